"""``edgetl verify`` checks a bundle's trainable tail in every installed runtime (issue 24): trunk,
inference graph and training graphs on the bundle's parity data, against Keras and the float64
reference. Each gate is fed a broken file with a valid, re-hashed manifest and must refuse it,
naming it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bundle_edits import rebuilt, scaled, without_tail

from edgetl.bundle import _contract as C
from edgetl.bundle import read_bundle
from edgetl.device import verify_bundle

TAIL_ROLES = ("trunk", "tail", "tail_infer", "tail_train_loop")


def _tail_rows(report):
    return [c for c in report.checks if c.role in TAIL_ROLES]


def _sizes(bundle):
    section = bundle.manifest.extra["tail"]
    capacity = bundle.arrays("head_init", (C.WEIGHTS,))[C.WEIGHTS].shape[1]
    return section["trunk_size"], section["embedding_size"], capacity, section["positions"]


def test_verify_checks_the_tail_in_both_runtimes(tail_bundle):
    bundle = read_bundle(tail_bundle[0])
    report = verify_bundle(bundle)
    assert report.ok, report.describe()
    rows = {
        (c.file, c.format, c.extra.get("optimizer") or c.extra.get("signature") or c.role) for c in _tail_rows(report)
    }
    assert rows == {
        ("trunk.fp32.onnx", "onnx", "trunk"),
        ("tail_infer.onnx", "onnx", "infer"),
        ("tail_train_loop_sgd.onnx", "onnx", "sgd"),
        ("tail_train_loop_adam.onnx", "onnx", "adam"),
        ("trunk.fp32.tflite", "tflite", "trunk"),
        ("tail.tflite", "tflite", "infer"),
        ("tail.tflite", "tflite", "sgd"),
        ("tail.tflite", "tflite", "adam"),
    }
    train = [c for c in _tail_rows(report) if c.extra.get("optimizer")]
    assert all(c.extra["steps"] == 8 and c.value < c.limit for c in train)  # 2 epochs of 4 batches of 8


# Each gate fed a broken file (a real graph or array that still loads, re-hashed into the manifest):
# the rows that must refuse it, as (file, what) with what = signature / optimizer / role.
def _linear_infer(bundle):
    from edgetl.host._tail_graphs import tail_infer_onnx

    return lambda old: tail_infer_onnx(*_sizes(bundle)[:3], "linear", _sizes(bundle)[3])  # the layer is relu


def _linear_loop(bundle, optimizer):
    from edgetl.host._tail_graphs import tail_train_loop_onnx

    f, d, cap, p = _sizes(bundle)
    return lambda old: tail_train_loop_onnx(f, d, cap, optimizer, "linear", p)


def _perturbed_w1(old: bytes) -> bytes:
    import io

    arrays = dict(np.load(io.BytesIO(old)))
    arrays["W1"] = arrays["W1"] * 1.01  # 1%: within what a bundle could plausibly ship, far outside float32 error
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


BROKEN = {
    "tail_init W1 x1.01": (lambda b: {"tail_init.npz": _perturbed_w1}, "tail_init.npz"),
    "trunk scaled x1.01": (lambda b: {"trunk.fp32.onnx": lambda old: scaled(old, 1.01)}, "trunk.fp32.onnx"),
    "trunk of another model": (
        lambda b: {"trunk.fp32.onnx": lambda old: (b.path / "backbone.fp32.onnx").read_bytes()},
        "trunk.fp32.onnx",
    ),
    "infer graph linear": (lambda b: {"tail_infer.onnx": _linear_infer(b)}, "tail_infer.onnx"),
    "sgd loop linear": (lambda b: {"tail_train_loop_sgd.onnx": _linear_loop(b, "sgd")}, "tail_train_loop_sgd.onnx"),
    "adam loop linear": (lambda b: {"tail_train_loop_adam.onnx": _linear_loop(b, "adam")}, "tail_train_loop_adam.onnx"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_verify_refuses_a_broken_tail_file_and_names_it(tail_bundle, tmp_path, case):
    bundle = read_bundle(tail_bundle[0])
    changes, named = BROKEN[case]
    broken = read_bundle(rebuilt(bundle, tmp_path / "broken.edgetl", changes(bundle)).path)
    report = verify_bundle(broken)
    failed = [c for c in report.failed()]
    assert failed and all(c.role in TAIL_ROLES for c in failed), report.describe()
    assert all(named in c.extra["inputs"] for c in failed), report.describe()  # every refusal ran the broken file
    assert named in report.describe().split("verification FAILED")[0].split("\nfailed:", 1)[1]
    if named.endswith(".onnx"):  # the other runtime's files are untouched and still pass
        assert all(c.ok for c in _tail_rows(report) if c.format == "tflite"), report.describe()


def test_verify_refuses_a_tail_tflite_whose_activation_is_swapped(tail_bundle, tmp_path):
    from edgetl.host._tail_graphs import tail_tflite

    bundle = read_bundle(tail_bundle[0])
    f, d, cap, p = _sizes(bundle)
    broken = read_bundle(
        rebuilt(bundle, tmp_path / "b.edgetl", {"tail.tflite": lambda old: tail_tflite(f, d, cap, "linear", p)}).path
    )
    report = verify_bundle(broken)
    failed = {(c.file, c.extra.get("signature")) for c in report.failed()}
    assert failed == {("tail.tflite", "infer"), ("tail.tflite", "train_steps_sgd"), ("tail.tflite", "train_steps_adam")}


def test_one_runtime_lists_the_other_runtimes_tail_files_and_a_bundle_without_a_tail_has_no_rows(
    tail_bundle, tmp_path, monkeypatch
):
    import edgetl.device._runtimes as runtimes

    bundle = read_bundle(tail_bundle[0])
    monkeypatch.setattr(runtimes, "installed_backends", lambda: ("onnxruntime",))
    report = verify_bundle(bundle)
    assert report.ok and {c.format for c in _tail_rows(report)} == {"onnx"} and len(_tail_rows(report)) == 4
    tflite = sorted(a.file for a in bundle.artifacts() if a.format.value == "tflite")
    assert {"trunk.fp32.tflite", "tail.tflite"} <= set(tflite)
    assert report.not_checked == [f"{len(tflite)} files need litert, not installed: {runtimes.install_hint('litert')}"]
    monkeypatch.undo()

    head_only = read_bundle(without_tail(bundle.path, tmp_path / "head_only.edgetl").path)
    report = verify_bundle(head_only)
    assert report.ok and not _tail_rows(report) and report.checks, report.describe()


def test_cli_verify_prints_the_tail_rows(tail_bundle, capsys):
    from edgetl.cli import main

    assert main(["verify", str(tail_bundle[0])]) == 0
    text = capsys.readouterr().out
    for file in ("trunk.fp32.onnx", "tail_infer.onnx", "tail_train_loop_adam.onnx", "trunk.fp32.tflite", "tail.tflite"):
        assert any(line.startswith(file) and line.endswith("yes") for line in text.splitlines()), (file, text)
    assert main(["verify", str(tail_bundle[0]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and sum(c["role"] in TAIL_ROLES for c in doc["checks"]) == 8
