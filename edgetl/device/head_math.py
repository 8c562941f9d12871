"""The head's math in numpy: the reference every exported head graph is checked against.

See :mod:`edgetl.host.head_graphs` for the formulas; this module holds the constants both
sides share, so the graphs and the reference cannot drift apart.
"""

from __future__ import annotations

import numpy as np

MASK_NEG = -1e9  # added to inactive-class logits; exp() underflows to exactly 0
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-7


def masked_softmax(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    z = logits + (1.0 - mask) * MASK_NEG
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reference_step(state: dict[str, np.ndarray], embedding: np.ndarray, labels: np.ndarray, mask: np.ndarray, W0: np.ndarray, *, optimizer: str, lr: float, l2: float, momentum: float = 0.9) -> tuple[dict[str, np.ndarray], float]:
    """The same train step in float64 numpy; returns the new state and the loss."""
    s = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    e, y = embedding.astype(np.float64), labels.astype(np.float64)
    p = masked_softmax(e @ s["W"] + s["b"], mask)
    loss = -np.mean(np.sum(y * np.log(np.clip(p, 1e-12, 1.0)), axis=1)) + 0.5 * l2 * np.sum((s["W"] - W0) ** 2)
    g_logits = (p - y) / len(e)
    grads = {"W": e.T @ g_logits + l2 * (s["W"] - W0), "b": g_logits.sum(axis=0)}
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
    return new, float(loss)


def initial_state(W: np.ndarray, b: np.ndarray, optimizer: str) -> dict[str, np.ndarray]:
    state = {"W": W.astype(np.float32), "b": b.astype(np.float32)}
    if optimizer == "sgd":
        state.update(vel_W=np.zeros_like(state["W"]), vel_b=np.zeros_like(state["b"]))
    else:
        state.update(m_W=np.zeros_like(state["W"]), m_b=np.zeros_like(state["b"]), v_W=np.zeros_like(state["W"]), v_b=np.zeros_like(state["b"]), t=np.zeros((), np.float32))
    return state
