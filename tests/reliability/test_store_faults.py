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
