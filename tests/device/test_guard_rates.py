"""The personalization guard, measured: a bounded run of tools/guard_rates.py on the suite's
digits bundle (the tool runs 20 seeds; its numbers are quoted where a bound comes from them)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_tool

HOT = ("genuine_hot", "one_label_hot", "one_class_hot", "relabel_hot")  # Adam at 0.5: heads that forget


@pytest.fixture(scope="module")
def guard():
    return load_tool("guard_rates")


@pytest.fixture(scope="module")
def records(guard, digits_bundle):
    """Every scenario at batch sizes 10-100, 4 seeds, through the real Personalizer.commit with
    its default margins (112 cases; measure() also checks the tool's copy of the guard rule
    reproduces every real decision)."""
    bundle, halves = digits_bundle
    return guard.measure(bundle.path, halves.test, seeds=range(4), sizes=(10, 20, 50, 100))


def test_heads_that_destroy_the_factory_classes_are_refused(guard, records):
    stats = guard.rates(records)
    # tool, 20 seeds: 296 heads lost > 0.2 factory accuracy, none accepted
    assert stats["destroyed"] >= 40 and stats["destroyed_accepted"] == 0, stats
    hot = [r for r in records if r["scenario"] in HOT]
    assert hot and not any(r["accepted"] for r in hot)  # tool: 0 of 320 accepted
    assert all("forgets the factory classes" in r["reason"] or "below the active" in r["reason"] for r in hot)


def test_genuine_personalization_is_mostly_accepted(guard, records):
    genuine = [r for r in records if r["scenario"] == "genuine"]
    assert len(genuine) == 16
    # The truth (independent test set): a correctly labelled restyled batch really helps the
    # user and keeps the factory classes (tool: 80 of 80, mean gain +0.10 to +0.23).
    assert all(r["should_accept"] for r in genuine)
    # tool: 79 of 80 accepted (one rejection at N=20); here at most one of 16 may be refused
    assert np.mean([r["accepted"] for r in genuine]) >= 0.9


def test_the_guard_checks_can_fail(guard, digits_bundle):
    """The same measurements with the guard loosened or tightened break each bound above:
    margins of 1 commit the destroyed heads; margins of 0 refuse half the genuine batches."""
    bundle, halves = digits_bundle
    loose = guard.measure(
        bundle.path, halves.test, seeds=range(2), sizes=(20,), scenarios=["relabel_hot"], margin=1.0, forget_margin=1.0
    )
    assert guard.rates(loose)["destroyed_accepted"] == len(loose) == 2
    strict = guard.measure(
        bundle.path,
        halves.test,
        seeds=range(4),
        sizes=(20, 50, 100),
        scenarios=["genuine"],
        margin=0.0,
        forget_margin=0.0,
    )
    assert np.mean([r["accepted"] for r in strict]) < 0.9  # tool, 20 seeds: 0.4-0.6 per size
