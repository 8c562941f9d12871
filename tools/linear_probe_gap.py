#!/usr/bin/env python
"""How far is edgetl's head from the best linear head on the same embeddings?

    python tools/linear_probe_gap.py [--seeds 3] [--out DIR] [--json]

For four tasks built from offline data, each the way a user would bring it, ``edgetl
train`` runs with default flags (through the CLI) and a scikit-learn reference is fitted
on the *same* embeddings of the *same* splits: ``StandardScaler`` + ``LogisticRegressionCV``
(C among 10 values by 5-fold cross-validation on train + validation). Both are scored on
the run's test split, averaged over seeds (each seed is a different split). Also shown:
the head edgetl trained before issue 9 (Adam on raw embeddings, 30 epochs), for the record.

Tasks:
  digits-transfer   edgetl_cnn pretrained on digits 0-4 (an `edgetl pretrain` run), target digits 5-9
  dense-model-file  a user's .keras CNN (32x32x3, Dense(64) embedding, Dense classifier; raw
                    pixels) trained on clean digits; target: the user's own photos, digits 0-9
                    drawn thicker and slanted, a folder of 28/32/40-pixel PNG/JPEG, some gray
  allconv-h5        a Keras 2 .h5 (64x64x1, Conv2D 1x1 -> GAP -> softmax) that expects
                    (x/255-0.5)*2, declared with --input-preprocessing -1-1; target: 25x25 gray
                    crops of digits 7 and 9, 90 per class
  csv-features      digits as 64-column CSV; edgetl_mlp pretrained on 0-4, target 5-9

Target (issue 9): edgetl within 1 point of the reference on every task. Printed as PASS/MISS.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TARGET_POINTS = 1.0


def build_tasks(base: Path) -> dict[str, dict[str, Any]]:
    """Make every task's files under ``base``; returns CLI arguments per task."""
    import user_models as um

    from edgetl.cli import main
    from edgetl.data import load_digits_dataset

    tasks: dict[str, dict[str, Any]] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "pretrain",
                    "--data",
                    str(_npz(base / "digits04.npz", load_digits_dataset((0, 1, 2, 3, 4)))),
                    "--backbone",
                    "edgetl_cnn",
                    "--epochs",
                    "15",
                    "--quiet",
                    "--overwrite",
                    "--out",
                    str(base / "source_cnn"),
                ]
            )
            == 0
        )
    tasks["digits-transfer"] = {
        "data": str(_npz(base / "digits59.npz", load_digits_dataset((5, 6, 7, 8, 9)))),
        "args": ["--backbone", str(base / "source_cnn")],
    }

    model = um.dense_classifier_model(base / "user_cnn.keras")
    x, y = um.digit_images(tuple(range(10)), 40, 3, seed=1, restyle=True)
    um.write_image_folder(
        base / "photos",
        x,
        y,
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
        sizes=(28, 32, 40),
        gray_every=7,
    )
    tasks["dense-model-file"] = {"data": str(base / "photos"), "args": ["--backbone", str(model)]}

    h5 = um.allconv_h5_model(base / "mini_classifier.h5")
    x, y = um.digit_images((7, 9), 25, 1, seed=2, per_class=90)
    um.write_image_folder(base / "crops", x, y, ["seven", "nine"], sizes=(25,))
    tasks["allconv-h5"] = {
        "data": str(base / "crops"),
        "args": ["--backbone", str(h5), "--input-preprocessing", "-1-1"],
    }

    digits = load_digits_dataset()
    flat = digits.x.reshape(len(digits), -1).astype(np.float32)
    src, tgt = digits.y < 5, digits.y >= 5
    um.write_csv(base / "src.csv", flat[src], digits.y[src], [str(i) for i in range(10)])
    um.write_csv(base / "tgt.csv", flat[tgt], digits.y[tgt], [str(i) for i in range(10)])
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "pretrain",
                    "--data",
                    str(base / "src.csv"),
                    "--backbone",
                    "edgetl_mlp",
                    "--epochs",
                    "30",
                    "--quiet",
                    "--overwrite",
                    "--out",
                    str(base / "source_mlp"),
                ]
            )
            == 0
        )
    tasks["csv-features"] = {"data": str(base / "tgt.csv"), "args": ["--backbone", str(base / "source_mlp")]}
    return tasks


def _npz(path: Path, ds: Any) -> Path:
    np.savez(path, x=ds.x, y=np.asarray([ds.class_names[i] for i in ds.y]))
    return path


