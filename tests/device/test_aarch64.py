"""The LiteRT scalar fix and the comparisons of tools/aarch64_check.py, on this machine.

The crash itself only happens on aarch64 builds of LiteRT: tools/aarch64_check.py proves
there (in CI) that personalizing on LiteRT dies of SIGSEGV with the fix turned off. Here:
the fix resizes no input whose shape is unchanged (so never a 0-d scalar), the switch that
turns it off is live, it computes what SignatureRunner computes, and the check's
comparisons refuse what they must.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_tool


class ResizeSpy:
    """The native interpreter wrapper, recording the shape of every ResizeInputTensor call."""

    def __init__(self, native):
        self._native, self.resized = native, []

    def ResizeInputTensor(self, index, shape, strict, subgraph):
        self.resized.append(tuple(shape))
        return self._native.ResizeInputTensor(index, shape, strict, subgraph)

    def __getattr__(self, name):
        return getattr(self._native, name)


def _train_twice(bundle, monkeypatch, resize_unchanged: bool):
    import edgetl.device._runtimes as runtimes
    from edgetl.device._head import HeadState, TrainSettings
    from edgetl.device._head_loop import LiteRTLoopHeadTrainer

    monkeypatch.setattr(runtimes, "RESIZE_UNCHANGED_INPUTS", resize_unchanged)
    trainer = LiteRTLoopHeadTrainer(bundle.artifact("head", "tflite"))
    train = trainer._run["train_steps"]
    spy = train._native = ResizeSpy(train._native)
    head = HeadState.factory(bundle)
    emb = np.random.default_rng(0).normal(size=(12, head.W.shape[0])).astype(np.float32)
    onehot = np.eye(head.capacity, dtype=np.float32)[np.arange(12) % 5]
    settings = TrainSettings(epochs=2, batch_size=8)
    trainer.train(head, emb, onehot, settings)  # 12 examples, then 8: the data inputs change shape
    trained, _ = trainer.train(head, emb[:8], onehot[:8], settings)
    return spy.resized, trained


def test_litert_signatures_never_resize_an_unchanged_input(digits_bundle, monkeypatch):
    bundle, _ = digits_bundle
    resized, fixed = _train_twice(bundle, monkeypatch, resize_unchanged=False)
    # embedding, labels, order and row_weight, when their shapes change
    assert resized and all(len(shape) == 2 for shape in resized), resized
    assert () not in resized
    # the switch tools/aarch64_check.py flips for its expected-failure run: every input, every call
    resized, unfixed = _train_twice(bundle, monkeypatch, resize_unchanged=True)
    assert resized.count(()) == 4 * 2, resized  # lr, l2, momentum, optimizer in each of the 2 calls
    np.testing.assert_array_equal(fixed.W, unfixed.W)  # on x86 both train the same head


def test_litert_signature_computes_what_signature_runner_computes(digits_bundle):
    from edgetl.device._runtimes import LiteRTSignature, litert_interpreter

    bundle, _ = digits_bundle
    interpreter = litert_interpreter(bundle.artifact("head", "tflite"))
    emb = np.random.default_rng(1).normal(size=(3, bundle.manifest.embedding_size)).astype(np.float32)
    ours = LiteRTSignature(interpreter, "infer")
    for batch in (emb, emb[:1], emb):
        want = interpreter.get_signature_runner("infer")(embedding=batch)["probabilities"].copy()
        np.testing.assert_array_equal(ours(embedding=batch)["probabilities"], want)
    with pytest.raises(ValueError, match="takes \\['embedding'\\]"):
        ours(embedding=emb, lr=np.float32(1))


def _world(path, commands=0, head=0.0, fp32=0.0, flip=False, tie=False):
    """A driver's output as tools/aarch64_device_run.py writes it, perturbed as asked."""
    path.mkdir()
    runs = [{"args": ["inspect", "/b/digits.edgetl"], "returncode": commands, "stderr_tail": "boom\n"}]
    (path / "commands.json").write_text(json.dumps(runs))
    probs = np.tile(np.array([[0.1, 0.6, 0.3]], np.float32), (4, 1))
    probs[0, 1] += fp32
    int8 = probs.copy()
    if flip:
        int8[1] = [0.6, 0.1, 0.3]
    if tie:
        int8[2] = [0.45, 0.45, 0.1]
    np.savez(
        path / "arrays.npz",
        **{
            "probabilities/onnxruntime/fp32": probs,
            "probabilities/onnxruntime/int8": int8,
            "head/onnxruntime/W": np.full((2, 3), 0.5 + head, np.float32),
        },
    )
    return path


@pytest.mark.parametrize(
    "change, missed",
    [
        ({}, []),
        ({"tie": True}, []),  # an exact tie on one machine is left out, not counted either way
        ({"commands": -11}, ["aarch64: edgetl inspect digits.edgetl exit -11"]),
        ({"head": 2e-6}, ["head/onnxruntime/W"]),
        ({"fp32": 2e-5}, ["probabilities/onnxruntime/fp32: max|diff|"]),
        ({"flip": True}, ["probabilities/onnxruntime/int8: top-1 equal on 3 of 4"]),
    ],
)
def test_the_check_misses_what_differs(tmp_path, change, missed):
    check = load_tool("aarch64_check")
    results = check.compare(_world(tmp_path / "x86"), _world(tmp_path / "arm", **change))
    got = [what for ok, what in results if not ok]
    assert len(got) == len(missed) and all(m in g for m, g in zip(missed, got)), got
    if change.get("tie"):
        assert any("1 exact ties left out" in what for _, what in results)
