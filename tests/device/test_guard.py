"""The guard's decision rule on evidence the test controls, checked against an independent
reference (scipy's exact binomial test), then on real users built in the test."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binomtest

from edgetl.device import GuardPolicy
from edgetl.device._guard import binomial_tail, decide, label_check, paired
from edgetl.errors import InputError


def _evidence(part: str, n: int, lost: int, gained: int, *, right: int | None = None, tolerance: float = 0.02):
    """``n`` examples: ``lost`` right -> wrong, ``gained`` wrong -> right, the rest right by both
    (or ``right`` of them)."""
    before = np.zeros(n, bool)
    after = np.zeros(n, bool)
    before[:lost] = True
    after[lost : lost + gained] = True
    rest = slice(lost + gained, n if right is None else lost + gained + right)
    before[rest] = after[rest] = True
    return paired(part, before, after, tolerance)


NO_LABEL_DOUBT = label_check([], [], np.zeros(0), gained=True)


@pytest.mark.parametrize("k,m", [(0, 0), (1, 1), (2, 2), (3, 7), (10, 10), (15, 40), (60, 100)])
def test_binomial_tail_matches_scipy(k, m):
    assert binomial_tail(k, m) == pytest.approx(binomtest(k, m, 0.5, alternative="greater").pvalue if m else 1.0)


def test_a_helpful_head_that_loses_one_or_two_of_fifty_factory_examples_is_accepted():
    user = _evidence("user", 25, 0, 9, tolerance=0.0)
    for lost in (1, 2):
        factory = _evidence("factory", 50, lost, 0, tolerance=0.0)
        assert factory.p_loss == pytest.approx(0.5**lost)  # 2 of 50 lost, 0 gained: p = 0.25
        verdict = decide(user, factory, NO_LABEL_DOUBT, GuardPolicy(forget_tolerance=0.0))
        assert verdict.accepted, verdict.reason
        assert f"{lost} of 50 lost and 0 gained" in verdict.reason and "9 gained" in verdict.reason


def test_a_head_that_loses_ten_of_fifty_factory_examples_is_refused():
    user = _evidence("user", 25, 0, 9, tolerance=0.0)
    factory = _evidence("factory", 50, 10, 0)
    verdict = decide(user, factory, NO_LABEL_DOUBT, GuardPolicy())
    assert not verdict.accepted
    assert "forgets the factory classes" in verdict.reason and "10 of 50 lost" in verdict.reason
    # the evidence is kept as the history keeps it: counts, p-values and the policy
    ev = verdict.evidence()
    assert ev["factory"]["lost"] == 10 and ev["factory"]["p_loss"] < 0.01 and ev["policy"]["alpha"] == 0.05


def test_losses_offset_by_gains_are_not_forgetting():
    """McNemar looks at the discordant pairs: 10 lost and 9 gained is a reshuffle, not a loss."""
    factory = _evidence("factory", 50, 10, 9, tolerance=0.0)
    assert factory.p_loss > 0.3
    assert decide(_evidence("user", 20, 0, 3), factory, NO_LABEL_DOUBT, GuardPolicy()).accepted


def test_the_tolerance_grants_a_small_real_loss_on_many_examples():
    """On 400 held-out examples, 10 lost and 0 gained is significant at tolerance 0 and within
    a 2% tolerance (8 granted, then 2 of 2: p = 0.25)."""
    strict = _evidence("factory", 400, 10, 0, tolerance=0.0)
    tolerant = _evidence("factory", 400, 10, 0, tolerance=0.02)
    assert strict.p_loss < 0.01 and tolerant.tolerated == 8 and tolerant.p_loss == pytest.approx(0.25)


def test_a_user_part_that_gets_worse_is_refused_and_thin_evidence_is_said():
    user = _evidence("user", 20, 8, 0, tolerance=0.0)
    verdict = decide(user, _evidence("factory", 300, 0, 0), NO_LABEL_DOUBT, GuardPolicy())
    assert not verdict.accepted and "worse on your own examples" in verdict.reason
    few = decide(_evidence("user", 4, 0, 1), _evidence("factory", 20, 0, 0), NO_LABEL_DOUBT, GuardPolicy())
    assert few.accepted and "evidence is thin" in few.reason


def test_forcing_the_guard_open_accepts_anything_but_labels():
    """Tolerances of 1 (``--margin 1 --forget-margin 1``) grant every loss."""
    opened = GuardPolicy(forget_tolerance=1.0, user_tolerance=1.0)
    user, factory = _evidence("user", 20, 20, 0, tolerance=1.0), _evidence("factory", 50, 50, 0, tolerance=1.0)
    assert decide(user, factory, NO_LABEL_DOUBT, opened).accepted


def test_the_label_check_sees_shuffled_and_one_label_batches_but_not_a_style_change():
    rng = np.random.default_rng(0)
    classes = list("56789")
    truth = [classes[i % 5] for i in range(50)]
    conf = np.full(50, 0.99)
    shuffled = list(rng.permutation(truth))
    assert label_check(shuffled, truth, conf, gained=False).suspicious
    assert label_check(["5"] * 50, truth, conf, gained=True).suspicious.startswith("every example is labelled")
    # a user whose style the factory gets wrong, but the labels generalize (held-out gain)
    style = [truth[i] if i % 3 else classes[(classes.index(truth[i]) + 1) % 5] for i in range(50)]
    assert not label_check(truth, style, conf, gained=True).suspicious
    # unconfident predictions are not evidence against the labels
    assert not label_check(shuffled, truth, np.full(50, 0.5), gained=False).suspicious


def test_policy_and_evidence_refuse_bad_input():
    with pytest.raises(InputError, match="alpha must be in"):
        GuardPolicy(alpha=0)
    with pytest.raises(InputError, match="forget_tolerance must be in"):
        GuardPolicy(forget_tolerance=1.5)
    with pytest.raises(InputError, match="mislabel must be"):
        GuardPolicy(mislabel="maybe")
    with pytest.raises(InputError, match="two equal 1-d vectors"):
        paired("user", np.ones(3, bool), np.ones(4, bool), 0.0)


def test_forgetting_a_label_redacts_it_from_the_evidence():
    from edgetl.device._guard import redact

    labels = label_check(["7"] * 6 + ["5"] * 6, ["1"] * 6 + ["5"] * 6, np.full(12, 0.99), gained=True)
    factory = paired(
        "factory", np.ones(40, bool), np.r_[np.zeros(8, bool), np.ones(32, bool)], 0.0, ["7"] * 20 + ["1"] * 20
    )
    verdict = decide(_evidence("user", 10, 0, 3), factory, labels, GuardPolicy())
    assert "'7'" in verdict.reason and "'1'" in verdict.reason
    kept = json.dumps(redact(verdict.evidence(), "7"))
    assert "'7'" not in kept and '"7"' not in kept and "'1'" in kept and "<forgotten>" in kept
    everything = json.dumps(redact(verdict.evidence(), None))
    assert "'1'" not in everything and '"1"' not in everything


def test_the_worst_class_p_value_says_it_is_corrected():
    """8 of class '7''s 20 examples lost: the class's own test, times the 2 classes tested, in words."""
    factory = paired(
        "factory", np.ones(40, bool), np.r_[np.zeros(8, bool), np.ones(32, bool)], 0.0, ["7"] * 20 + ["1"] * 20
    )
    assert factory.worst_class == "7" and factory.p_class == pytest.approx(min(1.0, 2 * 0.5**8))
    assert "class '7': 8 of 20 lost and 0 gained, p = 0.0078 (Bonferroni: times the number of classes)" in (
        factory.describe()
    )


def test_the_memorized_part_is_tested_beyond_its_own_larger_tolerance():
    """Beside a guard split, the replay rows the factory head was fitted on are a second factory
    part: losing 3% of 200 (the drift of any new head there) passes its 3% tolerance, losing 10%
    is forgetting, and a reason names the part; without the part, decide is as before."""
    user, factory = _evidence("user", 25, 0, 9, tolerance=0.0), _evidence("factory", 50, 2, 2, tolerance=0.01)
    policy = GuardPolicy(memorized_tolerance=0.03)
    drift = _evidence("memorized", 200, 6, 0, tolerance=policy.memorized_tolerance)
    verdict = decide(user, factory, NO_LABEL_DOUBT, policy, drift)
    assert verdict.accepted and "factory examples the factory head was fitted on: 6 of 200 lost" in verdict.reason
    assert verdict.evidence()["memorized"]["lost"] == 6
    forgot = _evidence("memorized", 200, 20, 0, tolerance=policy.memorized_tolerance)
    verdict = decide(user, factory, NO_LABEL_DOUBT, policy, forgot)
    assert not verdict.accepted
    assert "it forgets the factory classes (factory examples the factory head was fitted on: 20 of 200" in (
        verdict.reason
    )
    opened = GuardPolicy(memorized_tolerance=1.0)
    assert decide(user, factory, NO_LABEL_DOUBT, opened, _evidence("memorized", 200, 20, 0, tolerance=1.0)).accepted
    # --forget-margin 1 opens the whole factory side, as it did before the memorized part
    assert decide(user, factory, NO_LABEL_DOUBT, GuardPolicy(forget_tolerance=1.0), forgot).accepted
    assert "memorized" not in decide(user, factory, NO_LABEL_DOUBT, policy).evidence()
    with pytest.raises(InputError, match="memorized_tolerance must be in"):
        GuardPolicy(memorized_tolerance=-0.1)
