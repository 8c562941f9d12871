#!/usr/bin/env python
"""Time of the documented batch order (edgetl.bundle._head.step_plan, pure Python) per training call.

    python tools/measure_step_plan.py

The device trainers build the plan on every `train` call (edgetl.device._head_loop.plan_steps);
this prints its cost next to the numbers of steps it plans, for the sizes personalization sees.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from edgetl.device._head import TrainSettings
    from edgetl.device._head_loop import plan_steps

    print("examples epochs batch  steps  ms/plan (median of 7)")
    for n, epochs in ((40, 30), (160, 10), (160, 30), (1000, 30)):
        settings = TrainSettings(epochs=epochs, batch_size=16)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            order, _ = plan_steps(n, settings)
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"{n:>8} {epochs:>6} {16:>5} {len(order):>6}  {sorted(times)[3]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
