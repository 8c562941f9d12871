"""The int8 ONNX ladder and device targets: a model with one deliberately fragile layer (a
huge activation range) climbs to selective float fallback, which finds that layer and keeps
it float; the same model without the fault passes at the first rung; targets choose the recipe."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import load_tool

from edgetl.errors import InputError
from edgetl.host._int8_onnx import (
    RECIPES,
    agreement_gate,
    op_census,
    quantize_onnx_int8,
    recipe_for,
    tensor_sensitivity,
)

FRAGILE = "fragile"  # the layer tools/int8_ladder_check.py makes fragile


@pytest.fixture(scope="module")
def digit_cnns():
    """A small CNN trained on digits as float ONNX, healthy and with one fragile layer whose
    output channels span 1 to 10^5 (same float function; see tools/int8_ladder_check.py)."""
    return load_tool("int8_ladder_check").fragile_digit_cnns()


def _gate(fp32, x, y):
    return agreement_gate(fp32, x[1200:], y=y[1200:])


def test_a_healthy_model_passes_at_the_first_rung(digit_cnns):
    healthy, _, x, y = digit_cnns
    result = quantize_onnx_int8(healthy, x[:200], _gate(healthy, x, y), recipe=RECIPES["x86-vnni"])
    record = result.record
    assert result.passed and record["rung"] == "a1-minmax" and len(record["tried"]) == 1
    assert record["float_nodes"] == [] and record["float_share_macs"] == 0.0
    assert record["ops"] == {"quantized": {"Conv": 4, "Gemm": 1}, "float": {}}  # nothing left over
    assert record["gate"]["top1_agreement"] >= 0.9 and record["gate"]["examples"] == len(x) - 1200


def test_the_ladder_finds_the_fragile_layer_and_keeps_it_float(digit_cnns):
    """Every calibration rung fails (the fault is the range, not the samples); sensitivity
    ranks the fragile layer's output first, and keeping it float passes the gate with a
    small float share of the model."""
    _, fragile, x, y = digit_cnns
    gate = _gate(fragile, x, y)
    result = quantize_onnx_int8(fragile, x[:200], gate, recipe=RECIPES["x86-vnni"], more_calibration=x[:1200])
    record = result.record
    rungs = [t["rung"] for t in record["tried"]]
    assert rungs[:4] == ["a1-minmax", "a2-minmax-more-samples", "a3-percentile", "a4-entropy"], rungs
    assert not any(t["gate"]["ok"] for t in record["tried"][:4])  # the gate refused them, measured
    assert result.passed and record["rung"] == "b-float-fallback"
    assert any(FRAGILE in n for n in record["float_nodes"]), record["float_nodes"]
    # ranked by the output: keeping that one tensor float removes nearly all of int8's output error
    assert len(record["float_tensors"]) == 1 and FRAGILE in record["float_tensors"][0]["tensor"]
    all_int8_error = record["sensitivity"]["output_error_all_int8"]
    assert record["float_tensors"][0]["output_error"] < all_int8_error / 20, record["sensitivity"]
    float_macs = (32 * 16 + 16 * 16) * 64  # the fragile 1x1 layer and the one reading its output
    total = (9 * 32 + 9 * 32 * 32 + 32 * 16 + 16 * 16) * 64 + 1024 * 10
    assert record["float_share_macs"] == pytest.approx(float_macs / total, abs=1e-4)
    assert record["ops"]["float"] == {"Conv": 2}  # the fragile layer and the one reading its output
    assert set(record["latency_ms"]) == {"fp32", "int8", "all_int8"}
    assert set(record["size_bytes"]) == {"fp32", "int8", "all_int8"}  # what the float part costs, recorded


def test_sensitivity_ranks_the_fragile_tensor_worst_and_healthy_tensors_low(digit_cnns, tmp_path):
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _, fragile, x, y = digit_cnns
    result = quantize_onnx_int8(fragile, x[:100], lambda _: {"ok": True, "score": 1.0})  # a1 only
    (tmp_path / "f.onnx").write_bytes(fragile)
    quant_pre_process(str(tmp_path / "f.onnx"), str(tmp_path / "pre.onnx"), skip_symbolic_shape=True)
    ranked = tensor_sensitivity(tmp_path / "pre.onnx", result.content, x[:32])
    # > 0.3: the fixture trains a CNN, not bit-reproducibly (measured 0.356-0.9; healthy tensors < 0.1)
    assert any(FRAGILE in n for n in ranked[0]["nodes"]) and ranked[0]["damage"] > 0.3
    assert all(r["damage"] < ranked[0]["damage"] / 3 for r in ranked[1:]), ranked


def test_a_rung_the_gate_passes_above_the_accuracy_target_climbs_on(digit_cnns):
    """The gate tolerates 2 points (against broken files); the ladder's target is 1: a passing
    candidate measured 1.5 points below fp32 does not stop the climb, and when no rung meets the
    target, the first one the gate passed ships, with the miss recorded."""
    healthy, _, x, y = digit_cnns
    real = _gate(healthy, x, y)
    drops = iter([0.015, 0.015, 0.0])  # a1 and a2 above the target, a3 within it

    def gate(content):
        return {**real(content), "ok": True, "accuracy_drop": next(drops, 0.015)}

    result = quantize_onnx_int8(healthy, x[:200], gate, recipe=RECIPES["x86-vnni"], more_calibration=x[:1200])
    assert result.record["rung"] == "a3-percentile" and result.record["meets_target"]
    assert [t["meets_target"] for t in result.record["tried"]] == [False, False, True]

    def always_above(content):
        return {**real(content), "ok": True, "accuracy_drop": 0.015}

    result = quantize_onnx_int8(healthy, x[:200], always_above, more_calibration=x[:1200])
    rungs = [t["rung"] for t in result.record["tried"]]
    assert rungs[:4] == ["a1-minmax", "a2-minmax-more-samples", "a3-percentile", "a4-entropy"]
    assert result.passed and result.record["rung"] == "a1-minmax" and not result.record["meets_target"]
    untargeted = quantize_onnx_int8(healthy, x[:200], always_above, target_drop=None)
    assert untargeted.record["rung"] == "a1-minmax" and len(untargeted.record["tried"]) == 1


def test_a_backbone_rung_climbs_until_its_agreement_reaches_the_minimum_as_measured(digit_cnns):
    """A backbone's gate has no labels: it passes a candidate whose factory-head agreement is not
    significantly below 0.9. Its target is the agreement itself reaching 0.9: a candidate at 0.896
    (MobileNetV2-0.35's backbone on the selection data, refused on test) climbs on."""
    from edgetl.host._int8_onnx import meets_quality_target

    healthy, _, x, y = digit_cnns
    real = _gate(healthy, x, y)
    agreements = iter([0.896, 0.93])

    def backbone_gate(content):
        judged = {k: v for k, v in real(content).items() if k not in ("accuracy_drop", "labelled")}
        return {**judged, "ok": True, "top1_agreement": next(agreements, 0.93), "min_agreement": 0.9}

    result = quantize_onnx_int8(healthy, x[:200], backbone_gate, recipe=RECIPES["x86-vnni"], more_calibration=x[:1200])
    assert [t["meets_target"] for t in result.record["tried"]] == [False, True], result.record["tried"]
    assert result.record["rung"] == "a2-minmax-more-samples"
    assert meets_quality_target({"accuracy_drop": 0.02, "top1_agreement": 1.0, "min_agreement": 0.9}, 0.01) is False


def test_entropy_calibration_clips_an_outlier_minmax_keeps(digit_cnns, tmp_path):
    """Rung a4 is its own calibration (onnxruntime's quantize_static Entropy, with its default
    bins, searched one window, the whole range: byte-identical to MinMax): one calibration image
    50x too bright stretches MinMax's ranges, and the entropy ranges clip it."""
    import onnx

    from edgetl.host._int8_onnx import _activation_qparams, _prepare, _quantize

    healthy, _, x, _ = digit_cnns
    samples = np.concatenate([x[:99], 50 * x[99:100]])
    prep = _prepare(tmp_path, healthy, samples, None)
    scales = {
        method: _activation_qparams(onnx.load_from_string(_quantize(prep, RECIPES["x86-vnni"], method, samples, [])))
        for method in ("MinMax", "Entropy")
    }
    ratios = [scales["Entropy"][t][0] / scales["MinMax"][t][0] for t in scales["MinMax"]]
    assert np.median(ratios) < 0.5, ratios  # measured 0.25-0.31 (1.0 for the softmax, bounded anyway)


def test_a_gate_refuses_a_broken_int8_model(digit_cnns):
    """The gate is a real check: int8 calibrated on blank images fails it, with its measures."""
    healthy, _, x, y = digit_cnns
    gate = _gate(healthy, x, y)
    broken = quantize_onnx_int8(healthy, np.zeros_like(x[:50]), lambda _: {"ok": True, "score": 1.0}).content
    judged = gate(broken)
    assert not judged["ok"] and judged["top1_agreement"] < 0.9 and judged["accuracy_drop"] > 0.02


def test_targets_choose_the_recipe_and_refuse_nonsense():
    assert recipe_for([]).target == "any" and recipe_for(["mcu"]).target == "any"
    assert recipe_for(["x86-avx2"]).reduce_range and recipe_for(["any"]).reduce_range
    assert not recipe_for(["x86-vnni", "mcu"]).reduce_range and not recipe_for(["arm64"]).reduce_range
    assert recipe_for(["arm64"]).activations == "int8"
    with pytest.raises(InputError, match="one CPU target"):
        recipe_for(["arm64", "x86-vnni"])


def test_op_census_counts_float_convolutions(digit_cnns):
    healthy, _, _, _ = digit_cnns
    counts = op_census(healthy)
    assert counts["quantized"] == {} and counts["float"]["Conv"] == 4
    assert onnx.load_from_string(healthy).graph.node  # a real graph


def _max_int8_weight(content: bytes) -> int:
    """Largest |code| among the int8 weight initializers of a QDQ model (7-bit range: <= 64)."""
    from onnx import numpy_helper

    graph = onnx.load_from_string(content).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    codes = [init[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init]
    return max(int(np.abs(c.astype(np.int32)).max()) for c in codes if c.dtype == np.int8 and c.size > 1)


def test_export_target_sets_the_recipe_and_is_recorded(tmp_path, digits_bundle):
    """The default bundle (target any) has 7-bit weights; --target x86-vnni writes full 8-bit
    weights, and both say so in the manifest; two CPU classes are refused before any work."""
    from edgetl.bundle import read_bundle
    from edgetl.host._export import export_bundle

    default, halves = digits_bundle
    manifest = default.manifest.to_json()
    entry = next(a for a in manifest["artifacts"] if a["file"] == "model.int8.onnx")
    assert manifest["target"] == "any" and entry["quantization"]["target"] == "any"
    assert entry["int8_ladder"]["passed"] and entry["int8_ladder"]["ops"]["float"] == {}
    assert _max_int8_weight((default.path / "model.int8.onnx").read_bytes()) <= 64
    run = manifest["producer"]["run"]
    with pytest.raises(InputError, match="one CPU target"):
        export_bundle(run, tmp_path / "two.edgetl", quantize=["int8"], targets=["arm64", "x86-vnni"])
    with pytest.raises(InputError, match="targets must be a list"):
        export_bundle(run, tmp_path / "bad.edgetl", quantize=["int8"], targets=["riscv"])
    result = export_bundle(
        run,
        tmp_path / "vnni.edgetl",
        quantize=["int8"],
        formats=["onnx"],
        targets=["x86-vnni"],
        calibration=halves.train,
        evaluation=halves.test,
    )
    assert result.ok and not result.omitted, result.describe()
    assert "model.int8.onnx: int8 for target x86-vnni, ladder rung a1-minmax (passed" in result.describe()
    vnni = read_bundle(tmp_path / "vnni.edgetl")
    entry = next(a for a in vnni.manifest.to_json()["artifacts"] if a["file"] == "model.int8.onnx")
    assert vnni.manifest.to_json()["target"] == "x86-vnni" and entry["quantization"]["target"] == "x86-vnni"
    assert _max_int8_weight((vnni.path / "model.int8.onnx").read_bytes()) > 64


def test_candidates_are_scored_with_the_devices_batched_runner_to_the_same_bits(digit_cnns):
    """The gates and the sensitivity pass run a candidate's bytes through the device's
    ``run_batched(OnnxModel(...))``, 64 rows per run, instead of a session of their own: the
    outputs are the very bits of one onnxruntime session run 64 rows at a time (what they used to
    be), and bytes that are no model are refused as such."""
    import onnxruntime as ort

    from edgetl.device._runtimes import OnnxModel, run_batched
    from edgetl.errors import BundleError
    from edgetl.host._int8_onnx import GATE_BATCH

    healthy, _, x, _ = digit_cnns
    session = ort.InferenceSession(healthy, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = x[:150]  # two full runs and a part
    before = np.concatenate([session.run(None, {name: rows[i : i + 64]})[0] for i in range(0, len(rows), 64)])
    assert GATE_BATCH == 64
    np.testing.assert_array_equal(run_batched(OnnxModel(healthy), rows, GATE_BATCH), before)
    with pytest.raises(BundleError, match="an ONNX model given as bytes cannot be loaded by onnxruntime"):
        OnnxModel(b"not a model")
