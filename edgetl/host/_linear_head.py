"""Fit a linear softmax head to its optimum: standardized embeddings, full-batch L-BFGS.

A linear softmax head on frozen embeddings is a convex problem (multinomial logistic
regression): it has one optimum, and a deterministic full-batch quasi-Newton method
reaches it in a few hundred cheap steps. Minibatch Adam at 1e-3 for a few dozen epochs
does not: on a user's backbone with unscaled embeddings (mean |e| from 2 to 20) it
stopped at 0.70 test accuracy where the optimum was 0.97 (issue 9). So edgetl fits the
head the way scikit-learn's ``LogisticRegression`` does and chooses the L2 strength on
held-out data.

Objective, per example weight ``s_i`` (class weights) and soft targets ``t_i`` (label
smoothing)::

    L(W, b) = sum_i s_i * CE(t_i, softmax(x_i W + b)) / sum_i s_i  +  l2/2 * ||W||^2

The bias is not penalised. ``l2 = 1 / (C * n)`` maps scikit-learn's ``C`` onto this
mean-loss form, so ``C = 1`` here equals scikit-learn's default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edgetl.errors import InputError

# Inverse regularization strengths tried (scikit-learn's C). Coarse on purpose: the
# optimum of the validation loss is flat in log C, and each extra value costs a fit.
DEFAULT_C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclass(frozen=True)
class LinearHeadFit:
    """A fitted head and how the fit went (recorded in ``metrics.json``)."""

    W: np.ndarray  # (D, K) float32
    b: np.ndarray  # (K,) float32
    C: float
    l2: float
    steps: int
    loss: float
    grad_norm: float
    converged: bool
    selection: str  # "validation", "cross-validation" or "default"
    candidates: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "method": "lbfgs",
            "C": self.C,
            "l2": self.l2,
            "steps": self.steps,
            "final_loss": self.loss,
            "grad_norm": self.grad_norm,
            "converged": self.converged,
            "selection": self.selection,
            "candidates": self.candidates,
            "seconds": round(self.seconds, 4),
        }


def _targets(y: np.ndarray, k: int, smoothing: float) -> np.ndarray:
    t = np.full((len(y), k), smoothing / k, dtype=np.float32)
    t[np.arange(len(y)), y] += 1.0 - smoothing
    return t


class _Objective:
    """Loss and gradient in float32 (BLAS speed), accumulated in float64 where it matters."""

    def __init__(self, x: np.ndarray, t: np.ndarray, s: np.ndarray, l2: float) -> None:
        self.x, self.t, self.l2 = x, t, l2
        self.s = (s / s.sum()).astype(np.float32)[:, None]  # normalised example weights
        self.d, self.k = x.shape[1], t.shape[1]

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        d, k = self.d, self.k
        W = theta[: d * k].reshape(d, k).astype(np.float32)
        b = theta[d * k :].astype(np.float32)
        z = self.x @ W + b
        z -= z.max(axis=1, keepdims=True)
        logsum = np.log(np.exp(z).sum(axis=1, keepdims=True))
        logp = z - logsum
        loss = -float(np.sum(self.s * self.t * logp, dtype=np.float64)) + 0.5 * self.l2 * float(
            np.sum(W.astype(np.float64) ** 2)
        )
        g = self.s * (np.exp(logp) - self.t)  # target rows sum to 1, so dCE/dz = p - t
        gW = self.x.T @ g + self.l2 * W
        gb = g.sum(axis=0)
        return loss, np.concatenate([gW.ravel(), gb]).astype(np.float64)


def _fit_one(
    x: np.ndarray, t: np.ndarray, s: np.ndarray, l2: float, theta0: np.ndarray, *, tol: float, max_steps: int
) -> tuple[np.ndarray, Any]:
    from scipy.optimize import minimize

    res = minimize(
        _Objective(x, t, s, l2),
        theta0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_steps, "gtol": tol, "ftol": 1e-12, "maxcor": 20},
    )
    return res.x, res


def _split_theta(theta: np.ndarray, d: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return theta[: d * k].reshape(d, k).astype(np.float32), theta[d * k :].astype(np.float32)


def _scores(x: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    z = x @ W + b
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(np.mean(logp.argmax(1) == y)), float(-np.mean(logp[np.arange(len(y)), y]))


def fit_linear_head(*args: Any, **kwargs: Any) -> LinearHeadFit:
    """Fit a multinomial logistic-regression head to convergence (see :func:`_fit_linear_head`).

    Runs numpy's BLAS on one thread. Why: after TensorFlow has run in the process, its
    thread pools keep spinning, and OpenBLAS's own threads fight them for the cores;
    measured on this 2-core machine, the same fit took 11.6 s with OpenBLAS on 2 threads
    and 0.32 s on one. These matrices are small enough that one thread is as fast anyway.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - comes with scikit-learn (host extra)
        return _fit_linear_head(*args, **kwargs)
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_linear_head(*args, **kwargs)


