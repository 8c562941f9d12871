"""The tail contract: the last embedding layer trained with the head (numpy, float64 reference).

A bundle with a tail splits its backbone at the input of its last embedding layer: the
frozen **trunk** (``trunk.fp32.onnx`` / ``trunk.fp32.tflite``: input -> ``trunk[N, P, F]``,
what the device caches once per example) and the trainable **tail**::

    h = act(a @ W1 + b1)                        # per position: [N, P, D]
    e = mean over the P positions of h          # global average pooling (P = 1: nothing to pool)
    z = (e - mean) * inv_std                    # the frozen seam standardization
    p = masked_softmax(z @ W + b, mask)         # the head (edgetl.bundle._head)
    loss = mean(-sum(y log p)) + l2/2 (||W - W0||^2 + ||W1 - W1_0||^2)

One step on a batch (rows weighted by ``row_weight``: ``1/B_s`` per example, 0 for padding)::

    g = (p - y) * rw                  gW = z^T g + l2 (W - W0);       gb = sum g
    gpre = (g W^T) * inv_std / P * act'(pre)         (broadcast over the positions)
                                      gW1 = a^T gpre + l2 (W1 - W1_0); gb1 = sum gpre
                                      (sums over examples and positions)

The last embedding layer is a ``Dense`` (P = 1) or a 1x1 ``Conv2D`` (+ ``BatchNormalization``,
folded into ``W1``, ``b1`` at export) whose map is average-pooled (P = its height x width);
``act`` is linear, ReLU or ReLU6 (MobileNetV2's ``out_relu``).

SGD with momentum and Adam update the four tensors exactly as the head's step updates W and
b. SGD's learning rate is the user-facing one and is normalised inside the graphs (the head
rule, DECISIONS.md), per layer: the head's by ``mean ||z||^2 + 1`` over the call's examples
at the starting weights, the tail layer's by ``(mean ||a||^2 + 1) * (||W * inv_std||_F^2 / C_active + 1)``
(the gradient of ``W1`` reaches it through ``W`` and the standardization; the Frobenius norm
per active class bounds that factor without an eigenvalue solver in the graph).

The tensor names below are the graphs' interface (``edgetl.host._tail_graphs`` builds them,
``edgetl.device._tail`` runs them): a client that does not run Python feeds exactly these.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgetl.bundle import _contract as C
from edgetl.bundle._head import (
    ADAM_BETA1,
    ADAM_BETA2,
    ADAM_EPS,
    check_plan_arguments,
    cut_batches,
    masked_softmax,
    shuffle_in_place,
    shuffle_state,
)

ACTIVATIONS = ("linear", "relu", "relu6")  # of the last embedding layer; others keep the bundle head-only
# The names are the contract's (edgetl.bundle._contract), under the short names this module uses.
WEIGHTS = C.TAIL_WEIGHTS
ANCHORS = C.TAIL_ANCHORS  # L2 anchors (biases are not pulled)
CONSTANTS = C.TAIL_CONSTANTS
STATE = C.TAIL_STATE
HYPERPARAMETERS = C.TAIL_HYPERPARAMETERS
PLAN = (C.ORDER, C.ROW_WEIGHT)
DATA = (C.TRUNK, C.LABELS)
INFER_INPUTS = C.TAIL_INFER_INPUTS
INFER_OUTPUT = C.PROBABILITIES
LOOP_INPUTS = C.TAIL_LOOP_INPUTS
LOOP_OUTPUTS = C.TAIL_LOOP_OUTPUTS
TRAIN_FILE = C.TAIL_TRAIN_LOOP_FILE
INFER_FILE = C.TAIL_INFER_FILE
TFLITE_FILE = C.TAIL_TFLITE_FILE  # signatures: infer, train_steps_sgd, train_steps_adam (stateless)
TFLITE_SIGNATURES = C.TAIL_TFLITE_SIGNATURES
INIT_FILE = C.TAIL_INIT_FILE  # W1, b1, mean, inv_std (the head's W, b, mask stay in head_init)
REPLAY_KEY = C.REPLAY_TRUNK  # replay.npz gains the trunk activations of its examples


def activate(pre: np.ndarray, activation: str) -> np.ndarray:
    if activation == "linear":
        return pre
    return np.clip(pre, 0.0, 6.0) if activation == "relu6" else np.maximum(pre, 0.0)


def layer(trunk: np.ndarray, w1: np.ndarray, b1: np.ndarray, activation: str) -> np.ndarray:
    """``act(a @ W1 + b1)`` per position ``[N, P, D]``, as ONE ``[N P, F] x [F, D]`` product: numpy
    turns ``[N, P, F] @ [F, D]`` into N small products, each waking OpenBLAS's threads (measured
    on MobileNetV2-0.35's trunk, one core: 0.01-1.6 s for 100 examples against 2-16 ms)."""
    n, positions, f = trunk.shape
    pre = (trunk.reshape(n * positions, f) @ w1 + b1).reshape(n, positions, -1)
    return activate(pre, activation)


