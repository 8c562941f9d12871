"""Keras to TFLite and ONNX: the converters every export step uses (fused models, backbones,
the int8 ladder's TFLite converter, the tail's trunk).

Their own module so that the steps needing a converter (``edgetl.host._int8_tflite``,
``edgetl.host._tail_export``) import it instead of having ``edgetl.host._export`` hand its
functions in (export imports those steps: importing export back would be a cycle).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgetl._quiet import native_output_silenced
from edgetl.bundle._contract import MODEL_INPUT
from edgetl.errors import InputError
from edgetl.host._tf import tf


class Precision(Protocol):
    """What a converter reads of ``edgetl.host._export.QuantizeConfig``."""

    mode: str  # none, dynamic, float16, int8, qat
    io_dtype: str  # float32, int8, uint8


def _servable(model: Any, output_name: str) -> tuple[Any, Any]:
    """A plain ``tf.Module`` holding the model's variables and one serving function.

    Why not ``TFLiteConverter.from_keras_model``: it first saves a Keras SavedModel, and
    tf_keras's SavedModel serialization traces every layer's call functions for Keras
    metadata the converter never reads (cProfile: ~75% of a 14 s MobileNetV2-0.35
    conversion). Converting this module's concrete function gives the same flatbuffer
    outputs (max diff 1.7e-16) in ~3 s.
    """
    t = tf()
    module = t.Module()
    module.model_variables = list(model.variables)
    spec = t.TensorSpec((None, *model.input_shape[1:]), t.float32, name=MODEL_INPUT)
    module.serve = t.function(lambda x: {output_name: model(x, training=False)}, input_signature=[spec])
    return module, module.serve.get_concrete_function()


def to_tflite(
    model: Any, q: Precision | None = None, calibration: np.ndarray | None = None, *, output_name: str = "output"
) -> bytes:
    """Convert a Keras model with ``tf.lite.TFLiteConverter`` (signature ``serving_default``;
    ``q`` None: fp32)."""
    conv = tflite_converter(model, q, calibration, output_name=output_name)
    with warnings.catch_warnings(), native_output_silenced():
        # TensorFlow's own int8 calibrator runs the deprecated tf.lite.Interpreter internally;
        # edgetl itself runs models only with ai_edge_litert. Not actionable for users. The
        # converter also prints "fully_quantize: 0, inference_type: 6, ..." from C++.
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        warnings.filterwarnings("ignore", message=".*Statistics for quantized inputs were expected.*")
        return conv.convert()


def tflite_converter(
    model: Any, q: Precision | None = None, calibration: np.ndarray | None = None, *, output_name: str = "output"
) -> Any:
    """The ``tf.lite.TFLiteConverter`` :func:`to_tflite` runs (the int8 ladder reuses it)."""
    t = tf()
    module, fn = _servable(model, output_name)
    conv = t.lite.TFLiteConverter.from_concrete_functions([fn], module)
    conv._edgetl_module = module  # keeps the variables alive as long as the converter
    if q is None or q.mode == "none":
        pass
    elif q.mode == "dynamic":
        conv.optimizations = [t.lite.Optimize.DEFAULT]
    elif q.mode == "float16":
        conv.optimizations = [t.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [t.float16]
    elif q.mode in ("int8", "qat"):
        if calibration is None or not len(calibration):
            raise InputError(f"{q.mode} quantization needs calibration data (--calibration D)")
        samples = calibration.astype(np.float32)

        def representative() -> Any:
            for i in range(len(samples)):
                yield [samples[i : i + 1]]

        conv.optimizations = [t.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io = {"float32": t.float32, "int8": t.int8, "uint8": t.uint8}[q.io_dtype]
        conv.inference_input_type = io
        conv.inference_output_type = io
    return conv


def keras_to_onnx(model: Any, opset: int) -> bytes:
    import tf2onnx

    t = tf()
    spec = [t.TensorSpec((None, *model.input_shape[1:]), t.float32, name=MODEL_INPUT)]
    with native_output_silenced():
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    return proto.SerializeToString()


def tflite_to_onnx(tflite: bytes, opset: int) -> bytes:
    """Quantized ONNX converted from the quantized TFLite (the same int8 graph in both formats)."""
    import tf2onnx

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.tflite")
        Path(path).write_bytes(tflite)
        with warnings.catch_warnings(), native_output_silenced():
            # tf2onnx reads the .tflite with TensorFlow's deprecated tf.lite.Interpreter;
            # not something edgetl users run or can change.
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
            proto, _ = tf2onnx.convert.from_tflite(path, opset=opset)
    return proto.SerializeToString()
