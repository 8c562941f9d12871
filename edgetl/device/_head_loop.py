"""Head training, a whole step plan per runtime call (numpy + onnxruntime or LiteRT only).

The trainers hand the runtime the whole step plan and it loops inside, so the weights and
optimizer state stay there between steps: one onnxruntime ``run`` of
``head_train_loop_{sgd,adam}.onnx`` (an ONNX ``Scan``), or one invoke of ``head.tflite``'s
``train_steps`` signature (a TFLite ``WHILE``). Both graphs come from
:mod:`edgetl.host._head_loop_graphs` and compute :func:`edgetl.bundle._head.reference_step`
over the batches of :func:`edgetl.bundle._head.step_plan` (:func:`plan_steps` as arrays).

The trainers take the model bytes (or paths); :func:`edgetl.device._head.make_trainer` builds
them from a bundle's ``head_train_loop`` artifacts or its ``head.tflite``.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import numpy as np

from edgetl.bundle._contract import (
    ANCHOR_ONNX,
    BIAS,
    EMBEDDING,
    L2,
    LABELS,
    LEARNING_RATE,
    LOSSES,
    MASK,
    MOMENTUM,
    OPTIMIZER,
    ORDER,
    PROBABILITIES,
    ROW_WEIGHT,
    WEIGHTS,
    state_output,
)
from edgetl.bundle._head import (
    INFER_INPUTS,
    TFLITE_SIGNATURES,
    graph_learning_rate,
    initial_state,
    signature_inputs,
    step_plan,
    train_graph_inputs,
)
from edgetl.bundle._manifest import SCHEMA_VERSION
from edgetl.device._head import HeadState, TrainSettings
from edgetl.device._runtimes import (
    LiteRTSignature,
    check_graph_inputs,
    check_signatures,
    litert_interpreter,
    onnx_session,
)
from edgetl.errors import InputError, describe


def plan_steps(n: int, settings: TrainSettings) -> tuple[np.ndarray, np.ndarray]:
    """:func:`edgetl.bundle._head.step_plan` as the loop graphs' inputs.

    Args:
        n: Number of training examples.
        settings: Epochs, batch size and seed decide the plan.

    Returns:
        ``order[S, B]`` (int64): step s uses examples ``order[s, :B_s]``; and
        ``row_weight[S, B]`` (float32): ``1/B_s`` for those, 0 for the padding slots of a
        smaller last batch (they repeat the step's first example, so every index is valid,
        and their weight 0 makes their contribution exactly 0). ``B = min(batch_size, n)``.

    Raises:
        InputError: ``n`` is not a positive integer.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"the step plan needs at least 1 example, received n={describe(n)}")
    order, row_weight = step_plan(int(n), settings.epochs, settings.batch_size, settings.seed)
    return np.array(order, np.int64), np.array(row_weight, np.float32)


