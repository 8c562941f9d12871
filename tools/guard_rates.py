#!/usr/bin/env python
"""How often the personalization guard is right, on new users it was never tuned on.

    python tools/guard_rates.py [--bundle B] [--seeds 3] [--sizes 10,20,50,100] [--family evaluation]
    python tools/guard_rates.py --tune      # choose the defaults on the tuning family only

New users are built offline from scikit-learn's digits: each **kind** of user draws digits
differently (rotated, shifted, zoomed, thicker or thinner strokes, blurred, noisy, faded,
slanted, and combinations; ``KINDS``). The kinds are split once, by a fixed rule that looks
at nothing but their names (sorted, alternately), into a **tuning family** and an
**evaluation family** (``families()``). Defaults are chosen on the tuning family only
(``--tune``); rates are reported on the evaluation family only.

For every (kind, scenario, examples per class, seed) a user batch is drawn from the half of
digits 5-9 the bundle was trained on, drawn in the user's style (each image with its own
random jitter, so a batch of 100 per class is 100 distinct images); the truth comes from
the other half, which the bundle never saw: the user's accuracy on all of it in the user's
style, and the factory classes' accuracy on all of it as it is. The scenario decides the
labels and the training (``SCENARIOS``): genuine personalization, and harmful batches
(shuffled labels, one label for everything, one class only with a hot optimizer, every
class relabelled, one class consistently given a wrong label).

A candidate is **helpful** when the user gains at least 2 points on their independent test
set and the factory classes lose at most 3 points; **forgetting** when the factory classes
lose more than 5 points. The guard's verdict is the real ``Personalizer.decide()``; each
case also records the per-example evidence it rests on, so other policies are replayed
exactly (``decide_again``; checked to reproduce every real decision).

Targets (issue 19, evaluation family): >= 90% of helpful heads accepted; 0 accepted heads
that lose more than 5 factory points; shuffled labels refused in 100% of runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

HELPFUL_GAIN = 0.02  # the user gains at least this much ...
HELPFUL_DROP = 0.03  # ... while the factory classes lose at most this much
FORGETTING = 0.05  # a head losing more than this on the factory classes must be refused
SIZES = (10, 20, 50, 100)  # examples per class
TARGET_HELPFUL = 0.90

# ----------------------------------------------------------------------------- users


def _rotate(x: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    from scipy.ndimage import rotate

    return np.stack([rotate(img, float(d), axes=(0, 1), reshape=False, order=1) for img, d in zip(x, degrees)])


def _zoom(x: np.ndarray, factor: float) -> np.ndarray:
    from scipy.ndimage import affine_transform

    c = (np.asarray(x.shape[1:3]) - 1) / 2.0
    m = np.eye(2) / factor
    offset = c - m @ c
    return np.stack([affine_transform(img[..., 0], m, offset=offset, order=1)[..., None] for img in x])


def _shift(x: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    from scipy.ndimage import shift

    return np.stack([shift(img, (float(a), float(b), 0), order=1) for img, a, b in zip(x, dy, dx)])


def _thin(x: np.ndarray) -> np.ndarray:
    from scipy.ndimage import grey_erosion

    return np.stack([grey_erosion(img[..., 0], size=(1, 2))[..., None] for img in x])


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return np.stack([gaussian_filter(img, sigma=(sigma, sigma, 0)) for img in x])


def _restyle(x: np.ndarray, **kw: Any) -> np.ndarray:
    from edgetl.data import restyle_digits

    return restyle_digits(x.astype(np.uint8), **kw).astype(np.float32)


def _u(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, n)


# A kind maps (float images in [0, 255], rng) to the same images drawn by that kind of user.
# Every image gets its own jitter from rng; the kind's character is fixed.
KINDS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "rotate_left": lambda x, r: _rotate(x, _u(r, len(x), 12, 22)),
    "rotate_right": lambda x, r: _rotate(x, -_u(r, len(x), 12, 22)),
    "shift": lambda x, r: _shift(x, _u(r, len(x), 0.6, 1.2), _u(r, len(x), -1.2, -0.6)),
    "zoom_in": lambda x, r: _zoom(x, 1.3) + r.normal(0, 8, x.shape),
    "zoom_out": lambda x, r: _zoom(x, 0.72) + r.normal(0, 8, x.shape),
    "thick": lambda x, r: _restyle(x, thickness=1, slant=0.0) + r.normal(0, 8, x.shape),
    "thin": lambda x, r: _thin(x) + r.normal(0, 8, x.shape),
    "blur": lambda x, r: _blur(x, 0.9) * 1.3 + r.normal(0, 8, x.shape),
    "noise": lambda x, r: x + r.normal(0, 55, x.shape),
    "faded": lambda x, r: x * 0.45 + r.normal(0, 8, x.shape),
    "slant": lambda x, r: _restyle(x, thickness=0, slant=0.45) + r.normal(0, 8, x.shape),
    "thick_slant": lambda x, r: _restyle(x) + r.normal(0, 8, x.shape),
    "rotate_blur": lambda x, r: _blur(_rotate(x, _u(r, len(x), 10, 18)), 0.7) * 1.2,
    "zoom_noise": lambda x, r: _zoom(x, 0.8) + r.normal(0, 40, x.shape),
    "shift_faded": lambda x, r: _shift(x, _u(r, len(x), -1.0, -0.5), _u(r, len(x), 0.5, 1.0)) * 0.55,
    "thin_rotate": lambda x, r: _thin(_rotate(x, -_u(r, len(x), 10, 18))),
}


def families() -> dict[str, list[str]]:
    """The fixed split: kinds sorted by name, alternately tuning and evaluation. It looks at
    nothing but the names, so no result can move a kind from one family to the other."""
    names = sorted(KINDS)
    return {"tuning": names[0::2], "evaluation": names[1::2]}


def draw_style(kind: str, x: np.ndarray, seed: Any) -> np.ndarray:
    """``x`` (uint8 digits) drawn by ``kind``, as uint8."""
    out = KINDS[kind](x.astype(np.float32), np.random.default_rng(seed))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- scenarios


class Case(NamedTuple):
    clf: Any
    x: np.ndarray
    y: list[str]
    rng: np.random.Generator


def _hot() -> Any:
    from edgetl.device import TrainSettings

    return TrainSettings(epochs=100, optimizer="adam", learning_rate=0.5, l2=0.0)


def _without_replay(guard: Any, case: Case, labels: list[str]) -> None:
    """Train on the user's examples only (no replay), Adam at 0.5; both Personalizers hold out
    the same user examples (same labels and seed), so the candidate never saw what it is judged on."""
    from edgetl.device import Personalizer

    guard.add_examples(case.x, labels)
    side = Personalizer(case.clf, None, replay_per_class=0, settings=guard.settings)
    side.add_examples(case.x, labels)
    guard.candidate = side.train(_hot())


def genuine(guard: Any, case: Case) -> None:
    """Correct labels, the default training."""
    guard.add_examples(case.x, case.y)
    guard.train()


def genuine_hot(guard: Any, case: Case) -> None:
    """Correct labels, Adam at 0.5 for 100 epochs without replay: helps the user, may forget."""
    _without_replay(guard, case, case.y)


def shuffled(guard: Any, case: Case) -> None:
    """The batch's labels permuted among its examples, default training."""
    guard.add_examples(case.x, [str(v) for v in case.rng.permutation(case.y)])
    guard.train()


