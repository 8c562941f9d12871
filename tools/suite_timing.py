"""Time the test suite one directory at a time: wall seconds and CPU seconds (the pytest process
and every process it waited for), with the load average and the CPU, so a figure taken on a
shared machine can be read for what it is.

    python tools/suite_timing.py -m "not slow"      # the fast suite (target: under 8 minutes on 2 cores)
    python tools/suite_timing.py                    # the whole suite (target: under 15 minutes)

One directory at a time (each with the suite's two xdist workers, pyproject.toml's addopts)
so that a figure can be tied to a directory; each directory builds its own session fixtures (the digits bundle and
its source run), so the summed CPU time counts them once per directory and overstates what one
`python -m pytest` run costs.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["tests/test_codebase.py", "tests/bundle", "tests/cli", "tests/mcu", "tests/device", "tests/reliability"]
PARTS += ["tests/host", "tests/docs"]


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return f"{name}; " + ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", dest="marker", default=None, help='pytest marker expression, e.g. "not slow"')
    parser.add_argument("parts", nargs="*", default=PARTS, help="test directories or files, in order")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_model()}")
    total_wall = total_cpu = 0.0
    failed = False
    for part in args.parts:
        load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", part]
        cmd += ["-m", args.marker] if args.marker else []
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        summary = (done.stdout.strip().splitlines() or ["?"])[-1]
        print(f"{part:<24} wall {wall:7.1f} s  cpu {cpu:7.1f} s  load {' '.join(load)}  {summary}")
        total_wall, total_cpu, failed = total_wall + wall, total_cpu + cpu, failed or done.returncode not in (0, 5)
    minutes = f"({total_wall / 60:.1f} / {total_cpu / 60:.1f} min)"
    print(f"{'total':<24} wall {total_wall:7.1f} s  cpu {total_cpu:7.1f} s  {minutes}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
