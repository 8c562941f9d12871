#!/usr/bin/env python
"""Time the store part of a personalize commit: this checkout's store against another's.

    python tools/bench_store.py BUNDLE [--old-root DIR | --old-ref GIT_REF] [--commits 30] [--examples 50]

A personalize commit stores the new head version, makes it active, records the history and
keeps the user's examples. Each run times ``--commits`` such commits, each with
``--examples`` new examples (distinct, from scikit-learn's digits when the bundle takes 8x8
images, else random), on a fresh store in a temporary directory on the same disk, in a fresh
process, and prints the median and 90th percentile. The other side is another checkout of
edgetl: ``--old-ref`` (default ``e40bf7a``, the directory store before issue 20) is
extracted with ``git archive``. The old API kept the examples and the head in two calls
(``keep_examples`` then ``commit``); the new one takes both in one transaction.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMER = textwrap.dedent(
    """
    import json, sys, tempfile, time
    from dataclasses import replace
    import numpy as np
    from edgetl.bundle import read_bundle
    from edgetl.device._head import HeadState
    from edgetl.device._store import HeadStore
    bundle = read_bundle(sys.argv[1])
    commits, n = int(sys.argv[2]), int(sys.argv[3])
    factory = HeadState.factory(bundle)
    rng = np.random.default_rng(0)
    shape = tuple(bundle.input_spec.shape)
    times = []
    with tempfile.TemporaryDirectory(dir=sys.argv[4]) as d:
        store = HeadStore(d + "/store", bundle)
        for i in range(commits):
            x = rng.integers(0, 256, size=(n, *shape)).astype(np.float32)
            labels = [bundle.labels[j % len(bundle.labels)] for j in range(n)]
            head = replace(factory, W=factory.W + np.float32(i + 1))
            metrics = {"heldout_accuracy": 0.9, "example_labels": sorted(set(labels)), "examples": n}
            t0 = time.perf_counter()
            if hasattr(store, "keep_examples"):  # the directory store: two calls
                store.keep_examples(x, labels)
                store.commit(head, metrics)
            else:
                store.commit(head, metrics, examples=(x, labels))
            times.append(time.perf_counter() - t0)
    print(json.dumps(times))
    """
)


def time_commits(root: Path, bundle: Path, commits: int, examples: int, work: Path) -> list[float]:
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", TIMER, str(bundle), str(commits), str(examples), str(work)],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
    )
    if proc.returncode:
        raise SystemExit(f"timing under {root} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def summary(times: list[float]) -> str:
    import numpy as np

    ms = np.asarray(times) * 1000
    return f"median {np.median(ms):.2f} ms, p90 {np.percentile(ms, 90):.2f} ms over {len(ms)} commits"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--old-root", type=Path, help="a checkout of the old edgetl")
    parser.add_argument("--old-ref", default="e40bf7a", help="git ref of the old store (used without --old-root)")
    parser.add_argument("--commits", type=int, default=30)
    parser.add_argument("--examples", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:  # /tmp is the ext4 root disk here, not a tmpfs: check with df -T
        work = Path(d)
        old = args.old_root
        if old is None:
            old = work / "old"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.old_ref, "edgetl"], capture_output=True)
            if archive.returncode:
                raise SystemExit(archive.stderr.decode())
            with tarfile.open(fileobj=__import__("io").BytesIO(archive.stdout)) as tar:
                tar.extractall(old, filter="data")
        results = {}
        for name, root in (("old", old), ("new", ROOT)):  # alternated twice: drift on a shared machine hits both
            results[name] = time_commits(root, args.bundle.resolve(), args.commits, args.examples, work)
        for name, root in (("new", ROOT), ("old", old)):
            results[name] += time_commits(root, args.bundle.resolve(), args.commits, args.examples, work)
    for name in ("old", "new"):
        print(f"{name} store: {summary(results[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