def reference_accuracy(emb: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> tuple[float, float]:
    """Standardized logistic regression, C by 5-fold CV on train + validation."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_fit = np.concatenate([emb["train"], emb["val"]])
    y_fit = np.concatenate([y["train"], y["val"]])
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=5, max_iter=5000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9 announcing new defaults
        clf.fit(x_fit, y_fit)
    return float(clf.score(emb["test"], y["test"])), float(clf[-1].C_[0])


def run_task(name: str, task: dict[str, Any], base: Path, seed: int) -> dict[str, Any]:
    """edgetl train with default flags, the reference on the same embeddings, and the old head."""
    from edgetl.cli import main
    from edgetl.host._backbones import create_backbone
    from edgetl.host._run import load_run
    from edgetl.host._transfer import train_transfer

    out = base / f"run_{name}_{seed}"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            main(
                [
                    "train",
                    "--data",
                    task["data"],
                    *task["args"],
                    "--seed",
                    str(seed),
                    "--quiet",
                    "--out",
                    str(out),
                    "--overwrite",
                ]
            )
            == 0
        )
    run = load_run(out)
    metrics = json.loads((out / "metrics.json").read_text())
    # The same data, loaded and split the same way, embedded by the same (unstandardized) backbone.
    data, splits = _data_and_splits(run, seed)
    bb = create_backbone(
        run.config.backbone,
        None if data.kind == "image" else data.input_shape,
        cut_layer=run.config.cut_layer,
        preprocessing=run.config.input_preprocessing,
    )
    emb = {s: bb.model.predict(getattr(splits, s).x.astype(np.float32), verbose=0) for s in ("train", "val", "test")}
    labels = {s: getattr(splits, s).y for s in ("train", "val", "test")}
    ref, ref_C = reference_accuracy(emb, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = train_transfer(splits, replace(run.config, head_solver="adam", standardize_embeddings=False))
    return {
        "task": name,
        "seed": seed,
        "edgetl": metrics["test_accuracy"],
        "reference": ref,
        "reference_C": ref_C,
        "edgetl_C": metrics["head_fit"].get("C"),
        "old_head": old.metrics["test_accuracy"],
        "test_examples": metrics["test_examples"],
        "head_fit_seconds": metrics["head_fit"].get("seconds"),
        "embedding_scale": metrics.get("embedding_scale_mean_abs"),
    }


def _data_and_splits(run: Any, seed: int) -> tuple[Any, Any]:
    from edgetl.data import load_dataset, stratified_split

    load = dict(run.info["data"]["load"])
    data = load_dataset(load.pop("path"), **{k: (tuple(v) if isinstance(v, list) else v) for k, v in load.items()})
    return data, stratified_split(
        data, val_fraction=run.config.val_fraction, test_fraction=run.config.test_fraction, seed=seed
    )


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", help="keep the task files and runs here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out) if args.out else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        tasks = build_tasks(base)
        rows = [run_task(name, task, base, seed) for name, task in tasks.items() for seed in range(args.seeds)]
    summary = summarize(rows)
    print(json.dumps({"rows": rows, "summary": summary}, indent=2) if args.json else format_table(summary, args.seeds))
    return 0 if all(s["pass"] for s in summary) else 1


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == name]
        e, ref, old = (float(np.mean([r[k] for r in rs])) for k in ("edgetl", "reference", "old_head"))
        gap = (ref - e) * 100
        out.append(
            {
                "task": name,
                "edgetl": e,
                "reference": ref,
                "old_head": old,
                "gap_points": gap,
                "pass": gap <= TARGET_POINTS,
                "test_examples": rs[0]["test_examples"],
                "head_fit_seconds": float(np.mean([r["head_fit_seconds"] for r in rs])),
                "embedding_scale": rs[0]["embedding_scale"],
            }
        )
    return out


def format_table(summary: list[dict[str, Any]], seeds: int) -> str:
    lines = [
        f"Test accuracy, mean of {seeds} seeds (each seed a different split); reference = StandardScaler + "
        "LogisticRegressionCV on the same embeddings",
        f"{'task':<18} {'test n':>6} {'mean|e|':>8} {'edgetl':>8} {'reference':>10} {'gap (pts)':>10} {'target':>8} "
        f"{'before #9':>10} {'fit s':>6}",
    ]
    for s in summary:
        lines.append(
            f"{s['task']:<18} {s['test_examples']:>6} {s['embedding_scale']:>8.3g} {s['edgetl']:>8.4f} "
            f"{s['reference']:>10.4f} {s['gap_points']:>+10.2f} {'PASS' if s['pass'] else 'MISS':>8} "
            f"{s['old_head']:>10.4f} {s['head_fit_seconds']:>6.2f}"
        )
    lines.append(
        f"gap = reference - edgetl in points; target: gap <= {TARGET_POINTS:g} on every task. 'before #9' = Adam on "
        "unstandardized embeddings (the old default)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main_())
