#!/usr/bin/env python
"""SIGKILL a process committing to the SQLite store, at random instants and at every
write-path system call of a commit, and check the whole store after every kill.

    python tools/kill_test.py BUNDLE [--random 300] [--per-step 1] [--seed 0] [--tail 1024x64]

The child opens a store and commits new head versions (each with a few new kept examples),
printing each committed version number only after ``commit()`` returned. Two kinds of kill:

- **random**: SIGKILL after a random 0-50 ms once the child is ready (the default: 300).
- **crash points** (needs strace): ``strace -e inject=SYSCALL:signal=KILL:when=N`` kills
  the child as it enters the N-th fsync/fdatasync/pwrite64/openat/unlink/ftruncate on the
  store's files, for every N of one commit (after 0-2 complete commits), ``--per-step``
  times each.

After each kill the store must open; pass SQLite's integrity check; its active version must
not be older than the last one the child reported; every version must pass its sha256 and
hold exactly its own weights (``W`` = factory + the step recorded in its commit: a whole
version, never a mix; with ``--tail``, its own whole tail layer in the ``tails`` table too);
the history must name exactly the stored versions; the rollback stack
only stored versions; and every kept example must pass its sha256, each commit's examples
kept whole or not at all. SIGKILL keeps the page cache, so this checks that the store is
consistent at every instant, not durability (SQLite's own tests cover power loss).
tests/reliability runs a bounded sample.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXAMPLES_PER_COMMIT = 3
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
    tail_shape = tuple(int(n) for n in sys.argv[3].split("x")) if sys.argv[3] != "none" else None
    print("ready", flush=True)
    while True:
        step = max([0, *(h.get("metrics", {}).get("step", 0) for h in store.history())]) + 1
        new = replace(head, W=head.W + np.float32(step), b=head.b + np.float32(step))
        if tail_shape:  # a trained tail layer too: its table row is written in the same transaction
            new = replace(new, tail={"W1": np.full(tail_shape, step, np.float32),
                                     "b1": np.full(tail_shape[1:], -step, np.float32)})
        x = np.full((3, *bundle.input_spec.shape), step % 256, np.uint8)
        x[:, 0] = np.arange(3)[:, None, None] if x.ndim == 4 else np.arange(3)[:, None]
        x[:, -1] = step // 256
        version = store.commit(new, {"step": step}, examples=(x, [f"s{step}"] * 3))
        print(version, flush=True)
    """
)
SYSCALLS = ("fsync", "fdatasync", "pwrite64", "openat", "unlink", "ftruncate")


