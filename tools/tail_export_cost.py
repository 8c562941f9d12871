#!/usr/bin/env python
"""What the trainable tail adds to an export's time: the same run exported with and without
the tail step (fp32 + int8 + QAT, evaluated on the held-out target digits, as the demo does).

    python tools/tail_export_cost.py edgetl-demo/target_run [--repeats 2]

The first export of a process also pays TensorFlow's warm-up, so each mode runs ``--repeats``
times, alternating, and the last of each is reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def skipped_tail_step(*args: object) -> tuple[dict, dict, None]:
    """Export's tail step left out: what ``tail_step`` gives for a backbone without a tail
    (no files, a section saying why, no trunk model)."""
    return {}, {"available": False, "reason": "skipped (timing)"}, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a transfer run directory on digits 5-9 (the demo's target_run)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    from edgetl.data import load_digits_dataset, stratified_split
    from edgetl.host import _export

    warnings.simplefilter("ignore")  # left-out quantized files are part of the run, not news
    halves = stratified_split(load_digits_dataset((5, 6, 7, 8, 9)), val_fraction=0.0, test_fraction=0.5, seed=0)
    real, skipped = _export.tail_step, skipped_tail_step
    seconds = {}
    print(open("/proc/loadavg").read().strip(), "(load average)")
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.repeats):
            for mode, step in (("with the tail", real), ("without", skipped)):
                _export.tail_step = step
                t0 = time.perf_counter()
                result = _export.export_bundle(
                    args.run,
                    Path(d) / "b.edgetl",
                    quantize=["none", "int8", "qat"],
                    calibration=halves.train,
                    evaluation=halves.test,
                    overwrite=True,
                )
                seconds[mode] = time.perf_counter() - t0
                print(f"export {mode}: {seconds[mode]:.1f}s (ok: {result.ok})", flush=True)
    _export.tail_step = real
    print(f"the tail adds {seconds['with the tail'] - seconds['without']:.1f}s to an export")
    return 0


if __name__ == "__main__":
    sys.exit(main())
