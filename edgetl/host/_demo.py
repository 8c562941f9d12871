"""``edgetl demo``: the whole transfer story offline: learned on synthetic printed glyphs,
transferred to real handwriting with a few examples.

Scenario: ``edgetl_cnn`` is pretrained on a **source task** that costs nothing to collect:
30,000 images of letters and digits rendered from the fonts matplotlib and the system ship,
each randomly transformed (:mod:`edgetl._glyphs`). Its backbone is reused for a **target
task**, real handwritten digits 5-9 (scikit-learn's, which share no image with the source),
with only a few labelled examples per class, and compared with the same CNN trained from
scratch on the same examples.

What is printed is what is measured, over several seeds, on target digits never used for
training or for choosing any setting: the source task's settings were chosen in
``tools/glyph_transfer.py`` on a tuning target the demo never reports (digits 0-4, other
seeds), and everything else was fixed up front. The costs are printed next to accuracy:
trainable parameters and training time, which decide what can be trained on a device.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgetl._quiet import progress
from edgetl.bundle import read_bundle
from edgetl.data import Dataset, Splits, load_digits_dataset, restyle_digits, sample_shots, stratified_split
from edgetl.device._bench import bench_bundle
from edgetl.device._classifier import Classifier
from edgetl.device._lifecycle import migrate
from edgetl.device._personalizer import Personalizer
from edgetl.device._store import HeadStore
from edgetl.device._tail import TailPersonalizer
from edgetl.errors import BundleError, QuantizedModelLeftOut
from edgetl.host._backbones import Backbone
from edgetl.host._demo_report import USER_SHOTS, interpret, write_demo_report
from edgetl.host._demo_source import DEMO_BACKBONE, GlyphSourceRecipe, SourceModel, pretrained_source
from edgetl.host._export import export_bundle
from edgetl.host._pretrain import pretrain
from edgetl.host._reference_head import keras_retrain
from edgetl.host._run import save_run
from edgetl.host._tf import keras
from edgetl.host._transfer import TrainConfig, train_transfer

SOURCE = GlyphSourceRecipe()
TARGET_CLASSES = (5, 6, 7, 8, 9)
DEFAULT_SHOTS: tuple[int | str, ...] = (1, 3, 5, 10, "all")
DEFAULT_SEEDS = (0, 1, 2)
# Both models get the same number of optimizer steps, whatever the shot count, so neither
# wins by being trained longer. Fixed before any result was seen.
OPTIMIZER_STEPS = 300
BATCH_SIZE = 32


@dataclass
class DemoRow:
    shots: int | str
    transfer_accuracy: list[float]
    scratch_accuracy: list[float]
    transfer_trainable_params: int
    scratch_trainable_params: int
    transfer_train_seconds: list[float]
    scratch_train_seconds: list[float]

    def summary(self) -> dict[str, Any]:
        return {
            "shots": self.shots,
            "transfer_accuracy_mean": float(np.mean(self.transfer_accuracy)),
            "transfer_accuracy_std": float(np.std(self.transfer_accuracy)),
            "scratch_accuracy_mean": float(np.mean(self.scratch_accuracy)),
            "scratch_accuracy_std": float(np.std(self.scratch_accuracy)),
            "transfer_trainable_params": self.transfer_trainable_params,
            "scratch_trainable_params": self.scratch_trainable_params,
            "transfer_train_seconds_mean": float(np.mean(self.transfer_train_seconds)),
            "scratch_train_seconds_mean": float(np.mean(self.scratch_train_seconds)),
            "per_seed": {
                "transfer_accuracy": self.transfer_accuracy,
                "scratch_accuracy": self.scratch_accuracy,
                "transfer_train_seconds": self.transfer_train_seconds,
                "scratch_train_seconds": self.scratch_train_seconds,
            },
        }


def _epochs_for(n_examples: int) -> int:
    return max(1, math.ceil(OPTIMIZER_STEPS / math.ceil(n_examples / BATCH_SIZE)))


def run_demo(
    out: str | Path | None = None,
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    shots: Sequence[int | str] = DEFAULT_SHOTS,
    source: GlyphSourceRecipe = SOURCE,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo; print the table through ``echo``; write runs and JSON under ``out``.

    ``source`` is how the source backbone is pretrained (:data:`SOURCE` unless a quicker
    look is wanted); it is cached, so a second run with the same recipe skips pretraining.
    Returns the results as a dict (also written to ``out/demo_results.json``).
    """
    wall = time.perf_counter()
    target = load_digits_dataset(TARGET_CLASSES)
    echo("edgetl demo: learned on synthetic printed glyphs, transferred to real handwritten digits (offline)")
    echo(
        f"  source task: {source.images:,} images of {len(source.characters)} letters and digits rendered from fonts, "
        f"randomly transformed  ->  target task: handwritten digits {TARGET_CLASSES[0]}-{TARGET_CLASSES[-1]} "
        f"(scikit-learn, {len(target)} images, {source.image_size}x{source.image_size})"
    )
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
    src = pretrained_source(source, out_path / "source_run" if out_path is not None else None, echo)
    echo(
        "  per seed: half of each target class is held out for testing; k examples per class are drawn from the rest; "
        f"seeds {list(seeds)}"
    )
    rows, final_result, final_halves = _compare_with_scratch(src, target, seeds, shots)
    summaries = [r.summary() for r in rows.values()]
    echo("")
    echo(format_table(summaries, len(seeds)))
    echo("")
    for line in interpret(summaries):
        echo(line)
    result: dict[str, Any] = {
        "scenario": {
            "source": {**_recipe_record(src), "cached": src.cached},
            "target_classes": TARGET_CLASSES,
            "seeds": list(seeds),
            "optimizer_steps": OPTIMIZER_STEPS,
            "batch_size": BATCH_SIZE,
        },
        "source": src.metrics,
        "rows": summaries,
    }
    if out_path is not None and final_result is not None:
        result.update(_device_story(out_path, final_result, final_halves, seeds[0], echo))
        result["report"] = str(write_demo_report(out_path / "report.html", result, source, final_halves))
        echo(f"  report (source task, transfer vs scratch, export, int8, the new user, migration): {result['report']}")
    result["wall_seconds"] = round(time.perf_counter() - wall, 1)
    if out_path is not None:
        (out_path / "demo_results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    echo(f"  demo wall time: {result['wall_seconds']:.0f}s")
    return result


def _recipe_record(src: SourceModel) -> dict[str, Any]:
    r = src.recipe
    return {
        "kind": "synthetic printed glyphs (edgetl._glyphs)",
        "characters": r.characters,
        "images": r.images,
        "image_size": r.image_size,
        "fonts": src.fonts,
        "epochs": r.epochs,
        "batch_size": r.batch_size,
        "learning_rate": r.learning_rate,
        "seed": r.seed,
        "run": str(src.run),
    }


def _compare_with_scratch(
    src: SourceModel, target: Dataset, seeds: Sequence[int], shots: Sequence[int | str]
) -> tuple[dict[Any, DemoRow], Any, Splits | None]:
    """Per seed and shot count: transfer (frozen pretrained backbone, linear head) and the
    same architecture from scratch, on the same examples, tested on the same held-out half."""

    k = keras()
    backbone_weights = src.backbone.get_weights()
    rows: dict[Any, DemoRow] = {}
    final_result = final_halves = None
    for seed in progress(seeds, desc="demo: seeds"):
        halves = stratified_split(target, val_fraction=0.0, test_fraction=0.5, seed=seed)
        # With all shots (the model the demo exports), the guard split is held out by the split of
        # the run's own config (no val or test: halves.test tests), which export re-splits
        # halves.train with: it ships the guard rows only when they are exactly these.
        held = TrainConfig(backbone=DEMO_BACKBONE, val_fraction=0.0, test_fraction=0.0, seed=seed).split(halves.train)
        for k_shots in shots:
            train = held.train if k_shots == "all" else sample_shots(halves.train, int(k_shots), seed=seed)
            splits = Splits(
                train=train, val=train.subset([]), test=halves.test, guard=held.guard if k_shots == "all" else None
            )
            k.backend.clear_session()
            bb_model = k.models.clone_model(src.backbone)
            bb_model.set_weights(backbone_weights)
            bb = Backbone(bb_model, f"{DEMO_BACKBONE}(pretrained on glyphs)", src.embedding_size, src.input_spec, "run")
            t_cfg = TrainConfig(
                backbone=DEMO_BACKBONE,
                epochs=_epochs_for(len(train)),
                batch_size=BATCH_SIZE,
                learning_rate=1e-2,
                early_stopping_patience=0,
                seed=seed,
                val_fraction=0.0,
                test_fraction=0.0,
            )
            # The backbone standardizes its embedding with the source task's statistics (see
            # with_source_standardization); a few target examples cannot estimate them.
            tr = train_transfer(splits, replace(t_cfg, standardize_embeddings=False), backbone=bb)
            sc = pretrain(splits, replace(t_cfg, learning_rate=1e-3))  # every layer, the same examples
            row = rows.setdefault(
                k_shots,
                DemoRow(
                    k_shots, [], [], tr.metrics["trainable_params_head_phase"], sc.metrics["trainable_params"], [], []
                ),
            )
            row.transfer_accuracy.append(tr.metrics["test_accuracy"])
            row.scratch_accuracy.append(sc.metrics["test_accuracy"])
            # Transfer training time includes embedding the examples once with the backbone.
            row.transfer_train_seconds.append(tr.metrics["train_seconds"])
            row.scratch_train_seconds.append(sc.metrics["train_seconds"])
            if seed == seeds[0] and k_shots == "all":
                final_result, final_halves = tr, halves
    return rows, final_result, final_halves


def _device_story(
    out_path: Path, final_result: Any, halves: Splits, seed: int, echo: Callable[[str], None]
) -> dict[str, Any]:
    """Export the final model, personalize it on the device, migrate, benchmark."""

    save_run(final_result, out_path / "target_run", kind="train", overwrite=True)
    echo(
        f"  wrote {out_path / 'source_run'} (pretrained backbone) and {out_path / 'target_run'} (transfer model, all "
        f"shots, seed {seed})"
    )
    out: dict[str, Any] = {"export": export_demo_bundle(out_path, halves, echo)}
    out["personalization"] = personalize_demo(out_path, halves, echo)
    out["migration"] = migration_demo(out_path, halves, echo)
    out["bench"] = bench_bundle(read_bundle(out_path / "digits.edgetl"), data=(halves.test.x, halves.test.y), runs=30)
    return out


def format_table(rows: list[dict[str, Any]], n_seeds: int) -> str:
    head = (
        f"  {'shots/class':>11} | {'transfer acc':>14} | {'scratch acc':>14} | {'trainable params':>21} | "
        f"{'train time (s)':>20}"
    )
    sub = (
        f"  {'':>11} | {f'mean±sd, {n_seeds} seeds':>14} | {'':>14} | {'transfer / scratch':>21} | "
        f"{'transfer / scratch':>20}"
    )
    lines = [head, sub, "  " + "-" * (len(head) - 2)]
    for r in rows:
        t_acc = f"{r['transfer_accuracy_mean']:.3f}±{r['transfer_accuracy_std']:.3f}"
        s_acc = f"{r['scratch_accuracy_mean']:.3f}±{r['scratch_accuracy_std']:.3f}"
        params = f"{r['transfer_trainable_params']:,} / {r['scratch_trainable_params']:,}"
        secs = f"{r['transfer_train_seconds_mean']:.2f} / {r['scratch_train_seconds_mean']:.2f}"
        lines.append(f"  {str(r['shots']):>11} | {t_acc:>14} | {s_acc:>14} | {params:>21} | {secs:>20}")
    return "\n".join(lines)


def export_demo_bundle(out: Path, halves: Splits, echo: Callable[[str], None]) -> dict[str, Any]:
    """Export the target model (fp32, int8, QAT; TFLite and ONNX) and print size, accuracy
    and parity of each file, measured on the held-out half of the target digits."""

    with warnings.catch_warnings():  # the demo prints the files left out in its own words below
        warnings.simplefilter("ignore", QuantizedModelLeftOut)
        result = export_bundle(
            out / "target_run",
            out / "digits.edgetl",
            quantize=["none", "int8", "qat"],
            calibration=halves.train,
            evaluation=halves.test,
            overwrite=True,
        )
    if not result.ok:
        raise BundleError(f"the demo's export failed verification:\n{result.describe()}")
    bundle, checks = result.bundle, result.report.checks
    size = {a.file: a.size for a in bundle.manifest.artifacts}
    echo("")
    echo(
        f"  exported {bundle.path} and verified it in onnxruntime and LiteRT (held-out target digits: "
        f"{len(halves.test)}):"
    )
    echo(f"  {'file':<20} {'bytes':>9} {'accuracy':>9} {'vs fp32':>8}  parity with Keras")
    for c in checks:
        if c.role == "fused":
            echo(
                f"  {c.file:<20} {size[c.file]:>9,} {c.extra['accuracy']:>9.4f} "
                f"{-c.extra['accuracy_drop'] * 100 + 0.0:>+7.2f}p  {c.describe()}"
            )
    for o in result.omitted:
        echo(f"  left out {', '.join(o['files'])}: {o['reason']}")
    heads = [c for c in checks if c.role in ("head", "head_train_loop")]
    echo(
        f"  on-device head graphs ({', '.join(sorted({c.file for c in heads}))}): {heads[0].extra.get('steps', 1)} "
        f"train steps match numpy (largest difference {max(c.value for c in heads):.1e})"
    )
    echo(
        f"  all checks {'passed' if result.report.ok else 'FAILED'}; export took "
        f"{result.timings['export_seconds']:.1f}s"
    )
    return {
        "bundle": str(bundle.path),
        "ok": result.report.ok,
        "checks": [c.to_json() for c in checks],
        "sizes": size,
        "omitted": result.omitted,
    }


def _new_user(halves: Splits) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The new user's digits (thicker, slanted): USER_SHOTS per class to adapt on, the rest to test."""

    x = restyle_digits(halves.test.x)
    labels = np.asarray([halves.test.class_names[i] for i in halves.test.y])
    rng = np.random.default_rng(0)
    adapt = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:USER_SHOTS] for c in halves.test.class_names])
    return x, labels, adapt, np.setdiff1d(np.arange(len(x)), adapt)