def one_label(guard: Any, case: Case) -> None:
    """Every example labelled as one class, default training."""
    guard.add_examples(case.x, [str(case.rng.choice(case.clf.head.labels))] * len(case.y))
    guard.train()


def one_class_hot(guard: Any, case: Case) -> None:
    """Examples of one class only, correctly labelled, Adam at 0.5, no replay in training."""
    _without_replay(guard, case, case.y)


def relabel_hot(guard: Any, case: Case) -> None:
    """Every class labelled as the next one, consistently, Adam at 0.5, no replay in training."""
    names = list(case.clf.head.labels)
    _without_replay(guard, case, [names[(names.index(v) + 1) % len(names)] for v in case.y])


def wrong_label(guard: Any, case: Case) -> None:
    """One class's examples consistently given another class's label, default training."""
    names = list(case.clf.head.labels)
    source = names[int(case.rng.integers(len(names)))]
    target = names[(names.index(source) + 1 + int(case.rng.integers(len(names) - 1))) % len(names)]
    guard.add_examples(case.x, [target if v == source else v for v in case.y])
    guard.train()


SCENARIOS: dict[str, Callable[[Any, Case], None]] = {
    "genuine": genuine,
    "genuine_hot": genuine_hot,
    "shuffled": shuffled,
    "one_label": one_label,
    "one_class_hot": one_class_hot,
    "relabel_hot": relabel_hot,
    "wrong_label": wrong_label,
}
ONE_CLASS = {"one_class_hot"}


