"""Dynamic and float16 ONNX from the float ONNX graph (edgetl.host._onnx_quantized): on a small
model with the MobileNet shapes (depthwise, BatchNorm, ReLU6, a residual add, global pooling),
no layout Transpose inside the network, outputs close to fp32; the counter itself sees a
Transpose between layers and not the input's."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import layout_transposes

from edgetl.host._onnx_quantized import dynamic_onnx, float16_onnx


@pytest.fixture(scope="module")
def small_mobilenet():
    from edgetl.host._convert import keras_to_onnx
    from edgetl.host._tf import keras

    k = keras()
    inp = k.Input((24, 24, 3))
    h = k.layers.ReLU(6.0)(k.layers.BatchNormalization()(k.layers.Conv2D(16, 3, strides=2, padding="same")(inp)))
    block = k.layers.ReLU(6.0)(k.layers.BatchNormalization()(k.layers.DepthwiseConv2D(3, padding="same")(h)))
    h = k.layers.Add()([h, k.layers.Conv2D(16, 1)(block)])
    out = k.layers.Dense(5, activation="softmax")(k.layers.GlobalAveragePooling2D()(h))
    model = k.Model(inp, out)
    x = np.random.default_rng(0).uniform(0, 1, (16, 24, 24, 3)).astype(np.float32)
    return keras_to_onnx(model, 17), x


def _run(content: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(content, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_dynamic_and_float16_keep_the_float_layout(small_mobilenet):
    fp32, x = small_mobilenet
    ref = _run(fp32, x)
    assert layout_transposes(fp32) == 0 and sum(
        n.op_type == "Transpose" for n in onnx.load_from_string(fp32).graph.node
    )
    for reduce_range in (False, True):
        dynamic = dynamic_onnx(fp32, reduce_range=reduce_range)
        ops = {n.op_type for n in onnx.load_from_string(dynamic).graph.node}
        assert {"ConvInteger", "MatMulInteger"} <= ops and layout_transposes(dynamic) == 0
        assert np.abs(_run(dynamic, x) - ref).max() < 0.05
    half = float16_onnx(fp32)
    graph = onnx.load_from_string(half).graph
    assert layout_transposes(half) == 0 and graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(i.data_type == TensorProto.FLOAT16 for i in graph.initializer)
    weight_bytes = lambda c: sum(len(i.raw_data) for i in onnx.load_from_string(c).graph.initializer)  # noqa: E731
    assert weight_bytes(half) < 0.6 * weight_bytes(fp32) and np.abs(_run(half, x) - ref).max() < 1e-3


def test_the_counter_sees_a_transpose_between_layers():
    """A Transpose on the graph input is the edge; one after a convolution is inside the network."""
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w"], ["c"]),
        helper.make_node("Transpose", ["c"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["nhwc"], ["y"], perm=[0, 3, 1, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])],
        [w],
    )
    assert layout_transposes(helper.make_model(graph).SerializeToString()) == 2
