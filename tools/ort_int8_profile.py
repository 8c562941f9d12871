#!/usr/bin/env python
"""Where onnxruntime spends its time in a bundle's fp32 and int8 models, op by op.

    python tools/ort_int8_profile.py BUNDLE [--runs 50]
    python tools/ort_int8_profile.py --build mobilenetv2 [--size 224]   # weights=None, like bench_suite

Runs each fused ONNX model (fp32 and int8) at batch 1 on one thread with onnxruntime's
profiler and sums kernel time per op type, so an int8 model that is no faster than fp32
shows which kernels are slower. Also prints whether this CPU has VNNI (``avx512_vnni`` /
``avx_vnni``): without it, MLAS's int8 convolutions (AVX2 ``vpmaddubsw``) do about as many
instructions per multiply-add as fp32 FMA, so int8 cannot be much faster, whatever the
recipe (the issue 11 study: int8/fp32 1.01-1.34 on this AMD EPYC Zen 1, every recipe).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def cpu_flags() -> dict[str, bool]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")}


def profile(path: Path, x: np.ndarray, runs: int) -> tuple[dict[str, float], float]:
    """Mean kernel microseconds per op type per inference, and the mean wall time (ms)."""
    import time

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.log_severity_level = 3
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as d:
        opts.profile_file_prefix = str(Path(d) / "prof")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        for _ in range(5):
            session.run(None, feed)
        t0 = time.perf_counter()
        for _ in range(runs):
            session.run(None, feed)
        wall = (time.perf_counter() - t0) / runs * 1e3
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total_runs = runs + 5
    return {op: us / total_runs for op, us in per_op.items()}, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, nargs="?")
    parser.add_argument("--build", help="build a keras.applications family's bundle first (weights=None)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    from edgetl.bundle import read_bundle

    with tempfile.TemporaryDirectory() as work:
        path = args.bundle
        if args.build:
            from bench_suite import build_app_bundle

            path, _ = build_app_bundle(Path(work), args.build, args.size)
        if path is None:
            parser.error("give a BUNDLE or --build FAMILY")
        bundle = read_bundle(path)
        x = bundle.arrays("parity", ("x",))["x"][:1].astype(np.float32)
        fp32, fp32_ms = profile(bundle.artifact("fused", "onnx", "fp32"), x, args.runs)
        int8, int8_ms = profile(bundle.artifact("fused", "onnx", "int8"), x, args.runs)
    print(f"CPU flags: {cpu_flags()}")
    print(f"wall time per inference: fp32 {fp32_ms:.3f} ms, int8 {int8_ms:.3f} ms, int8/fp32 {int8_ms / fp32_ms:.2f}")
    print(f"{'op type':<28} {'fp32 us':>9} {'int8 us':>9}")
    ops = sorted(set(fp32) | set(int8), key=lambda op: -(fp32.get(op, 0) + int8.get(op, 0)))
    for op in ops:
        print(f"{op:<28} {fp32.get(op, 0):>9.1f} {int8.get(op, 0):>9.1f}")
    print(f"{'total kernel time':<28} {sum(fp32.values()):>9.1f} {sum(int8.values()):>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
