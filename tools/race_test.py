#!/usr/bin/env python
"""Several processes personalize, roll back and forget on ONE store at the same time.

    python tools/race_test.py BUNDLE DATA.npz [--procs 4] [--ops 50] [--seed 0]

Each worker process opens the bundle once, then runs ``--ops`` operations chosen at random:
personalize (a random third of DATA, guard margins of 1 so every candidate commits), store
rollback, and forget of a random label. It records what succeeded (the committed version
numbers, the versions each forget removed); the only error allowed is "nothing to roll
back". Afterwards: every stored version opens and verifies (SQLite's integrity check and
each version's sha256), the history's commits are exactly the commits the workers saw
succeed, the stored versions are exactly those minus the ones forgets removed, and every
kept example verifies. Exit 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(bundle: str, store: str, data: str, ops: int, seed: int, out: Any) -> None:
    from edgetl.device import Classifier, Personalizer
    from edgetl.device._head import TrainSettings
    from edgetl.device._store import HeadStore
    from edgetl.errors import StoreError

    rng = np.random.default_rng(seed)
    with np.load(data) as z:
        x, y = z["x"], [str(v) for v in z["y"]]
    clf = Classifier.open(bundle, backend="onnxruntime", threads=1)
    done: dict[str, list] = {"commits": [], "removed": [], "errors": []}
    for _ in range(ops):
        kind = rng.choice(["personalize", "personalize", "rollback", "forget"])
        try:
            if kind == "personalize":
                pick = np.sort(rng.choice(len(x), size=max(len(x) // 3, 2), replace=False))
                p = Personalizer(clf, store, margin=1.0, forget_margin=1.0, settings=TrainSettings(epochs=3))
                done["commits"].append(p.personalize(x[pick], [y[i] for i in pick]).version)
            elif kind == "rollback":
                HeadStore(store, clf.bundle).rollback()
            else:
                done["removed"] += HeadStore(store, clf.bundle).forget(str(rng.choice(sorted(set(y)))))["versions"]
        except StoreError as exc:
            if "nothing to roll back" not in str(exc) and "forget committed" not in str(exc):
                done["errors"].append(f"{kind}: {exc}")
    out.put(done)


def run(bundle: Path, data: Path, store: Path, *, procs: int = 4, ops: int = 50, seed: int = 0) -> dict[str, Any]:
    from edgetl.bundle import read_bundle
    from edgetl.device._store import HeadStore

    ctx = mp.get_context("spawn")  # no state shared with the parent: separate processes, as on a device
    queue = ctx.Queue()
    workers = [
        ctx.Process(target=worker, args=(str(bundle), str(store), str(data), ops, seed * 100 + i, queue))
        for i in range(procs)
    ]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    results = [queue.get(timeout=3600) for _ in workers]
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    commits = sorted(v for r in results for v in r["commits"])
    reported_removed = {v for r in results for v in r["removed"]}
    errors = [e for r in results for e in r["errors"]]
    s = HeadStore(store, read_bundle(bundle))
    versions = s.verified_versions()  # every stored version opens and verifies
    history = s.history()
    in_history = sorted(h["version"] for h in history if h["action"] == "commit")
    removed = {v for h in history if h["action"] == "forget" for v in h["versions_removed"]}
    problems = list(errors)
    if not reported_removed <= removed:
        problems.append(f"forgets reported removing {sorted(reported_removed - removed)}, the history does not say so")
    if in_history != commits:
        problems.append(f"history commits {in_history} != the commits that succeeded {commits}")
    if sorted(versions) != sorted(set(commits) - removed):
        problems.append(f"stored versions {sorted(versions)} != committed minus forgotten")
    s.kept_examples()  # every kept example verifies
    return {
        "procs": procs,
        "ops": procs * ops,
        "commits": len(commits),
        "forgotten_versions": len(removed),
        "rollbacks": sum(h["action"] == "rollback" for h in history),
        "forgets": sum(h["action"] == "forget" for h in history),
        "stored_versions": len(versions),
        "problems": problems,
        "seconds": round(seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("data", type=Path, help=".npz with x and y (labels of the bundle)")
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--ops", type=int, default=50, help="operations per process")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        stats = run(args.bundle, args.data, Path(d) / "store", procs=args.procs, ops=args.ops, seed=args.seed)
    print(json.dumps(stats))
    print(f"{'FAIL' if stats['problems'] else 'PASS'}: {stats['procs']} processes x {args.ops} operations")
    return 1 if stats["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
