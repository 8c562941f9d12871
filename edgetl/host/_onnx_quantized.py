"""Dynamic-range and float16 ONNX made from the float ONNX graph, not from the TFLite file.

Why: tf2onnx's conversion of a quantized TFLite file keeps TFLite's NHWC layout, so every
convolution sits between NHWC<->NCHW ``Transpose`` nodes (issue 23: 402 us of Transpose in
MobileNetV2's int8 profile). The float ONNX (tf2onnx from Keras) has one layout Transpose,
on the graph input; these files keep that graph and change only the weights:

- **dynamic**: onnxruntime's ``quantize_dynamic`` (int8 weights, activations quantized at run
  time: ``ConvInteger``/``MatMulInteger``), 7-bit weights where the int8 recipe of the
  export's ``--target`` uses them (x86 without VNNI saturates u8*s8 pair sums);
- **float16**: every float weight stored as float16 and cast back to float32 on load, as
  TFLite's float16 file does (half the size, float32 arithmetic: onnxruntime's CPU kernels
  have no fast float16 path on x86, and it constant-folds the casts at session start).

    >>> dynamic_onnx(fp32_onnx, reduce_range=False), float16_onnx(fp32_onnx)
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np

from edgetl._quiet import native_output_silenced

# Weights smaller than this stay float32 (biases, scalars): nothing to save, and float16
# would round constants such as Clip's bounds or the seam's 1/std for no gain.
FLOAT16_MIN_ELEMENTS = 16


def dynamic_onnx(fp32_onnx: bytes, *, reduce_range: bool) -> bytes:
    """onnxruntime's dynamic quantization of the float graph (int8 per-tensor weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "fp32.onnx", Path(d) / "dynamic.onnx"
        src.write_bytes(fp32_onnx)
        with native_output_silenced(), contextlib.redirect_stdout(io.StringIO()):
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, reduce_range=reduce_range)
        return out.read_bytes()


def float16_onnx(fp32_onnx: bytes) -> bytes:
    """The float graph with its float32 weights stored as float16, each cast back on use."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(fp32_onnx)
    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < FLOAT16_MIN_ELEMENTS:
            continue
        name = init.name
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{name}_float16")
        init.CopyFrom(half)
        casts.append(helper.make_node("Cast", [half.name], [name], name=f"{name}_to_float32", to=TensorProto.FLOAT))
    # An initializer listed as a graph input (old opsets) would now shadow the Cast's output.
    stale = {c.output[0] for c in casts}
    kept_inputs = [i for i in graph.input if i.name not in stale]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model.SerializeToString()
