"""A bundle written by the previous edgetl still loads, verifies and personalizes.

tests/data/schema2.edgetl was exported by edgetl at commit 6baf937 (schema 2): it ships
both head-training families, the one-step graphs (``head_train_{sgd,adam}.onnx``, the
``train`` signature of ``head.tflite``) and the loop graphs, whose SGD graphs take the
learning rate already normalized by the caller. Made with edgetl_mlp on 8 central pixels
of scikit-learn's digits 0-2 (5 epochs, fp32, max_classes 4), then
``export_bundle(run, out, quantize=["none"], calibration=data, evaluation=data, max_classes=4)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgetl.bundle import read_bundle
from edgetl.device import verify_bundle
from edgetl.device._classifier import Classifier
from edgetl.device._head import HeadState, ReferenceHeadTrainer, TrainSettings, make_trainer
from edgetl.device._personalizer import Personalizer

OLD = Path(__file__).resolve().parents[1] / "data" / "schema2.edgetl"
BACKENDS = ["onnxruntime", "litert"]


@pytest.fixture(scope="module")
def old():
    bundle = read_bundle(OLD)
    assert bundle.manifest.schema_version == 2
    files = {a.file for a in bundle.artifacts()}
    assert {"head_train_sgd.onnx", "head_train_adam.onnx", "head_train_loop_sgd.onnx"} <= files  # both families
    return bundle


def test_old_bundle_verifies_with_its_loop_graphs_only(old):
    report = verify_bundle(old)
    assert report.ok, report.describe()
    trained = {c.file for c in report.checks if c.extra.get("optimizer")}
    assert trained == {"head_train_loop_sgd.onnx", "head_train_loop_adam.onnx", "head.tflite"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_old_loop_graphs_train_like_the_reference(old, backend, optimizer):
    """The old SGD graphs take the normalized learning rate: the trainer must feed it, or the
    weights would move (mean |e|^2 + 1) times too far."""
    head = HeadState.factory(old)
    parity = old.arrays("parity", ("embeddings",))["embeddings"][:20]
    onehot = np.eye(head.capacity, dtype=np.float32)[np.arange(len(parity)) % 3]
    settings = TrainSettings(
        epochs=3, batch_size=8, optimizer=optimizer, learning_rate=0.1 if optimizer == "sgd" else 0.01
    )
    got, _ = make_trainer(old, backend).train(head, parity, onehot, settings)
    want, _ = ReferenceHeadTrainer().train(head, parity, onehot, settings)
    assert np.abs(want.W - head.W).max() > 1e-3  # it trained
    np.testing.assert_allclose(got.W, want.W, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_old_bundle_personalizes_and_commits(old, backend, tmp_path):
    """A user's examples of a new class (digit 3, the same 8 pixels): trained and guarded.

    The guard refuses this candidate (8 pixels cannot tell a 3 from a 2 without forgetting
    some 2s: measured 9 of 270 replay examples lost), which is its job; what this checks is
    that the old bundle's graphs trained a head that learned the new class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data[:, [19, 20, 27, 28, 35, 36, 43, 44]].astype(np.float32)
    threes, others = x[digits.target == 3][:40], x[digits.target < 3][:30]
    clf = Classifier.open(old.path, backend=backend)
    p = Personalizer(clf, tmp_path / "store")
    p.add_class("three", threes)
    p.add_examples(others, [("zero", "one", "two")[t] for t in digits.target[digits.target < 3][:30]])
    p.train()
    result = p.commit()
    assert result.candidate_scores["user"] >= result.active_scores["user"] + 0.2, result
    assert "forgets the factory classes" in result.reason and result.version == 0


def test_old_graphs_fed_the_users_learning_rate_fail_verify(old):
    """The gate behind the schema bump: read as schema 3, the old SGD graphs get the user's
    learning rate unnormalized and verify refuses them (measured 8.5e-3 > 1e-5)."""
    from dataclasses import replace

    as_new = replace(old, manifest=replace(old.manifest, schema_version=3))
    failed = {(c.file, c.extra.get("optimizer")) for c in verify_bundle(as_new).failed()}
    assert failed == {("head_train_loop_sgd.onnx", "sgd"), ("head.tflite", "sgd")}
