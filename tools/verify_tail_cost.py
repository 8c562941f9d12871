#!/usr/bin/env python
"""What verify's tail rows cost: ``tail_checks`` (trunk, inference and SGD/Adam training graphs in
both runtimes) against the whole ``verify_bundle``, on existing bundles. Export runs
``verify_bundle`` once on the bundle it stages, so the tail rows' time is what they add to an export.

    python tools/verify_tail_cost.py B [B ...] [--suite] [--repeats 3]

``--suite`` also builds the test suite's tail bundle (tools/tail_rates.build_tail_bundle, the
``tail_bundle`` fixture) in a temporary directory. The first call of each bundle is reported
(an export pays it once), and the median of ``--repeats`` more.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _seconds(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(path: Path, repeats: int) -> str:
    import edgetl.device._runtimes as runtimes
    from edgetl.bundle import read_bundle
    from edgetl.bundle._contract import PARITY_MEMBERS
    from edgetl.device import verify_bundle
    from edgetl.device._verify import tail_checks

    bundle = read_bundle(path)
    if not (bundle.manifest.extra.get("tail") or {}).get("available"):
        return f"{path}: no trainable tail"
    ref, backends = bundle.arrays("parity", PARITY_MEMBERS), runtimes.installed_backends()
    rows: list = []
    first = _seconds(lambda: rows.extend(tail_checks(bundle, ref, backends)))
    tail = statistics.median(_seconds(lambda: tail_checks(bundle, ref, backends)) for _ in range(repeats))
    whole = statistics.median(_seconds(lambda: verify_bundle(bundle)) for _ in range(repeats))
    ok = sum(c.ok for c in rows)
    return (
        f"{path}: {len(rows)} tail rows ({ok} ok) in {'+'.join(backends)}; tail checks first call {first:.2f} s, "
        f"median {tail:.2f} s; whole verify_bundle median {whole:.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--suite", action="store_true", help="also build and measure the test suite's tail bundle")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from suite_timing import cpu_model

    print(f"CPU {cpu_model()} ({platform.machine()}); load {Path('/proc/loadavg').read_text().strip()}")
    paths = list(args.bundles)
    with tempfile.TemporaryDirectory() as tmp:
        if args.suite:
            os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
            from tail_rates import build_tail_bundle

            paths.append(Path(build_tail_bundle(Path(tmp))))
        for path in paths:
            print(measure(path, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
