"""Export never strands the user: failed quantized artifacts are left out (or fatal with
--strict), calibration defaults to the run's own data, and the head-step parity tolerance
scales with the step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetl.cli import main
from edgetl.data import Dataset, load_digits_dataset
from edgetl.errors import BundleError, InputError


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, source_run):
    """A run trained by the CLI from an .npz file, so it records its data (path + sha256)."""
    base = tmp_path_factory.mktemp("gates")
    d = load_digits_dataset((5, 6, 7, 8, 9))
    np.savez(base / "digits.npz", x=d.x, y=np.asarray([d.class_names[i] for i in d.y]))
    out = base / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(base / "digits.npz"),
                "--backbone",
                str(source_run[0]),
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out, base / "digits.npz"


def test_a_failing_quantized_configuration_is_left_out_and_strict_makes_it_fatal(tmp_path, cli_run, digits_target):
    """int8 calibrated on blank images saturates (agreement near chance): its files are left
    out with the measured reason, float16 and fp32 stay; --strict writes nothing."""
    from edgetl.errors import QuantizedModelLeftOut
    from edgetl.host._export import export_bundle

    run, _ = cli_run
    blank = Dataset(np.zeros_like(digits_target.x), digits_target.y, digits_target.class_names, "image")
    with pytest.warns(QuantizedModelLeftOut, match="left out .*int8"):  # the Python API is never silent
        result = export_bundle(
            run, tmp_path / "partial.edgetl", quantize=["float16", "int8"], calibration=blank, evaluation=digits_target
        )
    assert result.ok and result.bundle is not None
    omitted = {(o["format"], o["precision"]) for o in result.omitted}
    assert ("tflite", "int8") in omitted or ("onnx", "int8") in omitted
    assert {o["outcome"] for o in result.omitted} == {"fail"}
    reason = " ".join(o["reason"] for o in result.omitted)
    # measured, with the counts and the tolerance: the paired tests on held-out and calibration examples
    assert "loses beyond its tolerance" in reason and "held-out accuracy" in reason and "tolerated" in reason
    files = {a["file"] for a in result.bundle.manifest.to_json()["artifacts"]}
    for o in result.omitted:
        assert not set(o["files"]) & files  # both fused and backbone of that configuration
        assert all(not (result.bundle.path / f).exists() for f in o["files"])
    assert {"model.fp32.tflite", "model.float16.tflite", "model.fp32.onnx"} <= files
    assert result.bundle.manifest.to_json()["parity"]["ok"] and result.bundle.manifest.to_json()["parity"]["omitted"]

    strict = export_bundle(
        run, tmp_path / "strict.edgetl", quantize=["int8"], calibration=blank, evaluation=digits_target, strict=True
    )
    assert not strict.ok and strict.bundle is None and not (tmp_path / "strict.edgetl").exists()
    assert any("loses beyond its tolerance" in f["message"] for f in strict.fatal), strict.fatal
    with pytest.raises(BundleError, match="failed verification"):
        strict.save(tmp_path / "forced.edgetl")


def test_cli_strict_exits_1_and_partial_exits_0(tmp_path, cli_run, digits_target, capsys):
    run, npz = cli_run
    np.savez(
        tmp_path / "blank.npz",
        x=np.zeros_like(digits_target.x),
        y=np.asarray([digits_target.class_names[i] for i in digits_target.y]),
    )
    flags = ["--quantize", "int8", "--calibration", str(tmp_path / "blank.npz"), "--evaluation", str(npz)]
    assert main(["export", str(run), *flags, "--strict", "--out", str(tmp_path / "s.edgetl")]) == 1
    assert "no bundle written" in capsys.readouterr().out and not (tmp_path / "s.edgetl").exists()
    assert main(["export", str(run), *flags, "--out", str(tmp_path / "p.edgetl")]) == 0
    out = capsys.readouterr().out
    assert "left out" in out and (tmp_path / "p.edgetl" / "model.fp32.onnx").exists()


def test_calibration_defaults_to_the_runs_own_data_and_notices_changes(tmp_path, cli_run):
    from edgetl.host._export import export_bundle

    run, npz = cli_run
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["load"]["path"] == str(npz.resolve()) and len(config["data"]["sha256"]) == 64
    result = export_bundle(run, tmp_path / "auto.edgetl", quantize=["int8"])
    assert result.ok and not result.omitted, result.describe()
    assert "verified" in result.manifest["data"]["calibration"]
    int8 = next(c for c in result.report.checks if c["file"] == "model.int8.tflite")
    assert int8["accuracy"] > 0.85 and int8["accuracy_drop"] <= 0.02  # evaluated on the run's held-out split

    changed = tmp_path / "changed.npz"
    with np.load(npz) as f:
        x, y = f["x"].copy(), f["y"]
    x[0, 0, 0, 0] ^= 1  # one pixel of one image
    np.savez(changed, x=x, y=y)
    config["data"]["load"]["path"] = str(changed)
    (run / "config.json").write_text(json.dumps(config))
    try:
        with pytest.raises(InputError, match="changed since training"):
            export_bundle(run, tmp_path / "changed.edgetl", quantize=["int8"])
        config["data"]["load"]["path"] = str(tmp_path / "gone.npz")
        (run / "config.json").write_text(json.dumps(config))
        with pytest.raises(InputError, match="no longer exists"):
            export_bundle(run, tmp_path / "gone.edgetl", quantize=["int8"])
        with pytest.warns(UserWarning, match="exporting without data"):  # fp32 still exports
            assert export_bundle(run, tmp_path / "fp32.edgetl").ok
    finally:
        config["data"]["load"]["path"] = str(npz.resolve())
        (run / "config.json").write_text(json.dumps(config))