def _accuracy(clf: Any, x: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(clf.predict(x).labels) == labels))


def personalize_demo(out: Path, halves: Splits, echo: Callable[[str], None]) -> dict[str, Any]:
    """A new user draws digits differently (thicker, slanted): personalize the head on the
    device with each backend (a store per backend under ``out/stores``, examples kept), and
    compare with the same head retrained on the host by Keras."""

    x, labels, adapt, test = _new_user(halves)
    echo("")
    echo(
        f"  a new user draws digits thicker and slanted; {USER_SHOTS} of their examples per class personalize the "
        f"head, {len(test)} others test it:"
    )
    rows: dict[str, Any] = {}
    for backend in ("onnxruntime", "litert"):
        clf = Classifier.open(out / "digits.edgetl", backend=backend)
        before = _accuracy(clf, x[test], labels[test])
        store = out / "stores" / backend
        shutil.rmtree(store, ignore_errors=True)
        p = Personalizer(clf, store)
        t0 = time.perf_counter()
        p.add_examples(x[adapt], labels[adapt])
        p.train()
        train_seconds = time.perf_counter() - t0
        committed = p.commit()
        after = _accuracy(clf, x[test], labels[test])
        rows[backend] = {
            "before": before,
            "after": after,
            "seconds": train_seconds,
            "committed": committed.accepted,
            "guard": committed.reason,
        }
        evidence = committed.reason.partition(": ")[2]
        echo(
            f"    on the device, {backend:<11}: accuracy {before:.3f} -> {after:.3f} (embed + train "
            f"{train_seconds:.2f}s; {'accepted' if committed.accepted else 'rejected'} by the guard)"
        )
        echo(f"      guard: {evidence}")
        rows[backend]["tail"] = tail = tail_side(
            out / "digits.edgetl", backend, x[adapt], labels[adapt], x[test], labels[test]
        )
        echo(
            f"      with the tail (its last layer trained too): accuracy {before:.3f} -> {tail['after']:.3f} (embed + "
            f"train {tail['seconds']:.2f}s; {'accepted' if tail['accepted'] else 'rejected'} by the guard)"
            if tail["available"]
            else f"      no tail: {tail['reason']}"
        )
        if backend == "onnxruntime":  # host reference: the same data, head, settings and batches
            emb, names = p.training_set()
            clf.set_head(keras_retrain(clf.factory, emb, p.onehot(names, clf.factory), p.settings), -1)
            reference = _accuracy(clf, x[test], labels[test])
    rows["host_keras"] = {"after": reference}
    echo(
        f"    on the host, Keras retraining the same head: accuracy {reference:.3f} (device - host: "
        f"{(rows['onnxruntime']['after'] - reference) * 100:+.2f} points)"
    )
    return rows


