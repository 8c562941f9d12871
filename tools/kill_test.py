#!/usr/bin/env python
"""Kill a personalizing process with SIGKILL at random instants, many times, and check the
head store after every kill.

    python tools/kill_test.py BUNDLE [--kills 500] [--seed 0]

The child opens a store and commits new head versions as fast as it can, printing each
committed version number only after ``commit()`` returned. After each kill the store must
open at a committed version whose file passes its checksum, hold exactly that version's
weights (a whole version, never a mix), and not be older than the last version the child
reported committed (no committed version lost). tests/reliability runs a bounded sample.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from dataclasses import replace
    from edgetl.bundle import read_bundle
    from edgetl.device._head import HeadState
    from edgetl.device._store import HeadStore
    bundle = read_bundle(sys.argv[1], verify_hashes=False)
    store = HeadStore(sys.argv[2], bundle)
    head = HeadState.factory(bundle)
    print("ready", flush=True)
    while True:
        v = store.active_version
        new = replace(head, W=head.W + np.float32(v + 1), b=head.b + np.float32(v + 1))
        print(store.commit(new, {"step": v + 1}), flush=True)
    """
)


def run(bundle: Path, store_dir: Path, kills: int, seed: int = 0) -> dict[str, Any]:
    from edgetl.bundle import read_bundle
    from edgetl.device._head import HeadState
    from edgetl.device._store import HeadStore

    b = read_bundle(bundle)
    factory = HeadState.factory(b)
    rng = np.random.default_rng(seed)
    last_reported, lost, survived, commits = 0, 0, 0, 0
    for _ in range(kills):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(bundle), str(store_dir)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready", "child failed to start"
        time.sleep(rng.uniform(0.0, 0.05))  # a random instant inside the commit loop
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        reported = [int(v) for v in out.split()]
        commits += len(reported)
        active = HeadStore(store_dir, b).active()  # raises if the pointer or checksum is bad
        if reported:
            last_reported = reported[-1]
        if active.number < last_reported:
            lost += 1
        # Version numbers skip the files of commits killed before their pointer update, so
        # the weights are checked against the step recorded with the commit, not the number.
        step = active.info.get("metrics", {}).get("step", 0) if active.number else 0
        expected = factory.W + np.float32(step)
        assert np.allclose(active.head.W, expected, atol=1e-3), (
            f"version {active.number} (step {step}) holds other weights"
        )
        survived += 1
    return {
        "kills": kills,
        "survived": survived,
        "versions_lost": lost,
        "commits_seen": commits,
        "final_version": last_reported,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--kills", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        stats = run(args.bundle, Path(d) / "store", args.kills, args.seed)
    print(json.dumps(stats))
    print(
        f"{stats['survived']}/{stats['kills']} kills survived, {stats['versions_lost']} committed versions lost, in "
        f"{time.perf_counter() - t0:.0f}s"
    )
    return 0 if stats["versions_lost"] == 0 and stats["survived"] == stats["kills"] else 1


if __name__ == "__main__":
    sys.exit(main())