def slope(pre: np.ndarray, activation: str) -> np.ndarray:
    """``act'(pre)``: 1 where the activation passes its input, else 0."""
    if activation == "linear":
        return np.ones_like(pre)
    return ((pre > 0) & (pre < 6)) if activation == "relu6" else (pre > 0)


def forward(
    p: dict[str, np.ndarray], trunk: np.ndarray, activation: str, dtype: type = np.float64
) -> dict[str, np.ndarray]:
    """The tail's forward pass (``trunk[N, P, F]``): pre-activation, ``z``, probabilities.

    ``dtype`` float64 is the reference; float32 is the same math at the runtimes' precision,
    which tells how far from the reference float32 arithmetic alone lands (``precision_floor``).
    """
    a = np.asarray(trunk, dtype)
    pre = layer(a, p["W1"], p["b1"], "linear")
    z = (activate(pre, activation).mean(axis=1) - p["mean"]) * p["inv_std"]
    return {"pre": pre, "z": z, "p": masked_softmax(z @ p["W"] + p["b"], p["mask"])}


def sgd_scales(
    p: dict[str, np.ndarray], trunk: np.ndarray, activation: str, dtype: type = np.float64
) -> tuple[float, float]:
    """The SGD normalisers (head layer, tail layer) the graphs compute before the loop."""
    a = np.asarray(trunk, dtype)
    z = forward(p, a, activation, dtype)["z"]
    head = float(np.mean(np.sum(z * z, axis=1))) + 1.0
    a = a.mean(axis=1)  # the pooled trunk: what one step of W1 moves the pooled embedding by
    active = max(float(np.sum(p["mask"])), 1.0)
    w_scaled = np.asarray(p["W"], dtype) * (np.asarray(p["mask"], dtype)[None, :]) * p["inv_std"][:, None]
    tail = (float(np.mean(np.sum(a * a, axis=1))) + 1.0) * (float(np.sum(w_scaled**2)) / active + 1.0)
    return head, tail


def gradients(
    p: dict[str, np.ndarray], a: np.ndarray, y: np.ndarray, rw: np.ndarray, activation: str, l2: float
) -> tuple[dict[str, np.ndarray], float]:
    """Gradients of the four tail tensors on one step's rows (weights ``rw``), and the loss, in
    ``a``'s precision."""
    f = forward(p, a, activation, a.dtype.type)
    g = (f["p"] - y) * rw[:, None]
    gpre = ((g @ p["W"].T) * p["inv_std"] / a.shape[1])[:, None, :] * slope(f["pre"], activation)
    dW, dW1 = p["W"] - p["W0"], p["W1"] - p["W1_0"]
    loss = -np.sum(y * rw[:, None] * np.log(np.clip(f["p"], 1e-12, 1.0))) + 0.5 * l2 * (
        np.sum(dW * dW) + np.sum(dW1 * dW1)
    )
    a2, g2 = a.reshape(-1, a.shape[2]), gpre.reshape(-1, gpre.shape[2])
    grads = {"W": f["z"].T @ g + l2 * dW, "b": g.sum(axis=0), "W1": a2.T @ g2 + l2 * dW1, "b1": g2.sum(axis=0)}
    return grads, float(loss)