def check_store(
    store_dir: Path, bundle: Any, factory: Any, last_reported: int, tail_shape: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Everything a kill could have damaged; raises AssertionError (or StoreError) on damage.
    ``tail_shape``: every version was committed with a tail layer of that shape (its own step's)."""
    from edgetl.device._store import HeadStore

    store = HeadStore(store_dir, bundle)
    active = store.active()  # raises if its checksum fails
    assert active.number >= last_reported, f"active v{active.number} is older than committed v{last_reported}"
    versions = store.verified_versions()  # integrity check + every version's sha256
    commits = {h["version"]: h["metrics"]["step"] for h in store.history() if h["action"] == "commit"}
    assert set(commits) == set(versions), f"history names {sorted(commits)}, the store holds {sorted(versions)}"
    for number, head in versions.items():
        expected = factory.W + np.float32(commits[number])
        assert np.allclose(head.W, expected, atol=1e-3), f"version {number} holds another version's weights"
        _check_tail(number, head.tail, commits[number], tail_shape)
    stack = store.rollback_stack()
    assert all(v == 0 or v in versions for v in stack), f"rollback stack {stack} names a version not stored"
    _, labels = store.kept_examples()  # every example's sha256
    per_commit = Counter(labels)
    assert all(n == EXAMPLES_PER_COMMIT for n in per_commit.values()), f"a commit's examples kept in part: {per_commit}"
    assert set(per_commit) == {f"s{step}" for step in commits.values()}, "kept examples and commits differ"
    return {"active": active.number, "versions": len(versions)}


def _check_tail(number: int, tail: dict | None, step: int, shape: tuple[int, int] | None) -> None:
    """A version holds its own whole tail layer (W1 = step, b1 = -step) or, committed without one, none."""
    if shape is None:
        assert tail is None, f"version {number} was committed without a tail layer and has one"
        return
    assert tail is not None, f"version {number} lost its tail layer"
    assert tail["W1"].shape == shape and tail["b1"].shape == shape[1:], f"version {number}'s tail has another shape"
    whole = np.all(tail["W1"] == step) and np.all(tail["b1"] == -step)
    assert whole, f"version {number}'s tail layer holds another version's weights or a mix"


def _strace(store: Path, syscalls: str, n: int | None) -> list[str]:
    """strace on the store's files; with ``n``, SIGKILL at the n-th call of ``syscalls``."""
    paths = [store, *(store / f"store.db{s}" for s in ("", "-wal", "-shm", "-journal"))]
    cmd = [
        "strace",
        "-f",
        "-qq",
        "-o",
        os.devnull,
        *(a for p in paths for a in ("-P", str(p))),
        "-e",
        f"trace={syscalls}",
    ]
    return cmd + (["-e", f"inject={syscalls}:signal=KILL:when={n}"] if n else [])


def _tail_arg(tail_shape: tuple[int, int] | None) -> str:
    return "x".join(map(str, tail_shape)) if tail_shape else "none"


def _kill_once(
    bundle: Path,
    store: Path,
    delay: float,
    crash: tuple[str, int] | None = None,
    tail_shape: tuple[int, int] | None = None,
) -> list[int]:
    """Start a child, kill it (after ``delay``, or strace kills it at ``crash``); return the versions it reported."""
    prefix = _strace(store, *crash) if crash else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [*prefix, sys.executable, "-c", CHILD, str(bundle), str(store), _tail_arg(tail_shape)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    reported = []
    if child.stdout.readline().strip() != "ready":  # strace may kill it while it opens the store
        child.wait()
        return []
    if crash is None:
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    else:
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.kill()
    out, _ = child.communicate()
    reported += [int(line) for line in out.split() if line.isdigit()]
    return reported


def commit_syscalls(
    bundle: Path, work: Path, tail_shape: tuple[int, int] | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """Per write-path syscall, how many calls one commit makes on an existing store, and how
    many the child makes before its first commit (from strace's count of runs with 1 and 2 commits)."""
    store = work / "probe"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = CHILD.replace("while True:", "for _ in range(COMMITS):")
    tail = _tail_arg(tail_shape)
    subprocess.run([sys.executable, "-c", script.replace("COMMITS", "1"), str(bundle), str(store), tail], env=env,
                   check=True, capture_output=True)  # fmt: skip
    counts = []
    for commits in (1, 2):
        probe = work / f"probe{commits}"
        shutil.copytree(store, probe)
        log = work / "count.txt"
        cmd = [*_strace(probe, ",".join(SYSCALLS), None), "-o", str(log), sys.executable, "-c",
               script.replace("COMMITS", str(commits)), str(bundle), str(probe), tail]  # fmt: skip
        subprocess.run(cmd, capture_output=True, env=env, check=True)
        counts.append(Counter(re.findall(r"^\d+\s+(\w+)\(", log.read_text(), re.M)))
    per = {sc: counts[1][sc] - counts[0][sc] for sc in SYSCALLS if counts[1][sc] > counts[0][sc]}
    return per, {sc: counts[0][sc] - per[sc] for sc in per}


def run(
    bundle: Path,
    work: Path,
    *,
    random_kills: int = 300,
    per_step: int = 0,
    seed: int = 0,
    sample: int | None = None,
    tail_shape: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``random_kills`` at random instants, then (``per_step`` > 0, needs strace) at every
    syscall of a commit; ``sample``: only the first and last call of each kind and random
    others, that many in all (a bounded run). ``tail_shape``: every commit also stores a
    tail layer of that shape (the ``tails`` table's row, in the same transaction)."""
    from edgetl.bundle import read_bundle
    from edgetl.device._head import HeadState

    b = read_bundle(bundle)
    factory = HeadState.factory(b)
    rng = np.random.default_rng(seed)
    store = work / "store"
    _kill_once(bundle, store, 1.0, tail_shape=tail_shape)  # a store with a few commits: kills then hit an existing one
    plan: list[tuple[str, int] | None] = [None] * random_kills
    per_commit, base = commit_syscalls(bundle, work, tail_shape) if per_step else ({}, {})
    points = [(sc, k) for sc, n in per_commit.items() for k in range(1, n + 1)]
    if sample is not None and sample < len(points):
        ends = {(sc, k) for sc, n in per_commit.items() for k in (1, n)}
        others = [p for p in points if p not in ends]
        extra = rng.choice(len(others), size=max(sample - len(ends), 0), replace=False)
        points = sorted(ends | {others[i] for i in extra})
    plan += [p for p in points for _ in range(per_step)]
    last, kills, commits = 0, Counter(), 0
    for crash in plan:
        if crash is not None:  # a commit's k-th call, after 0-2 complete commits
            crash = (crash[0], base[crash[0]] + int(rng.integers(0, 3)) * per_commit[crash[0]] + crash[1])
        reported = _kill_once(bundle, store, float(rng.uniform(0.0, 0.05)), crash, tail_shape)
        commits += len(reported)
        last = max([last, *reported])
        check_store(store, b, factory, last, tail_shape)
        kills["random instant" if crash is None else f"{crash[0]} of a commit"] += 1
    return {"kills": sum(kills.values()), "kills_by_kind": dict(kills), "commits_seen": commits,
            "final_version": last, "syscalls_per_commit": per_commit}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--random", type=int, default=300, help="kills at random instants")
    parser.add_argument("--per-step", type=int, default=1, help="kills at each write-path syscall of a commit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tail",
        metavar="ROWSxCOLS",
        help="every commit also stores a trained tail layer of this shape (e.g. 1024x64, the demo CNN's)",
    )
    args = parser.parse_args()
    tail_shape = tuple(int(n) for n in args.tail.split("x")) if args.tail else None
    if args.per_step and shutil.which("strace") is None:
        print("strace is not installed (apt-get install strace); use --per-step 0")
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        try:
            stats = run(
                args.bundle, Path(d), random_kills=args.random, per_step=args.per_step, seed=args.seed,
                tail_shape=tail_shape,
            )  # fmt: skip
        except AssertionError as exc:
            print(f"FAIL: {exc}")
            return 1
    print(json.dumps(stats))
    seconds = time.perf_counter() - t0
    print(f"{stats['kills']} kills, every one checked (store opens, no committed version lost, every version and "
          f"example verifies), 0 stores lost, in {seconds:.0f}s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
