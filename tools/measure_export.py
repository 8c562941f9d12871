#!/usr/bin/env python
"""Measure export targets on a MobileNetV2 (alpha 0.35, 96x96) transfer model.

    python tools/measure_export.py

Builds the backbone with weights=None (size and speed do not depend on the weights),
trains the head a few steps on random images so outputs are not uniform, then exports
fp32 + int8 in both formats and verifies parity. Prints export+verify wall time and the
int8 / fp32 size ratio. Accuracy targets need real data; see the export tests.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from edgetl.host.data import Dataset
    from edgetl.host.export import export_bundle
    from edgetl.host.run import save_run
    from edgetl.host.transfer import TrainConfig, train_transfer

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(120, 96, 96, 3)).astype(np.uint8)
    ds = Dataset(x, np.arange(120) % 4, ("a", "b", "c", "d"), "image", "random")
    result = train_transfer(ds, TrainConfig(backbone="mobilenetv2_035", epochs=3, early_stopping_patience=0))
    with tempfile.TemporaryDirectory() as d:
        run = save_run(result, Path(d) / "run")
        t0 = time.perf_counter()
        bundle, report = export_bundle(run, Path(d) / "m.edgetl", quantize=["none", "int8"], calibration=ds)
        seconds = time.perf_counter() - t0
        size = {a["file"]: a["size"] for a in bundle.manifest["artifacts"]}
    print(f"export + verify, fp32 + int8, TFLite + ONNX: {seconds:.1f}s (target < 60s); parity ok: {report['ok']}")
    for fmt in ("tflite", "onnx"):
        print(f"int8 / fp32 size, fused {fmt}: {size[f'model.int8.{fmt}'] / size[f'model.fp32.{fmt}']:.3f} (target <= 0.3)")
    for c in report["checks"]:
        if c["role"] == "fused":
            print("  ", c["file"], {k: v for k, v in c.items() if k in ("max_abs_diff", "top1_agreement")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