def digit_halves() -> Any:
    """Digits 5-9 split in halves: the bundle trains on ``train``; ``test`` is never seen by it."""
    from edgetl.data import load_digits_dataset, stratified_split

    return stratified_split(load_digits_dataset((5, 6, 7, 8, 9)), val_fraction=0.0, test_fraction=0.5, seed=0)


def build_bundle(out: Path, seed: int = 0, guard_fraction: float | None = None) -> Path:
    """The test suite's digits bundle (tests/conftest.py ``digits_bundle``), fp32 only:
    edgetl_cnn pretrained on digits 0-4, head transferred to the train half of 5-9, holding out
    ``guard_fraction`` of it as the guard split (default: training's default)."""
    from edgetl.data import load_digits_dataset
    from edgetl.host._export import export_bundle
    from edgetl.host._pretrain import pretrain
    from edgetl.host._run import save_run
    from edgetl.host._transfer import TrainConfig, train_transfer

    source = pretrain(load_digits_dataset((0, 1, 2, 3, 4)), TrainConfig(backbone="edgetl_cnn", epochs=15, seed=seed))
    source_run = save_run(source, out / f"source{seed}", kind="pretrain")
    config = TrainConfig(backbone=str(source_run), epochs=60, learning_rate=1e-2, val_fraction=0.1, test_fraction=0.0)
    if guard_fraction is not None:
        config = replace(config, guard_fraction=guard_fraction)
    halves = digit_halves()
    run = save_run(train_transfer(halves.train, config), out / f"target{seed}")
    result = export_bundle(run, out / f"digits{seed}.edgetl", quantize=["none"], calibration=halves.train)
    return result.bundle.path


class World(NamedTuple):
    """One bundle's view of the digits: where user batches come from, and the truth."""

    clf: Any
    pool_x: np.ndarray  # the bundle's training half, original style: user batches are drawn from here
    pool_y: np.ndarray  # its class names
    test_x: np.ndarray  # the half the bundle never saw
    test_y: np.ndarray
    factory_emb: np.ndarray  # embeddings of test_x as it is (the factory classes' truth)


def world(bundle: Any, backend: str = "onnxruntime") -> World:
    from edgetl.device import Classifier

    clf = Classifier.open(bundle, backend=backend)
    halves = digit_halves()
    names = lambda d: np.asarray([d.class_names[i] for i in d.y])  # noqa: E731
    return World(
        clf,
        np.asarray(halves.train.x),
        names(halves.train),
        np.asarray(halves.test.x),
        names(halves.test),
        clf.embed(np.asarray(halves.test.x)),
    )


def draw(w: World, per_class: int, rng: np.random.Generator, one_class: bool) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the pool: ``per_class`` of every class (or of one class), with repeats
    when a class has fewer images (each repeat is drawn with its own jitter)."""
    classes = sorted(set(w.pool_y.tolist()))
    chosen = [classes[int(rng.integers(len(classes)))]] if one_class else classes
    idx = np.concatenate([rng.choice(np.flatnonzero(w.pool_y == c), per_class) for c in chosen])
    return idx, w.pool_y[idx]


def accuracy(clf: Any, head: Any, emb: np.ndarray, labels: np.ndarray) -> float:
    active = np.flatnonzero(head.mask > 0)
    probs = clf.head_runtime.probabilities(head, emb)[:, active]
    return float(np.mean(np.asarray(head.labels)[probs.argmax(axis=1)] == labels))


FACTORY_LABELS: list[str] = []  # the held-out replay examples' labels, in the order records keep them
MEMORIZED_LABELS: list[str] = []  # the guard's "memorized" part's (bundles with a guard split), likewise


def factory_labels(w: World, part: str = "factory") -> list[str]:
    """The labels of the guard's ``part`` of the replay buffer (none: the bundle has no such part)."""
    from edgetl.device import Personalizer

    held = Personalizer(w.clf, None)._held_out()
    return list(held[part][1]) if part in held else []


