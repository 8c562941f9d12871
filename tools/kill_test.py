#!/usr/bin/env python
"""Kill a personalizing process at every step of a commit, and at random instants, and
check the whole head store after every kill.

    python tools/kill_test.py BUNDLE [--per-step 20] [--random 100] [--seed 0]
    python tools/kill_test.py BUNDLE --migrate-to NEW_BUNDLE [--per-step 10] [--random 100]

The child opens a store and commits new head versions, printing each committed version
number only after ``commit()`` returned. Two kinds of kill:

- **crash points**: ``EDGETL_CRASH_AT=K`` makes the store's file-system layer
  (``edgetl._atomic.FS``) stop before its K-th operation, print which one, and wait; the
  parent then sends SIGKILL. K runs over every step of a commit (after 0-2 complete
  commits, so the store grows), ``--per-step`` times each.
- **random**: SIGKILL after a random 0-50 ms.

With ``--migrate-to``, the child migrates a personalized store (two commits, kept
examples) to NEW_BUNDLE instead, from a fresh copy each time; after each kill the store must
open at the old bundle or the new one, every version verifying.

After each kill the store must open; its active version must not be older than the last
one the child reported committed; every version the history names (and every version on
the rollback stack) must pass its sha256 and hold exactly its own weights (``W`` = factory
+ the step recorded with it: a whole version, never a mix); and every other file must be a
temporary file of an interrupted write or an unreferenced version file. SIGKILL keeps the
page cache, so this checks the protocol's order, not durability: tools/power_loss.py
simulates power loss. tests/reliability runs a bounded sample.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from dataclasses import replace
    from edgetl import _atomic
    from edgetl.bundle import read_bundle
    from edgetl.device._head import HeadState
    from edgetl.device._store import HeadStore
    bundle = read_bundle(sys.argv[1], verify_hashes=False)
    store = HeadStore(sys.argv[2], bundle)
    head = HeadState.factory(bundle)
    print("ready", flush=True)
    while True:
        start = _atomic.FS.steps
        step = max([0, *(h.get("metrics", {}).get("step", 0) for h in store.history())]) + 1
        new = replace(head, W=head.W + np.float32(step), b=head.b + np.float32(step))
        version = store.commit(new, {"step": step})
        print(version, _atomic.FS.steps - start, flush=True)
    """
)
TEMP = re.compile(r"^\.(ACTIVE\.json|v\d{6}\.npz)\..+$")
VERSION = re.compile(r"^v(\d{6})\.npz$")


def check_store(store_dir: Path, bundle: Any, factory: Any, last_reported: int) -> dict[str, Any]:
    """Everything a kill could have damaged; raises AssertionError on damage. Returns the leftover file names."""
    from edgetl.device._store import HeadStore, live_versions

    store = HeadStore(store_dir, bundle)  # raises if the pointer is unreadable
    active = store.active()  # raises if its checksum fails
    assert active.number >= last_reported, f"active v{active.number} is older than committed v{last_reported}"
    pointer = store._read_pointer()
    named = live_versions(pointer["history"])
    for number, head in store.verified_versions().items():  # every version verifies
        expected = factory.W + np.float32(named[number]["metrics"]["step"])
        assert np.allclose(head.W, expected, atol=1e-3), f"version {number} holds another version's weights"
    for v in pointer["stack"]:
        assert v == 0 or v in named, f"rollback stack names v{v}, which has no commit record"
    assert pointer["active"] == 0 or pointer["active"] in named
    files = [p.name for p in store_dir.iterdir()]
    leftovers = set()
    for name in files:
        m = VERSION.match(name)
        if name == "ACTIVE.json" or (m and int(m.group(1)) in named):
            continue
        assert TEMP.match(name) or m, f"unexpected file {name!r} in the store"
        leftovers.add(name)
    return {"active": active.number, "leftovers": leftovers}


