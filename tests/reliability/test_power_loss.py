"""Power-loss simulation of every store operation (tools/power_loss.py, the way SQLite tests
its journal): the store writes through edgetl._atomic.FS; a simulated file system keeps, at
each crash point, only what was fsynced (and torn mixes of the rest). Every crash point of a
commit, keeping examples, rollback, reset, forget and migration must leave the store at the
state before or after the operation; after it returns, everything must be durable. Then each
fsync the store makes is dropped in turn, and the same simulation must find the damage."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from conftest import load_tool


@pytest.fixture(scope="module")
def power_loss():
    return load_tool("power_loss")


@pytest.fixture(scope="module")
def stats(power_loss, digits_bundle, lifecycle_bundles):
    same, other = lifecycle_bundles
    return power_loss.run(digits_bundle[0].path, same.path, other.path, worlds=4, drop_fsync=True)


def test_every_crash_point_of_every_operation_leaves_a_consistent_store(power_loss, stats):
    power_loss.report(stats)
    by_name = {r["scenario"]: r for r in stats["scenarios"]}
    assert set(by_name) == {
        "commit, new store",
        "commit",
        "keep examples, first",
        "keep examples",
        "rollback",
        "reset",
        "forget one class",
        "forget everything",
        "migrate, same backbone",
        "migrate, retrained",
    }
    for r in stats["scenarios"]:
        assert r["steps"] >= 5 and r["worlds"] == 4 * (r["steps"] + 1), r
        assert r["failures"] == [], r["failures"][:3]
        assert r["before"] != r["after"], r  # each operation really changed the store
    assert sum(r["crash_points"] for r in stats["scenarios"]) >= 150


def test_dropping_any_one_fsync_is_caught(stats):
    sites = {site.rsplit(":", 1)[0] for site in stats["fsync_sites"]}
    # Every kind of fsync the store relies on was exercised: file data, directory entries,
    # new directories, zeroed (forgotten) data, the example store's directory.
    assert {
        "_atomic.py:replace_file",
        "_atomic.py:make_dirs",
        "_atomic.py:zero_fd",
        "_examples.py:_commit",
    } <= sites, sites
    missed = [site for site, found in stats["dropped"].items() if found is None]
    assert not missed, f"dropping these fsyncs broke nothing the simulation checks: {missed}"
    assert len(stats["dropped"]) == len(stats["fsync_sites"]) >= 5


def test_the_simulation_sees_a_pointer_written_before_its_version_file(power_loss, digits_bundle, tmp_path):
    """A commit in the wrong order (ACTIVE.json first, the version file second) leaves, at
    the crash point between them, a pointer to a missing file: the checks catch ordering bugs."""
    from edgetl.device._store import HeadStore, bundle_identity

    def pointer_first(self, head, metrics=None):
        pointer = self._pointer()
        number = self._new_version_number(pointer)
        buf = io.BytesIO()
        np.savez(buf, **head.arrays(), labels=np.asarray(head.labels, dtype=str))
        entry = {"version": number, "action": "commit", "labels": list(head.labels), "metrics": metrics or {}}
        name = f"v{number:06d}.npz"
        self._write_pointer(
            {
                **pointer,
                "active": number,
                "file": name,
                "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                "stack": [*pointer["stack"], pointer["active"]],
                "history": [*pointer["history"], entry],
            }
        )
        self._write(name, buf.getvalue())
        return number

    bundle = digits_bundle[0]
    (scenario,) = [s for s in power_loss.scenarios(bundle) if s.name == "commit"]
    original, HeadStore.commit = HeadStore.commit, pointer_first
    try:
        result = power_loss.check_scenario(scenario, {bundle_identity(bundle): bundle}, tmp_path, worlds=2)
    finally:
        HeadStore.commit = original
    assert any("store does not open" in f for f in result["failures"]), result["failures"][:3]
