"""The trainable head on the device: its state, and training it inside a runtime.

The head is linear with a fixed capacity of ``max_classes`` columns; ``mask`` marks the
active ones and ``labels`` names them in column order. Training runs the bundle's own
loop graphs (:mod:`edgetl.device._head_loop`): ``head_train_loop_{sgd,adam}.onnx`` in
onnxruntime, or ``head.tflite``'s ``train_steps`` signature in LiteRT. numpy only plans the
batches and moves arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from edgetl._options import option
from edgetl.bundle import Bundle
from edgetl.bundle._contract import ANCHOR, BIAS, HEAD_INIT_MEMBERS, MASK, OPTIMIZERS, WEIGHTS
from edgetl.bundle._head import (
    TRAINING_DEFAULTS,
    gradients,
    initial_state,
    masked_softmax,
    reference_step,
    sgd_step_size,
    step_plan,
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
        arrays = bundle.arrays("head_init", HEAD_INIT_MEMBERS)
        d, cap, n = bundle.manifest.embedding_size, bundle.manifest.head.max_classes, len(bundle.labels)
        expected = {WEIGHTS: (d, cap), BIAS: (cap,), MASK: (cap,)}
        for key, shape in expected.items():
            if arrays[key].shape != shape:
                raise BundleError(
                    f"head_init.npz: {key} has shape {arrays[key].shape}; the manifest (embedding size {d}, "
                    f"{cap} classes) needs {shape}"
                )
        W, b, mask = (arrays[k].astype(np.float32) for k in (WEIGHTS, BIAS, MASK))
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise BundleError("head_init.npz: W or b holds NaN or infinite values")
        if not np.isin(mask, (0.0, 1.0)).all() or not np.array_equal(mask[:n], np.ones(n)) or mask[n:].any():
            raise BundleError(
                f"head_init.npz: mask must mark the {n} labelled classes active (1) and the other {cap - n} free "
                f"(0), received {int(mask.sum())} active"
            )
        return cls(W, b, mask, W.copy(), tuple(bundle.labels))

    def arrays(self) -> dict[str, np.ndarray]:
        return {WEIGHTS: self.W, BIAS: self.b, MASK: self.mask, ANCHOR: self.anchor}


@dataclass(frozen=True)
class TrainSettings:
    """Head training hyperparameters (defaults suit a few dozen examples; they are the
    contract's :data:`edgetl.bundle._head.TRAINING_DEFAULTS`, which the manifest records).
    ``edgetl personalize`` takes the fields marked :func:`~edgetl._options.option` as flags."""

    epochs: int = option(TRAINING_DEFAULTS.epochs, help="passes over the examples")
    batch_size: int = option(TRAINING_DEFAULTS.batch_size, help="examples per step")
    # For SGD this is relative to the embeddings' scale (see `effective_learning_rate`), so one
    # value suits any backbone; for Adam it is the usual absolute step size.
    learning_rate: float = option(
        TRAINING_DEFAULTS.learning_rate, help="for sgd relative to the embedding scale; for adam absolute (e.g. 0.01)"
    )
    # pull toward the factory (anchor) weights, against forgetting
    l2: float = option(TRAINING_DEFAULTS.l2, help="pull toward the factory head")
    optimizer: Optimizer = option(TRAINING_DEFAULTS.optimizer, choices=OPTIMIZERS, help="the update rule")
    # API only: momentum is the contract's (recorded in the manifest), and the seed fixes the
    # batch order that clients in other languages reproduce; neither is a user's knob.
    momentum: float = TRAINING_DEFAULTS.momentum
    seed: int = TRAINING_DEFAULTS.seed  # orders the batches (edgetl.bundle._head.step_plan)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name} must be a positive integer, received {name}={describe(v)}")
        if not 0 < self.learning_rate < 10:
            raise InputError(f"learning_rate must be in (0, 10), received {self.learning_rate}")
        if self.l2 < 0 or not 0 <= self.momentum < 1:
            raise InputError(f"l2 must be >= 0 and momentum in [0, 1), received l2={self.l2}, momentum={self.momentum}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {OPTIMIZERS}, received {self.optimizer!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 32:
            raise InputError(f"seed must be an integer in [0, 2^32), received seed={describe(self.seed)}")


def effective_learning_rate(settings: TrainSettings, emb: np.ndarray) -> float:
    """The step size of the update: for SGD, ``learning_rate`` normalised by the embeddings'
    scale (:func:`edgetl.bundle._head.sgd_step_size`, which the SGD graphs compute
    themselves); Adam normalises its steps itself."""
    if settings.optimizer != "sgd":
        return float(settings.learning_rate)
    return sgd_step_size(settings.learning_rate, emb)


def batches(n: int, settings: TrainSettings) -> list[np.ndarray]:
    """The examples of every step, in order: :func:`edgetl.bundle._head.step_plan` without its padding."""
    order, row_weight = step_plan(n, settings.epochs, settings.batch_size, settings.seed)
    return [np.array([i for i, w in zip(o, r) if w > 0], np.int64) for o, r in zip(order, row_weight)]


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
        self.min_abs_gradient = {WEIGHTS: np.full(head.W.shape, np.inf), BIAS: np.full(head.b.shape, np.inf)}
        losses = []
        for idx in batches(len(emb), settings):
            W, b = state[WEIGHTS], state[BIAS]
            grads, _ = gradients(W, b, emb[idx], onehot[idx], head.mask, head.anchor, settings.l2)
            for k in (WEIGHTS, BIAS):
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
        return replace(head, W=state[WEIGHTS], b=state[BIAS]), losses

    def probabilities(self, head: HeadState, emb: np.ndarray) -> np.ndarray:
        return masked_softmax(emb.astype(np.float64) @ head.W + head.b, head.mask)
