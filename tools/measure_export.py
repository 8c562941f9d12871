#!/usr/bin/env python
"""Measure issue 3's export targets side by side in one run.

    python tools/measure_export.py [--epochs 3]

1. MobileNetV2 (alpha 0.35, 96x96): scikit-learn digits upsampled to 96x96 RGB, every
   layer trained from weights=None for a few epochs (no internet for imagenet weights;
   enough that outputs are far from uniform), saved as a run, then exported fp32 + int8
   in TFLite and ONNX and verified. Prints export+verify wall time (target < 60 s),
   int8/fp32 size, int8 top-1 agreement with Keras and the accuracy drop on the test split.
2. Size ratio for full MobileNetV2 (alpha 1.0): the "MobileNetV2-class" size target. Size
   depends on the weights' count and layout, not their values, so weights=None is used.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def digits_96() -> "object":
    from edgetl.data import Dataset, load_digits_dataset

    d = load_digits_dataset()
    x = np.repeat(np.repeat(d.x, 12, axis=1), 12, axis=2)  # 8x8 -> 96x96, nearest neighbour
    return Dataset(np.repeat(x, 3, axis=3), d.y, d.class_names, "image", "digits@96x96")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    from edgetl.host._backbones import create_backbone
    from edgetl.host._convert import to_tflite
    from edgetl.host._export import QuantizeConfig, export_bundle
    from edgetl.host._pretrain import pretrain
    from edgetl.host._run import save_run
    from edgetl.host._transfer import TrainConfig

    ds = digits_96()
    t0 = time.perf_counter()
    result = pretrain(ds, TrainConfig(backbone="mobilenetv2_035", epochs=args.epochs, early_stopping_patience=0))
    print(
        f"trained mobilenetv2_035 on {ds.source}: test accuracy {result.metrics['test_accuracy']:.3f} "
        f"({time.perf_counter() - t0:.0f}s)"
    )
    with tempfile.TemporaryDirectory() as d:
        run = save_run(result, Path(d) / "run", kind="pretrain")
        t0 = time.perf_counter()
        result = export_bundle(run, Path(d) / "m.edgetl", quantize=["none", "int8"], calibration=ds)
        bundle, report = result.bundle, result.report
        seconds = time.perf_counter() - t0
        size = {a["file"]: a["size"] for a in bundle.manifest.to_json()["artifacts"]}
        onnx_int8 = next(a for a in bundle.manifest.to_json()["artifacts"] if a["file"] == "model.int8.onnx")
    print(
        f"export + verify, fp32 + int8, TFLite + ONNX, MobileNetV2-0.35 96x96: {seconds:.1f}s (target < 60s); all "
        f"checks ok: {report.ok}; left out: {result.omitted or 'nothing'}"
    )
    for fmt in ("tflite", "onnx"):
        print(f"  int8 / fp32 size, fused {fmt}: {size[f'model.int8.{fmt}'] / size[f'model.fp32.{fmt}']:.3f}")
    for c in report.checks:
        if c.role == "fused":
            print(
                f"  {c.file:<20} {c.describe():<34} accuracy {c.extra['accuracy']:.4f}  drop "
                f"{c.extra['accuracy_drop'] * 100:+.2f} points"
            )

    ladder = onnx_int8["int8_ladder"]
    print(
        f"  int8 ONNX: rung {ladder['rung']} (passed {ladder['passed']}), gate {ladder['gate']}, float share "
        f"{ladder['float_share_macs']:.3f}, ops {ladder['ops']}"
    )

    bb = create_backbone("mobilenetv2", (96, 96, 3))
    rng = np.random.default_rng(0)
    calib = rng.uniform(0, 255, size=(16, 96, 96, 3)).astype(np.float32)
    fp32 = len(to_tflite(bb.model, QuantizeConfig("none")))
    int8 = len(to_tflite(bb.model, QuantizeConfig("int8"), calib))
    print(
        f"MobileNetV2 (alpha 1.0) backbone TFLite: fp32 {fp32:,} B, int8 {int8:,} B, ratio {int8 / fp32:.3f} (target "
        "<= 0.3)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