def tail_side(
    bundle: Path, backend: str, x: np.ndarray, labels: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> dict:
    """The same examples personalizing the backbone's last layer with the head (``--adapt
    tail``) from the factory head, judged by the same guard; not committed (the store keeps the
    head-only personalization the migration step carries over). A refused tail leaves the
    factory head: its accuracy is the one before."""
    clf = Classifier.open(bundle, backend=backend)
    before = _accuracy(clf, test_x, test_y)
    t0 = time.perf_counter()
    p = Personalizer(clf, None)
    p.add_examples(x, labels)
    try:
        tp = TailPersonalizer(p)
    except BundleError as exc:
        return {"available": False, "reason": str(exc)}
    candidate = tp.train()
    verdict = tp.decide()
    seconds = time.perf_counter() - t0
    after = before
    if verdict.accepted:
        after = float(np.mean(tp.predict(candidate.weights, tp.runtime.trunk(test_x), clf.factory.labels) == test_y))
    return {
        "available": True,
        "after": after,
        "seconds": seconds,
        "accepted": verdict.accepted,
        "guard": verdict.reason,
    }


def migration_demo(out: Path, halves: Splits, echo: Callable[[str], None]) -> dict[str, Any]:
    """A new bundle arrives (the backbone fine-tuned one more phase): each device store moves
    to it, rebuilding the user's head from the examples it kept."""

    config = TrainConfig(
        backbone=str(out / "source_run"),
        fine_tune_layers=2,
        fine_tune_epochs=5,
        val_fraction=0.1,
        test_fraction=0.0,
        seed=0,
    )
    with warnings.catch_warnings():
        # Fine-tuning that does not beat head-only on validation is not kept (and warned
        # about); the demo says so in its own words below.
        warnings.filterwarnings("ignore", message="fine-tuning did not improve")
        tuned = train_transfer(halves.train, config)
    run = save_run(tuned, out / "target_run_v2", kind="train", overwrite=True)
    new = export_bundle(
        run, out / "digits_v2.edgetl", calibration=halves.train, evaluation=halves.test, version="2", overwrite=True
    ).bundle
    x, labels, _, test = _new_user(halves)
    what = (
        "the backbone fine-tuned one more phase"
        if tuned.metrics.get("fine_tune_kept")
        else "fine-tuning did not beat head-only on validation and was not kept: a new head and embedding statistics"
    )
    echo("")
    echo(f"  a new bundle arrives ({new.path.name}: {what}); each store migrates to it:")
    rows: dict[str, Any] = {}
    for backend in ("onnxruntime", "litert"):
        old = Classifier.open(out / "digits.edgetl", backend=backend, store=out / "stores" / backend)
        personalized = _accuracy(old, x[test], labels[test])
        factory = _accuracy(Classifier.open(new.path, backend=backend), x[test], labels[test])
        result = migrate(HeadStore(out / "stores" / backend, old.bundle), new, backend=backend)
        migrated = _accuracy(
            Classifier.open(new.path, backend=backend, store=out / "stores" / backend), x[test], labels[test]
        )
        rows[backend] = {
            "personalized_old": personalized,
            "new_factory": factory,
            "migrated": migrated,
            "kind": result.kind,
        }
        echo(
            f"    {backend:<11}: old bundle personalized {personalized:.3f}; new bundle factory head {factory:.3f} -> "
            f"after migration {migrated:.3f} ({result.kind})"
        )
        if result.decision is not None:  # a retrained head: the guard's counts against the new factory head
            echo(f"      guard: {result.decision.reason.partition(': ')[2]}")
    return rows
