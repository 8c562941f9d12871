"""The personalization guard: decide on evidence whether a candidate head may replace the active one.

Both heads are scored on the same held-out examples (the user's, and factory-class replay
examples shipped in the bundle), so the comparison is *paired*: only the examples one head
gets right and the other wrong (the discordant pairs) carry information about which is
better. The guard asks two questions, each answered by an exact one-sided binomial test
on the discordant pairs (McNemar's exact test), after granting a tolerated loss:

- **Does it forget the factory classes?** ``lost`` replay examples went from right to wrong,
  ``gained`` from wrong to right. The first ``tolerated = floor(forget_tolerance * n)``
  losses are granted; the rest are tested: under "no forgetting beyond the tolerance" each
  remaining discordant pair is a loss or a gain with probability 1/2, so
  ``p = P(Binomial(lost + gained - tolerated, 1/2) >= lost - tolerated)``. Forgetting is
  what that p-value shows below ``alpha``.
- **Is it worse for the user?** The same test on the user's held-out examples, with
  ``user_tolerance``.

Which factory examples: a bundle from a run with a guard split (``replay.npz``'s ``guard``
rows) judges forgetting on examples the factory head was never fitted on, where a candidate
can gain as well as lose. Those are few on a small dataset (a tenth of it), too few to see a
loss of 5 points alone, so the replay examples the factory head *was* fitted on (and the
candidate was not trained on) are tested too, as a second part (``memorized``) with a larger
tolerance: the factory head gets nearly all of them right, so any change of the head loses a
few of them without forgetting anything (tools/guard_memorized.py), and only a loss beyond
``memorized_tolerance`` is evidence. A bundle without guard rows judges on training examples
alone, with ``forget_tolerance`` (as before the guard split).

Why this and not a fixed margin on accuracies: with 50 held-out factory examples at 97%
accuracy, sampling noise alone moves accuracy by ~2.4 points, so a 3-point margin decided
by chance (issue 19: heads gaining a user 24-36 points were refused for losing 2 of 50).
The discordant pairs are what differs between the two heads; an exact binomial needs no
normal approximation at the handful of pairs a device sees. 2 of 50 lost and 0 gained is
p = 0.25 (noise); 10 of 50 lost and 0 gained is p = 0.001 (forgetting).

Why a tolerated loss on top of the test: with hundreds of replay examples, a real but
small loss (1-2 points, the price of adapting to a different style) becomes significant;
the tolerance says how much of it the product accepts. The defaults were chosen on the
tuning family of ``tools/guard_rates.py`` only (see there and the README for the rates on
its evaluation family).

A third check looks at the labels themselves (:func:`label_check`): users mislabel, and a
consistent mislabelling looks like a preference to the held-out test (the held-out labels
are as wrong as the training ones).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from edgetl._options import option
from edgetl.errors import InputError

# Chosen on the tuning family of tools/guard_rates.py (never on its evaluation family).
DEFAULT_ALPHA = 0.05
DEFAULT_FORGET_TOLERANCE = 0.01
# The memorized part's tolerance, chosen on the tuning family with a guard split of 0.1 (the
# defaults' bundles; tools/guard_rates.py --tune --guard-fraction 0.1): every tolerance above 0.01
# accepted more forgetting heads (0.03: 2, 0.1: 6, untested: 14 of 407), because the guard split's
# 45 examples alone cannot see a 5-point loss. So a head or tail may not lose more of what the
# factory head was fitted on than before the guard split; the guard rows add unbiased evidence.
DEFAULT_MEMORIZED_TOLERANCE = 0.01
DEFAULT_USER_TOLERANCE = 0.0
MISLABEL_POLICIES = ("refuse", "warn", "off")
# Below this many held-out examples a part's test cannot see a loss of THIN_LOSS: say so.
THIN_LOSS = 0.10


def binomial_tail(k: int, m: int) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(m, 1/2)``, exact (integers only)."""
    if k <= 0:
        return 1.0
    if k > m:
        return 0.0
    return math.fsum(math.comb(m, i) for i in range(k, m + 1)) / 2.0**m


# How a part is named in a reason; the factory parts are tested for a loss whatever they gained.
PART_NAMES = {
    "user": "your held-out examples",
    "factory": "factory classes",
    "memorized": "factory examples the factory head was fitted on",
}
FACTORY_PARTS = ("factory", "memorized")


