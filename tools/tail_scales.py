#!/usr/bin/env python
"""Would the tail gain more if its layer moved faster or slower than the head? (tuning family only)

    python tools/tail_scales.py [--tail-rate K] [--head-rate H] [--tail-l2 L] -- TAIL_RATES_ARGS

Trains every tail with the float32 numpy reference (``edgetl.bundle._tail.reference_train``:
the graphs' own steps and plan, which the runtimes match within 1e-5) instead of the graphs,
with the SGD step of the tail layer (``W1``, ``b1``) times ``K``, of the head times ``H``, and
the l2 pull on ``W1`` times ``L``, then runs ``tools/tail_rates.py`` with the arguments after
``--`` (use ``--tune``: the evaluation family is not for choosing). ``K = H = L = 1`` prints the
graphs' figures exactly (checked on the three Dense bundles of ``--tune --grid 28``: +6.9
points, 6 tails refused, the same as the graphs).

Why a separate tool: the graphs compute their SGD normalisers inside (``sgd_scales``), so
trying another ratio between the layers would mean rebuilding them; the reference answers
whether it is worth it first. The answer is in ``edgetl/device/_tail.py`` (``TAIL_SETTINGS``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def patch(tail_rate: float, head_rate: float, tail_l2: float) -> None:
    """Make every TailRuntime train with the scaled float32 reference (this process only)."""
    from edgetl.bundle import _contract as C
    from edgetl.bundle import _tail as T
    from edgetl.device import _tail as D

    scales, gradients = T.sgd_scales, T.gradients

    def scaled(*args: Any, **kwargs: Any) -> tuple[float, float]:
        head, tail = scales(*args, **kwargs)
        return head / head_rate, tail / tail_rate  # a normaliser divides the rate

    def pulled(p: dict, a: np.ndarray, y: np.ndarray, rw: np.ndarray, activation: str, l2: float) -> tuple:
        grads, loss = gradients(p, a, y, rw, activation, l2)
        grads["W1"] = grads["W1"] + (tail_l2 - 1.0) * l2 * (p["W1"] - p["W1_0"])  # the loss line is informative only
        return grads, loss

    def train_steps(self: Any, weights: dict, trunk: np.ndarray, onehot: np.ndarray, optimizer: str, order: Any,
                    row_weight: Any, *, lr: float, l2: float, momentum: float = 0.9) -> dict:  # fmt: skip
        state, losses = self.reference_steps(
            weights, trunk, onehot, optimizer, order, row_weight, lr=lr, l2=l2, momentum=momentum, dtype=np.float32
        )
        return {**{s: np.asarray(state[s], np.float32) for s in T.STATE[optimizer]}, C.LOSSES: np.asarray(losses)}

    T.sgd_scales, T.gradients, D.TailRuntime.train_steps = scaled, pulled, train_steps


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tail-rate", type=float, default=1.0, help="the tail layer's SGD step times this")
    ap.add_argument("--head-rate", type=float, default=1.0, help="the head's SGD step times this")
    ap.add_argument("--tail-l2", type=float, default=1.0, help="the l2 pull on W1 times this")
    args = ap.parse_args(ours)
    patch(args.tail_rate, args.head_rate, args.tail_l2)
    print(f"### tail rate x{args.tail_rate}, head rate x{args.head_rate}, W1 l2 x{args.tail_l2}", flush=True)
    import tail_rates

    return tail_rates.main(rest)


if __name__ == "__main__":
    sys.exit(main())
