#!/usr/bin/env python
"""Can the QAT ONNX come from tf2onnx of the QAT Keras model? (issue 23: clean quantized ONNX)

    python tools/qat_onnx_check.py

Builds a small Conv+BatchNorm+ReLU model, annotates it with tfmot's default 8-bit QAT scheme
(per-channel, narrow-range weight fake-quantization; activation ranges as variables), converts
it with tf2onnx from Keras, and prints the op counts, the ops onnxruntime cannot run, and
whether each convolution reads its weights through a DequantizeLinear (an int8 convolution)
or as float constants. Measured with tf2onnx 1.17: one FakeQuantWithMinMaxVars left
unconverted and the convolution's weights folded to float, so edgetl makes the QAT ONNX from
a float copy of the run holding QAT's trained weights (``edgetl.host._qat.float_twin``),
quantized by onnxruntime like the int8 ONNX.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> int:
    import onnx
    import tensorflow_model_optimization as tfmot
    import tf2onnx

    from edgetl.host._convert import keras_to_onnx
    from edgetl.host._tf import keras

    k = keras()
    inp = k.Input((16, 16, 3))
    h = k.layers.ReLU()(k.layers.BatchNormalization()(k.layers.Conv2D(8, 3)(inp)))
    out = k.layers.Dense(4, activation="softmax")(k.layers.GlobalAveragePooling2D()(h))
    qat = tfmot.quantization.keras.quantize_model(k.Model(inp, out))
    qat.predict(np.random.default_rng(0).uniform(0, 1, (8, 16, 16, 3)).astype(np.float32), verbose=0)
    graph = onnx.load_from_string(keras_to_onnx(qat, 17)).graph
    ops: dict[str, int] = {}
    for n in graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    known = {s.name for s in onnx.defs.get_all_schemas()}
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [
        ("int8 (weights via DequantizeLinear)" if n.input[1] in dq else "float weights")
        for n in graph.node
        if n.op_type == "Conv"
    ]
    print(f"tf2onnx {tf2onnx.__version__}, tfmot {tfmot.__version__}")
    print(f"ops: {ops}")
    print(f"not ONNX ops (onnxruntime cannot run them): {sorted(set(ops) - known)}")
    print(f"convolutions: {convs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