@dataclass(frozen=True)
class PairedEvidence:
    """Two heads on the same ``n`` held-out examples of one part (user or factory classes)."""

    part: str  # "user" or "factory"
    n: int
    before: int  # examples the active head gets right
    after: int  # examples the candidate gets right
    lost: int  # right before, wrong after
    gained: int  # wrong before, right after
    tolerated: int  # losses granted before testing
    p_loss: float  # one-sided exact p-value of a loss beyond the tolerated one
    p_gain: float  # one-sided exact p-value of a gain (no tolerance): how sure the gain is
    thin: bool  # the test could not see a loss of THIN_LOSS of these examples
    # The class that lost most, tested alone (Bonferroni: its p-value times the number of classes).
    worst_class: str = ""
    worst_class_n: int = 0
    worst_class_lost: int = 0
    worst_class_gained: int = 0
    p_class: float = 1.0

    @property
    def change(self) -> float:
        return (self.after - self.before) / self.n if self.n else 0.0

    def describe(self) -> str:
        what = PART_NAMES.get(self.part, self.part)
        if not self.n:
            return f"{what}: none held out"
        text = f"{what}: {self.lost} of {self.n} lost and {self.gained} gained ({self.change * 100:+.1f} points)"
        if self.part in FACTORY_PARTS or self.lost > self.gained:
            text += f", p = {self.p_loss:.2g} for a loss beyond {self.tolerated} tolerated"
        else:
            text += f", p = {self.p_gain:.2g} for the gain"
        if self.worst_class_lost > self.worst_class_gained:
            text += (
                f"; class {self.worst_class!r}: {self.worst_class_lost} of {self.worst_class_n} lost and "
                f"{self.worst_class_gained} gained, p = {self.p_class:.2g} (Bonferroni: times the number of classes)"
            )
        return text + (" [thin evidence]" if self.thin else "")


def _p_loss(lost: int, gained: int, n: int, tolerance: float) -> tuple[int, float]:
    """Losses tolerated and the exact one-sided p-value of the losses beyond them."""
    tolerated = int(math.floor(tolerance * n + 1e-9))
    excess = lost - tolerated
    return tolerated, binomial_tail(excess, lost + gained - tolerated) if excess > 0 else 1.0


def paired(
    part: str,
    before_correct: np.ndarray,
    after_correct: np.ndarray,
    tolerance: float,
    labels: list[str] | np.ndarray | None = None,
) -> PairedEvidence:
    """The paired evidence from per-example correctness of the active and the candidate head;
    with ``labels``, the class that lost most is also tested alone.

    Why per class too: a head can wipe out much of one class while the others hold (one
    class consistently given another's label, measured on the tuning family: 11 of 353
    factory examples lost, 3.1 points overall, p = 0.06, most of them from one class). The
    worst class's test is corrected for having been picked among the classes (Bonferroni).
    """
    before = np.asarray(before_correct, dtype=bool)
    after = np.asarray(after_correct, dtype=bool)
    if before.shape != after.shape or before.ndim != 1:
        raise InputError(f"paired evidence needs two equal 1-d vectors, received {before.shape} and {after.shape}")
    n = int(before.size)
    lost_each, gained_each = before & ~after, ~before & after
    lost, gained = int(lost_each.sum()), int(gained_each.sum())
    tolerated, p_loss = _p_loss(lost, gained, n, tolerance)
    p_gain = binomial_tail(gained, lost + gained) if gained > lost else 1.0
    # The smallest all-loss outcome the test would call significant, against what it should see.
    needed = tolerated + next(k for k in range(1, 64) if 0.5**k < DEFAULT_ALPHA)
    thin = n == 0 or needed > THIN_LOSS * n
    worst: tuple = ("", 0, 0, 0, 1.0)
    if labels is not None and n:
        names = np.asarray(labels)
        classes = sorted(set(names.tolist()))
        for c in classes:
            mask = names == c
            nc, lc, gc = int(mask.sum()), int(lost_each[mask].sum()), int(gained_each[mask].sum())
            pc = min(1.0, _p_loss(lc, gc, nc, tolerance)[1] * len(classes))
            if (pc, -(lc - gc)) < (worst[4], -(worst[2] - worst[3])):
                worst = (c, nc, lc, gc, pc)
    return PairedEvidence(
        part, n, int(before.sum()), int(after.sum()), lost, gained, tolerated, p_loss, p_gain, thin, *worst
    )


