"""verify can fail: broken artifacts with valid, re-hashed manifests are refused.

Each test builds a real bundle (real graphs, written by write_bundle so every hash is
valid), breaks one thing the way a buggy converter or a tampering author would, and sees
``verify_bundle`` return ``ok=False`` on exactly that check.
"""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest

from edgetl.bundle import read_bundle, write_bundle
from edgetl.device import verify_bundle
from edgetl.errors import BundleError
from edgetl.host._head_graphs import head_infer_onnx
from edgetl.host._head_loop_graphs import head_train_loop_onnx

D, C, N_ACTIVE = 32, 6, 4


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _head_bundle(tmp_path, *, scale: float = 1.0, train_adam: bytes | None = None):
    """A head-only bundle: factory head, ONNX head graphs, parity references.

    Embeddings of magnitude ~``scale`` (20 mimics an unstandardized user backbone)."""
    rng = np.random.default_rng(0)
    W = np.zeros((D, C), np.float32)
    W[:, :N_ACTIVE] = rng.normal(0, 0.5, size=(D, N_ACTIVE))
    b, mask = np.zeros(C, np.float32), np.r_[np.ones(N_ACTIVE), np.zeros(C - N_ACTIVE)].astype(np.float32)
    emb = (rng.normal(0, 1, size=(16, D)) * scale).astype(np.float32)
    z = emb @ W[:, :N_ACTIVE]
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    files = {
        "head_init.npz": _npz(W=W, b=b, mask=mask),
        "parity.npz": _npz(x=emb, probabilities=probs.astype(np.float32), embeddings=emb),
        "head_infer.onnx": head_infer_onnx(D, C),
        "head_train_loop_sgd.onnx": head_train_loop_onnx(D, C, "sgd"),
        "head_train_loop_adam.onnx": train_adam or head_train_loop_onnx(D, C, "adam"),
    }
    roles = {
        "head_init.npz": ("head_init", "npz"),
        "parity.npz": ("parity", "npz"),
        "head_infer.onnx": ("head_infer", "onnx"),
        "head_train_loop_sgd.onnx": ("head_train_loop", "onnx"),
        "head_train_loop_adam.onnx": ("head_train_loop", "onnx"),
    }
    artifacts = [
        {
            "file": f,
            "role": r,
            "format": fmt,
            "precision": "fp32",
            **({"optimizer": f.split("_")[-1].split(".")[0]} if r == "head_train_loop" else {}),
        }
        for f, (r, fmt) in roles.items()
    ]
    manifest = {
        "name": "head",
        "labels": [f"c{i}" for i in range(N_ACTIVE)],
        "input_spec": {"shape": [D], "dtype": "float32", "kind": "features"},
        "embedding_size": D,
        "head": {"max_classes": C, "active_classes": N_ACTIVE},
        "artifacts": artifacts,
    }
    return write_bundle(tmp_path / "head.edgetl", manifest, files)


def test_a_healthy_head_passes_even_with_large_embeddings(tmp_path):
    """Embeddings ~20 (an unstandardized backbone): Adam moves weights ~lr per step; the
    tolerance scales with the movement, so the healthy graphs pass (issue 9: a fixed 1e-5
    failed such a head)."""
    report = verify_bundle(_head_bundle(tmp_path, scale=20.0))
    assert report.ok, report.describe()
    adam = next(c for c in report.checks if c.extra.get("optimizer") == "adam")
    assert adam.limit > 1e-5 and adam.extra["steps"] == 6


