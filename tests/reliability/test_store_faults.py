"""Bounded runs of tools/fault_inject.py (strace fault injection into the five store
operations, checked through the CLI) and tools/race_test.py (several processes on one
store); the full runs are the tools' defaults."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import load_tool

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")


@pytest.fixture(scope="module")
def user_npz(tmp_path_factory, restyled_user):
    (x, y), _ = restyled_user
    path = tmp_path_factory.mktemp("faults") / "user.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.mark.slow  # strace sweeps every system call of five operations, ~100 s
@needs_strace
def test_injected_io_errors_leave_the_state_before_or_after_and_say_which(
    tmp_path, digits_bundle, lifecycle_bundles, user_npz
):
    fi = load_tool("fault_inject")
    bundle, new = digits_bundle[0].path, lifecycle_bundles[1].path
    template, part = fi.make_template(bundle, user_npz, tmp_path)
    s = fi.Setup(bundle, new, part, template, tmp_path)
    # A sync in the middle of each operation (the commit's, or a read's) and its last write.
    picked = [("fdatasync", "EIO", 3), ("pwrite64", "ENOSPC", -1)]
    results = fi.sweep(s, list(fi.OPS), jobs=2, picked=picked)
    assert results["failures"] == [], results["failures"]
    assert results["cases"] == 5 * 2, results["by_op"]  # every operation syncs and writes
    assert sum(n for outcome, n in results["outcomes"].items() if outcome.startswith("ok")) == results["cases"]


@pytest.fixture(scope="module")
def tail_faults(tmp_path_factory, tail_bundle, tail_migration_bundles, user_npz):
    """The sweep's setup on a bundle with a trainable tail: a template store with two tail
    versions (head and layer) and kept examples; migrate moves to v2 of the same run, whose
    tail files let the tail carry over (a tails row written in the migration's transaction)."""
    fi = load_tool("fault_inject")
    work = tmp_path_factory.mktemp("tail_faults")
    template, part = fi.make_template(tail_bundle[0], user_npz, work, adapt="tail")
    return fi.Setup(tail_bundle[0], tail_migration_bundles[0].path, part, template, work, adapt="tail")


@pytest.mark.slow  # strace on the three operations that write the tails table, ~25 s
@needs_strace
def test_injected_io_errors_during_tail_writes_leave_the_previous_version_whole(tail_faults):
    """personalize --adapt tail (a new version and its tails row), migrate (the tail carried
    over) and forget (tails rows deleted with their versions), each failed inside the write
    of the tail's pages (the middle pwrite64: a personalize writes ~76 WAL frames, 64 of
    them the layer's 256 KiB, then checkpoints): the store is the one before (both earlier
    tail versions whole: `store verify` checks every version's and tail's sha256 and lists
    the versions holding a tail) or the one after, and says which."""
    fi = load_tool("fault_inject")
    before, _ = fi.state(fi.fresh(tail_faults, "tails"))
    assert "verified (with a trained tail layer: [1, 2])" in before, before
    results = fi.sweep(tail_faults, ["personalize", "migrate", "forget"], jobs=2, picked=[("pwrite64", "EIO", 0.5)])
    assert results["failures"] == [], results["failures"]
    assert results["cases"] == 3, results["by_op"]
    # each fault hit its transaction: rolled back, said so, and an uninjected rerun completed it
    assert all(outcome.startswith("ok: before") for outcome in results["outcomes"]), results["outcomes"]
    assert results["by_op"]["personalize"]["syscalls"]["pwrite64"] >= 64, results["by_op"]  # the tail's pages
    assert sum(n for outcome, n in results["outcomes"].items() if outcome.startswith("ok")) == results["cases"]


@pytest.mark.slow  # a template and one strace case, ~10 s
@needs_strace
def test_a_store_older_than_tails_gets_the_table_in_its_first_tail_commit_or_not_at_all(
    tmp_path, tail_faults, user_npz
):
    """A store made before issue 24 has no tails table; its first tail commit creates it in
    the commit's own transaction. Failed inside the tail's pages, the store is the old one
    (no table, both head versions whole) or the new one."""
    import sqlite3

    fi = load_tool("fault_inject")
    s = tail_faults
    template, part = fi.make_template(s.bundle, user_npz, tmp_path, adapt="head")
    with sqlite3.connect(template / "store.db") as db:
        db.execute("DROP TABLE tails")  # the schema of a store made before tails existed
    old = fi.Setup(s.bundle, s.new_bundle, part, template, tmp_path, adapt="tail")
    before, _ = fi.state(fi.fresh(old, "old"))
    assert "tail layer" not in before, before
    results = fi.sweep(old, ["personalize"], picked=[("pwrite64", "EIO", 0.5)])
    assert results["failures"] == [] and results["cases"] == 1, results
    assert all(outcome.startswith("ok: before") for outcome in results["outcomes"]), results["outcomes"]


@needs_strace
def test_the_fault_check_sees_a_lie(tmp_path, digits_bundle, user_npz):
    """run_case refuses a message contradicted by the state: an operation that ran without
    a fault but whose 'before' state is made to differ says it succeeded, yet the state is
    not the one after."""
    fi = load_tool("fault_inject")
    bundle = digits_bundle[0].path
    template, part = fi.make_template(bundle, user_npz, tmp_path)
    s = fi.Setup(bundle, bundle, part, template, tmp_path)
    before, _ = fi.state(fi.fresh(s, "b"))
    problem = fi.run_case(s, "rollback", ("fdatasync", "EIO", 10_000), before, "not the after-state")
    assert "neither the one before nor the one after" in problem


def test_concurrent_personalize_rollback_and_forget_lose_nothing(tmp_path, digits_bundle, user_npz):
    stats = load_tool("race_test").run(digits_bundle[0].path, user_npz, tmp_path / "store", procs=3, ops=12)
    assert stats["problems"] == [], stats["problems"]
    assert stats["commits"] > 5 and stats["forgets"] > 0 and stats["rollbacks"] > 0, stats