def check_training_data(head: HeadState, emb: np.ndarray, onehot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and one-hot labels as contiguous float32, or an :class:`InputError`."""
    d, c = head.W.shape
    emb, onehot = np.asarray(emb), np.asarray(onehot)
    if emb.ndim != 2 or emb.shape[1] != d:
        raise InputError(f"embeddings must have shape (N, {d}) for this head, received shape {emb.shape}")
    if onehot.ndim != 2 or onehot.shape[1] != c:
        raise InputError(
            f"labels must be one-hot with shape (N, {c}) (the head's capacity), received shape {onehot.shape}"
        )
    if len(emb) != len(onehot):
        raise InputError(
            f"embeddings and labels must have the same number of rows, received {len(emb)} and {len(onehot)}"
        )
    if len(emb) == 0:
        raise InputError("training needs at least 1 example, received 0 (the step plan would be empty)")
    for name, arr in (("embeddings", emb), (LABELS, onehot)):
        if arr.dtype.kind not in "fiu":
            raise InputError(f"{name} must be numbers, received dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            bad = int(np.size(arr) - np.isfinite(arr).sum())
            raise InputError(f"{name} must be finite numbers, received {bad} NaN or inf value(s)")
    return np.ascontiguousarray(emb, np.float32), np.ascontiguousarray(onehot, np.float32)


def check_plan(order: np.ndarray, row_weight: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A step plan as the graphs' dtypes, or an :class:`InputError` saying what is wrong."""
    order, row_weight = np.asarray(order), np.asarray(row_weight)
    if order.ndim != 2 or order.shape != row_weight.shape:
        raise InputError(
            f"order and row_weight must both have shape (steps, batch), received {order.shape} and {row_weight.shape}"
        )
    if order.size == 0:
        raise InputError(
            f"the step plan is empty (shape {order.shape}); it needs at least 1 step of at least 1 example"
        )
    if order.dtype.kind not in "iu" or order.min() < 0 or order.max() >= n:
        raise InputError(
            f"order must hold integer example indices in [0, {n}), received dtype {order.dtype},"
            f" range [{order.min()}, {order.max()}]"
        )
    if not np.all(np.isfinite(row_weight)) or row_weight.min() < 0:
        raise InputError("row_weight must be finite and >= 0 (1/B_s for a step's examples, 0 for padding)")
    return np.ascontiguousarray(order, np.int64), np.ascontiguousarray(row_weight, np.float32)


class OnnxLoopHeadTrainer:
    """Runs ``head_train_loop_{opt}.onnx``: every step of a ``train`` call in one ``run``.

    Args:
        train_models: ``{"sgd": model, "adam": model}`` (either may be missing), each the
            bytes or path of :func:`edgetl.host._head_loop_graphs.head_train_loop_onnx`.
        infer_model: bytes or path of :func:`edgetl.host._head_graphs.head_infer_onnx`.
        threads: onnxruntime intra-op threads (None: its default).
        schema_version: the bundle's manifest schema; decides the ``lr`` fed to the SGD
            graph (:func:`edgetl.bundle._head.graph_learning_rate`).
    """

    backend = "onnxruntime"

    def __init__(
        self,
        train_models: Mapping[str, bytes | str | Path],
        infer_model: bytes | str | Path,
        threads: int | None = None,
        schema_version: int = SCHEMA_VERSION,
    ) -> None:
        self._schema_version = schema_version  # bundles before schema 3 take SGD's lr normalized
        unknown = set(train_models) - {"sgd", "adam"}
        if unknown or not train_models:
            raise InputError(
                f"train_models must map 'sgd' and/or 'adam' to a model, received keys {sorted(train_models)}"
            )
        self._sessions = {opt: onnx_session(m, threads=threads) for opt, m in train_models.items()}
        for opt, session in self._sessions.items():
            check_graph_inputs(session, f"the {opt} training loop graph", train_graph_inputs(opt))
        self._outputs = {opt: [o.name for o in s.get_outputs()] for opt, s in self._sessions.items()}
        self._infer = onnx_session(infer_model, threads=threads)
        check_graph_inputs(self._infer, "the head inference graph", INFER_INPUTS, exact=True)

    def train(
        self, head: HeadState, emb: np.ndarray, onehot: np.ndarray, settings: TrainSettings
    ) -> tuple[HeadState, list[float]]:
        """Train ``head`` on the examples, over the batches of :func:`plan_steps`.

        Returns:
            The trained head (optimizer state starts at zero, as step-by-step) and the loss
            of every step.

        Raises:
            InputError: shapes do not match the head, no examples, non-finite values, or no
                graph for ``settings.optimizer``.
        """
        emb, onehot = check_training_data(head, emb, onehot)
        state, losses = self._train(
            head,
            emb,
            onehot,
            *plan_steps(len(emb), settings),
            settings,
            initial_state(head.W, head.b, settings.optimizer),
        )
        return replace(head, W=state[WEIGHTS], b=state[BIAS]), losses

    def train_plan(
        self,
        head: HeadState,
        emb: np.ndarray,
        onehot: np.ndarray,
        order: np.ndarray,
        row_weight: np.ndarray,
        settings: TrainSettings,
        state: dict[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], list[float]]:
        """Run any step plan (see :func:`plan_steps`) from any optimizer state, in one call.

        Args:
            state: ``W``, ``b`` and the optimizer's state, named as
                :func:`edgetl.bundle._head.initial_state` names them.

        Returns:
            The state after the plan (same keys) and the loss of every step.
        """
        emb, onehot = check_training_data(head, emb, onehot)
        order, row_weight = check_plan(order, row_weight, len(emb))
        expected = set(initial_state(head.W, head.b, settings.optimizer))
        if set(state) != expected:
            raise InputError(
                f"state for {settings.optimizer} must have keys {sorted(expected)}, received {sorted(state)}"
            )
        return self._train(head, emb, onehot, order, row_weight, settings, state)

    def _train(
        self,
        head: HeadState,
        emb: np.ndarray,
        onehot: np.ndarray,
        order: np.ndarray,
        row_weight: np.ndarray,
        settings: TrainSettings,
        state: dict[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], list[float]]:
        if settings.optimizer not in self._sessions:
            raise InputError(
                f"no loop graph for optimizer {settings.optimizer!r}; this trainer has {sorted(self._sessions)}"
            )
        # onnxruntime takes 0-d arrays for scalar inputs, not numpy scalars.
        feed = {
            EMBEDDING: emb,
            LABELS: onehot,
            ORDER: order,
            ROW_WEIGHT: row_weight,
            MASK: head.mask,
            ANCHOR_ONNX: head.anchor,
            LEARNING_RATE: np.array(self._lr(settings, emb), np.float32),
            L2: np.array(settings.l2, np.float32),
            **{k: np.asarray(v, np.float32) for k, v in state.items()},
        }
        if settings.optimizer == "sgd":
            feed[MOMENTUM] = np.array(settings.momentum, np.float32)
        out = dict(zip(self._outputs[settings.optimizer], self._sessions[settings.optimizer].run(None, feed)))
        return {k: out[state_output(k)] for k in state}, out[LOSSES].tolist()

    def _lr(self, settings: TrainSettings, emb: np.ndarray) -> float:
        return graph_learning_rate(settings.optimizer, settings.learning_rate, emb, self._schema_version)

    def probabilities(self, head: HeadState, emb: np.ndarray) -> np.ndarray:
        return self._infer.run(
            None, {EMBEDDING: np.asarray(emb, np.float32), WEIGHTS: head.W, BIAS: head.b, MASK: head.mask}
        )[0]


class LiteRTLoopHeadTrainer:
    """Runs ``head.tflite``'s ``train_steps`` signature: every step in one invoke.

    The model is :func:`edgetl.host._head_loop_graphs.head_tflite_loop`; its weights live in
    the interpreter, so each call loads the head it is given first (under a lock:
    interpreters are not thread-safe).

    Args:
        model: bytes or path of the TFLite model.
        threads: interpreter threads (None: its default).
        schema_version: the bundle's manifest schema (see :class:`OnnxLoopHeadTrainer`).
    """

    backend = "litert"

    def __init__(
        self, model: bytes | str | Path, threads: int | None = None, schema_version: int = SCHEMA_VERSION
    ) -> None:
        self._schema_version = schema_version
        self._interpreter = litert_interpreter(model, threads=threads, allocate=False)
        signatures = self._interpreter.get_signature_list()
        self._get_weights_args = signature_inputs(signatures, "get_weights")
        required = {
            k: v for k, v in TFLITE_SIGNATURES.items() if k in ("infer", "train_steps", "get_weights", "set_weights")
        }
        check_signatures(signatures, "the TFLite head", required)
        self._run = {
            name: LiteRTSignature(self._interpreter, name)  # not SignatureRunner: see LiteRTSignature
            for name in ("infer", "train_steps", "get_weights", "set_weights")
        }
        self._lock = threading.Lock()
        self._loaded: HeadState | None = None

    def _load(self, head: HeadState) -> None:
        if self._loaded is not head:
            self._run["set_weights"](**head.arrays())  # also resets the optimizer state
            self._loaded = head

    def train(
        self, head: HeadState, emb: np.ndarray, onehot: np.ndarray, settings: TrainSettings
    ) -> tuple[HeadState, list[float]]:
        """Same contract as :meth:`OnnxLoopHeadTrainer.train`."""
        emb, onehot = check_training_data(head, emb, onehot)
        return self._train(head, emb, onehot, *plan_steps(len(emb), settings), settings)

    def train_plan(
        self,
        head: HeadState,
        emb: np.ndarray,
        onehot: np.ndarray,
        order: np.ndarray,
        row_weight: np.ndarray,
        settings: TrainSettings,
    ) -> tuple[HeadState, list[float]]:
        """Run any step plan (see :func:`plan_steps`) from ``head`` and a zero optimizer state."""
        emb, onehot = check_training_data(head, emb, onehot)
        return self._train(head, emb, onehot, *check_plan(order, row_weight, len(emb)), settings)

    def _train(
        self,
        head: HeadState,
        emb: np.ndarray,
        onehot: np.ndarray,
        order: np.ndarray,
        row_weight: np.ndarray,
        settings: TrainSettings,
    ) -> tuple[HeadState, list[float]]:
        with self._lock:
            self._loaded = None
            self._load(head)  # also resets the optimizer state
            losses = self._train_steps(emb, onehot, order, row_weight, settings)
            w = self._run["get_weights"](**self._get_weights_args)
            self._loaded = None  # the interpreter now holds the trained weights, not `head`
        return replace(head, W=w[WEIGHTS].copy(), b=w[BIAS].copy()), losses

    def _train_steps(
        self, emb: np.ndarray, onehot: np.ndarray, order: np.ndarray, row_weight: np.ndarray, settings: TrainSettings
    ) -> list[float]:
        lr = graph_learning_rate(settings.optimizer, settings.learning_rate, emb, self._schema_version)
        feed = {
            EMBEDDING: emb,
            LABELS: onehot,
            ORDER: order,
            ROW_WEIGHT: row_weight,
            LEARNING_RATE: np.float32(lr),
            L2: np.float32(settings.l2),
            MOMENTUM: np.float32(settings.momentum),
            OPTIMIZER: np.float32(1.0 if settings.optimizer == "adam" else 0.0),
        }
        out = self._run["train_steps"](**feed)
        return out[LOSSES].tolist()

    def probabilities(self, head: HeadState, emb: np.ndarray) -> np.ndarray:
        with self._lock:
            self._load(head)
            return self._run["infer"](**{EMBEDDING: np.asarray(emb, np.float32)})[PROBABILITIES].copy()
