#!/usr/bin/env python
"""The int8 ONNX remedy ladder on a CNN with one deliberately fragile layer, and what each
way of finding that layer costs.

    python tools/int8_ladder_check.py

Trains a small CNN on scikit-learn's digits, then rescales one layer so its output channels
span 1 to 10^5 (the next layer divides it back out: the float function is unchanged, but a
uint8 per-tensor activation loses most channels). Prints every rung the ladder tried with its
gate measures and seconds, and compares two sensitivity analyses on the same model:

- per-tensor damage (what the ladder uses): one run of the float model, each quantized
  activation fake-quantized with the int8 model's own scale;
- one node excluded at a time: one quantization and one gate run per Conv/Gemm node.

PASS when the ladder ends at a passing rung with the fragile layer float, and the healthy
model passes at the first rung.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

FRAGILE = "fragile"


def fragile_digit_cnns() -> tuple[bytes, bytes, np.ndarray, np.ndarray]:
    """(healthy float ONNX, fragile float ONNX, x in [0, 1], y) of a CNN trained on all ten digits.

    The fragile model is the healthy one with layer ``fragile``'s 16 output channels scaled
    by 1 ... 10^5 and layer ``after``'s input weights divided by the same: ReLU is positively
    homogeneous, so both compute the same function in float.
    """
    from edgetl.data import load_digits_dataset
    from edgetl.host._convert import keras_to_onnx
    from edgetl.host._tf import keras, tf

    tf().random.set_seed(0)
    k = keras()
    data = load_digits_dataset()
    x, y = data.x.astype(np.float32) / 255.0, data.y
    inp = k.Input((8, 8, 1))
    h = k.layers.Conv2D(32, 3, padding="same", activation="relu")(inp)
    h = k.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = k.layers.Conv2D(16, 1, activation="relu", name=FRAGILE)(h)
    h = k.layers.Conv2D(16, 1, activation="relu", name="after")(h)
    out = k.layers.Dense(10, activation="softmax")(k.layers.Flatten()(h))
    model = k.Model(inp, out)
    model.compile(k.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:1200], y[:1200], epochs=12, batch_size=32, verbose=0)
    healthy = keras_to_onnx(model, 17)
    scale = np.logspace(0, 5, 16).astype(np.float32)
    kernel, bias = model.get_layer(FRAGILE).get_weights()
    model.get_layer(FRAGILE).set_weights([kernel * scale, bias * scale])
    kernel, bias = model.get_layer("after").get_weights()
    model.get_layer("after").set_weights([kernel / scale[:, None], bias])
    return healthy, keras_to_onnx(model, 17), x, y


def one_node_at_a_time(fp32: bytes, x: np.ndarray, gate) -> tuple[float, list[tuple[str, bool]]]:
    """Seconds, and (node, gate passed) for each Conv/Gemm node excluded alone."""
    import tempfile

    import onnx

    from edgetl.host._int8_onnx import RECIPES, _prepare, _quantize

    t0 = time.perf_counter()
    out = []
    with tempfile.TemporaryDirectory() as d:
        prep = _prepare(Path(d), fp32, x, None)
        nodes = [n.name for n in onnx.load(str(prep.model_path)).graph.node if n.op_type in ("Conv", "Gemm")]
        for node in nodes:
            out.append((node, gate(_quantize(prep, RECIPES["x86-vnni"], "MinMax", x, [node]))["ok"]))
    return time.perf_counter() - t0, out


def main() -> int:
    from edgetl.host._int8_onnx import RECIPES, agreement_gate, quantize_onnx_int8

    healthy, fragile, x, y = fragile_digit_cnns()
    ok = True
    for name, fp32 in (("healthy", healthy), ("fragile", fragile)):
        gate = agreement_gate(fp32, x[1200:], y=y[1200:])
        t0 = time.perf_counter()
        result = quantize_onnx_int8(fp32, x[:200], gate, recipe=RECIPES["x86-vnni"], more_calibration=x[:1200])
        r = result.record
        print(f"{name}: {time.perf_counter() - t0:.1f} s, ended at {r['rung']} (passed {r['passed']})")
        for t in r["tried"]:
            g = t["gate"]
            ranked = f"  float {t['float_tensors']}" if "float_tensors" in t else ""
            print(
                f"  {t['rung']:<24} {t['calibration']:<10} {t['calibration_samples']:>5} samples  agreement "
                f"{g['top1_agreement']:.3f}  drop {g['accuracy_drop'] * 100:+.2f} pts  ok {g['ok']}  {t['seconds']} s"
                + ranked
            )
        print(f"  float nodes {r['float_nodes']}, float share {r['float_share_macs']:.3f} of MACs, ops {r['ops']}")
        if "latency_ms" in r:
            print(f"  batch-1 ms {r['latency_ms']}, bytes {r['size_bytes']}")
        if "sensitivity" in r:
            print(f"  per-tensor sensitivity: {r['sensitivity']}")
        expected = "a1-minmax" if name == "healthy" else "b-float-fallback"
        ok = ok and result.passed and r["rung"] == expected
        ok = ok and (name == "healthy" or any(FRAGILE in n for n in r["float_nodes"]))
        if name == "fragile":
            seconds, found = one_node_at_a_time(fp32, x[:200], gate)
            passing = [n for n, passed in found if passed] or "none (its output stays quantized by its consumer)"
            print(f"  one node excluded at a time: {seconds:.1f} s for {len(found)} nodes; gate passes with {passing}")
    print(f"{'PASS' if ok else 'MISS'}  the healthy model passes at a1; the fragile one at b with its layer float")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
