"""Head-only personalization on the device, with a guarded, crash-safe commit.

    >>> clf = Classifier.open("digits.edgetl", store="heads/")
    >>> p = Personalizer(clf, "heads/")
    >>> p.add_examples(images, ["7", "7", "1", ...])   # each embedded once, cached
    >>> p.add_class("smiley", smiley_images)          # imprinted, then trained
    >>> p.train()                                     # runs the bundle's train graph
    >>> p.commit()                                    # guarded; the store keeps versions
    CommitResult(accepted=True, version=3, ...)

Training is executed by the runtime (the bundle's training loop graph in onnxruntime, or
LiteRT's ``train_steps`` signature); numpy only plans the batches. Part of the user's
examples and most of the bundle's replay buffer (examples of the factory classes) are held
out; the guard (:mod:`edgetl.device._guard`) scores the active and the candidate head on
them and refuses a candidate when the paired evidence shows it forgets the factory classes
or is worse for the user, or when its labels look wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from edgetl._options import option
from edgetl.bundle import _contract as C
from edgetl.device._classifier import Classifier
from edgetl.device._guard import (
    SCORE_NAMES,
    CommitResult,
    GuardPolicy,
    LabelCheck,
    _balanced,
    _balanced_accuracy,
    generalizes,
    label_check,
    paired,
    part_scores,
)
from edgetl.device._guard import decide as decide_guard
from edgetl.device._head import HeadState, TrainSettings
from edgetl.device._store import HeadStore
from edgetl.device._tail import ADAPT, check_adapt
from edgetl.device._tail import personalize as personalize_adapting
from edgetl.errors import BundleError, InputError, StoreError, describe


@dataclass(frozen=True)
class _Factory:
    number: int
    head: HeadState


DEFAULT_HOLDOUT = 0.25
# Replay examples per factory class trained on (against forgetting); the rest of the bundle's
# replay buffer is held out to judge forgetting (more held out = a sharper guard).
DEFAULT_REPLAY_PER_CLASS = 10


def check_holdout(fraction: float) -> None:
    """The held-out share a Personalizer accepts (its own check and PersonalizeOptions')."""
    if not 0 <= fraction < 1:
        raise InputError(f"holdout_fraction must be in [0, 1), received {fraction}")


@dataclass(frozen=True)
class PersonalizeOptions:
    """What a personalization does besides training (:class:`TrainSettings`) and judging
    (:class:`GuardPolicy`): the :class:`Personalizer`'s ``keep_examples`` and
    ``holdout_fraction``, and :func:`edgetl.device._tail.personalize`'s ``adapt`` and
    ``add_classes``. ``edgetl personalize`` takes each field as a flag (:mod:`edgetl._options`)."""

    keep_examples: bool = option(
        True,
        flag="--no-keep-examples",
        help="do not keep the examples in the store (a new bundle cannot rebuild the head)",
    )
    add_classes: bool = option(False, help="labels the head does not know become new classes (up to its capacity)")
    adapt: str = option(
        "head",
        choices=ADAPT,
        help="what trains: the head; the head and the backbone's last layer (bundles with a tail); or auto: "
        "the tail when the guard's evidence prefers it to the head (training settings below apply to the head)",
    )
    holdout_fraction: float = option(
        DEFAULT_HOLDOUT, flag="--holdout", help="share of the examples held out for the guard"
    )

    def __post_init__(self) -> None:
        for name in ("keep_examples", "add_classes"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, received {name}={describe(getattr(self, name))}")
        check_adapt(self.adapt)
        if isinstance(self.holdout_fraction, bool) or not isinstance(self.holdout_fraction, (int, float)):
            raise InputError(f"holdout_fraction must be a number in [0, 1), received {describe(self.holdout_fraction)}")
        check_holdout(self.holdout_fraction)


class Personalizer:
    """Collects labelled examples, trains a candidate head, and commits it if it is no worse.

    Args:
        classifier: the :class:`Classifier` whose head is personalized (its backend trains).
        store: a :class:`HeadStore` or its directory.
        holdout_fraction: share of each class's user examples kept out of training for the guard.
        replay_per_class: replay examples per factory class trained on (against forgetting);
            the rest of the bundle's replay buffer is held out, so the guard can see forgetting.
        guard: how the guard decides (:class:`GuardPolicy`: one-sided exact tests on the
            held-out examples both heads are scored on, with tolerated losses).
        margin: shorthand for ``guard.user_tolerance``: the share of the user's held-out
            examples a candidate may lose net before the loss is tested (1 opens it).
        forget_margin: shorthand for ``guard.forget_tolerance``: the same for the held-out
            factory-class examples (1 opens it).
        settings: training hyperparameters.
    """

    def __init__(
        self,
        classifier: Classifier,
        store: HeadStore | str | os.PathLike[str] | None,
        *,
        keep_examples: bool = True,
        holdout_fraction: float = DEFAULT_HOLDOUT,
        replay_per_class: int = DEFAULT_REPLAY_PER_CLASS,
        guard: GuardPolicy = GuardPolicy(),
        margin: float | None = None,
        forget_margin: float | None = None,
        settings: TrainSettings = TrainSettings(),
    ) -> None:
        check_holdout(holdout_fraction)
        if margin is not None:
            guard = replace(guard, user_tolerance=margin)
        if forget_margin is not None:
            guard = replace(guard, forget_tolerance=forget_margin)
        self.guard = guard
        self.classifier = classifier
        self.keep_examples = keep_examples
        if store is None:  # train and judge only (a migration's candidate): nothing to commit to
            self.store = None
            active = _Factory(0, classifier.factory)
        else:
            self.store = store if isinstance(store, HeadStore) else HeadStore(store, classifier.bundle)
            active = self.store.active()
        classifier.set_head(active.head, active.number)
        self._raw: list[tuple[np.ndarray, list[str]]] = []  # the user's inputs, kept at commit
        self._embed = classifier.embed  # a TailPersonalizer embeds through its trunk pass instead (one pass)
        self.holdout_fraction, self.settings = holdout_fraction, settings
        self._emb = np.zeros((0, classifier.factory.W.shape[0]), np.float32)
        self._labels: list[str] = []
        self._base = active.head  # the head being extended (new classes) before training
        self.candidate: HeadState | None = None
        self.replay_emb, self.replay_labels = self._load_replay(replay_per_class)

    # ------------------------------------------------------------------ data

    def _load_replay(self, per_class: int) -> tuple[np.ndarray, list[str]]:
        """The bundle's whole replay buffer; ``per_class`` of each class are trained on.
        Sets ``replay_guard``: per row, whether it is a guard row (held out of the factory
        head's training: only those judge forgetting), or ``None`` for a bundle without them."""
        self._replay_train_per_class = max(0, per_class)
        self.replay_guard: np.ndarray | None = None
        found = self.classifier.bundle.artifacts("replay", "npz")
        if not found:
            return np.zeros((0, self._emb.shape[1]), np.float32), []
        arrays = self.classifier.bundle.arrays("replay", ("embeddings", "labels"))
        emb, y = _checked_replay(arrays, self._emb.shape[1], len(self.classifier.bundle.labels))
        if "guard_examples" in found[0].extra:  # the manifest (hashed) says the rows are flagged
            flag = self.classifier.bundle.arrays("replay", (C.REPLAY_GUARD,))[C.REPLAY_GUARD]
            self.replay_guard = _checked_guard(flag, len(y), found[0].extra["guard_examples"])
        if self.classifier.head.tail is not None:  # the active version's tail layer gives the embeddings
            trunk = self.classifier.bundle.arrays("replay", (C.TRUNK,))[C.TRUNK]
            emb = self.classifier.tail_embed(trunk, self.classifier.head)
        return emb, [self.classifier.bundle.labels[int(i)] for i in y]

    def _replay_split(self, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Replay examples to train on (against forgetting) and to judge forgetting with
        (never trained on by the candidate), ``per_class`` of each class trained on (default
        ``replay_per_class``).

        A bundle with guard rows (the run's guard split, which the factory head was never
        fitted on) trains on the first ``per_class`` other rows of each class and judges on
        every guard row. An older bundle (or a run without a guard split) has training
        examples only: every other one up to ``per_class`` is trained on and the rest judge
        (a small buffer, 20 per class, still holds out half)."""
        train, parts = self._replay_parts(per_class)
        return train, parts["factory"]

    def _replay_parts(self, per_class: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Replay rows trained on, and the guard's factory parts: ``"factory"`` (the rows
        :meth:`_replay_split` holds out) and, with guard rows, ``"memorized"``: the other
        training rows the candidate does not train on (the factory head was fitted on them;
        the guard tests them with ``memorized_tolerance``, see :mod:`edgetl.device._guard`)."""
        per_class = self._replay_train_per_class if per_class is None else per_class
        labels = np.asarray(self.replay_labels)
        train, held, memorized = [], [], []
        for name in sorted(set(self.replay_labels)):
            idx = np.flatnonzero(labels == name)
            if self.replay_guard is not None:
                fitted = idx[~self.replay_guard[idx]]
                chosen = fitted[:per_class]
                held += idx[self.replay_guard[idx]].tolist()
                memorized += fitted[per_class:].tolist()
            else:
                chosen = idx[0::2][:per_class]
                held += np.setdiff1d(idx, chosen).tolist()
            train += chosen.tolist()
        rows = lambda v: np.asarray(sorted(v), dtype=np.int64)  # noqa: E731
        parts = {"factory": rows(held)}
        if self.replay_guard is not None:
            parts["memorized"] = rows(memorized)
        return rows(train), parts

    @property
    def examples(self) -> int:
        return len(self._labels)

    def add_examples(self, x: Any, labels: Sequence[str]) -> None:
        """Embed ``x`` once with the backbone and cache it with its ``labels``.

        Raises:
            InputError: bad inputs (shape, dtype, NaN, empty), a label count that differs
                from the example count, or a label the head does not have (use add_class).
        """
        labels = [str(l) for l in (labels if not isinstance(labels, str) else [labels])]
        batch = self.classifier.check_inputs(x)
        if len(labels) != len(batch):
            raise InputError(f"received {len(batch)} examples and {len(labels)} labels; give one label per example")
        known = set(self._base.labels)
        unknown = sorted(set(labels) - known)
        if unknown:
            raise InputError(
                f"unknown label(s) {unknown}; the head knows {list(self._base.labels)}. Use add_class(name, examples) "
                "for a new class"
            )
        self._cache(batch, labels)

    def _cache(self, batch: np.ndarray, labels: list[str]) -> None:
        emb = self._embed(batch)
        self._emb = np.concatenate([self._emb, emb])
        self._labels += labels
        self._raw.append((batch, labels))

    def add_class(self, name: str, x: Any) -> None:
        """Add a class up to the head's capacity, initialised by weight imprinting
        (see :meth:`_imprint`), so it is recognisable before any training."""
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise InputError(
                f"class name must be a non-empty string of at most 256 characters, received {describe(name)}"
            )
        base = self._base
        if name in base.labels:
            raise InputError(f"class {name!r} already exists; add examples to it with add_examples")
        free = np.flatnonzero(base.mask == 0)
        if not len(free):
            raise InputError(
                f"the head is full: capacity {base.capacity} classes ({len(base.labels)} active); export the bundle "
                "with a larger max_classes"
            )
        batch = self.classifier.check_inputs(x)
        emb = self._embed(batch)
        col = int(free[0])
        W, b, mask, anchor = base.W.copy(), base.b.copy(), base.mask.copy(), base.anchor.copy()
        W[:, col], b[col] = self._imprint(base, emb)
        mask[col] = 1.0
        anchor[:, col] = W[:, col]  # the L2 pull keeps the new class near its imprint
        self._base = HeadState(W, b, mask, anchor, (*base.labels, name))
        self._emb = np.concatenate([self._emb, emb])
        self._labels += [name] * len(emb)
        self._raw.append((batch, [name] * len(emb)))

    def _imprint(self, base: HeadState, emb: np.ndarray) -> tuple[np.ndarray, float]:
        """Nearest-class-mean weights for a new column: ``w = a*mu``, ``b = -a*|mu|^2/2``.

        The logit ``a*(mu.e - |mu|^2/2)`` peaks for embeddings near the class mean ``mu``.
        (Cosine-style imprinting -- the mean direction at the existing columns' norm -- is
        wrong for a linear head on non-negative ReLU embeddings: every embedding has a large
        positive dot product with that direction, and the new class took all predictions,
        measured 0.0 accuracy on the old classes.) ``a`` makes the new class's logit at its
        mean equal to the current head's typical top logit on replay examples (or on the
        new examples without a replay buffer): as confident as the old classes, no more.
        """
        mu = emb.astype(np.float64).mean(axis=0)
        active = np.flatnonzero(base.mask > 0)
        reference = self.replay_emb if len(self.replay_emb) else emb
        top_logit = float(np.mean((reference @ base.W[:, active] + base.b[active]).max(axis=1)))
        norm2 = max(float(mu @ mu), 1e-12)
        a = 2.0 * max(top_logit, 1.0) / norm2
        return (a * mu).astype(np.float32), float(-a * norm2 / 2.0)

    # ------------------------------------------------------------------ train

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        """Per class, hold out ``holdout_fraction`` of the user examples (deterministic)."""
        rng = np.random.default_rng(self.settings.seed)
        labels = np.asarray(self._labels)
        train, held = [], []
        for name in sorted(set(self._labels)):
            idx = rng.permutation(np.flatnonzero(labels == name))
            n_held = int(round(len(idx) * self.holdout_fraction)) if len(idx) > 1 else 0
            held += idx[:n_held].tolist()
            train += idx[n_held:].tolist()
        return np.asarray(sorted(train), dtype=np.int64), np.asarray(sorted(held), dtype=np.int64)

    def onehot(self, labels: Sequence[str], head: HeadState) -> np.ndarray:
        """One-hot rows over the head's columns (a label's column is its position among the active ones)."""
        column = dict(zip(head.labels, np.flatnonzero(head.mask > 0)))
        y = np.zeros((len(labels), head.capacity), np.float32)
        y[np.arange(len(labels)), [column[l] for l in labels]] = 1.0
        return y

    def training_set(self) -> tuple[np.ndarray, list[str]]:
        """Embeddings and labels a head is trained on: user examples not held out, plus the
        training half of the replay buffer, class-balanced.

        Balanced by repeating the examples of smaller classes (the train graphs take no
        per-example weights) up to the largest class's count: a user who adds 40 examples
        of a new class next to 10 replay examples per factory class would otherwise tilt
        the head toward the new class, and one who corrects a single class would tilt it
        toward that one. Deterministic (the settings' seed).
        """
        user, _ = self._split()
        replay, _ = self._replay_split()
        emb = np.concatenate([self._emb[user], self.replay_emb[replay]])
        labels = [self._labels[i] for i in user] + [self.replay_labels[i] for i in replay]
        index = _balanced(np.asarray(labels), np.random.default_rng(self.settings.seed))
        return emb[index], [labels[i] for i in index]

    def train(self, settings: TrainSettings | None = None) -> HeadState:
        """Train a candidate head on :meth:`training_set`."""
        if not self._labels:
            raise InputError("no examples yet: call add_examples or add_class first")
        settings = settings or self.settings
        emb, labels = self.training_set()
        self.candidate, self.losses = self.classifier.head_runtime.train(
            self._base, emb, self.onehot(labels, self._base), settings
        )
        return self.candidate

    def evaluate(self, head: HeadState | None = None, x: Any = None, labels: Sequence[str] | None = None) -> float:
        """Accuracy of ``head`` (default: the active one) on ``x``/``labels``; without them,
        the guard's score: the mean of its accuracy on the held-out user examples and on
        the held-out half of the replay buffer. A label the head does not have counts as
        wrong.

        Why a mean of the two and not one pooled accuracy: the replay buffer (20 per
        factory class) outnumbers a user's held-out examples, so pooled accuracy let a
        slight slip on factory examples veto a large gain on the user's own data
        (measured in the demo: a head going from 0.65 to 0.82 on the new user was rejected).
        """
        head = head or self.classifier.head
        if x is not None:
            emb = self.classifier.embed(x)
            labels = [str(l) for l in labels or []]
            if len(labels) != len(emb):
                raise InputError(f"received {len(emb)} examples and {len(labels)} labels")
            return self._accuracy(head, emb, labels)
        scores = self.guard_scores(head)
        if not scores:
            raise InputError("nothing to evaluate on: no held-out examples and no replay buffer")
        return float(np.mean(list(scores.values())))

    def _held_out(self, per_class: int | None = None) -> dict[str, tuple[np.ndarray, list[str]]]:
        """The guard's held-out examples: ``{"user": ..., "factory": ...}`` and, for a bundle
        with guard rows, ``"memorized"`` (embeddings, labels); ``per_class``: replay rows per
        class the candidate trained on (default ``replay_per_class``)."""
        _, held = self._split()
        _, replay = self._replay_parts(per_class)
        out = {"user": (self._emb[held], [self._labels[i] for i in held])}
        for part, rows in replay.items():
            out[part] = (self.replay_emb[rows], [self.replay_labels[i] for i in rows])
        return out

    def guard_scores(self, head: HeadState) -> dict[str, float]:
        """``{"user": ..., "replay": ...}``: class-balanced accuracy on the held-out user
        examples and on the held-out replay examples (the factory classes); a part without
        examples is absent."""
        parts = self._held_out()
        return part_scores({p: self._correct(head, *parts[p]) for p in parts if p in SCORE_NAMES}, parts)

    def _predict(self, head: HeadState, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted label names and their probabilities (over the head's active classes)."""
        active = np.flatnonzero(head.mask > 0)
        probs = self.classifier.head_runtime.probabilities(head, emb)[:, active]
        return np.asarray(head.labels)[probs.argmax(axis=1)], probs.max(axis=1)

    def _correct(self, head: HeadState, emb: np.ndarray, labels: Sequence[str]) -> np.ndarray:
        if not len(labels):
            return np.zeros(0, bool)
        return self._predict(head, emb)[0] == np.asarray(list(labels))

    def _accuracy(self, head: HeadState, emb: np.ndarray, labels: Sequence[str], *, balanced: bool = False) -> float:
        """Accuracy of ``head``; ``balanced``: the mean of per-class recalls, so that every
        class counts alike (a new class with few held-out examples included). A label the
        head does not have counts as wrong."""
        correct = self._correct(head, emb, labels)
        return _balanced_accuracy(correct, labels) if balanced else float(np.mean(correct))

    def _label_check(self, gained: bool) -> LabelCheck:
        """The user's labels on factory classes against the factory head's confident predictions."""
        factory = self.classifier.factory
        known = [i for i, l in enumerate(self._labels) if l in factory.labels]
        if not known:
            return label_check([], [], np.zeros(0), gained=gained)
        predicted, confidence = self._predict(factory, self._emb[known])
        return label_check([self._labels[i] for i in known], predicted.tolist(), confidence, gained=gained)

    def decide(self, margin: float | None = None) -> CommitResult:
        """The guard's verdict on the trained candidate, without storing anything.

        Both heads are scored on the same held-out user and factory-class examples; the
        candidate is refused when the paired evidence shows it forgets the factory classes
        or is worse on the user's examples beyond the tolerated loss, or when it was trained
        on labels that look wrong (:mod:`edgetl.device._guard`). ``margin`` overrides the
        user tolerance for this call.
        """
        if self.candidate is None:
            raise InputError("no candidate head: call train() first")
        policy = self.guard if margin is None else replace(self.guard, user_tolerance=margin)
        active, parts = self.classifier.head, self._held_out()
        if not any(len(labels) for _, labels in parts.values()):
            raise InputError("nothing to evaluate on: no held-out examples and no replay buffer")
        # Each head runs once per part; the evidence and the scores both come from these.
        before = {part: self._correct(active, *parts[part]) for part in parts}
        after = {part: self._correct(self.candidate, *parts[part]) for part in parts}
        verdict = self.judge(before, after, parts, policy)
        cur_scores, cand_scores = (part_scores(hits, parts) for hits in (before, after))
        return CommitResult(
            verdict.accepted,
            self.classifier.head_version,
            float(np.mean(list(cand_scores.values()))),
            float(np.mean(list(cur_scores.values()))),
            policy.user_tolerance,
            verdict.reason,
            cand_scores,
            cur_scores,
            verdict.evidence(),
        )

    def judge(
        self,
        before: dict[str, np.ndarray],
        after: dict[str, np.ndarray],
        parts: dict[str, tuple[Any, list[str]]],
        policy: GuardPolicy,
    ) -> Any:
        """The guard's decision from the active head's and the candidate's per-example
        correctness on each held-out part (a head's or a tail's: the same rule)."""
        user = paired("user", before["user"], after["user"], policy.user_tolerance)
        factory = paired("factory", before["factory"], after["factory"], policy.forget_tolerance, parts["factory"][1])
        memorized = None
        if "memorized" in parts:
            memorized = paired(
                "memorized", before["memorized"], after["memorized"], policy.memorized_tolerance, parts["memorized"][1]
            )
        return decide_guard(user, factory, self._label_check(generalizes(user, policy)), policy, memorized)

    def commit(self, margin: float | None = None, *, decision: CommitResult | None = None) -> CommitResult:
        """Store the trained candidate if the guard accepts it (:meth:`decide`); the
        classifier switches to it only once it is stored. With ``keep_examples``, the user's
        examples are kept in the store too (to rebuild the head for a new bundle), in the
        same transaction. ``decision``: the guard's verdict on ``candidate`` when another
        judge made it (a tail: :meth:`edgetl.device._tail.TailPersonalizer.decide`)."""
        decision = decision or self.decide(margin)
        if not decision.accepted:
            return self._record_rejection(decision)
        if self.store is None:
            raise InputError("this Personalizer has no store to commit to (store=None): use decide()")
        metrics = {"heldout_accuracy": decision.candidate_accuracy, "previous_accuracy": decision.active_accuracy}
        metrics.update(
            scores=decision.candidate_scores,
            examples=self.examples,
            example_labels=sorted(set(self._labels)),
            guard=decision.evidence,
        )
        kept = None
        if self.keep_examples and self._raw:
            kept = (np.concatenate([x for x, _ in self._raw]), [label for _, labels in self._raw for label in labels])
        # One transaction: the examples, the version, the pointer and the history, or none of them.
        version = self.store.commit(self.candidate, metrics, examples=kept)
        self._raw = []
        self.classifier.set_head(self.candidate, version)
        self._base, self.candidate = self.classifier.head, None
        return replace(decision, version=version, reason="committed: " + decision.reason.removeprefix("accepted: "))

    def _record_rejection(self, decision: CommitResult) -> CommitResult:
        """The refusal and its counts go into the store's history (nothing else changes). A
        store that cannot record it does not turn the refusal into an error: the result says so."""
        if self.store is None:
            return decision
        info = {"examples": self.examples, "example_labels": sorted(set(self._labels)), "guard": decision.evidence}
        try:
            self.store.record_rejection(info)
        except StoreError as exc:
            return replace(decision, reason=f"{decision.reason} (not recorded in the store history: {exc})")
        return decision

    def personalize(
        self,
        x: Any,
        labels: Sequence[str],
        *,
        add_classes: bool = False,
        settings: TrainSettings | None = None,
        commit: bool = True,
        adapt: str = "head",
    ) -> CommitResult:
        """The whole flow in one call: add the examples, train a candidate, commit it if the
        guard accepts it (what ``edgetl personalize`` runs); ``commit=False`` stops at the
        guard's verdict (:meth:`decide`).

        Labels the head does not know become new classes (imprinted from their examples)
        when ``add_classes`` is true, and are refused otherwise. ``adapt`` (``personalize
        --adapt``): ``"head"``; ``"tail"``, the head and the backbone's last layer, guarded alike
        (bundles with a trainable tail; any other personalizes the head and says so in the
        result's evidence, ``tail_unavailable``); ``"auto"``, the tail only when the guard's
        evidence prefers it to the head. ``settings`` apply to the head.

        Raises:
            InputError: bad inputs, a label count that differs from the example count, an
                unknown label without ``add_classes``, a head without room for new classes,
                ``adapt`` not one of head, tail, auto.
        """
        if adapt != "head":  # the tail's flow, which calls back here for the head candidate
            return personalize_adapting(
                self, x, labels, adapt=adapt, add_classes=add_classes, settings=settings, commit=commit
            )
        self.add_labelled(x, labels, add_classes=add_classes)
        self.train(settings)
        return self.commit() if commit else self.decide()

    def add_labelled(self, x: Any, labels: Sequence[str], *, add_classes: bool = False) -> None:
        """:meth:`personalize`'s first half: check the examples and labels, add the new classes
        (imprinted) when ``add_classes`` allows, and keep every example; nothing is trained."""
        labels = [str(l) for l in labels]
        batch = self.classifier.check_inputs(x)
        if len(labels) != len(batch):
            raise InputError(f"received {len(batch)} examples and {len(labels)} labels; give one label per example")
        new = sorted(set(labels) - set(self._base.labels), key=labels.index)
        if new and not add_classes:
            raise InputError(
                f"labels {new} are not classes of the head {list(self._base.labels)}; pass add_classes=True "
                "(--add-classes) to add them"
            )
        free = int((self._base.mask == 0).sum())
        if len(new) > free:
            raise InputError(
                f"{len(new)} new classes {new} do not fit: the head has room for {free} more (capacity "
                f"{self._base.capacity}); export the bundle with a larger max_classes"
            )
        for name in new:
            self.add_class(name, batch[[l == name for l in labels]])
        known = [i for i, l in enumerate(labels) if l not in new]
        if known:
            self.add_examples(batch[known], [labels[i] for i in known])

    def _need_store(self) -> HeadStore:
        if self.store is None:
            raise InputError("this Personalizer has no store (store=None): nothing to roll back or reset")
        return self.store

    def rollback(self) -> int:
        version = self._need_store().rollback()
        self._activate()
        return version

    def reset(self) -> int:
        """Back to the factory head (stored as a reset; earlier versions stay on disk)."""
        version = self._need_store().reset()
        self._activate()
        return version

    def _activate(self) -> None:
        active = self.store.active()
        self.classifier.set_head(active.head, active.number)
        self._base, self.candidate = active.head, None


def _checked_guard(flag: np.ndarray, rows: int, declared: Any) -> np.ndarray:
    """replay.npz's ``guard`` member: one bool per row, as many true as the manifest declares
    (a file edited to judge on training rows, or to train on guard rows, is refused)."""
    if flag.shape != (rows,) or flag.dtype != np.bool_:
        raise BundleError(
            f"replay.npz: guard must be {rows} booleans (one per row), received {flag.shape} {flag.dtype}"
        )
    if int(flag.sum()) != declared:
        raise BundleError(f"replay.npz: {int(flag.sum())} guard rows, the manifest declares {declared!r}")
    return flag


def _checked_replay(arrays: dict[str, np.ndarray], width: int, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """replay.npz's embeddings and labels, refused unless they can be trained on and scored:
    finite ``(n, width)`` floats and integer labels in ``0..n_labels-1``, one per row."""
    emb, y = arrays["embeddings"], arrays["labels"]
    if emb.ndim != 2 or emb.shape[1] != width or emb.dtype.kind != "f":
        raise BundleError(f"replay.npz: embeddings must be (n, {width}) floats, received {emb.shape} {emb.dtype}")
    if not np.isfinite(emb).all():
        raise BundleError("replay.npz: embeddings hold NaN or infinite values")
    if y.shape != (len(emb),) or y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= n_labels)):
        raise BundleError(
            f"replay.npz: labels must be {len(emb)} integers in 0..{n_labels - 1} (one per embedding), received "
            f"{y.shape} {y.dtype}"
        )
    return emb.astype(np.float32), y.astype(np.int64)
