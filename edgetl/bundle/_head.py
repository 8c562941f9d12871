"""The head contract: what the trainable head is, in numpy (the one home of its math).

The head is linear with a capacity of ``max_classes`` columns; ``mask`` (1 = active class)
lets the device add classes without a new graph::

    p = masked_softmax(e @ W + b, mask)
    loss = mean(-sum(y * log p)) + l2/2 ||W - W0||^2          # L2 pull toward the anchor W0

One train step on a batch of embeddings ``e`` and one-hot labels ``y``::

    g_logits = (p - y) / B
    gW = e^T g_logits + l2 * (W - W0);  gb = sum(g_logits)
    SGD with momentum:  v = mu v + g;  w -= lr v
    Adam:               m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  t += 1
                        w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)

The host builds graphs of exactly this (``edgetl.host._head_graphs``: the ONNX inference
graph; ``edgetl.host._head_loop_graphs``: the ONNX loop graphs, which run a whole step plan
per call (S = 1 is one step), and ``head.tflite`` with its signatures); the device runs them
(``edgetl.device._head_loop``); ``verify`` checks every graph against :func:`reference_step`.
The tensor names below are the graphs' interface: a device that does not run Python
(docs/integration.md) feeds exactly these names.
"""

from __future__ import annotations

import numpy as np

MASK_NEG = -1e9  # added to inactive-class logits; exp() underflows to exactly 0
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-7
OPTIMIZERS = ("sgd", "adam")

# ONNX graphs (head_infer.onnx, head_train_loop_{sgd,adam}.onnx): inputs and outputs by name.
INFER_INPUTS = ("embedding", "W", "b", "mask")
INFER_OUTPUT = "probabilities"
TRAIN_INPUTS = ("embedding", "labels", "mask", "W", "b", "W0", "lr", "l2")
STATE = {"sgd": ("W", "b", "vel_W", "vel_b"), "adam": ("W", "b", "m_W", "m_b", "v_W", "v_b", "t")}
HYPERPARAMETERS = {"sgd": ("momentum",), "adam": ()}


def train_graph_inputs(optimizer: str) -> set[str]:
    """The inputs the ONNX loop graph for ``optimizer`` takes: the step's, the optimizer state
    and the step plan ``order`` and ``row_weight``."""
    return {*TRAIN_INPUTS, *STATE[optimizer], *HYPERPARAMETERS[optimizer], "order", "row_weight"}


def state_output(name: str) -> str:
    """The graph output that carries the updated ``name`` (``W`` -> ``W_out``)."""
    return f"{name}_out"


# TFLite head (head.tflite): signature -> input names (outputs in the docstring of
# edgetl.host._head_loop_graphs.head_tflite_loop). ``optimizer`` is 0 for SGD, 1 for Adam.
# ``get_weights`` takes one ignored scalar, ``unused``: LiteRT's Java/Kotlin
# ``Interpreter.runSignature`` refuses an empty input map, so an Android app could not read
# its trained weights back from a signature without inputs. ``train_steps`` runs a whole
# step plan (``order``, ``row_weight``) in one invoke (S = 1: one step). Heads from edgetl
# before schema 3 also have a one-step ``train`` signature, which nothing runs any more.
TFLITE_SIGNATURES = {
    "infer": ("embedding",),
    "get_weights": ("unused",),
    "set_weights": ("W", "b", "mask", "anchor"),
    "train_steps": ("embedding", "labels", "order", "row_weight", "lr", "l2", "momentum", "optimizer"),
}


def signature_inputs(signatures: dict, name: str) -> dict:
    """Keyword arguments a runtime must add for ``name`` beyond the data, for heads exported
    by any edgetl version: ``get_weights`` gained its ``unused`` input in schema 2."""
    inputs = signatures.get(name, {}).get("inputs", [])
    return {"unused": np.float32(0.0)} if name == "get_weights" and "unused" in inputs else {}


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
