"""int8 ONNX calibration holds a few inputs' activations at a time, not every input's.

onnxruntime's histogram calibrators (the ladder's Percentile and Entropy rungs) keep every
intermediate tensor of every input of one pass: on EfficientNetB0 at 128x128, rung a3's 800
inputs grew the export to 22 GB and the kernel killed it. The ladder now calibrates in passes
of at most ``CALIBRATION_CHUNK`` inputs; this test measures the memory a calibration holds.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgetl.host import _int8_onnx as int8_onnx
from edgetl.host._int8_onnx import RECIPES, _prepare, _quantize, calibration_stride

CHANNELS, SIZE = 16, 32


def _conv_net() -> bytes:
    """Conv-ReLU-Conv-ReLU on 4x32x32 inputs: four 64 KB intermediate tensors per input."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (CHANNELS, 4, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.1, (CHANNELS, CHANNELS, 3, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", CHANNELS, SIZE, SIZE])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def _prepared(work: Path, x: np.ndarray):
    work.mkdir()
    return _prepare(work, _conv_net(), x, None)


def _scales(content: bytes) -> dict[str, float]:
    graph = onnx.load_from_string(content).graph
    return {t.name: float(numpy_helper.to_array(t).ravel()[0]) for t in graph.initializer if t.name.endswith("_scale")}


def _peak_bytes(work: Path, x: np.ndarray, method: str) -> int:
    """Memory Python allocations reached during one calibration and quantization with ``method``."""
    prep = _prepared(work, x)
    _quantize(prep, RECIPES["any"], "MinMax", x[:4], [])  # onnxruntime's one-time imports and setup
    tracemalloc.start()
    try:
        _quantize(prep, RECIPES["any"], method, x, [])
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_histogram_calibration_memory_does_not_grow_with_the_inputs(tmp_path: Path, monkeypatch):
    x = np.random.default_rng(1).random((240, 4, SIZE, SIZE), dtype=np.float32)
    held_by_one_pass = len(x) * 4 * CHANNELS * SIZE * SIZE * 4  # every input's four activations, bytes
    # Entropy is below: its rung runs onnxruntime's calibrator itself (512 bins, _entropy_ranges) in
    # one pass, because in passes ORT's histogram merge widens the bins to the largest range seen and the
    # KL search then took minutes; its inputs are capped by a memory budget instead.
    for method in ("Percentile",):
        peak = _peak_bytes(tmp_path / method, x, method)
        # Measured: 3.3 MB in passes of 16 inputs, 36 MB in one pass of 240 (63 MB of activations).
        assert peak < held_by_one_pass / 4, (method, peak, held_by_one_pass)
    monkeypatch.setattr(int8_onnx, "CALIBRATION_CHUNK", len(x))  # one pass: what the check must catch
    assert _peak_bytes(tmp_path / "one-pass", x, "Percentile") > held_by_one_pass / 4


def test_min_max_ranges_in_passes_equal_one_pass(tmp_path: Path, monkeypatch):
    """Passes merge their ranges (min of minima, max of maxima): the same model as one pass."""
    x = np.random.default_rng(2).random((48, 4, SIZE, SIZE), dtype=np.float32)
    in_passes = _scales(_quantize(_prepared(tmp_path / "a", x), RECIPES["x86-vnni"], "MinMax", x, []))
    monkeypatch.setattr(int8_onnx, "CALIBRATION_CHUNK", len(x))
    one_pass = _scales(_quantize(_prepared(tmp_path / "b", x), RECIPES["x86-vnni"], "MinMax", x, []))
    assert calibration_stride(len(x)) == len(x) and len(one_pass) >= 3
    assert in_passes == one_pass


def test_the_stride_divides_the_inputs():
    assert [calibration_stride(n) for n in (1, 13, 17, 200, 240, 800)] == [1, 13, 1, 10, 16, 16]


def test_the_entropy_rung_takes_as_many_inputs_as_its_memory_budget_holds(tmp_path: Path, monkeypatch):
    x = np.random.default_rng(1).random((240, 4, SIZE, SIZE), dtype=np.float32)
    prep = _prepared(tmp_path / "work", x)
    per_input = 4 * CHANNELS * SIZE * SIZE * 4  # c1, r1, c2, y: float32 [1, 16, 32, 32] each
    assert int8_onnx.activation_bytes(prep.model_path) == per_input
    assert int8_onnx.entropy_sample_count(prep.model_path, len(x)) == len(x)  # 63 MB fit the default 4 GiB
    monkeypatch.setattr(int8_onnx, "ENTROPY_MEMORY_BUDGET", 40 * per_input)
    n = int8_onnx.entropy_sample_count(prep.model_path, len(x))
    assert n == 40
    monkeypatch.setattr(int8_onnx, "ENTROPY_MEMORY_BUDGET", per_input)
    assert int8_onnx.entropy_sample_count(prep.model_path, len(x)) == int8_onnx.ENTROPY_MIN_SAMPLES
    rungs = {rung: len(samples) for rung, _, samples in int8_onnx._calibration_rungs(prep)}
    assert rungs["a4-entropy"] == int8_onnx.ENTROPY_MIN_SAMPLES and rungs["a3-percentile"] == len(x)
    # What the cap buys: the one-pass calibration of 40 inputs holds a sixth of what 240 did.
    assert _peak_bytes(tmp_path / "capped", x[:n], "Entropy") < len(x) * per_input / 4
    assert _peak_bytes(tmp_path / "uncapped", x, "Entropy") > len(x) * per_input / 4  # the measure sees it
