#!/usr/bin/env python
"""How often the personalization guard is right: false-accept and false-reject rates.

    python tools/guard_rates.py [--bundle B] [--seeds 20] [--sizes 10,20,50,100] [--backend onnxruntime]

``Personalizer.commit`` accepts a candidate head when its guard score (the mean of the
held-out user and held-out replay accuracies) has not dropped by more than ``margin`` and
its held-out replay accuracy (the factory classes) not by more than ``forget_margin``.
This tool runs the real guard on many user batches (per seed and batch size) of several
scenarios and judges every decision against the truth, measured on a large independent
test set the guard never sees:

- a user's digits, restyled (``edgetl.data.restyle_digits``), from the half of digits 5-9
  the bundle was not trained on: per seed, a class-balanced batch of N is the user's;
  every other image of that half is the test set, restyled (the user's style) and as it
  is (the factory classes' style);
- the candidate is *really better* when its accuracy on the restyled test set is above
  the factory head's, and *forgets* when its accuracy on the original-style test set is
  more than TRUTH_FORGET (0.05, the forgetting allowance) below the factory
  head's. The right decision is to accept iff it is really better and does not forget.

Scenarios: ``genuine`` (correct labels, default training), ``genuine_hot`` (correct labels,
Adam at 0.5 for 100 epochs, no replay in training), and harmful batches: ``shuffled``
(labels permuted), ``one_label`` (every example labelled one class), ``one_label_hot``
(the same, Adam at 0.5), ``one_class_hot`` (examples of one class only, correctly labelled,
Adam at 0.5, no replay in training), ``relabel_hot`` (every digit labelled as the next one,
consistently: a head that agrees with its user and forgets the factory classes).

Prints a table per (scenario, batch size): accept rate, how often accepting was right,
false-accept rate (accepted among those that should be rejected), false-reject rate
(rejected among those that should be accepted); then the same pooled rates for a grid of
``margin``/``forget_margin`` values, recomputed from the recorded guard scores (checked to
reproduce every real decision at the margins used), and a recommendation. Without
``--bundle`` it builds the digits bundle the test suite uses (about 40 s, TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

TRUTH_FORGET = (
    0.05  # the forgetting allowed in truth; the guard's forget_margin (0.03) is stricter: its estimate is noisy
)
DESTROYED = 0.20  # a factory-accuracy drop this large is "destroyed": the guard must refuse it
SIZES = (10, 20, 50, 100)
MARGINS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1)
FORGET_MARGINS = (0.02, 0.03, 0.05, 0.1, 0.2)
GENUINE_FLOOR = 0.95  # a recommended pair accepts at least this share of genuine batches at every size


def build_bundle(out: Path) -> Path:
    """The test suite's digits bundle (tests/conftest.py ``digits_bundle``), fp32 only:
    edgetl_cnn pretrained on digits 0-4, head transferred to the train half of 5-9."""
    from edgetl.host._export import export_bundle
    from edgetl.host._pretrain import pretrain
    from edgetl.host._run import save_run
    from edgetl.host._transfer import TrainConfig, train_transfer

    source = pretrain(_digits((0, 1, 2, 3, 4)), TrainConfig(backbone="edgetl_cnn", epochs=15, seed=0))
    source_run = save_run(source, out / "source", kind="pretrain")
    config = TrainConfig(backbone=str(source_run), epochs=60, learning_rate=1e-2, val_fraction=0.1, test_fraction=0.0)
    halves = digit_halves()
    run = save_run(train_transfer(halves.train, config), out / "target")
    result = export_bundle(run, out / "digits.edgetl", quantize=["none"], calibration=halves.train)
    return result.bundle.path


def _digits(classes: tuple[int, ...]) -> Any:
    from edgetl.data import load_digits_dataset

    return load_digits_dataset(classes)


def digit_halves() -> Any:
    """The split the bundle was trained on: its ``test`` half is never seen by the bundle."""
    from edgetl.data import stratified_split

    return stratified_split(_digits((5, 6, 7, 8, 9)), val_fraction=0.0, test_fraction=0.5, seed=0)


class Users(NamedTuple):
    """The test half as a user would draw it (restyled) and as the factory saw digits."""

    x: np.ndarray  # restyled raw images: the user's examples come from here
    labels: np.ndarray  # true class names
    emb_user: np.ndarray  # embeddings of the restyled images
    emb_factory: np.ndarray  # embeddings of the original images


def users(clf: Any, test: Any) -> Users:
    """The test half restyled (the user's examples and their test set) and both styles' embeddings."""
    from edgetl.data import restyle_digits

    x = restyle_digits(np.asarray(test.x))
    labels = np.asarray([test.class_names[i] for i in test.y])
    return Users(x, labels, clf.embed(x), clf.embed(np.asarray(test.x)))


class Case(NamedTuple):
    clf: Any
    x: np.ndarray
    y: list[str]
    rng: np.random.Generator
    side_store: Path  # a second store for candidates trained without replay (never committed to)


def _hot() -> Any:
    from edgetl.device import TrainSettings

    return TrainSettings(epochs=100, optimizer="adam", learning_rate=0.5, l2=0.0)


def _without_replay(guard: Any, case: Case, labels: list[str]) -> None:
    """Train the candidate on the user's examples only (no replay), Adam at 0.5, and hand it
    to the guarded Personalizer. Both hold out the same user examples (same labels, same
    seed), so the candidate never saw what the guard judges it on."""
    from edgetl.device import Personalizer

    guard.add_examples(case.x, labels)
    side = Personalizer(case.clf, case.side_store, replay_per_class=0, settings=guard.settings)
    side.add_examples(case.x, labels)
    guard.candidate = side.train(_hot())


def genuine(guard: Any, case: Case) -> None:
    """Correct labels, the Personalizer's default training (with replay)."""
    guard.add_examples(case.x, case.y)
    guard.train()


def genuine_hot(guard: Any, case: Case) -> None:
    """Correct labels, Adam at 0.5 for 100 epochs, no replay in training."""
    _without_replay(guard, case, case.y)


def shuffled(guard: Any, case: Case) -> None:
    """The batch's labels permuted among its examples, default training."""
    guard.add_examples(case.x, [str(v) for v in case.rng.permutation(case.y)])
    guard.train()


def _one_label(case: Case) -> list[str]:
    return [str(case.rng.choice(case.clf.head.labels))] * len(case.y)


def one_label(guard: Any, case: Case) -> None:
    """Every example labelled one class, default training."""
    guard.add_examples(case.x, _one_label(case))
    guard.train()


def one_label_hot(guard: Any, case: Case) -> None:
    """Every example labelled one class, Adam at 0.5 (replay still in training)."""
    guard.add_examples(case.x, _one_label(case))
    guard.train(_hot())


def one_class_hot(guard: Any, case: Case) -> None:
    """Examples of one class only, correctly labelled, Adam at 0.5, no replay in training."""
    _without_replay(guard, case, case.y)  # the batch itself holds one class (see ONE_CLASS)


def relabel_hot(guard: Any, case: Case) -> None:
    """Every digit labelled as the next one, consistently, Adam at 0.5, no replay in training."""
    names = list(case.clf.head.labels)
    _without_replay(guard, case, [names[(names.index(v) + 1) % len(names)] for v in case.y])


SCENARIOS: dict[str, Callable[[Any, Case], None]] = {
    "genuine": genuine,
    "genuine_hot": genuine_hot,
    "shuffled": shuffled,
    "one_label": one_label,
    "one_label_hot": one_label_hot,
    "one_class_hot": one_class_hot,
    "relabel_hot": relabel_hot,
}
ONE_CLASS = {"one_class_hot"}  # scenarios whose batch is drawn from one class


def draw(labels: np.ndarray, n: int, rng: np.random.Generator, one_class: bool) -> tuple[np.ndarray, np.ndarray]:
    """A user batch of ``n`` (class-balanced, or from one class, keeping 20 of that class for
    the test) and the test set: every other image."""
    classes = sorted(set(labels.tolist()))
    if one_class:
        pool = rng.permutation(np.flatnonzero(labels == classes[rng.integers(len(classes))]))
        batch = pool[: min(n, len(pool) - 20)]
    else:
        per = max(1, n // len(classes))
        batch = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes])
    return np.sort(batch), np.setdiff1d(np.arange(len(labels)), batch)


