#!/usr/bin/env python
"""Issue 9's speed target for the host head: fit on 10,000 cached 256-d embeddings in < 2 s.

    python tools/bench_head_fit.py [--n 10000] [--d 256] [--classes 10]

Embeddings are Gaussian clusters (one per class, overlapping, so the fit has work to do),
standardized as edgetl standardizes them. Timed on one core: the fit with C chosen on a
validation split of 2,000 (the default path for a run of this size), and with C given.
Median of 3; prints PASS or MISS.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_SECONDS = 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    from edgetl.host._linear_head import fit_linear_head, standardization

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 0.12, (args.classes, args.d))  # overlapping: ~60% accuracy, a real fit
    y = rng.integers(0, args.classes, args.n + 2000)
    e = (centers[y] + rng.normal(0, 1.0, (len(y), args.d))).astype(np.float32)
    st = standardization(e[: args.n])
    x, xv = st.apply(e[: args.n]), st.apply(e[args.n :])
    y, yv = y[: args.n], y[args.n :]
    rows = []
    for what, kw in (("C on validation", {"x_val": xv, "y_val": yv}), ("C given", {"C": 1.0})):
        times, fit = [], None
        for _ in range(3):
            t0 = time.perf_counter()
            fit = fit_linear_head(x, y, args.classes, **kw)
            times.append(time.perf_counter() - t0)
        acc = float(np.mean((xv @ fit.W + fit.b).argmax(1) == yv))
        rows.append((what, float(np.median(times)), fit.steps, fit.converged, acc))
    print(f"linear head on {args.n} x {args.d} embeddings, {args.classes} classes, one core")
    for what, seconds, steps, converged, acc in rows:
        verdict = "PASS" if seconds < TARGET_SECONDS else "MISS"
        print(
            f"{verdict}  {what}: {seconds:.2f} s (target < {TARGET_SECONDS:g} s), {steps} L-BFGS steps, converged "
            f"{converged}, validation accuracy {acc:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
