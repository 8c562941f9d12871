#!/usr/bin/env python
"""How many calibration inputs the int8 ONNX entropy rung takes per backbone (issue 23).

    python tools/activation_bytes.py [--backbone efficientnetb0:128 --backbone mobilenetv2_035:96]

The entropy rung collects in one pass and holds every input's activations
(``edgetl.host._int8_onnx.ENTROPY_MEMORY_BUDGET``). This prints, per backbone (random weights,
no download), the bytes of one input's float node outputs after ``quant_pre_process`` and how
many of the ladder's 800 inputs the budget lets the rung use.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", action="append", help="FAMILY:SIZE (repeatable)")
    args = parser.parse_args()
    from edgetl.host._backbones import create_backbone
    from edgetl.host._convert import keras_to_onnx
    from edgetl.host._int8_onnx import ENTROPY_MEMORY_BUDGET, _prepare, activation_bytes, entropy_sample_count

    print(f"entropy rung budget: {ENTROPY_MEMORY_BUDGET / 2**30:.0f} GiB")
    for spec in args.backbone or ["efficientnetb0:128", "mobilenetv2_035:96"]:
        family, size = spec.split(":")[0], int(spec.split(":")[1])
        model = create_backbone(family, (size, size, 3), weights=None).model
        with tempfile.TemporaryDirectory() as d:
            prep = _prepare(Path(d), keras_to_onnx(model, 17), np.zeros((1, size, size, 3), np.float32), None)
            per_input = activation_bytes(prep.model_path)
            n = entropy_sample_count(prep.model_path, 800)
        print(f"{family} {size}x{size}: {per_input / 1e6:.1f} MB per input; the rung takes {n} of 800 inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