def initial_state(weights: dict[str, np.ndarray], optimizer: str) -> dict[str, np.ndarray]:
    """The four weights and a zero optimizer state, float32, keyed by :data:`STATE` names."""
    state = {w: np.asarray(weights[w], np.float32) for w in WEIGHTS}
    for name in STATE[optimizer][len(WEIGHTS) :]:
        state[name] = np.zeros((), np.float32) if name == "t" else np.zeros_like(state[name.split("_", 1)[1]])
    return state


def reference_train(
    state: dict[str, np.ndarray],
    fixed: dict[str, np.ndarray],
    trunk: np.ndarray,
    labels: np.ndarray,
    order: np.ndarray,
    row_weight: np.ndarray,
    *,
    optimizer: str,
    activation: str,
    lr: float,
    l2: float,
    momentum: float = 0.9,
    dtype: type = np.float64,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Every step of a plan in float64: what the graphs must reproduce (``dtype`` float32: the
    same steps at the runtimes' precision, see :func:`forward`).

    Args:
        state: :func:`initial_state`'s keys.
        fixed: ``mask``, ``mean``, ``inv_std``, ``W0``, ``W1_0``.
    """
    s = {k: np.asarray(v, dtype) for k, v in state.items()}
    c = {k: np.asarray(v, dtype) for k, v in fixed.items()}
    a_all, y_all = np.asarray(trunk, dtype), np.asarray(labels, dtype)
    lrs = dict.fromkeys(WEIGHTS, lr)
    if optimizer == "sgd":
        head_scale, tail_scale = sgd_scales({**s, **c}, a_all, activation, dtype)
        lrs = {"W": lr / head_scale, "b": lr / head_scale, "W1": lr / tail_scale, "b1": lr / tail_scale}
    losses = []
    for idx, rw in zip(np.asarray(order), np.asarray(row_weight, dtype)):
        grads, loss = gradients({**s, **c}, a_all[idx], y_all[idx], rw, activation, l2)
        losses.append(loss)
        s = _update(s, grads, optimizer, lrs, momentum)
    return s, losses


def _update(s: dict[str, Any], grads: dict[str, Any], optimizer: str, lrs: dict[str, float], momentum: float) -> dict:
    new = dict(s)
    if optimizer == "sgd":
        for w in WEIGHTS:
            new[f"vel_{w}"] = momentum * s[f"vel_{w}"] + grads[w]
            new[w] = s[w] - lrs[w] * new[f"vel_{w}"]
        return new
    t = s["t"] + 1
    new["t"] = t
    for w in WEIGHTS:
        new[f"m_{w}"] = ADAM_BETA1 * s[f"m_{w}"] + (1 - ADAM_BETA1) * grads[w]
        new[f"v_{w}"] = ADAM_BETA2 * s[f"v_{w}"] + (1 - ADAM_BETA2) * grads[w] ** 2
        mhat = new[f"m_{w}"] / (1 - ADAM_BETA1**t)
        vhat = new[f"v_{w}"] / (1 - ADAM_BETA2**t)
        new[w] = s[w] - lrs[w] * mhat / (np.sqrt(vhat) + ADAM_EPS)
    return new


def tail_step_plan(
    user: list[list[int]],
    replay: list[list[int]],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    replay_ratio: float,
) -> tuple[list[list[int]], list[list[float]]]:
    """edgetl's step plan for the tail (pure Python): every epoch trains on all of the user's
    rows and a fresh window of the replay rows, weighted to stand for all of them, class-balanced,
    in the head's shuffle.

    ``user[c]`` and ``replay[c]`` are class ``c``'s rows (indices into the graph's ``trunk``
    input), classes in a fixed order; ``u_c``, ``r_c`` their counts. With ``u = max(1, max_c u_c)``,
    every epoch holds ``K = max(u, min(u + ceil(replay_ratio * u), max_c(u_c + r_c)))`` slots
    of each class:

    * a class with replay rows: its user rows, then the next ``k_c = K - u_c`` of its replay
      rows, walked in their order from where the previous epoch stopped and wrapping around
      (every replay row is used once every ``ceil(r_c / k_c)`` epochs). Weights: a user row
      ``K / (u_c + r_c)``, a replay row ``K r_c / (k_c (u_c + r_c))``, so the class weighs ``K``
      and its user and replay rows weigh as ``u_c : r_c``, as if every replay row were in every
      epoch (``k_c = 0``: user rows at 1);
    * a class without replay rows: its user rows repeated in order up to ``K``, at 1.

    The epoch's slots (classes concatenated in order) are shuffled and cut into batches exactly
    as :func:`edgetl.bundle._head.step_plan` does (one xorshift32 state from ``seed``,
    continued from epoch to epoch; ``B = min(batch_size, C K)``, padding at row weight 0); a
    row's ``row_weight`` is its weight ``/ B_s``.

    Why: the replay rows (40 per factory class against forgetting) outnumber a user's 10 per
    class several times, and each row costs the tail an ``F x D`` product forward and backward;
    a window as large as the user's rows keeps every replay row in the run at a third of the
    rows per epoch. The weights matter: unweighted windows (replay rows at 1) tilted the tail
    toward the user's style and the guard refused more tails for forgetting (see
    ``edgetl/device/_tail.py``).

    Test vector: ``tail_step_plan([[0], [1, 2]], [[3, 4, 5], []], epochs=2, batch_size=4,
    seed=0, replay_ratio=0.5)`` (K = 3; class 0's user row weighs 3/4, its replay rows 9/8) is
    order ``[[0, 1, 3, 2], [4, 1, 4, 4], [5, 2, 0, 1], [3, 1, 3, 3]]`` with row weights
    ``[[3/16, 1/4, 9/32, 1/4], [9/16, 1/2, 0, 0], [9/32, 1/4, 3/16, 1/4], [9/16, 1/2, 0, 0]]``
    (tests/bundle/test_tail_plan.py checks it).

    Raises:
        ValueError: no rows, ``user`` and ``replay`` of different lengths, a bad count or seed.
    """
    per_class = _rows_per_class(user, replay, replay_ratio)
    check_plan_arguments(seed, epochs=epochs, batch_size=batch_size)
    state, width, walked = shuffle_state(seed), min(batch_size, per_class * len(user)), [0] * len(user)
    plan_order: list[list[int]] = []
    plan_weight: list[list[float]] = []
    for _ in range(epochs):
        rows: list[int] = []
        weights: list[float] = []
        for c, (mine, pool) in enumerate(zip(user, replay)):
            fill = per_class - len(mine)
            if pool:
                rows += list(mine) + [pool[(walked[c] + j) % len(pool)] for j in range(fill)]
                walked[c] = (walked[c] + fill) % len(pool)
                keep = per_class / (len(mine) + len(pool)) if fill else 1.0
                stand_in = per_class * len(pool) / (fill * (len(mine) + len(pool))) if fill else 1.0
                weights += [keep] * len(mine) + [stand_in] * fill
            elif mine:
                rows += [mine[j % len(mine)] for j in range(per_class)]
                weights += [1.0] * per_class
        slots = list(range(len(rows)))
        state = shuffle_in_place(slots, state)
        first = len(plan_weight)
        cut_batches([rows[i] for i in slots], batch_size, width, plan_order, plan_weight)
        slot_weight = [weights[i] for i in slots]
        for k, step in enumerate(plan_weight[first:]):
            plan_weight[first + k] = [w * slot_weight[k * batch_size + j] if w else 0.0 for j, w in enumerate(step)]
    return plan_order, plan_weight


def _rows_per_class(user: list[list[int]], replay: list[list[int]], replay_ratio: float) -> int:
    """:func:`tail_step_plan`'s ``K`` (its checks first)."""
    if len(user) != len(replay) or not any(len(u) + len(r) for u, r in zip(user, replay)):
        raise ValueError(
            f"user and replay need one row list per class and some rows, received {len(user)} and {len(replay)} lists"
        )
    if isinstance(replay_ratio, bool) or not isinstance(replay_ratio, (int, float)) or not replay_ratio >= 0:
        raise ValueError(f"replay_ratio must be a number >= 0, received {replay_ratio!r}")
    per_user = max(1, max(len(u) for u in user))
    most = max(len(u) + len(r) for u, r in zip(user, replay))
    return max(per_user, min(per_user + math.ceil(replay_ratio * per_user), most))
