"""The trainable head on the device: its state, and training it inside a runtime.

The head is linear with a fixed capacity of ``max_classes`` columns; ``mask`` marks the
active ones and ``labels`` names them in column order. Training runs the bundle's own
train-step graph: ``head_train_{sgd,adam}.onnx`` in onnxruntime, or ``head.tflite``'s
``train`` signature in LiteRT. numpy only shuffles batches and moves arrays.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from edgetl.bundle import Bundle
from edgetl.bundle._head import (
    HYPERPARAMETERS,
    INFER_INPUTS,
    INFER_OUTPUT,
    LOSS_OUTPUT,
    TFLITE_SIGNATURES,
    gradients,
    initial_state,
    masked_softmax,
    reference_step,
    signature_inputs,
    state_output,
)
from edgetl.errors import BundleError, InputError, describe

Optimizer = Literal["sgd", "adam"]


@dataclass(frozen=True)
class HeadState:
    """One complete head: weights, active-class mask, the L2 anchor and the labels; ``tail``
    (``{"W1", "b1"}``, issue 24) when the version also trained the backbone's last layer: the
    head then runs on the embeddings that layer gives (``Classifier.embed`` follows it)."""

    W: np.ndarray
    b: np.ndarray
    mask: np.ndarray
    anchor: np.ndarray
    labels: tuple[str, ...]
    tail: dict | None = None

    @property
    def capacity(self) -> int:
        return int(self.W.shape[1])

    @classmethod
    def factory(cls, bundle: Bundle) -> "HeadState":
        arrays = bundle.arrays("head_init", ("W", "b", "mask"))
        d, cap, n = bundle.manifest.embedding_size, bundle.manifest.head.max_classes, len(bundle.labels)
        expected = {"W": (d, cap), "b": (cap,), "mask": (cap,)}
        for key, shape in expected.items():
            if arrays[key].shape != shape:
                raise BundleError(
                    f"head_init.npz: {key} has shape {arrays[key].shape}; the manifest (embedding size {d}, "
                    f"{cap} classes) needs {shape}"
                )
        W, b, mask = (arrays[k].astype(np.float32) for k in ("W", "b", "mask"))
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise BundleError("head_init.npz: W or b holds NaN or infinite values")
        if not np.isin(mask, (0.0, 1.0)).all() or not np.array_equal(mask[:n], np.ones(n)) or mask[n:].any():
            raise BundleError(
                f"head_init.npz: mask must mark the {n} labelled classes active (1) and the other {cap - n} free "
                f"(0), received {int(mask.sum())} active"
            )
        return cls(W, b, mask, W.copy(), tuple(bundle.labels))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"W": self.W, "b": self.b, "mask": self.mask, "anchor": self.anchor}


@dataclass(frozen=True)
class TrainSettings:
    """Head training hyperparameters (defaults suit a few dozen examples)."""

    epochs: int = 30
    batch_size: int = 16
    # For SGD this is relative to the embeddings' scale (see `effective_learning_rate`), so one
    # value suits any backbone; for Adam it is the usual absolute step size.
    learning_rate: float = 0.1
    l2: float = 1e-3  # pull toward the factory (anchor) weights, against forgetting
    optimizer: Optimizer = "sgd"
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name} must be a positive integer, received {name}={describe(v)}")
        if not 0 < self.learning_rate < 10:
            raise InputError(f"learning_rate must be in (0, 10), received {self.learning_rate}")
        if self.l2 < 0 or not 0 <= self.momentum < 1:
            raise InputError(f"l2 must be >= 0 and momentum in [0, 1), received l2={self.l2}, momentum={self.momentum}")
        if self.optimizer not in ("sgd", "adam"):
            raise InputError(f"optimizer must be 'sgd' or 'adam', received {self.optimizer!r}")


def effective_learning_rate(settings: TrainSettings, emb: np.ndarray) -> float:
    """The step size handed to the runtime: for SGD, normalised by the embeddings' scale.

    The gradient of the logits w.r.t. W scales with ||e||^2, so a fixed SGD learning rate
    that is stable for one backbone diverges on another (measured: lr 0.05 with momentum
    0.9 on the digits CNN's 256-d embeddings drove the loss from 0.08 to 13). Dividing by
    the mean squared norm of the input (as normalised LMS does) makes ``learning_rate`` a
    fraction of the largest stable step. The input includes the constant 1 the bias
    multiplies, hence ``+ 1``: without it, all-zero embeddings (a dead backbone) gave a
    huge step on the bias, whose gradient does not shrink with e, and NaN weights.
    Adam normalises its steps itself.
    """
    if settings.optimizer != "sgd" or not len(emb):
        return float(settings.learning_rate)
    scale = float(np.mean(np.sum(emb.astype(np.float64) ** 2, axis=1))) + 1.0
    return float(settings.learning_rate / scale)


def batches(n: int, settings: TrainSettings) -> list[np.ndarray]:
    """The batch index order every backend uses (so backends give identical weights)."""
    rng = np.random.default_rng(settings.seed)
    order = []
    for _ in range(settings.epochs):
        perm = rng.permutation(n)
        order += [perm[i : i + settings.batch_size] for i in range(0, n, settings.batch_size)]
    return order


class OnnxHeadTrainer:
    """Runs ``head_train_{opt}.onnx`` (weights and optimizer state in, out) in onnxruntime."""

    backend = "onnxruntime"

    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        from edgetl.bundle._head import train_graph_inputs
        from edgetl.device._runtimes import check_graph_inputs, onnx_session

        self._sessions = {}
        for a in bundle.artifacts("head_train", "onnx"):
            opt = a.optimizer or "sgd"
            self._sessions[opt] = onnx_session(bundle.path / a.file, threads=threads)
            check_graph_inputs(self._sessions[opt], a.file, train_graph_inputs(opt))
        self._infer = onnx_session(bundle.artifact("head_infer", "onnx"), threads=threads)
        check_graph_inputs(self._infer, "head_infer.onnx", INFER_INPUTS, exact=True)

    def train(
        self, head: HeadState, emb: np.ndarray, onehot: np.ndarray, settings: TrainSettings
    ) -> tuple[HeadState, list[float]]:
        if settings.optimizer not in self._sessions:
            raise InputError(f"the bundle has no {settings.optimizer} train graph; it has {sorted(self._sessions)}")
        sess = self._sessions[settings.optimizer]
        names = [o.name for o in sess.get_outputs()]
        state = initial_state(head.W, head.b, settings.optimizer)
        # onnxruntime takes 0-d arrays for scalar inputs, not numpy scalars.
        fixed = {
            "mask": head.mask,
            "W0": head.anchor,
            "lr": np.array(effective_learning_rate(settings, emb), np.float32),
            "l2": np.array(settings.l2, np.float32),
        }
        fixed.update({h: np.array(getattr(settings, h), np.float32) for h in HYPERPARAMETERS[settings.optimizer]})
        losses = []
        for idx in batches(len(emb), settings):
            out = dict(zip(names, sess.run(None, {"embedding": emb[idx], "labels": onehot[idx], **fixed, **state})))
            state = {k: out[state_output(k)] for k in state}
            losses.append(float(out[LOSS_OUTPUT]))
        return replace(head, W=state["W"], b=state["b"]), losses

    def probabilities(self, head: HeadState, emb: np.ndarray) -> np.ndarray:
        return self._infer.run([INFER_OUTPUT], {"embedding": emb, "W": head.W, "b": head.b, "mask": head.mask})[0]


class LiteRTHeadTrainer:
    """Runs ``head.tflite``'s signatures; its weights live inside the interpreter, so every
    call loads the head it is given first (under a lock: interpreters are not thread-safe)."""

    backend = "litert"

    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        from edgetl._quiet import native_output_silenced
        from edgetl.device._runtimes import LiteRTSignature, check_signatures, litert_interpreter

        with native_output_silenced():
            self._interpreter = litert_interpreter(bundle.artifact("head", "tflite"), threads=threads)
            required = {k: v for k, v in TFLITE_SIGNATURES.items() if k != "train_steps"}
            check_signatures(self._interpreter.get_signature_list(), "head.tflite", required)
            self._runners = {
                name: LiteRTSignature(self._interpreter, name)  # not SignatureRunner: see LiteRTSignature
                for name in ("infer", "train", "get_weights", "set_weights")
            }
        self._lock = threading.Lock()
        self._loaded: HeadState | None = None

    def _load(self, head: HeadState) -> None:
        if self._loaded is not head:
            self._runners["set_weights"](**head.arrays())
            self._loaded = head

    def train(
        self, head: HeadState, emb: np.ndarray, onehot: np.ndarray, settings: TrainSettings
    ) -> tuple[HeadState, list[float]]:
        lr = np.float32(effective_learning_rate(settings, emb))
        flag = np.float32(1.0 if settings.optimizer == "adam" else 0.0)
        with self._lock:
            self._loaded = None
            self._load(head)  # also resets the optimizer state
            losses = []
            for idx in batches(len(emb), settings):
                out = self._runners["train"](
                    embedding=emb[idx],
                    labels=onehot[idx],
                    lr=lr,
                    l2=np.float32(settings.l2),
                    momentum=np.float32(settings.momentum),
                    optimizer=flag,
                )
                losses.append(float(out[LOSS_OUTPUT]))
            w = self._runners["get_weights"](**signature_inputs(self._interpreter.get_signature_list(), "get_weights"))
            self._loaded = None  # the interpreter now holds the trained weights, not `head`
        return replace(head, W=w["W"].copy(), b=w["b"].copy()), losses

    def probabilities(self, head: HeadState, emb: np.ndarray) -> np.ndarray:
        with self._lock:
            self._load(head)
            return self._runners["infer"](embedding=emb)[INFER_OUTPUT].copy()


class ReferenceHeadTrainer:
    """The same training in float64 numpy (:func:`edgetl.bundle._head.reference_step`), over
    the same batches: what ``verify`` compares the runtimes' trainers with.

    After :meth:`train`, ``min_abs_gradient`` holds, per weight, the smallest |gradient| any
    step saw (Adam's update is ill-conditioned where it is near eps; see verify).
    """

    backend = "numpy"

    def __init__(self) -> None:
        self.min_abs_gradient: dict[str, np.ndarray] = {}

    def train(
        self, head: HeadState, emb: np.ndarray, onehot: np.ndarray, settings: TrainSettings
    ) -> tuple[HeadState, list[float]]:
        lr = effective_learning_rate(settings, emb)
        state = {k: v.astype(np.float64) for k, v in initial_state(head.W, head.b, settings.optimizer).items()}
        self.min_abs_gradient = {"W": np.full(head.W.shape, np.inf), "b": np.full(head.b.shape, np.inf)}
        losses = []
        for idx in batches(len(emb), settings):
            grads, _ = gradients(state["W"], state["b"], emb[idx], onehot[idx], head.mask, head.anchor, settings.l2)
            for k in ("W", "b"):
                self.min_abs_gradient[k] = np.minimum(self.min_abs_gradient[k], np.abs(grads[k]))
            state, loss = reference_step(
                state,
                emb[idx],
                onehot[idx],
                head.mask,
                head.anchor,
                optimizer=settings.optimizer,
                lr=lr,
                l2=settings.l2,
                momentum=settings.momentum,
            )
            losses.append(loss)
        return replace(head, W=state["W"], b=state["b"]), losses

    def probabilities(self, head: HeadState, emb: np.ndarray) -> np.ndarray:
        return masked_softmax(emb.astype(np.float64) @ head.W + head.b, head.mask)


def make_trainer(bundle: Bundle, backend: str, threads: int | None = None) -> Any:
    """The fastest trainer the bundle supports on ``backend``: the graphs that run a whole
    step plan per call (bundles from edgetl 0.2), else one call per step (older bundles)."""
    from edgetl.device._head_loop import LiteRTLoopHeadTrainer, OnnxLoopHeadTrainer

    if backend == "onnxruntime":
        loops = {a.optimizer or "sgd": bundle.path / a.file for a in bundle.artifacts("head_train_loop", "onnx")}
        if loops:
            return OnnxLoopHeadTrainer(loops, bundle.artifact("head_infer", "onnx"), threads)
        return OnnxHeadTrainer(bundle, threads)
    head = bundle.artifacts("head", "tflite")
    if head and "train_steps" in head[0].extra.get("signatures", []):
        return LiteRTLoopHeadTrainer(bundle.path / head[0].file, threads)
    return LiteRTHeadTrainer(bundle, threads)