def _bits(v: np.ndarray) -> str:
    return "".join("1" if b else "0" for b in np.asarray(v, bool))


def run_case(w: World, kind: str, scenario: str, per_class: int, seed: int, policy: Any) -> dict[str, Any]:
    """One user batch through the real guard (``Personalizer.decide``), judged on the truth."""
    from edgetl.device import Personalizer

    rng = np.random.default_rng([seed, per_class, list(SCENARIOS).index(scenario), sorted(KINDS).index(kind)])
    idx, y = draw(w, per_class, rng, scenario in ONE_CLASS)
    x = draw_style(kind, w.pool_x[idx], [seed, per_class, 1])
    clf, factory = w.clf, w.clf.factory
    clf.set_head(factory, 0)
    guard = Personalizer(clf, None, guard=policy)
    SCENARIOS[scenario](guard, Case(clf, x, [str(v) for v in y], rng))
    decision = guard.decide()
    held = guard._held_out()
    known = [i for i, l in enumerate(guard._labels) if l in factory.labels]
    predicted, confidence = guard._predict(factory, guard._emb[known])
    user_test = clf.embed(draw_style(kind, w.test_x, [seed, per_class, 2]))
    truth = {
        "user_before": accuracy(clf, factory, user_test, w.test_y),
        "user_after": accuracy(clf, guard.candidate, user_test, w.test_y),
        "factory_before": accuracy(clf, factory, w.factory_emb, w.test_y),
        "factory_after": accuracy(clf, guard.candidate, w.factory_emb, w.test_y),
    }
    gain, drop = truth["user_after"] - truth["user_before"], truth["factory_before"] - truth["factory_after"]
    return {
        "kind": kind,
        "scenario": scenario,
        "per_class": per_class,
        "seed": seed,
        "accepted": bool(decision.accepted),
        "reason": decision.reason,
        "evidence": {
            part: {
                "before": _bits(guard._correct(factory, *held[part])),
                "after": _bits(guard._correct(guard.candidate, *held[part])),
            }
            for part in held
        },
        "labels": {
            "labels": [guard._labels[i] for i in known],
            "predicted": predicted.tolist(),
            "confidence": confidence.round(5).tolist(),
        },
        **truth,
        "user_gain": gain,
        "factory_drop": drop,
        "helpful": bool(gain >= HELPFUL_GAIN and drop <= HELPFUL_DROP),
        "forgetting": bool(drop > FORGETTING),
    }


def decide_again(record: dict[str, Any], policy: Any, **label_thresholds: Any) -> bool:
    """The guard's decision replayed on a record's evidence under another policy."""
    from edgetl.device._guard import decide, generalizes, label_check, paired

    ev = record["evidence"]
    vec = lambda s: np.frombuffer(s.encode(), np.uint8) == ord("1")  # noqa: E731
    user = paired("user", vec(ev["user"]["before"]), vec(ev["user"]["after"]), policy.user_tolerance)
    factory = paired(
        "factory", vec(ev["factory"]["before"]), vec(ev["factory"]["after"]), policy.forget_tolerance, FACTORY_LABELS
    )
    memorized = None
    if "memorized" in ev:
        before, after = vec(ev["memorized"]["before"]), vec(ev["memorized"]["after"])
        memorized = paired("memorized", before, after, policy.memorized_tolerance, MEMORIZED_LABELS)
    lab = record["labels"]
    confidence = np.asarray(lab["confidence"])
    check = label_check(
        lab["labels"], lab["predicted"], confidence, gained=generalizes(user, policy), **label_thresholds
    )
    return decide(user, factory, check, policy, memorized).accepted


def measure(
    bundle: Any,
    *,
    kinds: list[str],
    scenarios: list[str] | None = None,
    sizes: tuple[int, ...] = SIZES,
    seeds: range | list[int] = range(3),
    backend: str = "onnxruntime",
    policy: Any = None,
) -> list[dict[str, Any]]:
    """Every (kind, scenario, size, seed) case, with the real decision checked against the replay."""
    from edgetl.device import GuardPolicy

    policy = policy or GuardPolicy()
    w = world(bundle, backend)
    FACTORY_LABELS[:] = factory_labels(w)
    MEMORIZED_LABELS[:] = factory_labels(w, "memorized")
    records = []
    for kind, scenario, size, seed in itertools.product(kinds, scenarios or list(SCENARIOS), sizes, seeds):
        record = run_case(w, kind, scenario, size, seed, policy)
        if decide_again(record, policy) != record["accepted"]:
            raise AssertionError(f"the replayed guard no longer matches Personalizer.decide: {record['reason']}")
        records.append(record)
    return records


