"""The personalization guard on new users it was never tuned on: a bounded run of
tools/guard_rates.py (evaluation family only) on the suite's digits bundle. The tool runs
every kind, scenario, size and seed; its figures are in the README."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_tool

from edgetl.device import GuardPolicy


@pytest.fixture(scope="module")
def guard():
    return load_tool("guard_rates")


@pytest.fixture(scope="module")
def records(guard, digits_bundle):
    """Three evaluation-family kinds x every scenario x 10 and 50 examples per class, one seed,
    through the real Personalizer.decide (measure() also checks that the tool's replay of the
    rule reproduces every real decision)."""
    bundle, _ = digits_bundle
    kinds = guard.families()["evaluation"][:3]
    return guard.measure(bundle.path, kinds=kinds, sizes=(10, 50), seeds=range(1))


def test_the_families_are_fixed_disjoint_and_cover_every_kind(guard):
    fam = guard.families()
    tuning, evaluation = set(fam["tuning"]), set(fam["evaluation"])
    assert not tuning & evaluation
    assert tuning | evaluation == set(guard.KINDS) and len(guard.KINDS) >= 12
    assert len(tuning) >= 6 and len(evaluation) >= 6
    assert fam == guard.families()  # no randomness in the split


def test_every_kind_is_a_different_user(guard, digits_bundle):
    """Each kind really changes the digits (the factory head does worse on them), and draws
    every image with its own jitter (no two identical images from one source image)."""
    bundle, halves = digits_bundle
    x = np.asarray(halves.test.x[:40])
    for kind in guard.KINDS:
        a, b = guard.draw_style(kind, x, 0), guard.draw_style(kind, x, 1)
        assert a.shape == x.shape and a.dtype == np.uint8
        assert np.mean(np.abs(a.astype(float) - x)) > 3, kind
        if kind not in ("thin",):  # erosion alone is deterministic
            assert not np.array_equal(a, b), kind


def test_the_guard_meets_its_targets_on_users_it_was_not_tuned_on(guard, records):
    s = guard.rates(records)
    assert s["shuffled"] == 6 and s["shuffled_refused"] == 1.0, s
    assert s["forgetting"] >= 10 and s["forgetting_accepted"] == 0, s  # hot optimizers, relabelling
    genuine = [r for r in records if r["scenario"] == "genuine"]
    # the truth: correct labels help most of these users (a mild style gains less than 2 points)
    assert np.mean([r["helpful"] for r in genuine]) >= 0.5, [r["user_gain"] for r in genuine]
    # Correct labels are accepted, but for the price README states: the fitted replay rows keep their
    # 1% tolerance (the guard split's few rows cannot keep forgetting heads out alone), so a big
    # style change may be refused there (88 of 96 accepted on the evaluation family).
    refused = [r["reason"] for r in genuine if not r["accepted"]]
    assert len(refused) <= len(genuine) // 4 and all("the factory head was fitted on" in why for why in refused), (
        refused
    )
    correctly_labelled = [r for r in records if r["helpful"] and r["scenario"] != "shuffled"]
    assert np.mean([r["accepted"] for r in correctly_labelled]) >= 0.9, s


def test_every_decision_explains_itself(records):
    for r in records:
        assert r["reason"].startswith("accepted: " if r["accepted"] else "rejected: ")
        assert "factory classes:" in r["reason"] and " lost and " in r["reason"]


def test_the_guard_checks_can_fail(guard, records):
    """The same evidence under an opened guard (what ``--margin 1 --forget-margin 1
    --mislabel off`` does) accepts the forgetting heads and the shuffled batches, so each
    target above can fail."""
    opened = GuardPolicy(forget_tolerance=1.0, user_tolerance=1.0, mislabel="off")
    s = guard.rates(records, lambda r: guard.decide_again(r, opened))
    assert s["forgetting_accepted"] == s["forgetting"] and s["shuffled_refused"] == 0.0
    no_labels = GuardPolicy(mislabel="off")
    assert guard.rates(records, lambda r: guard.decide_again(r, no_labels))["shuffled_refused"] < 1.0