@dataclass(frozen=True)
class LabelCheck:
    """How the user's labels on factory classes compare with the factory head's confident predictions.

    ``checked``: user examples labelled with a factory class whose factory prediction is
    confident; ``contradicted``: of those, the ones whose label differs from the
    prediction; ``top_pair``: the most frequent (label, predicted) contradiction and its
    count. ``suspicious`` says why the labels look wrong across the batch (the guard may
    refuse); ``warning`` says why one label looks consistently wrong (the guard only says so).
    """

    checked: int
    contradicted: int
    top_pair: tuple[str, str] | None
    top_pair_count: int
    suspicious: str
    warning: str = ""

    def describe(self) -> str:
        if not self.checked:
            return "labels: no confident factory prediction to compare with"
        text = f"labels: {self.contradicted} of {self.checked} contradict a confident factory prediction"
        return text + "".join(f"; {s}" for s in (self.suspicious, self.warning) if s)


# Label-check thresholds, chosen on the tuning family (tools/guard_rates.py --tune). There,
# correctly labelled users had at most 52% of confident predictions contradicted, shuffled
# batches at least 61%; consistently relabelled classes had all confident predictions of
# one class given one other label, correctly labelled users at most 86% of one class's.
CONFIDENT = 0.9  # a factory prediction this probable counts as confident
CONTRADICTED_SHARE = 0.6  # more than this share of confident predictions contradicted ...
MIN_CHECKED = 10  # ... out of at least this many (fewer: no verdict)
ONE_DIRECTION = 0.9  # this share of one class's confident predictions given one other label ...
MIN_ONE_DIRECTION = 5  # ... and at least this many of them


def label_check(
    labels: list[str],
    predicted: list[str],
    confidence: np.ndarray,
    *,
    gained: bool,
    confident: float = CONFIDENT,
    share: float = CONTRADICTED_SHARE,
    min_checked: int = MIN_CHECKED,
) -> LabelCheck:
    """Do the user's labels contradict the factory head where it is confident, in a way a
    change of style does not explain?

    A different style makes the factory head wrong on the user's examples, and a head
    trained on them then predicts the user's *held-out* examples better (``gained``: a
    significant gain, see :func:`generalizes`). Labels that are simply wrong do not
    generalize that way: shuffled labels leave the held-out score at chance. So the batch
    is ``suspicious`` when most confident predictions are contradicted and nothing was
    gained, or when every example carries one label the factory confidently disagrees with.

    One class consistently given another's label (every confident "7" labelled "1") is only
    a ``warning``: it may be a user's deliberate choice, it does generalize, and when it
    costs the factory classes the per-class forgetting test refuses the head.
    """
    is_confident = np.asarray(confidence) >= confident
    checked = int(is_confident.sum())
    counts: dict[tuple[str, str], int] = {}
    per_predicted: dict[str, int] = {}
    for label, pred, conf in zip(labels, predicted, is_confident):
        if conf:
            per_predicted[pred] = per_predicted.get(pred, 0) + 1
            if label != pred:
                counts[(label, pred)] = counts.get((label, pred), 0) + 1
    contradicted = sum(counts.values())
    top = max(counts, key=counts.get) if counts else None
    suspicious = warning = ""
    if checked >= min_checked and contradicted > share * checked:
        if len(set(labels)) == 1:
            suspicious = f"every example is labelled {labels[0]!r}, while the factory head is confident otherwise"
        elif not gained:
            suspicious = (
                "most labels contradict confident factory predictions and the head trained on them predicts your "
                "held-out examples no better: the labels may be wrong"
            )
    if top and counts[top] >= MIN_ONE_DIRECTION and counts[top] >= ONE_DIRECTION * per_predicted[top[1]]:
        warning = (
            f"warning: {counts[top]} of the {per_predicted[top[1]]} examples the factory head confidently calls "
            f"{top[1]!r} are labelled {top[0]!r}; check that label"
        )
    return LabelCheck(checked, contradicted, top, counts.get(top, 0) if top else 0, suspicious, warning)


