"""The int8 remedy ladders and the QAT-or-PTQ choice decide on selection data (the validation
split, or half of the held-out data, and the labelled calibration examples), and the export
reports on data no choice looked at (edgetl/host/_selection.py).

The choice tests craft the two splits so they disagree: labels are what fp32 predicts (fp32
is right on every example), so a candidate's accuracy drop is the share of examples where it
disagrees with fp32. The ``hard`` split holds 5 such examples in 100 (5 points, above the
1-point target), the ``easy`` split none. The int8 candidate is calibrated on inputs scaled
by 0.5 so it clips, and disagrees with fp32 on some examples (with the real calibration it
agrees on all 896 digits)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edgetl.host._int8_onnx import TARGET_ACCURACY_DROP, agreement_gate

HARD_DROP = 0.05


@pytest.fixture(scope="module")
def plan_and_pool(digits_bundle):
    """The digits bundle's run planned for int8 export, its float ONNX, and every digit (x)."""
    from edgetl.host._convert import keras_to_onnx
    from edgetl.host._export import plan_export

    bundle, halves = digits_bundle
    run = bundle.manifest.to_json()["producer"]["run"]
    plan = plan_export(run, quantize=["int8"], calibration=halves.train, evaluation=halves.test)
    x = np.concatenate([halves.train.x, halves.test.x]).astype(np.float32)
    return plan, keras_to_onnx(plan.run.model, plan.opset), x


def _splits(fp32_top: np.ndarray, int8_top: np.ndarray, x: np.ndarray, k: int = 5, n: int = 100):
    """``(hard, easy)`` labelled splits: ``hard`` has ``k`` of ``n`` examples where int8 and fp32
    disagree, ``easy`` none; labels are fp32's predictions."""
    differ, agree = np.flatnonzero(fp32_top != int8_top), np.flatnonzero(fp32_top == int8_top)
    assert len(differ) >= k and len(agree) >= 2 * n, (len(differ), len(agree))
    labelled = lambda rows: (x[rows], fp32_top[rows])  # noqa: E731
    return labelled(np.concatenate([differ[:k], agree[: n - k]])), labelled(agree[n : 2 * n])


def _onnx_choice(plan, fp32, calibration, select, report):
    """The export's int8 ONNX ladder (``onnx_int8``) on a plan whose selection and reporting splits are given."""
    from edgetl.host._export import onnx_int8

    plan.data.select, plan.data.test, plan.data.calibration_x = select, report, select[0]
    return onnx_int8(plan, "fused", fp32, calibration)


def test_the_onnx_ladder_climbs_on_the_selection_split_not_the_reported_one(plan_and_pool):
    from edgetl.device._runtimes import OnnxModel, run_batched
    from edgetl.host._int8_onnx import GATE_BATCH, RECIPES, quantize_onnx_int8

    plan, fp32, x = plan_and_pool
    run = lambda content: run_batched(OnnxModel(content), x, GATE_BATCH)  # noqa: E731  (what the gates run)
    calibration = plan.data.calibration_x[:200] * 0.5  # clips: some examples flip
    accept = lambda _: {"ok": True, "score": 1.0}  # noqa: E731
    a1 = quantize_onnx_int8(
        fp32, calibration, accept, recipe=RECIPES[plan.target], keep_float=("embedding_standardize",), ladder=False
    )
    hard, easy = _splits(run(fp32).argmax(1), run(a1.content).argmax(1), x)
    assert agreement_gate(fp32, *hard[:1], y=hard[1])(a1.content)["accuracy_drop"] == pytest.approx(HARD_DROP)

    # Chosen on the hard split, reported on the easy one: a1 misses the target where it is chosen, so the
    # ladder climbs, although on the reported split a1 is within it.
    _, climbed = _onnx_choice(plan, fp32, calibration, select=hard, report=easy)
    first = climbed["tried"][0]
    assert first["rung"] == "a1-minmax" and not first["meets_target"] and len(climbed["tried"]) > 1
    assert first["gate"]["labelled"] == 100 and first["gate"]["accuracy_drop"] == pytest.approx(HARD_DROP)
    # The reverse: a1 meets the target on the selection split and ships, whatever it does on the reported one.
    content, stayed = _onnx_choice(plan, fp32, calibration, select=easy, report=hard)
    assert stayed["rung"] == "a1-minmax" and len(stayed["tried"]) == 1 and stayed["gate"]["accuracy_drop"] == 0
    assert agreement_gate(fp32, *hard[:1], y=hard[1])(content)["accuracy_drop"] > TARGET_ACCURACY_DROP