def migration_case(wa: World, wb: World, kind: str, per_class: int, seed: int, store_dir: Path) -> dict[str, Any]:
    """A genuine user personalizes bundle A (examples kept), the store migrates to bundle B
    (another backbone: the head is retrained from the kept examples and guarded); compared
    with the same user personalizing B from scratch with the same examples."""
    from edgetl.device import HeadStore, Personalizer, migrate

    rng = np.random.default_rng([seed, per_class, 99, sorted(KINDS).index(kind)])
    idx, y = draw(wa, per_class, rng, False)
    x, labels = draw_style(kind, wa.pool_x[idx], [seed, per_class, 1]), [str(v) for v in y]
    wa.clf.set_head(wa.clf.factory, 0)
    first = Personalizer(wa.clf, HeadStore(store_dir, wa.clf.bundle)).personalize(x, labels)
    if not first.accepted:  # nothing personalized on A: nothing to carry (the case is counted apart)
        return {"kind": kind, "per_class": per_class, "seed": seed, "first_accepted": False, "helpful": False}
    migration = migrate(HeadStore(store_dir, None), wb.clf.bundle, backend=wb.clf.backend)
    migrated = HeadStore(store_dir, wb.clf.bundle).active().head
    wb.clf.set_head(wb.clf.factory, 0)
    scratch = Personalizer(wb.clf, None)
    verdict = scratch.personalize(x, labels, commit=False)
    direct = scratch.candidate if verdict.accepted else wb.clf.factory
    user_test = wb.clf.embed(draw_style(kind, wb.test_x, [seed, per_class, 2]))
    before = accuracy(wb.clf, wb.clf.factory, user_test, wb.test_y)
    after_direct = accuracy(wb.clf, scratch.candidate, user_test, wb.test_y)
    drop = accuracy(wb.clf, wb.clf.factory, wb.factory_emb, wb.test_y) - accuracy(
        wb.clf, scratch.candidate, wb.factory_emb, wb.test_y
    )
    return {
        "kind": kind,
        "per_class": per_class,
        "seed": seed,
        "first_accepted": bool(first.accepted),
        "migration": migration.kind,
        "migration_reason": migration.reason,
        "user_before": before,
        "user_migrated": accuracy(wb.clf, migrated, user_test, wb.test_y),
        "user_direct": accuracy(wb.clf, direct, user_test, wb.test_y),
        "helpful": bool(after_direct - before >= HELPFUL_GAIN and drop <= HELPFUL_DROP),
    }


def migrations(bundle_a: Any, bundle_b: Any, *, kinds: list[str], sizes: tuple[int, ...], seeds: Any) -> list[dict]:
    wa, wb = world(bundle_a), world(bundle_b)
    out = []
    for kind, size, seed in itertools.product(kinds, sizes, seeds):
        with tempfile.TemporaryDirectory() as tmp:
            out.append(migration_case(wa, wb, kind, size, seed, Path(tmp) / "store"))
    return out


