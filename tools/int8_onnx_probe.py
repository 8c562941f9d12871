#!/usr/bin/env python
"""The int8 ONNX remedy ladder on one run, without a whole export (issue 23, targets).

    nice -n 10 python tools/int8_onnx_probe.py [RUN] [--target x86-vnni] [--role fused|backbone|both]

Runs exactly what ``edgetl export --quantize int8 --target T`` runs for the int8 ONNX files
(``edgetl.host._export.onnx_int8``: the ladder judged by the export's paired-evidence gate)
and prints every rung tried with its gate and seconds, the rung that shipped, what stayed
float, and the test-split accuracy of the result against fp32 (the rungs are judged on the
run's validation split, not on that test split: ``edgetl.host._selection``). RUN defaults to the
MobileNetV2-0.35 96x96 run ``tools/int8_targets.py prepare`` caches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_RUN = "/tmp/edgetl-int8-run/mobilenetv2_035-96/run"


def probe(run: str, target: str, roles: list[str]) -> None:
    from edgetl.device._runtimes import OnnxModel, run_batched
    from edgetl.host._convert import keras_to_onnx
    from edgetl.host._export import onnx_int8, plan_export, split_model
    from edgetl.host._int8_onnx import GATE_BATCH

    plan = plan_export(run, quantize=["int8"])
    plan.target = target
    backbone, _ = split_model(plan.run.model)
    calib = plan.data.calibration_x[: plan.configs[-1].calibration_samples]
    xt, yt = plan.data.test
    roles_record = plan.data.source["selection"]  # the ladder chooses on one split, the test line reports another
    print(f"rungs judged on {roles_record['chooses']}; accuracy reported on {roles_record['reports']}")
    for role in roles:
        fp32 = keras_to_onnx(plan.run.model if role == "fused" else backbone, plan.opset)
        t0 = time.perf_counter()
        content, record = onnx_int8(plan, role, fp32, calib)
        print(f"\n{role} int8 ONNX, target {target}: {time.perf_counter() - t0:.1f} s")
        for t in record["tried"]:
            g = t["gate"]
            floats = [f["tensor"].rsplit("/", 2)[-2] for f in t.get("float_tensors", [])]
            print(f"  {t['rung']:<24} {t['calibration']:<10} n={t['calibration_samples']:<4} {t['seconds']:>6.1f} s "
                  f"{g['outcome']:<5} agreement {g['top1_agreement']:.3f} of {g['examples']}"
                  + (f", drop {g['accuracy_drop'] * 100:+.2f} points" if "accuracy_drop" in g else "")
                  + (f", cosine {g['cosine']:.3f}" if "cosine" in g else "")
                  + (f", float {floats}" if floats else ""))  # fmt: skip
        if "sensitivity" in record:
            print(f"  sensitivity: {record['sensitivity']}")
        print(f"  shipped rung {record['rung']} (passed {record['passed']}), float share of MACs "
              f"{record['float_share_macs']}, ops {record['ops']}, sizes {record['size_bytes']}, "
              f"latency {record.get('latency_ms')}")  # fmt: skip
        if role == "fused":
            x = np.asarray(xt, np.float32)
            acc = lambda c: float(np.mean(run_batched(OnnxModel(c), x, GATE_BATCH).argmax(1) == yt))  # noqa: E731
            a32, a8 = acc(fp32), acc(content)
            print(f"  test split ({len(yt)}): fp32 {a32:.4f}, int8 {a8:.4f}, {100 * (a8 - a32):+.2f} points")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=DEFAULT_RUN)
    parser.add_argument("--target", default="x86-vnni")
    parser.add_argument("--role", choices=("fused", "backbone", "both"), default="both")
    args = parser.parse_args(argv)
    text = Path("/proc/cpuinfo").read_text()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    print(f"CPU: {name}; load {Path('/proc/loadavg').read_text().split()[:3]}")
    probe(args.run, args.target, ["fused", "backbone"] if args.role == "both" else [args.role])
    return 0


if __name__ == "__main__":
    sys.exit(main())
