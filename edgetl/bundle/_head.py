"""The head contract: what the trainable head is, in numpy (the one home of its math).

The head is linear with a capacity of ``max_classes`` columns; ``mask`` (1 = active class)
lets the device add classes without a new graph::

    p = masked_softmax(e @ W + b, mask)
    loss = mean(-sum(y * log p)) + l2/2 ||W - W0||^2          # L2 pull toward the anchor W0

One train step on a batch of embeddings ``e`` and one-hot labels ``y``::

    g_logits = (p - y) / B
    gW = e^T g_logits + l2 * (W - W0);  gb = sum(g_logits)
    SGD with momentum:  v = mu v + g;  w -= lr' v,   lr' = lr / (mean_i ||e_i||^2 + 1)
    Adam:               m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  t += 1
                        w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)

SGD's ``lr'`` is over every example of the run (:func:`sgd_step_size`); the SGD graphs compute
it from the learning rate they are fed, which is the user's. The batches of a run are
:func:`step_plan`'s, a shuffle any language can reproduce. The defaults are
:data:`TRAINING_DEFAULTS` (the manifest's ``head`` section records them).

The host builds graphs of exactly this (``edgetl.host._head_graphs``: the ONNX inference
graph; ``edgetl.host._head_loop_graphs``: the ONNX loop graphs, which run a whole step plan
per call (S = 1 is one step), and ``head.tflite`` with its signatures); the device runs them
(``edgetl.device._head_loop``); ``verify`` checks every graph against :func:`reference_step`.
The graphs' tensor names are in :mod:`edgetl.bundle._contract`: a device that does not run
Python (docs/integration.md) feeds exactly these names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The names are the contract module's; imported here too for the modules that use both.
from edgetl.bundle._contract import (  # noqa: F401
    HYPERPARAMETERS,
    INFER_INPUTS,
    INFER_OUTPUT,
    LOOP_INPUTS,
    LOOP_OUTPUTS,
    LOOP_STATE,
    OPTIMIZERS,
    STATE,
    TFLITE_SIGNATURE_OUTPUTS,
    TFLITE_SIGNATURES,
    TRAIN_INPUTS,
    UNUSED,
    state_output,
)

MASK_NEG = -1e9  # added to inactive-class logits; exp() underflows to exactly 0
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-7


def train_graph_inputs(optimizer: str) -> set[str]:
    """The inputs the ONNX loop graph for ``optimizer`` takes (:data:`~edgetl.bundle._contract.LOOP_INPUTS`)."""
    return set(LOOP_INPUTS[optimizer])


def signature_inputs(signatures: dict, name: str) -> dict:
    """Keyword arguments a runtime must add for ``name`` beyond the data, for heads exported
    by any edgetl version: ``get_weights`` gained its ``unused`` input in schema 2."""
    inputs = signatures.get(name, {}).get("inputs", [])
    return {UNUSED: np.float32(0.0)} if name == "get_weights" and UNUSED in inputs else {}


def masked_softmax(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    z = logits + (1.0 - mask) * MASK_NEG
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def initial_state(W: np.ndarray, b: np.ndarray, optimizer: str) -> dict[str, np.ndarray]:
    """Weights and a zero optimizer state, float32, keyed by :data:`STATE` names."""
    state = {"W": W.astype(np.float32), "b": b.astype(np.float32)}
    if optimizer == "sgd":
        state.update(vel_W=np.zeros_like(state["W"]), vel_b=np.zeros_like(state["b"]))
    else:
        zw, zb = np.zeros_like(state["W"]), np.zeros_like(state["b"])
        state.update(m_W=zw, m_b=zb, v_W=zw.copy(), v_b=zb.copy(), t=np.zeros((), np.float32))
    return state


def gradients(
    W: np.ndarray, b: np.ndarray, embedding: np.ndarray, labels: np.ndarray, mask: np.ndarray, W0: np.ndarray, l2: float
) -> tuple[dict[str, np.ndarray], float]:
    """Gradients of the loss with respect to ``W`` and ``b`` (float64), and the loss."""
    e, y = embedding.astype(np.float64), labels.astype(np.float64)
    p = masked_softmax(e @ W + b, mask)
    loss = -np.mean(np.sum(y * np.log(np.clip(p, 1e-12, 1.0)), axis=1)) + 0.5 * l2 * np.sum((W - W0) ** 2)
    g_logits = (p - y) / len(e)
    return {"W": e.T @ g_logits + l2 * (W - W0), "b": g_logits.sum(axis=0)}, float(loss)


def reference_step(
    state: dict[str, np.ndarray],
    embedding: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray,
    W0: np.ndarray,
    *,
    optimizer: str,
    lr: float,
    l2: float,
    momentum: float = 0.9,
) -> tuple[dict[str, np.ndarray], float]:
    """The train step in float64 numpy; returns the new state and the loss."""
    s = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    grads, loss = gradients(s["W"], s["b"], embedding, labels, mask, W0, l2)
    new = dict(s)
    if optimizer == "sgd":
        for w in ("W", "b"):
            new[f"vel_{w}"] = momentum * s[f"vel_{w}"] + grads[w]
            new[w] = s[w] - lr * new[f"vel_{w}"]
    else:
        t = s["t"] + 1
        new["t"] = t
        for w in ("W", "b"):
            new[f"m_{w}"] = ADAM_BETA1 * s[f"m_{w}"] + (1 - ADAM_BETA1) * grads[w]
            new[f"v_{w}"] = ADAM_BETA2 * s[f"v_{w}"] + (1 - ADAM_BETA2) * grads[w] ** 2
            mhat = new[f"m_{w}"] / (1 - ADAM_BETA1**t)
            vhat = new[f"v_{w}"] / (1 - ADAM_BETA2**t)
            new[w] = s[w] - lr * mhat / (np.sqrt(vhat) + ADAM_EPS)
    return new, loss


# --- The training rule a client follows (the manifest's head section records the defaults) ---


@dataclass(frozen=True)
class TrainingDefaults:
    """edgetl's training defaults (``edgetl.device.TrainSettings``), written to the manifest's
    ``head`` section so a client without Python trains the head as edgetl does."""

    optimizer: str = "sgd"
    learning_rate: float = 0.1
    l2: float = 1e-3
    momentum: float = 0.9
    epochs: int = 30
    batch_size: int = 16
    seed: int = 0


TRAINING_DEFAULTS = TrainingDefaults()
SHUFFLE = "xorshift32-fisher-yates"  # the manifest's head.shuffle: the batch order of step_plan
#: From this manifest schema on, the SGD graphs normalize the learning rate themselves; the
#: loop graphs of older bundles take it already normalized (see graph_learning_rate).
SGD_LR_IN_GRAPH_SINCE_SCHEMA = 3


def sgd_step_size(learning_rate: float, embedding: np.ndarray) -> float:
    """SGD's step: ``learning_rate / (mean_i ||e_i||^2 + 1)`` over every example ``e_i`` of the
    ``embedding`` input (float64). The SGD graphs compute this themselves from the learning
    rate they are fed.

    The gradient of the logits w.r.t. W scales with ||e||^2, so a fixed SGD learning rate
    that is stable for one backbone diverges on another (measured: lr 0.05 with momentum
    0.9 on the digits CNN's 256-d embeddings drove the loss from 0.08 to 13). Dividing by
    the mean squared norm of the input (as normalised LMS does) makes ``learning_rate`` a
    fraction of the largest stable step. The input includes the constant 1 the bias
    multiplies, hence ``+ 1``: without it, all-zero embeddings (a dead backbone) gave a
    huge step on the bias, whose gradient does not shrink with e, and NaN weights.
    Adam normalises its steps itself and takes the learning rate as it is.
    """
    if not len(embedding):
        return float(learning_rate)
    scale = float(np.mean(np.sum(np.asarray(embedding, np.float64) ** 2, axis=1))) + 1.0
    return float(learning_rate / scale)


def graph_learning_rate(optimizer: str, learning_rate: float, embedding: np.ndarray, schema_version: int) -> float:
    """The ``lr`` to feed a bundle's training graphs: the user's learning rate, except for the
    SGD graphs of bundles before :data:`SGD_LR_IN_GRAPH_SINCE_SCHEMA`, which take it normalized."""
    if optimizer == "sgd" and schema_version < SGD_LR_IN_GRAPH_SINCE_SCHEMA:
        return sgd_step_size(learning_rate, embedding)
    return float(learning_rate)


_XORSHIFT_SEED_MUL, _XORSHIFT_SEED_ADD, _U32 = 2654435761, 0x9E3779B9, 0xFFFFFFFF


def step_plan(n: int, epochs: int, batch_size: int, seed: int) -> tuple[list[list[int]], list[list[float]]]:
    """The batches of a training run: ``order[S][B]`` and ``row_weight[S][B]`` (pure Python).

    The algorithm (``shuffle: "xorshift32-fisher-yates"`` in the manifest), in 32-bit
    unsigned arithmetic, so that a client in any language gets the same batches:

    1. ``state = (seed * 2654435761 + 0x9E3779B9) mod 2^32``; if it is 0, ``state = 1``.
    2. ``order = [0, 1, ..., n-1]`` once, before the first epoch.
    3. Each epoch shuffles ``order`` in place (it continues from the previous epoch's
       order): for ``i`` from ``n-1`` down to 1, draw ``x`` (xorshift32:
       ``state ^= state << 13; state ^= state >> 17; state ^= state << 5``, each mod 2^32,
       ``x = state``), ``j = x mod (i + 1)``, swap ``order[i]`` and ``order[j]``.
    4. The epoch is then cut into ``ceil(n / batch_size)`` steps of ``batch_size`` examples
       in that order, the last one holding the ``B_s`` that remain. Every step is padded to
       ``B = min(batch_size, n)`` slots with its own first example, at row weight 0; each
       real example has row weight ``1 / B_s`` (float32 when fed to a graph).

    Test vector: ``step_plan(5, 2, 2, 0)`` is order ``[[0, 1], [4, 2], [3, 3], [0, 4],
    [3, 2], [1, 1]]`` with row weights ``[[0.5, 0.5], [0.5, 0.5], [1, 0], [0.5, 0.5],
    [0.5, 0.5], [1, 0]]`` (tests/bundle/test_head_contract.py checks it).
    This is also the MCU C trainer's order (``edgetl_head_fit`` with ``rows`` NULL).

    Raises:
        ValueError: ``n``, ``epochs`` or ``batch_size`` is below 1, or ``seed`` is outside
            ``[0, 2^32)``.
    """
    check_plan_arguments(seed, n=n, epochs=epochs, batch_size=batch_size)
    state = shuffle_state(seed)
    order, width = list(range(n)), min(batch_size, n)
    plan_order: list[list[int]] = []
    plan_weight: list[list[float]] = []
    for _ in range(epochs):
        state = shuffle_in_place(order, state)
        cut_batches(order, batch_size, width, plan_order, plan_weight)
    return plan_order, plan_weight


def check_plan_arguments(seed: int, **counts: int) -> None:
    """A step plan's checks: every count a positive integer, ``seed`` in ``[0, 2^32)``."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, received {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _U32:
        raise ValueError(f"seed must be an integer in [0, 2^32), received {seed!r}")


def shuffle_state(seed: int) -> int:
    """:func:`step_plan`'s first state: ``(seed * 2654435761 + 0x9E3779B9) mod 2^32``, 0 -> 1."""
    return (seed * _XORSHIFT_SEED_MUL + _XORSHIFT_SEED_ADD) & _U32 or 1


def shuffle_in_place(order: list[int], state: int) -> int:
    """One epoch's Fisher-Yates shuffle of ``order`` driven by xorshift32 (:func:`step_plan`,
    step 3); returns the state the next shuffle continues from."""
    for i in range(len(order) - 1, 0, -1):
        state ^= (state << 13) & _U32
        state ^= state >> 17
        state ^= (state << 5) & _U32
        j = state % (i + 1)
        order[i], order[j] = order[j], order[i]
    return state


def cut_batches(
    order: list[int], batch_size: int, width: int, plan_order: list[list[int]], plan_weight: list[list[float]]
) -> None:
    """Append one epoch's steps to the plan (:func:`step_plan`, step 4): batches of
    ``batch_size`` in ``order``, each padded to ``width`` slots with its first row at weight 0."""
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        pad = width - len(batch)
        plan_order.append(batch + [batch[0]] * pad)
        plan_weight.append([1.0 / len(batch)] * len(batch) + [0.0] * pad)