def test_the_tflite_ladder_climbs_on_the_selection_split_not_the_reported_one(plan_and_pool):
    from edgetl.bundle._contract import FUSED_OUTPUT
    from edgetl.device._runtimes import TFLiteModel
    from edgetl.host._convert import to_tflite
    from edgetl.host._int8_tflite import _run_tflite, ladder_for

    plan, _, x = plan_and_pool
    q = next(c for c in plan.configs if c.mode == "int8")
    calibration = plan.data.calibration_x[:200] * 0.5
    model = plan.run.model
    ptq = to_tflite(model, q, calibration, output_name=FUSED_OUTPUT)
    hard, easy = _splits(model.predict(x, verbose=0).argmax(1), _run_tflite(TFLiteModel, ptq, x).argmax(1), x)

    def ladder(select, report):
        plan.data.select, plan.data.test = select, report
        return ladder_for(plan, q, "fused", model, FUSED_OUTPUT, calibration, ptq)

    climbed = ladder(select=hard, report=easy)["ladder"]
    assert climbed["tried"][0]["rung"] == "ptq" and climbed["tried"][0]["accuracy_drop"] == pytest.approx(HARD_DROP)
    assert len(climbed["tried"]) > 1  # missed the target where it is chosen: float fallback was tried
    stayed = ladder(select=easy, report=hard)
    assert stayed["ladder"]["rung"] == "ptq" and len(stayed["ladder"]["tried"]) == 1
    assert stayed["content"] is ptq
    # on the reported split the file shipped is 5 points below fp32: that split chose nothing
    assert np.mean(_run_tflite(TFLiteModel, ptq, hard[0]).argmax(1) != hard[1]) == pytest.approx(HARD_DROP)


def test_the_manifest_records_the_split_that_chose_and_the_one_reported(digits_bundle):
    """The session's digits bundle: run with a validation split, exported with evaluation data."""
    from edgetl.host._export import _ladder_line

    bundle, halves = digits_bundle
    manifest = bundle.manifest.to_json()
    roles = manifest["data"]["selection"]
    val, calibration = roles["chooses_parts"]
    assert val["split"] == "val" and 0 < val["examples"] < len(halves.train.y)
    assert calibration == {"split": "calibration (train split)", "examples": 200}
    assert roles["chooses"] == {"split": "val + calibration (train split)", "examples": val["examples"] + 200}
    assert roles["reports"] == {"split": "evaluation", "examples": 448}
    checks = {c["file"]: c for c in manifest["parity"]["checks"]}
    entries = {e["file"]: e for e in manifest["artifacts"]}
    for file in ("model.int8.onnx", "model.int8.tflite", "backbone.int8.onnx", "backbone.int8.tflite"):
        record = entries[file]["selection"]
        assert record["chosen_on"] == roles["chooses"] and record["reported_on"] == roles["reports"], (file, record)
        assert record["selection_accuracy_drop"] is not None and record["reported_accuracy_drop"] is not None
        if file.startswith("model."):  # the reported drop is the one verification measured on the evaluation data
            assert record["reported_accuracy_drop"] == pytest.approx(checks[file]["accuracy_drop"], abs=1e-4)
            assert checks[file]["evidence"]["accuracy"]["n"] == 448
    onnx = entries["model.int8.onnx"]
    gate = onnx["int8_ladder"]["gate"]  # the ladder's gate measured what the record says, on the same data
    assert onnx["selection"]["selection_accuracy_drop"] == pytest.approx(gate["accuracy_drop"], abs=1e-4)
    assert gate["labelled"] == roles["chooses"]["examples"]
    assert "examples of val + calibration (train split)" in _ladder_line(onnx)
    assert "selection" not in entries["model.fp32.onnx"]


def test_a_run_without_a_validation_split_chooses_on_one_half_and_reports_on_the_other(tmp_path, digits_bundle):
    from edgetl.host._export import export_bundle
    from edgetl.host._run import load_run
    from edgetl.host._selection import stratified_halves

    bundle, halves = digits_bundle
    run = load_run(bundle.manifest.to_json()["producer"]["run"])
    run.config = replace(run.config, val_fraction=0.0)  # the same run, split without a validation split
    result = export_bundle(
        run, tmp_path / "halves.edgetl", quantize=["int8"], formats=["onnx"], calibration=halves.train,
        evaluation=halves.test,
    )  # fmt: skip
    assert result.ok and not result.omitted, result.describe()
    roles = result.manifest["data"]["selection"]
    select, report = stratified_halves(halves.test.y)
    assert not set(select) & set(report) and len(select) + len(report) == len(halves.test.y)
    assert roles["chooses_parts"][0] == {"split": "evaluation (selection half)", "examples": len(select)}
    assert roles["reports"] == {"split": "evaluation (reporting half)", "examples": len(report)}
    assert "no validation split" in roles["why"]
    entry = next(e for e in result.manifest["artifacts"] if e["file"] == "model.int8.onnx")
    assert entry["selection"]["chosen_on"] == roles["chooses"] and entry["selection"]["reported_on"] == roles["reports"]
    assert entry["int8_ladder"]["gate"]["labelled"] == len(select) + 200
    check = next(c for c in result.report.checks if c.file == "model.int8.onnx")
    assert check.extra["evidence"]["accuracy"]["n"] == len(report)  # verification reports on the other half
