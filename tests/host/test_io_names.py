"""Every fused model and backbone gets the contract's I/O names, whatever converter made it.

Unit tests on a small Keras model converted by the exporter's own converters (TFLite, tf2onnx
from Keras and from TFLite); then the suite's digits bundle, every artifact.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgetl.bundle._contract import BACKBONE_OUTPUT, FUSED_OUTPUT, MODEL_INPUT
from edgetl.errors import InputError
from edgetl.host._io_names import rename_onnx_io, rename_tflite_io


@pytest.fixture(scope="module")
def converted():
    """A small model as the exporter converts it: fp32 TFLite, int8 TFLite, ONNX from Keras and from int8 TFLite."""
    from edgetl.host._convert import keras_to_onnx, tflite_to_onnx, to_tflite
    from edgetl.host._export import QuantizeConfig
    from edgetl.host._tf import keras

    k = keras()
    inputs = k.Input(shape=(6,), name="input")
    x = k.layers.Dense(8, activation="relu", name="features")(inputs)
    model = k.Model(inputs, k.layers.Dense(3, activation="softmax", name="head")(x))
    calib = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
    int8 = to_tflite(model, QuantizeConfig("int8", calibration_samples=32), calib, output_name=FUSED_OUTPUT)
    return {
        "tflite": to_tflite(model, QuantizeConfig("none"), None, output_name=FUSED_OUTPUT),
        "tflite_int8": int8,
        "onnx": keras_to_onnx(model, 17),
        "onnx_from_tflite": tflite_to_onnx(int8, 17),
        "x": calib[:5],
    }


def _onnx_run(model, x):
    import onnxruntime as ort

    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return (
        [i.name for i in s.get_inputs()],
        [o.name for o in s.get_outputs()],
        s.run(None, {s.get_inputs()[0].name: x})[0],
    )


def _litert_run(model, x):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    (sig,) = it.get_signature_list().items()
    runner = it.get_signature_runner(sig[0])
    inp = it.get_input_details()[0]
    if inp["dtype"] != np.float32:
        scale, zero = inp["quantization"]
        x = np.round(x / scale + zero).clip(-128, 127).astype(inp["dtype"])
    out = runner(**{sig[1]["inputs"][0]: x})
    names = ([d["name"] for d in it.get_input_details()], [d["name"] for d in it.get_output_details()])
    return names, sig[1], next(iter(out.values()))


@pytest.mark.parametrize("which", ["onnx", "onnx_from_tflite"])
def test_onnx_models_are_renamed_and_compute_the_same(converted, which):
    before_in, before_out, before = _onnx_run(converted[which], converted["x"])
    assert before_in != [MODEL_INPUT] or before_out != [FUSED_OUTPUT]  # the converter's own names
    renamed = rename_onnx_io(converted[which], MODEL_INPUT, FUSED_OUTPUT)
    names_in, names_out, after = _onnx_run(renamed, converted["x"])
    assert (names_in, names_out) == ([MODEL_INPUT], [FUSED_OUTPUT])
    np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize("which", ["tflite", "tflite_int8"])
def test_tflite_tensors_and_signature_keys_are_renamed_and_compute_the_same(converted, which):
    (tensors, _), _, before = _litert_run(converted[which], converted["x"])
    assert tensors == ["serving_default_input:0"]  # what the TFLite converter names it
    renamed = rename_tflite_io(converted[which], MODEL_INPUT, BACKBONE_OUTPUT)
    (tensors, outputs), signature, after = _litert_run(renamed, converted["x"])
    assert (tensors, outputs) == ([MODEL_INPUT], [BACKBONE_OUTPUT])
    assert (signature["inputs"], signature["outputs"]) == ([MODEL_INPUT], [BACKBONE_OUTPUT])
    np.testing.assert_array_equal(after, before)


def test_renaming_refuses_what_it_cannot_rename(converted):
    import onnx
    from onnx import helper as h

    f = onnx.TensorProto.FLOAT
    two = h.make_model(
        h.make_graph(
            [h.make_node("Add", ["a", "b"], ["c"])],
            "two_inputs",
            [h.make_tensor_value_info(n, f, [1]) for n in ("a", "b")],
            [h.make_tensor_value_info("c", f, [1])],
        )
    )
    with pytest.raises(InputError, match=r"one input and one output, received inputs \['a', 'b'\]"):
        rename_onnx_io(two.SerializeToString(), MODEL_INPUT, FUSED_OUTPUT)
    inner = _an_inner_name(converted["onnx"])  # an output name that already names a tensor inside
    with pytest.raises(InputError, match=re.escape(f"{[inner]} already name other tensors")):
        rename_onnx_io(converted["onnx"], MODEL_INPUT, inner)
    with pytest.raises(InputError, match="not a TFLite flatbuffer"):
        rename_tflite_io(converted["onnx"], MODEL_INPUT, FUSED_OUTPUT)


def _an_inner_name(model: bytes) -> str:
    import onnx

    graph = onnx.load_from_string(model).graph
    return next(n for node in graph.node for n in node.output if n != graph.output[0].name)