@dataclass(frozen=True)
class GuardPolicy:
    """How the guard decides (see the module docstring).

    Args:
        alpha: significance level of the one-sided exact tests.
        forget_tolerance: share of the held-out factory examples a candidate may lose net
            before the loss is tested (1 opens the guard on the factory side).
        memorized_tolerance: the same on the ``memorized`` part (replay examples the factory
            head was fitted on, tested beside a guard split; see the module docstring). A
            ``forget_tolerance`` of 1 opens this part too.
        user_tolerance: the same on the user's held-out examples (1 opens that side).
        mislabel: ``"refuse"`` a head trained on labels that look wrong, ``"warn"`` and
            decide on the other checks, or ``"off"``.
    """

    alpha: float = option(
        DEFAULT_ALPHA, help="significance level of the guard's exact tests: a loss is forgetting when p < alpha"
    )
    forget_tolerance: float = option(
        DEFAULT_FORGET_TOLERANCE,
        flag="--forget-margin",
        help="share of the held-out factory-class examples a new head may lose before the loss is tested "
        "(1 opens the guard's factory side, --memorized-margin included)",
    )
    memorized_tolerance: float = option(
        DEFAULT_MEMORIZED_TOLERANCE,
        flag="--memorized-margin",
        help="share of the factory-class examples the factory head was fitted on that a new head may lose before "
        "the loss is tested (bundles with a guard split; 1 opens that side)",
    )
    user_tolerance: float = option(
        DEFAULT_USER_TOLERANCE,
        flag="--margin",
        help="share of your held-out examples a new head may lose before the loss is tested (1 opens the guard)",
    )
    mislabel: str = option(
        "refuse",
        choices=MISLABEL_POLICIES,
        help="a head trained on labels that contradict confident factory predictions: refuse it, or warn",
    )

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise InputError(f"alpha must be in (0, 1), received {self.alpha}")
        for name in ("forget_tolerance", "memorized_tolerance", "user_tolerance"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise InputError(f"{name} must be in [0, 1], received {value}")
        if self.mislabel not in MISLABEL_POLICIES:
            raise InputError(f"mislabel must be one of {MISLABEL_POLICIES}, received {self.mislabel!r}")


def generalizes(user: PairedEvidence, policy: GuardPolicy) -> bool:
    """Does the head trained on the user's labels predict their held-out examples better, by
    the evidence (a significant gain)? A chance gain on a few held-out examples is not enough:
    shuffled labels on the tuning family "gained" 1-2 of 10 held-out examples 6 times in 96."""
    return user.p_gain < policy.alpha


@dataclass(frozen=True)
class GuardDecision:
    """The verdict with the counts behind it (``evidence()`` is what the store history keeps)."""

    accepted: bool
    reason: str
    user: PairedEvidence
    factory: PairedEvidence
    labels: LabelCheck
    policy: GuardPolicy
    memorized: PairedEvidence | None = None

    def evidence(self) -> dict:
        out = {
            "accepted": self.accepted,
            "reason": self.reason,
            "user": asdict(self.user),
            "factory": asdict(self.factory),
            "labels": asdict(self.labels),
            "policy": asdict(self.policy),
        }
        if self.memorized is not None:
            out["memorized"] = asdict(self.memorized)
        return out


def decide(
    user: PairedEvidence,
    factory: PairedEvidence,
    labels: LabelCheck,
    policy: GuardPolicy,
    memorized: PairedEvidence | None = None,
) -> GuardDecision:
    """Refuse a candidate that forgets the factory classes (on the held-out factory examples,
    or beyond ``memorized_tolerance`` on the ``memorized`` part) or is worse for the user, by
    the evidence; refuse (or warn about) one trained on labels that look wrong."""
    why, said = [], set()
    if policy.forget_tolerance >= 1:  # --forget-margin 1 opens the whole factory side, as it always did
        memorized = None
    for part in (factory, memorized):
        if part is not None and part.n and min(part.p_loss, part.p_class) < policy.alpha:
            why.append(f"it forgets the factory classes ({part.describe()} < {policy.alpha})")
            said.add(part.part)
    if user.n and user.p_loss < policy.alpha:
        why.append(f"it is worse on your own examples ({user.describe()} < {policy.alpha})")
        said.add("user")
    if labels.suspicious and policy.mislabel == "refuse":
        why.append(f"the labels look wrong ({labels.describe()})")
        said.add("labels")
    facts = [e.describe() for e in (user, factory, memorized) if e is not None and e.n and e.part not in said]
    if labels.checked and "labels" not in said:
        facts.append(labels.describe())
    if why:
        reason = "rejected: " + "; and ".join(why) + "".join(f"; {f}" for f in facts)
        return GuardDecision(False, reason, user, factory, labels, policy, memorized)
    notes = []
    if not factory.n:
        notes.append("the bundle has no replay examples, so forgetting was not checked")
    elif factory.thin:
        notes.append(f"evidence is thin: {factory.n} factory examples cannot show a loss under {THIN_LOSS:.0%}")
    if user.n == 0:
        notes.append("none of your examples could be held out (give at least 2 per class)")
    if labels.suspicious:
        notes.append("warning: the labels look wrong")
    reason = "accepted: " + ("; ".join(facts) or "no held-out examples") + "".join(f"; {n}" for n in notes)
    return GuardDecision(True, reason, user, factory, labels, policy, memorized)


FORGOTTEN = "<forgotten>"


def redact_text(text: str, label: str | None) -> str:
    """``text`` with the quoted class name ``label`` (every quoted name, for ``None``) forgotten:
    guard reasons name classes as Python reprs (``class '7'``)."""
    if label is None:
        return re.sub(r"'[^']*'", f"'{FORGOTTEN}'", text)
    return text.replace(repr(label), f"'{FORGOTTEN}'")


def redact(evidence: dict, label: str | None) -> dict:
    """Guard evidence (:meth:`GuardDecision.evidence`) that no longer names ``label`` (any
    label, for ``None``): what ``store forget`` keeps of a decision."""
    out = json.loads(json.dumps(evidence))
    named = lambda v: v is not None and (label is None or v == label)  # noqa: E731
    labels = out.get("labels") or {}
    if labels.get("top_pair") and any(named(v) for v in labels["top_pair"]):
        labels["top_pair"] = [FORGOTTEN if named(v) else v for v in labels["top_pair"]]
    for part in ("user", "factory", "memorized"):
        if named((out.get(part) or {}).get("worst_class") or None):
            out[part]["worst_class"] = FORGOTTEN
    for holder, key in ((out, "reason"), (labels, "suspicious"), (labels, "warning")):
        if isinstance(holder.get(key), str):
            holder[key] = redact_text(holder[key], label)
    return out


# What a commit decided, and the held-out scoring both judges (head and tail) share.
SCORE_NAMES = {"user": "user", "factory": "replay"}  # held-out part -> its key in *_scores


def part_scores(hits: dict[str, np.ndarray], parts: dict[str, tuple[Any, list[str]]]) -> dict[str, float]:
    """Class-balanced accuracy of each scored part (``user``, ``replay``) from per-example hits;
    the ``memorized`` part is evidence only, not a score."""
    return {
        SCORE_NAMES[p]: _balanced_accuracy(hits[p], parts[p][1]) for p in parts if p in SCORE_NAMES and len(parts[p][1])
    }


@dataclass(frozen=True)
class CommitResult:
    """What the guard decided, and why. ``*_accuracy`` is the mean of the held-out user and
    held-out factory-class (replay) accuracies, ``*_scores`` has each part; ``evidence`` has
    the counts the decision rests on (see :mod:`edgetl.device._guard`), as the store
    history keeps them."""

    accepted: bool
    version: int  # the active version after the call
    candidate_accuracy: float
    active_accuracy: float
    margin: float
    reason: str
    candidate_scores: dict = field(default_factory=dict)
    active_scores: dict = field(default_factory=dict)
    evidence: dict = field(default_factory=dict)


def _balanced(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices in which every class appears as often as the largest one (smaller classes'
    examples repeated, in a seeded order)."""
    if not len(labels):
        return np.zeros(0, np.int64)
    groups = [np.flatnonzero(labels == name) for name in sorted(set(labels.tolist()))]
    most = max(len(g) for g in groups)
    return np.sort(np.concatenate([np.resize(rng.permutation(g), most) for g in groups]))


def _balanced_accuracy(correct: np.ndarray, labels: Sequence[str]) -> float:
    """The mean of per-class recalls from per-example correctness."""
    truth = np.asarray(list(labels))
    return float(np.mean([np.mean(correct[truth == c]) for c in sorted(set(truth.tolist()))]))