def _fit_linear_head(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    label_smoothing: float = 0.0,
    C: float | None = None,
    C_grid: Sequence[float] = DEFAULT_C_GRID,
    tol: float = 1e-5,
    max_steps: int = 2000,
) -> LinearHeadFit:
    """Fit a multinomial logistic-regression head to convergence.

    The L2 strength is chosen, in this order: ``C`` if given; else on ``(x_val, y_val)``
    (lowest validation log-loss, the proper scoring rule: validation accuracy on a few
    dozen examples ties too often to choose by); else by stratified k-fold (k <= 5)
    cross-validation on ``x`` when every class has at least two examples; else
    scikit-learn's default ``C = 1``. Candidates are fitted along the path from the
    strongest regularization down, each warm-started from the previous solution.

    Args:
        x: ``(n, D)`` embeddings (standardized: see :func:`standardization`).
        y: ``(n,)`` integer labels in ``[0, num_classes)``.
        num_classes: number of output columns.
        x_val, y_val: held-out embeddings and labels to choose ``C`` on.
        sample_weight: per-example weights (e.g. balanced class weights).
        label_smoothing: as Keras' ``CategoricalCrossentropy(label_smoothing=...)``.
        C: fixed inverse regularization strength (skips the selection).
        C_grid: candidates for the selection.
        tol: convergence test on the largest gradient component.
        max_steps: L-BFGS iteration limit per fit.

    Returns:
        A :class:`LinearHeadFit` (float32 ``W``, ``b``) with the fit's diagnostics.
    """
    start = time.perf_counter()
    x, y = _checked(x, y, num_classes)
    n, d = x.shape
    s = np.ones(n, np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
    t = _targets(y, num_classes, label_smoothing)
    fit_kw = {"tol": tol, "max_steps": max_steps}
    theta0 = np.zeros(d * num_classes + num_classes)
    candidates: list[dict[str, Any]] = []

    if C is not None:
        chosen, selection = float(C), "given"
    elif x_val is not None and y_val is not None and len(y_val):
        chosen, candidates = _select_on_validation(
            x, t, s, np.ascontiguousarray(x_val, dtype=np.float32), np.asarray(y_val), C_grid, fit_kw
        )
        selection = "validation"
    else:
        chosen, candidates = _select_by_cross_validation(x, y, t, s, num_classes, C_grid, fit_kw)
        selection = "cross-validation" if candidates else "default"
    l2 = 1.0 / (chosen * n)
    theta, res = _fit_one(x, t, s, l2, theta0, **fit_kw)
    W, b = _split_theta(theta, d, num_classes)
    grad_norm = float(np.max(np.abs(res.jac)))
    # The loss is computed in float32 (BLAS speed): near the optimum the line search can
    # stop on rounding ("ABNORMAL_TERMINATION_IN_LNSRCH") with the gradient at ~1e-5; that
    # is converged for any purpose here, so the gradient decides, not only scipy's flag.
    converged = bool(res.success or grad_norm <= 10 * tol)
    seconds = time.perf_counter() - start
    return LinearHeadFit(
        W, b, chosen, l2, int(res.nit), float(res.fun), grad_norm, converged, selection, candidates, seconds
    )


def _checked(x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if len(x) == 0 or len(y) != len(x) or x.ndim != 2:
        raise InputError(f"fit_linear_head needs non-empty (n, D) x and (n,) y, received {x.shape} and {y.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError("embeddings contain NaN or infinite values; the backbone output is broken")
    if y.min() < 0 or y.max() >= num_classes:
        raise InputError(f"labels must lie in [0, {num_classes - 1}], received range [{y.min()}, {y.max()}]")
    return x, y


def _select_on_validation(
    x: np.ndarray,
    t: np.ndarray,
    s: np.ndarray,
    xv: np.ndarray,
    yv: np.ndarray,
    C_grid: Sequence[float],
    fit_kw: dict[str, Any],
) -> tuple[float, list[dict[str, Any]]]:
    """The C with the lowest validation log-loss, fitting along the path (warm starts)."""
    d, k = x.shape[1], t.shape[1]
    theta = np.zeros(d * k + k)
    candidates = []
    for c in sorted(C_grid):
        theta, res = _fit_one(x, t, s, 1.0 / (c * len(x)), theta, **fit_kw)
        acc, loss = _scores(xv, yv, *_split_theta(theta, d, k))
        candidates.append({"C": c, "val_accuracy": acc, "val_loss": loss, "steps": int(res.nit)})
    return min(candidates, key=lambda r: r["val_loss"])["C"], candidates


def _select_by_cross_validation(
    x: np.ndarray, y: np.ndarray, t: np.ndarray, s: np.ndarray, k: int, C_grid: Sequence[float], fit_kw: dict[str, Any]
) -> tuple[float, list[dict[str, Any]]]:
    """The C with the lowest stratified k-fold log-loss; scikit-learn's default C = 1
    (and no candidates) when a class has fewer than two examples."""
    folds = _stratified_folds(y, k)
    if folds is None:
        return 1.0, []
    d = x.shape[1]
    grid = sorted(C_grid)
    losses = np.zeros(len(grid))
    for train_idx, val_idx in folds:
        theta = np.zeros(d * k + k)
        for i, c in enumerate(grid):
            theta, _ = _fit_one(x[train_idx], t[train_idx], s[train_idx], 1.0 / (c * len(train_idx)), theta, **fit_kw)
            losses[i] += _scores(x[val_idx], y[val_idx], *_split_theta(theta, d, k))[1] * len(val_idx)
    candidates = [{"C": c, "cv_loss": float(v / len(y))} for c, v in zip(grid, losses)]
    return grid[int(np.argmin(losses))], candidates


def _stratified_folds(
    y: np.ndarray, num_classes: int, max_folds: int = 5
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Deterministic stratified folds; ``None`` when a present class has fewer than two examples."""
    counts = np.bincount(y, minlength=num_classes)
    present = counts[counts > 0]
    k = int(min(max_folds, present.min())) if len(present) else 0
    if k < 2:
        return None
    fold_of = np.empty(len(y), np.int64)
    rng = np.random.default_rng(0)
    for c in np.flatnonzero(counts):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold_of[idx] = np.arange(len(idx)) % k
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


@dataclass(frozen=True)
class Standardization:
    """Per-dimension statistics of the training embeddings, frozen at the seam."""

    mean: np.ndarray  # (D,) float32
    variance: np.ndarray  # (D,) float32, what the Normalization layer divides by (sqrt)
    constant_dims: int
    scale: float  # mean |e| before standardizing (recorded: it explains old runs)

    def apply(self, e: np.ndarray) -> np.ndarray:
        return ((e - self.mean) / np.sqrt(self.variance)).astype(np.float32)

    @property
    def problem(self) -> str | None:
        """Why these embeddings cannot carry information about any task, or ``None``."""
        if not np.isfinite(self.scale):
            return "its embeddings contain NaN or infinite values"
        if self.scale < _VANISHING:
            return f"its embeddings vanish (mean |e| = {self.scale:.1e}): activations collapse through the layers"
        if self.constant_dims == len(self.mean):
            return f"its embedding is the same for every input (all {len(self.mean)} dimensions constant)"
        return None


# A dimension that never varies on the training split carries no information about the
# task (its head weights stay 0). It is scaled like a typical dimension (the median
# variance of the others), neither divided by ~0 (a unit dead on the training data that
# fires on the device would inject huge values into the head) nor multiplied by ~1e-6 (as
# edgetl did before: the standardization's 1/std vector then spanned many orders of
# magnitude, and int8 quantization of that vector as one tensor rounded most of it to 0).
# Trained networks produce embeddings of order 1e-3..1e3; a randomly initialised
# keras.applications network in inference mode collapses them to ~1e-16 (measured on
# MobileNetV2-0.35), where float32 arithmetic in the convolutions is mostly rounding.
_VANISHING = 1e-8
# A dimension whose std is under this share of the median dimension's is nearly dead (see
# standardization); the suite's backbones have such units at 0.002-0.006 and the next at 0.085.
NEARLY_DEAD = 0.01


def standardization(e: np.ndarray) -> Standardization:
    """Statistics to standardize embeddings ``e`` (``(n, D)``, the training split).

    Degenerate embeddings are not refused here (see ``Standardization.problem``): the
    caller knows which backbone made them and what the user can do about it.
    """
    e = np.asarray(e, dtype=np.float64)
    if not np.all(np.isfinite(e)):
        return Standardization(
            np.zeros(e.shape[1], np.float32), np.ones(e.shape[1], np.float32), e.shape[1], float("nan")
        )
    scale = float(np.mean(np.abs(e)))
    std = e.std(axis=0)
    # Relative to the embedding's own scale: float32 rounding of a constant output is ~1e-7.
    alive = std > max(1e-6 * scale, 1e-30)
    # A nearly dead unit (it fired on one or two training examples) is constant too: divided by
    # its tiny std, it scaled those examples' values ~500x beyond every other dimension, and an int8
    # backbone's output range, calibrated on them, rounded the rest of the embedding away (the
    # README's `edgetl export runs/digits --target mcu`: cosine 0.82 with the unit, 0.999 without).
    if alive.any():
        alive &= std > NEARLY_DEAD * float(np.median(std[alive]))
    mean = e.mean(axis=0)
    typical = float(np.median(std[alive] ** 2)) if alive.any() else 1.0
    var = np.where(alive, std**2, typical)
    return Standardization(mean.astype(np.float32), var.astype(np.float32), int((~alive).sum()), scale)