def _kill_once(bundle: Path, store_dir: Path, crash_at: int | None, delay: float) -> tuple[list[int], str, list[int]]:
    """Start a child, kill it (at its crash point, or after ``delay``); return the versions it
    reported, the step it was stopped at ('' for random kills) and its steps per commit."""
    env = {**os.environ, "EDGETL_CRASH_AT": str(crash_at)} if crash_at is not None else None
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(bundle), str(store_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready", "child failed to start"
    reported, steps, where = [], [], ""
    if crash_at is None:
        time.sleep(delay)
    else:
        for line in child.stdout:
            if line.startswith("crash-point"):
                _, _, op, name = line.split()
                where = f"{op} {re.sub(r'[0-9]+', 'N', name)}"
                break
            version, n = line.split()
            reported.append(int(version))
            steps.append(int(n))
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate()
    for line in out.splitlines():
        if line and not line.startswith("crash-point"):
            version, n = line.split()
            reported.append(int(version))
            steps.append(int(n))
    return reported, where, steps


def run(bundle: Path, store_dir: Path, *, per_step: int = 20, random_kills: int = 100, seed: int = 0) -> dict[str, Any]:
    """Kill at every step of a commit ``per_step`` times, then ``random_kills`` at random."""
    from edgetl.bundle import read_bundle
    from edgetl.device._head import HeadState

    b = read_bundle(bundle)
    factory = HeadState.factory(b)
    rng = np.random.default_rng(seed)
    # Steps of one commit: measured by a child that creates the store and commits a few
    # times (the first commit also creates the directory: its later commits are the norm).
    reported, _, steps = _kill_once(bundle, store_dir, crash_at=None, delay=1.0)
    assert len(steps) >= 2, "the probe child did not commit twice in a second"
    n_steps = steps[-1]
    last_reported, kills, commits = max(reported), Counter(), len(reported)
    leftovers: set[str] = set()
    plan = [k for k in range(1, n_steps + 1) for _ in range(per_step)] + [None] * random_kills
    for k in plan:
        crash_at = None if k is None else int(rng.integers(0, 3)) * n_steps + k
        reported, where, _ = _kill_once(bundle, store_dir, crash_at, float(rng.uniform(0.0, 0.05)))
        commits += len(reported)
        last_reported = max([last_reported, *reported])
        state = check_store(store_dir, b, factory, last_reported)
        leftovers.update(state["leftovers"])
        kills[f"step {k:>2}: {where}" if k is not None else "random instant"] += 1
    return {
        "kills": sum(kills.values()),
        "steps_per_commit": n_steps,
        "kills_per_step": dict(sorted(kills.items())),
        "commits_seen": commits,
        "final_version": last_reported,
        # Files of interrupted writes (never read; the names say what they are).
        "leftover_temporary_files": sum(1 for n in leftovers if TEMP.match(n)),
        "leftover_unreferenced_versions": sum(1 for n in leftovers if VERSION.match(n)),
    }


MIGRATE_CHILD = textwrap.dedent(
    """
    import sys
    from edgetl import _atomic
    from edgetl.bundle import read_bundle
    from edgetl.device._store import HeadStore
    old, new = read_bundle(sys.argv[1], verify_hashes=False), read_bundle(sys.argv[3], verify_hashes=False)
    store = HeadStore(sys.argv[2], old)
    print("ready", flush=True)
    start = _atomic.FS.steps
    # The guard's verdict is tested elsewhere (tests/device/test_lifecycle.py); margins of 1
    # make every run take the retraining path, which writes a version file and the pointer.
    result = store.migrate(new, margin=1.0, forget_margin=1.0)
    print("done", _atomic.FS.steps - start, result.kind, flush=True)
    """
)


def personalized_template(bundle: Any, path: Path) -> None:
    """A store with two committed heads and kept examples (digits restyled as a user's)."""
    from dataclasses import replace

    from edgetl.data import load_digits_dataset, restyle_digits
    from edgetl.device._head import HeadState
    from edgetl.device._store import HeadStore

    digits = load_digits_dataset(tuple(int(label) for label in bundle.labels))
    x = restyle_digits(digits.x[::6])
    labels = [digits.class_names[i] for i in digits.y[::6]]
    store = HeadStore(path, bundle)
    factory = HeadState.factory(bundle)
    for step in (1, 2):
        store.keep_examples(x[step::2], labels[step::2])
        store.commit(
            replace(factory, W=factory.W * (1 + 0.01 * step)), {"step": step, "example_labels": sorted(set(labels))}
        )


def _migrate_once(bundle: Path, new: Path, store: Path, crash_at: int | None, delay: float) -> tuple[str, list[str]]:
    env = {**os.environ, "EDGETL_CRASH_AT": str(crash_at)} if crash_at is not None else None
    child = subprocess.Popen(
        [sys.executable, "-c", MIGRATE_CHILD, str(bundle), str(store), str(new)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready", "child failed to start"
    where, done = "", []
    if crash_at is None:
        time.sleep(delay)
    else:
        line = child.stdout.readline()
        if line.startswith("crash-point"):
            _, _, op, name = line.split()
            where = f"{op} {re.sub(r'[0-9]+', 'N', name)}"
        elif line.startswith("done"):
            done = line.split()
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate()
    done = done or next((line.split() for line in out.splitlines() if line.startswith("done")), [])
    return where, done


def check_migrated(store_dir: Path, bundles: dict[str, Any]) -> str:
    """The store opens at the old or the new bundle, every named version verifying; returns which."""
    from edgetl.device._store import POINTER, HeadStore

    bundle_id = json.loads((store_dir / POINTER).read_text())["bundle_id"]
    assert bundle_id in bundles, "the pointer names neither the old bundle nor the new one"
    store = HeadStore(store_dir, bundles[bundle_id])
    store.active()
    store.verified_versions()
    pointer = store._read_pointer()
    kept = store.examples()
    if kept is not None:
        kept.examples()  # every kept segment passes its checksum
    return "new" if pointer["history"][-1]["action"] == "migrate" else "old"


def run_migration(
    bundle: Path, new: Path, work: Path, *, per_step: int = 10, random_kills: int = 100, seed: int = 0
) -> dict[str, Any]:
    """Kill ``store.migrate(new)`` at each of its steps ``per_step`` times and at random instants."""
    import shutil

    from edgetl.bundle import read_bundle
    from edgetl.device._store import bundle_identity

    old_b, new_b = read_bundle(bundle), read_bundle(new)
    bundles = {bundle_identity(old_b): old_b, bundle_identity(new_b): new_b}
    template, store = work / "template", work / "store"
    personalized_template(old_b, template)
    shutil.copytree(template, store)
    t0 = time.perf_counter()
    # One uninterrupted migration: its steps and duration (random kills land within it).
    child = subprocess.run(
        [sys.executable, "-c", MIGRATE_CHILD, str(bundle), str(store), str(new)], capture_output=True, text=True
    )
    done = next(line.split() for line in child.stdout.splitlines() if line.startswith("done"))
    seconds, n_steps, kind = time.perf_counter() - t0, int(done[1]), done[2]
    rng = np.random.default_rng(seed)
    kills, outcome = Counter(), Counter()
    plan = [k for k in range(1, n_steps + 1) for _ in range(per_step)] + [None] * random_kills
    for k in plan:
        shutil.rmtree(store)
        shutil.copytree(template, store)
        where, _ = _migrate_once(bundle, new, store, k, float(rng.uniform(0.0, seconds)))
        outcome[check_migrated(store, bundles)] += 1
        kills[f"step {k:>2}: {where}" if k is not None else "random instant"] += 1
    return {
        "kills": sum(kills.values()),
        "migration": kind,
        "steps_per_migration": n_steps,
        "kills_per_step": dict(sorted(kills.items())),
        "opened_at": dict(outcome),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--per-step", type=int, default=20, help="kills at each step of the protocol")
    parser.add_argument("--random", type=int, default=100, help="kills at random instants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--migrate-to", type=Path, help="kill migrations of a personalized store to this bundle")
    args = parser.parse_args()
    t0 = time.perf_counter()
    options = {"per_step": args.per_step, "random_kills": args.random, "seed": args.seed}
    with tempfile.TemporaryDirectory() as d:
        try:
            if args.migrate_to:
                stats = run_migration(args.bundle, args.migrate_to, Path(d), **options)
            else:
                stats = run(args.bundle, Path(d) / "store", **options)
        except AssertionError as exc:
            print(f"FAIL: {exc}")
            return 1
    for where, n in stats["kills_per_step"].items():
        print(f"  {n:>4} kills at {where}")
    print(json.dumps({k: v for k, v in stats.items() if k != "kills_per_step"}))
    what = "opens at the old or the new bundle" if args.migrate_to else "opens, no committed version lost"
    seconds = time.perf_counter() - t0
    print(f"{stats['kills']} kills, every one checked (store {what}, every version verifies), in {seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