def migration_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Target: within 2 points of personalizing the new bundle from scratch in >= 90% of helpful cases."""
    helpful = [r for r in records if r["helpful"]]
    close = [abs(r["user_migrated"] - r["user_direct"]) <= 0.02 for r in helpful]
    return {
        "cases": len(records),
        "helpful": len(helpful),
        "within_2_points": float(np.mean(close)) if close else float("nan"),
        "not_personalized_first": sum(not r["first_accepted"] for r in records),
        "retrained": sum(r.get("migration") == "retrained" for r in records),
        "mean_gap": float(np.mean([r["user_direct"] - r["user_migrated"] for r in helpful])) if helpful else 0.0,
    }


# ----------------------------------------------------------------------------- rates


def rates(records: list[dict[str, Any]], decide: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """The targets' rates: helpful accepted, forgetting accepted, shuffled refused, false accepts."""
    decide = decide or (lambda r: r["accepted"])
    acc = [decide(r) for r in records]
    pick = lambda cond: [a for a, r in zip(acc, records) if cond(r)]  # noqa: E731
    helpful, forgetting = pick(lambda r: r["helpful"]), pick(lambda r: r["forgetting"])
    shuffled = pick(lambda r: r["scenario"] == "shuffled")
    unhelpful = pick(lambda r: not r["helpful"])
    # Shuffled batches the truth calls helpful (the replay and the user's style still move the
    # head the right way) are refused by the shuffled-labels target: counted apart too.
    unshuffled = pick(lambda r: r["helpful"] and r["scenario"] != "shuffled")
    return {
        "cases": len(records),
        "helpful": len(helpful),
        "helpful_accepted": float(np.mean(helpful)) if helpful else float("nan"),
        "helpful_accepted_unshuffled": float(np.mean(unshuffled)) if unshuffled else float("nan"),
        "forgetting": len(forgetting),
        "forgetting_accepted": int(sum(forgetting)),
        "shuffled": len(shuffled),
        "shuffled_refused": float(1 - np.mean(shuffled)) if shuffled else float("nan"),
        "false_accepts": int(sum(unhelpful)),
        "far": float(np.mean(unhelpful)) if unhelpful else float("nan"),
    }


def passes(s: dict[str, Any]) -> dict[str, bool]:
    return {
        f"helpful accepted >= {TARGET_HELPFUL:.0%}": s["helpful_accepted"] >= TARGET_HELPFUL,
        f"helpful accepted >= {TARGET_HELPFUL:.0%}, shuffled batches apart": (
            s["helpful_accepted_unshuffled"] >= TARGET_HELPFUL
        ),
        f"0 accepted heads losing > {FORGETTING * 100:.0f} factory points": s["forgetting_accepted"] == 0,
        "shuffled labels refused 100%": s["shuffled_refused"] == 1.0,
    }


def table(records: list[dict[str, Any]], by: str) -> str:
    lines = [f"{by:<14}{'cases':>6}{'accept':>8}{'helpful':>8}{'h. acc.':>8}{'forget.':>8}{'f. acc.':>8}{'FAR':>7}"]
    for key in dict.fromkeys(r[by] for r in records):
        group = [r for r in records if r[by] == key]
        s = rates(group)
        lines.append(
            f"{str(key):<14}{s['cases']:>6}{np.mean([r['accepted'] for r in group]):>8.2f}{s['helpful']:>8}"
            f"{s['helpful_accepted']:>8.2f}{s['forgetting']:>8}{s['forgetting_accepted']:>8}{s['far']:>7.2f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tuning

ALPHAS = (0.01, 0.05, 0.1)
FORGET_TOLERANCES = (0.0, 0.01, 0.02, 0.03, 0.05)
# The memorized part (bundles with a guard split; 1.0: not tested). With it, the label-check
# thresholds stay at their defaults (chosen before, on the same family; they judge the labels,
# not the factory evidence), which keeps the grid at 420 policies instead of 3,780.
MEMORIZED_TOLERANCES = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 1.0)
USER_TOLERANCES = (0.0, 0.05)
CONFIDENCES = (0.8, 0.9, 0.95)
SHARES = (0.4, 0.5, 0.6)