def test_a_wrong_adam_graph_is_refused(tmp_path):
    """beta1 = 0.5 instead of 0.9 in the Adam graph: the first step is the same
    (lr * sign(g), bias-corrected), later ones are not; several steps from a non-zero
    state catch it, one step from zero could not."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(head_train_loop_onnx(D, C, "adam"))
    for i, init in enumerate(model.graph.initializer):
        if init.name == "beta1":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.array(0.5, np.float32), "beta1"))
    bundle = _head_bundle(tmp_path, train_adam=model.SerializeToString())
    report = verify_bundle(read_bundle(bundle.path))
    failed = report.failed()
    assert [(c.file, c.extra.get("optimizer")) for c in failed] == [("head_train_loop_adam.onnx", "adam")], (
        report.describe()
    )
    assert failed[0].value > failed[0].limit


def test_a_wrong_sgd_momentum_is_refused(tmp_path):
    """The SGD graph without momentum (velocity reset every step)."""
    import onnx

    model = onnx.load_from_string(head_train_loop_onnx(D, C, "sgd"))
    (scan,) = [n for n in model.graph.node if n.op_type == "Scan"]
    for node in scan.attribute[0].g.node:  # the step body reads the outer `momentum`
        if node.op_type == "Mul" and "momentum" in node.input:
            node.input[list(node.input).index("momentum")] = "zero_momentum"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero_momentum"))
    bundle = _head_bundle(tmp_path)
    (bundle.path / "head_train_loop_sgd.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(BundleError, match="truncated or replaced|sha256"):
        read_bundle(bundle.path)  # integrity first; now re-hash it as a hostile author would
    from bundle_edits import rebuilt

    rehashed = rebuilt(bundle, tmp_path / "rehashed.edgetl", {"head_train_loop_sgd.onnx": lambda content: content})
    report = verify_bundle(read_bundle(rehashed.path))
    assert [c.file for c in report.failed()] == ["head_train_loop_sgd.onnx"], report.describe()


def test_an_sgd_graph_that_does_not_normalize_the_learning_rate_is_refused(tmp_path):
    """The SGD loop graph with its step taken as the raw ``lr`` (the normalization
    lr / (mean |e|^2 + 1) skipped): the weights move too far and verify says so."""
    import onnx

    model = onnx.load_from_string(head_train_loop_onnx(D, C, "sgd"))
    (scan,) = [n for n in model.graph.node if n.op_type == "Scan"]
    for node in [*model.graph.node, *scan.attribute[0].g.node]:
        for i, name in enumerate(node.input):
            if name == "lr_step":
                node.input[i] = "lr"
    from bundle_edits import rebuilt

    bundle = _head_bundle(tmp_path)
    changed = rebuilt(
        bundle, tmp_path / "changed.edgetl", {"head_train_loop_sgd.onnx": lambda _: model.SerializeToString()}
    )
    report = verify_bundle(read_bundle(changed.path))
    assert [c.file for c in report.failed()] == ["head_train_loop_sgd.onnx"], report.describe()


@pytest.mark.parametrize(
    "name,refused,edit",
    [
        ("scaled_backbone", "backbone.fp32.onnx", "scale"),
        ("swapped_fused", "model.int8.onnx", "swap"),
    ],
)
def test_a_broken_model_with_valid_hashes_fails_verify_and_the_cli(
    tmp_path, digits_bundle, capsys, name, edit, refused
):
    """A real bundle whose manifest hashes are valid but one model is wrong: fp32 backbone
    outputs scaled by 1.5 (parity), int8 classes swapped (agreement and accuracy drop)."""
    from bundle_edits import rebuilt, scaled, swapped

    from edgetl.cli import main

    bundle, halves = digits_bundle
    classes = len(bundle.labels)
    change = (lambda b: swapped(b, classes)) if edit == "swap" else (lambda b: scaled(b, 1.5))
    broken = rebuilt(bundle, tmp_path / f"{name}.edgetl", {refused: change})
    report = verify_bundle(broken, halves.test.x, halves.test.y)
    assert not report.ok
    assert {c.file for c in report.failed()} == {refused}, report.describe()
    np.savez(tmp_path / "test.npz", x=halves.test.x, y=halves.test.y, class_names=np.asarray(bundle.labels))
    assert main(["verify", str(broken.path), "--data", str(tmp_path / "test.npz")]) == 1
    out = capsys.readouterr().out
    # the failing check is named with its number, not only marked NO in the table
    (failed,) = [line for line in out.splitlines() if line.startswith("failed: ")]
    assert refused in failed and any(w in failed for w in ("max|diff|", "points below fp32", "agreement")), failed
    assert verify_bundle(bundle, halves.test.x, halves.test.y).ok  # the original passes


def test_with_one_runtime_verify_lists_what_it_could_not_check_and_export_refuses(digits_bundle, monkeypatch):
    """A device with only onnxruntime: its files are checked (and can still fail), the
    .tflite files are reported as not checked with the extra to install; an export, which
    must verify every file it writes, refuses instead of shipping unchecked files."""
    import edgetl.device._runtimes as runtimes
    from edgetl.errors import DependencyError
    from edgetl.host._export import verify_staged

    bundle, halves = digits_bundle
    monkeypatch.setattr(runtimes, "installed_backends", lambda: ("onnxruntime",))
    report = verify_bundle(bundle, halves.test.x, halves.test.y)
    assert report.ok and {c.format for c in report.checks} == {"onnx"}, report.describe()
    assert 'need litert, not installed: pip install "edgetl[device-litert]"' in report.describe()
    tflite = [a.file for a in bundle.artifacts() if a.format.value == "tflite"]
    assert report.not_checked == [f"{len(tflite)} files need litert, not installed: {runtimes.install_hint('litert')}"]
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    files = [
        SimpleNamespace(file=e["file"], content=(bundle.path / e["file"]).read_bytes()) for e in manifest["artifacts"]
    ]
    plan = SimpleNamespace(data=SimpleNamespace(test=(halves.test.x, halves.test.y), calibration_x=None), strict=False)
    with pytest.raises(DependencyError, match="export verifies every file in both runtimes"):
        verify_staged(plan, manifest, files)
    monkeypatch.setattr(runtimes, "installed_backends", lambda: ())
    with pytest.raises(DependencyError, match="no runtime installed"):
        verify_bundle(bundle)