def accuracy(clf: Any, head: Any, emb: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of ``head`` on embeddings, run by the classifier's head runtime."""
    active = np.flatnonzero(head.mask > 0)
    probs = clf.head_runtime.probabilities(head, emb)[:, active]
    return float(np.mean(np.asarray(head.labels)[probs.argmax(axis=1)] == labels))


def run_case(clf: Any, data: Users, scenario: str, n: int, seed: int, margins: tuple[float, float]) -> dict[str, Any]:
    """One user batch through the real guard (``Personalizer.commit``), judged on the test set."""
    from edgetl.device import Personalizer

    rng = np.random.default_rng([seed, n, list(SCENARIOS).index(scenario)])
    batch, test = draw(data.labels, n, rng, scenario in ONE_CLASS)
    factory = clf.factory
    with tempfile.TemporaryDirectory() as tmp:
        clf.set_head(factory, 0)
        guard = Personalizer(clf, Path(tmp) / "store", margin=margins[0], forget_margin=margins[1])
        case = Case(clf, data.x[batch], [str(v) for v in data.labels[batch]], rng, Path(tmp) / "side")
        SCENARIOS[scenario](guard, case)
        candidate = guard.candidate
        result = guard.commit()
    clf.set_head(factory, 0)
    truth = {
        "user_before": accuracy(clf, factory, data.emb_user[test], data.labels[test]),
        "user_after": accuracy(clf, candidate, data.emb_user[test], data.labels[test]),
        "factory_before": accuracy(clf, factory, data.emb_factory[test], data.labels[test]),
        "factory_after": accuracy(clf, candidate, data.emb_factory[test], data.labels[test]),
    }
    gain = truth["user_after"] - truth["user_before"]
    drop = truth["factory_before"] - truth["factory_after"]
    return {
        "scenario": scenario,
        "n": int(len(batch)),
        "size": n,
        "seed": seed,
        "accepted": bool(result.accepted),
        "reason": result.reason,
        "candidate_scores": dict(result.candidate_scores),
        "active_scores": dict(result.active_scores),
        **truth,
        "user_gain": gain,
        "factory_drop": drop,
        "should_accept": bool(gain > 0 and drop <= TRUTH_FORGET),
    }


def measure(
    bundle: str | os.PathLike[str],
    test: Any,
    *,
    seeds: range | list[int] = range(20),
    sizes: tuple[int, ...] = SIZES,
    scenarios: tuple[str, ...] | list[str] | None = None,
    backend: str = "onnxruntime",
    margin: float | None = None,
    forget_margin: float | None = None,
) -> list[dict[str, Any]]:
    """Every (scenario, size, seed) case on ``bundle``; ``test`` is the half of digits 5-9 the
    bundle never saw (``digit_halves().test``). Margins default to the Personalizer's."""
    from edgetl.device import Classifier
    from edgetl.device._personalizer import DEFAULT_FORGET_MARGIN, DEFAULT_MARGIN

    margins = (
        DEFAULT_MARGIN if margin is None else margin,
        DEFAULT_FORGET_MARGIN if forget_margin is None else forget_margin,
    )
    clf = Classifier.open(bundle, backend=backend)
    data = users(clf, test)
    records = []
    for scenario in scenarios or list(SCENARIOS):
        for n in sizes:
            for seed in seeds:
                record = run_case(clf, data, scenario, n, seed, margins)
                record["margins"] = list(margins)
                records.append(record)
    for r in records:  # the sweep below recomputes decisions: it must reproduce the real ones
        if guard_accepts(r, *margins) != r["accepted"]:
            raise AssertionError(f"the guard rule here no longer matches Personalizer.commit: {r}")
    return records


def guard_accepts(record: dict[str, Any], margin: float, forget_margin: float) -> bool:
    """Personalizer.commit's rule, on a case's recorded guard scores."""
    cand, cur = record["candidate_scores"], record["active_scores"]
    if float(np.mean(list(cand.values()))) < float(np.mean(list(cur.values()))) - margin:
        return False
    return not ("replay" in cand and cand["replay"] < cur["replay"] - forget_margin)


def rates(records: list[dict[str, Any]], decide: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Accept rate, false-accept rate (accepted among the should-reject), false-reject rate
    (rejected among the should-accept); ``decide`` replaces the recorded decisions."""
    decide = decide or (lambda r: r["accepted"])
    accepted = [decide(r) for r in records]
    should = [r["should_accept"] for r in records]
    fa = sum(a and not s for a, s in zip(accepted, should))
    fr = sum(s and not a for a, s in zip(accepted, should))
    n_reject, n_accept = should.count(False), should.count(True)
    destroyed = [a for a, r in zip(accepted, records) if r["factory_drop"] > DESTROYED]
    return {
        "cases": len(records),
        "accept_rate": sum(accepted) / len(records) if records else float("nan"),
        "should_accept": n_accept,
        "false_accepts": fa,
        "false_rejects": fr,
        "far": fa / n_reject if n_reject else float("nan"),
        "frr": fr / n_accept if n_accept else float("nan"),
        "destroyed": len(destroyed),
        "destroyed_accepted": sum(destroyed),
        "user_gain": float(np.mean([r["user_gain"] for r in records])) if records else float("nan"),
        "factory_drop": float(np.mean([r["factory_drop"] for r in records])) if records else float("nan"),
    }


def _pct(v: float) -> str:
    return "    -" if v != v else f"{v:5.2f}"


def table(records: list[dict[str, Any]]) -> str:
    """Per (scenario, batch size): what the guard did and how often it was right."""
    head = (
        f"{'scenario':<15}{'N':>5}{'cases':>6}{'accept':>8}{'should':>8}{'FAR':>7}{'FRR':>7}"
        f"{'user gain':>11}{'fac. drop':>11}{'destroyed (acc.)':>18}"
    )
    lines = [head]
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        for size in dict.fromkeys(r["size"] for r in records):
            group = [r for r in records if r["scenario"] == scenario and r["size"] == size]
            if not group:
                continue
            s = rates(group)
            n = f"{size}" if all(r["n"] == size for r in group) else f"~{int(np.mean([r['n'] for r in group]))}"
            lines.append(
                f"{scenario:<15}{n:>5}{s['cases']:>6}{_pct(s['accept_rate']):>8}"
                f"{_pct(s['should_accept'] / s['cases']):>8}{_pct(s['far']):>7}{_pct(s['frr']):>7}"
                f"{s['user_gain']:>+11.3f}{s['factory_drop']:>+11.3f}{s['destroyed']:>9} ({s['destroyed_accepted']})"
            )
    return "\n".join(lines)


def sweep(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pooled rates for every (margin, forget_margin) in the grid, from the recorded scores,
    with the genuine scenario's accept rate at its worst batch size."""
    rows = []
    sizes = list(dict.fromkeys(r["size"] for r in records))
    for m in MARGINS:
        for f in FORGET_MARGINS:
            s = rates(records, lambda r, m=m, f=f: guard_accepts(r, m, f))
            per_size = [
                [guard_accepts(r, m, f) for r in records if r["scenario"] == "genuine" and r["size"] == n]
                for n in sizes
            ]
            s["genuine_min"] = min((float(np.mean(a)) for a in per_size if a), default=float("nan"))
            rows.append({"margin": m, "forget_margin": f, **s})
    return rows


def recommend(rows: list[dict[str, Any]], current: tuple[float, float]) -> dict[str, Any]:
    """The rule: refuse every destroyed head, accept at least GENUINE_FLOOR of the genuine
    batches at every size; among those pairs, the fewest false accepts (a committed harmful
    batch costs more than a refused good one, which the user can retry), ties going to the
    pair nearest the current defaults, then to fewer false rejects."""
    eligible = [r for r in rows if r["destroyed_accepted"] == 0 and r["genuine_min"] >= GENUINE_FLOOR] or rows

    def key(r: dict[str, Any]) -> tuple[float, float, float]:
        near = abs(r["margin"] - current[0]) + abs(r["forget_margin"] - current[1])
        return (r["false_accepts"], round(near, 6), r["false_rejects"])

    return min(eligible, key=key)


def sweep_table(rows: list[dict[str, Any]], current: tuple[float, float], best: dict[str, Any]) -> str:
    """The sweep as a table, marking the current and the recommended pair."""
    lines = [
        f"{'margin':>7}{'forget':>8}{'FAR':>7}{'FRR':>7}{'FA':>5}{'FR':>5}{'destroyed acc.':>16}{'genuine min':>13}"
    ]
    for r in rows:
        mark = " <- current" if (r["margin"], r["forget_margin"]) == current else ""
        mark += " <- recommended" if r is best else ""
        lines.append(
            f"{r['margin']:>7.2f}{r['forget_margin']:>8.2f}{_pct(r['far']):>7}{_pct(r['frr']):>7}"
            f"{r['false_accepts']:>5}{r['false_rejects']:>5}{r['destroyed_accepted']:>16}"
            f"{_pct(r['genuine_min']):>13}{mark}"
        )
    return "\n".join(lines)


def per_size(records: list[dict[str, Any]], margin: float, forget_margin: float) -> str:
    """FAR and FRR per batch size for one margin pair."""
    parts = []
    for size in dict.fromkeys(r["size"] for r in records):
        s = rates([r for r in records if r["size"] == size], lambda r: guard_accepts(r, margin, forget_margin))
        parts.append(f"N={size}: FAR {_pct(s['far']).strip()} FRR {_pct(s['frr']).strip()}")
    return f"margin {margin:.2f} / forget_margin {forget_margin:.2f}: " + "; ".join(parts)


def main() -> int:
    """The command line: build or take a bundle, measure, print the tables and the recommendation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a digits bundle trained on digit_halves().train (default: build)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "litert"])
    parser.add_argument("--json", type=Path, help="write every case's record here")
    args = parser.parse_args()
    from edgetl.device._personalizer import DEFAULT_FORGET_MARGIN, DEFAULT_MARGIN

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_bundle(Path(tmp))
        records = measure(
            bundle,
            digit_halves().test,
            seeds=range(args.seeds),
            sizes=tuple(int(s) for s in args.sizes.split(",")),
            scenarios=args.scenarios.split(","),
            backend=args.backend,
        )
    current = (DEFAULT_MARGIN, DEFAULT_FORGET_MARGIN)
    print(f"guard decisions at margin {current[0]} / forget_margin {current[1]} ({args.backend}, {args.seeds} seeds):")
    print("(should = share that should be accepted: user test accuracy up and factory test accuracy down by at most")
    print(f" {TRUTH_FORGET}; FAR = accepted among the should-reject; FRR = rejected among the should-accept;")
    print(f" destroyed = factory accuracy down by more than {DESTROYED}, (acc.) = of those accepted)")
    print(table(records))
    rows = sweep(records)
    best = recommend(rows, current)
    print("\npooled over every scenario and size, per margin pair (recomputed from the recorded guard scores;")
    print(" genuine min = the genuine scenario's accept rate at its worst batch size):")
    print(sweep_table(rows, current, best))
    print("\n" + per_size(records, *current) + "  (current)")
    print(per_size(records, best["margin"], best["forget_margin"]) + "  (recommended)")
    pair = f"margin {best['margin']:.2f}, forget_margin {best['forget_margin']:.2f}"
    print(
        f"\nrecommendation: {pair} (FAR {best['far']:.3f}, FRR {best['frr']:.3f}, {best['destroyed_accepted']} "
        f"destroyed head(s) accepted, genuine accepted >= {best['genuine_min']:.2f} at every size)."
    )
    print(
        f"rule: no destroyed head accepted, genuine >= {GENUINE_FLOOR} at every size, then the fewest false accepts, "
        f"ties to the nearest current default; {len(records)} cases in {time.perf_counter() - t0:.0f}s"
    )
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