def tune(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The rule, on the tuning family only: every target met (no forgetting head accepted,
    every shuffled batch refused; when no policy meets both, the fewest forgetting heads
    accepted, then the most shuffled batches refused); among those, the most helpful heads
    accepted, then the fewest false accepts, then the policy nearest the current defaults."""
    from edgetl.device import GuardPolicy
    from edgetl.device._guard import CONFIDENT, CONTRADICTED_SHARE

    rows = []
    memorized = any("memorized" in r["evidence"] for r in records)
    grid = itertools.product(
        ALPHAS,
        FORGET_TOLERANCES,
        MEMORIZED_TOLERANCES if memorized else (GuardPolicy().memorized_tolerance,),
        USER_TOLERANCES,
        (CONFIDENT,) if memorized else CONFIDENCES,
        (CONTRADICTED_SHARE,) if memorized else SHARES,
        ("refuse", "warn"),
    )
    for alpha, ft, mt, ut, conf, share, mislabel in grid:
        policy = GuardPolicy(
            alpha=alpha, forget_tolerance=ft, memorized_tolerance=mt, user_tolerance=ut, mislabel=mislabel
        )
        s = rates(records, lambda r: decide_again(r, policy, confident=conf, share=share))
        rows.append({"policy": asdict(policy), "confident": conf, "share": share, **s})
    current = asdict(GuardPolicy())

    def distance(r: dict[str, Any]) -> float:  # ties go to the nearest current default
        p = r["policy"]
        return (
            sum(abs(p[k] - current[k]) for k in ("alpha", "forget_tolerance", "memorized_tolerance", "user_tolerance"))
            + abs(r["confident"] - CONFIDENT)
            + abs(r["share"] - CONTRADICTED_SHARE)
            + (p["mislabel"] != current["mislabel"])
        )

    # Every target met when some policy meets them; else the fewest forgetting heads accepted, then
    # the most shuffled batches refused (a hard target missed is missed by as little as possible).
    floor = min((r["forgetting_accepted"], -r["shuffled_refused"]) for r in rows)
    ok = [r for r in rows if (r["forgetting_accepted"], -r["shuffled_refused"]) == floor]
    best = max(ok, key=lambda r: (round(r["helpful_accepted"], 3), -r["false_accepts"], -distance(r)))
    return best, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a digits bundle trained on digit_halves().train (default: build)")
    parser.add_argument("--family", choices=("tuning", "evaluation"), default="evaluation")
    parser.add_argument("--tune", action="store_true", help="choose the guard's defaults on the tuning family")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "litert"])
    parser.add_argument("--json", type=Path, help="write every case's record here")
    parser.add_argument(
        "--guard-fraction", type=float, help="the built bundles' guard split (default: training's default)"
    )
    parser.add_argument("--migrate-to", type=Path, help="also migrate genuine users to this bundle (another backbone)")
    args = parser.parse_args()

    family = "tuning" if args.tune else args.family
    kinds = families()[family]
    t0 = time.perf_counter()
    # One directory for every bundle built here: the migration at the end still reads the first.
    with tempfile.TemporaryDirectory() as tmp:
        return _report(args, kinds, family, t0, Path(tmp))


def _report(args: Any, kinds: list[str], family: str, t0: float, tmp: Path) -> int:
    """main's measuring and printing, with ``tmp`` alive for every bundle it builds."""
    from edgetl.device import GuardPolicy

    bundle = args.bundle or build_bundle(tmp, guard_fraction=args.guard_fraction)
    records = measure(
        bundle,
        kinds=kinds,
        scenarios=args.scenarios.split(","),
        sizes=tuple(int(s) for s in args.sizes.split(",")),
        seeds=range(args.seeds),
        backend=args.backend,
    )
    if args.json:
        args.json.write_text(json.dumps(records))
    print(f"{family} family: {', '.join(kinds)}; {len(records)} cases in {time.perf_counter() - t0:.0f}s")
    print(f"(helpful: user +{HELPFUL_GAIN * 100:.0f} points or more on their test set and factory classes at most")
    print(f" -{HELPFUL_DROP * 100:.0f}; forgetting: factory classes -{FORGETTING * 100:.0f} points or worse)")
    print(f"guard: {GuardPolicy()}")
    for by in ("scenario", "kind", "per_class"):
        print("\n" + table(records, by))
    s = rates(records)
    print(f"\n{family} family, pooled: {json.dumps(s)}")
    if args.tune:
        best, _ = tune(records)
        print(
            "\ntuned (the rule: every target met, else the fewest forgetting heads accepted and most shuffled "
            f"refused; then most helpful accepted, then fewest false accepts):\n{best}"
        )
        return 0
    checks = passes(s)
    if args.migrate_to or not args.bundle:
        other = args.migrate_to or build_bundle(tmp, seed=1, guard_fraction=args.guard_fraction)
        moved = migrations(
            bundle, other, kinds=kinds, sizes=tuple(int(s) for s in args.sizes.split(",")), seeds=range(args.seeds)
        )
        m = migration_summary(moved)
        print(f"\nmigration to another backbone (genuine users): {json.dumps(m)}")
        checks["migrated within 2 points of personalizing the new bundle, >= 90% of helpful"] = (
            m["within_2_points"] >= 0.9
        )
    failed = 0
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'}  {name}")
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
