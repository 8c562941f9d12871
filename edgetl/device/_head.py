"""The trainable head on the device: its state, and training it inside a runtime.

The head is linear with a fixed capacity of ``max_classes`` columns; ``mask`` marks the
active ones and ``labels`` names them in column order. Training runs the bundle's own
loop graphs (:mod:`edgetl.device._head_loop`): ``head_train_loop_{sgd,adam}.onnx`` in
onnxruntime, or ``head.tflite``'s ``train_steps`` signature in LiteRT. numpy only plans the
batches and moves arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from edgetl.bundle import Bundle
from edgetl.bundle._head import gradients, initial_state, masked_softmax, reference_step
from edgetl.errors import BundleError, InputError, describe

Optimizer = Literal["sgd", "adam"]


@dataclass(frozen=True)
class HeadState:
    """One complete head: weights, active-class mask, the L2 anchor and the labels."""

    W: np.ndarray
    b: np.ndarray
    mask: np.ndarray
    anchor: np.ndarray
    labels: tuple[str, ...]

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
    """The bundle's head trainer on ``backend``: its loop graphs, which run a whole step plan
    per call (the one-step graphs that older bundles also carry are not used).

    Raises:
        BundleError: the bundle has no loop graph for ``backend`` (re-export it).
    """
    from edgetl.device._head_loop import LiteRTLoopHeadTrainer, OnnxLoopHeadTrainer

    if backend == "onnxruntime":
        loops = {a.optimizer or "sgd": bundle.path / a.file for a in bundle.artifacts("head_train_loop", "onnx")}
        if not loops:
            raise BundleError(
                f"bundle {bundle.path.name!r} has no head_train_loop ONNX graphs, the only head training graphs this "
                "edgetl runs; re-export it with this edgetl"
            )
        return OnnxLoopHeadTrainer(loops, bundle.artifact("head_infer", "onnx"), threads)
    head = bundle.artifacts("head", "tflite")
    if not head or "train_steps" not in head[0].extra.get("signatures", []):
        raise BundleError(
            f"bundle {bundle.path.name!r} has no head.tflite with a train_steps signature, the only TFLite head "
            "training this edgetl runs; re-export it with this edgetl"
        )
    return LiteRTLoopHeadTrainer(bundle.path / head[0].file, threads)
