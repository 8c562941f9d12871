#!/usr/bin/env python
"""Inject I/O errors into every write-path system call of the store's five operations, with
strace, and check each outcome through the CLI alone.

    python tools/fault_inject.py BUNDLE NEW_BUNDLE DATA.npz [--ops personalize,rollback] [--limit N] [--adapt tail]

strace (an independent tool: ``apt-get install strace``) runs the real ``edgetl`` command
and makes the N-th call of one system call fail: ``-e inject=SYSCALL:error=EIO:when=N``,
for every N the uninjected run makes of fsync, fdatasync, pwrite64, write, openat, rename,
unlink and ftruncate on the store's files (``-P``: the directory, the database, its WAL,
shared memory and journal) and on the command's report (stdout, redirected to a file), and
ENOSPC for the writes (pwrite64, write, ftruncate). The five operations, each from a fresh
copy of a store with two commits and kept examples: ``personalize`` (new examples),
``store rollback``, ``store reset``, ``store migrate NEW_BUNDLE``, ``store forget --label``.
With ``--adapt tail`` (a BUNDLE with a trainable tail) every personalization, the template's
two included, commits a head and tail layer: the ``tails`` table's row is written in each
commit, carried by a migration to a NEW_BUNDLE with the same tail, removed by a forget, and
``store verify`` names the versions that hold one.

After each case, through the CLI only (``store history``, ``store verify``): no traceback;
the state is the one before or the one after the operation (history, active version,
rollback stack, versions, kept examples per class); ``store verify`` passes (SQLite's
integrity check, every version's and every example's sha256); the message is true (an
error saying "nothing changed" leaves the state before; success, or an error saying the
work was committed, leaves the state after); and when the state is the one before, an
uninjected rerun reaches the uninjected after-state. Exit 1 if any case fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSCALLS = ("fsync", "fdatasync", "pwrite64", "write", "openat", "rename", "unlink", "ftruncate")
WRITES = ("pwrite64", "write", "ftruncate")
OPS = ("personalize", "rollback", "reset", "migrate", "forget")
BEFORE_WORDS = ("nothing changed", "nothing was changed")
AFTER_WORDS = ("committed",)
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Setup:
    bundle: Path
    new_bundle: Path
    data: Path  # the examples the personalize operation adds
    template: Path  # a store with two commits and kept examples
    work: Path
    adapt: str = "head"  # what personalize trains (personalize --adapt): "tail" writes the tails table too


def edgetl(*args: str, stdout: Any = subprocess.PIPE, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [*prefix, sys.executable, "-m", "edgetl.cli", *args]
    return subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, timeout=600)


def op_args(op: str, s: Setup, store: Path) -> list[str]:
    if op == "personalize":
        # The guard opened (the sweep is about the store's writes: a commit's), what trains as asked.
        return ["personalize", str(s.bundle), "--data", str(s.data), "--store", str(store), "--margin", "1",
                "--forget-margin", "1", "--mislabel", "off", "--adapt", s.adapt]  # fmt: skip
    extra = {"migrate": [str(s.new_bundle)], "forget": ["--label", "7"]}.get(op, [])
    return ["store", op, "--store", str(store), *extra]


def state(store: Path) -> tuple[str, str]:
    """(the state, a problem or ''), read through the CLI: history without times, and verify."""
    history, verify = (
        edgetl("store", "history", "--store", str(store)),
        edgetl("store", "verify", "--store", str(store)),
    )
    for proc in (history, verify):
        if proc.returncode != 0 or "Traceback" in proc.stderr:
            return "", f"store does not open or verify: {proc.stderr.strip()[-300:]}"
    lines = [re.sub(r"^\S+Z  ", "", line) for line in history.stdout.splitlines()]
    return "\n".join(lines + verify.stdout.splitlines()), ""


def fresh(s: Setup, name: str) -> Path:
    store = s.work / name
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(s.template, store)
    return store


def trace_counts(s: Setup, op: str) -> tuple[Counter, str]:
    """How often the uninjected operation makes each system call on the store's files, and its after-state."""
    store = fresh(s, "probe")
    log = s.work / "trace.txt"
    report = s.work / "report.txt"
    with open(report, "w") as out:
        proc = edgetl(*op_args(op, s, store), stdout=out, prefix=strace(store, report, log, None))
    assert proc.returncode in (0, 3), f"{op} failed without faults: {proc.stderr[-500:]}"
    counts = Counter(m.group(1) for m in re.finditer(r"^\d+\s+(\w+)\(", log.read_text(), re.M))
    after, problem = state(store)
    assert not problem, problem
    return counts, after


def strace(store: Path, report: Path, log: Path | None, inject: str | None) -> tuple[str, ...]:
    paths = [store, *(store / f"store.db{suffix}" for suffix in ("", "-wal", "-shm", "-journal")), report]
    cmd = ["strace", "-f", "-qq", "-e", f"trace={','.join(SYSCALLS)}", "-o", str(log or os.devnull)]
    cmd += [arg for p in paths for arg in ("-P", str(p))]
    return (*cmd, "-e", f"inject={inject}") if inject else tuple(cmd)


def run_case(s: Setup, op: str, case: tuple[str, str, int], before: str, after: str) -> str:
    """One injected run (``case``: syscall, error, occurrence) and its checks; returns what
    went wrong, or "ok: " and the outcome (the state before, after with success, or after
    with an error saying it committed)."""
    syscall, error, n = case
    name = f"case-{op}-{syscall}-{error}-{n}"
    store, report = fresh(s, name), s.work / f"{name}.txt"
    with open(report, "w") as out:
        proc = edgetl(
            *op_args(op, s, store), stdout=out, prefix=strace(store, report, None, f"{syscall}:error={error}:when={n}")
        )
    if "Traceback" in proc.stderr or proc.returncode == 1:
        return f"traceback or unexpected failure: {proc.stderr.strip()[-400:]}"
    now, problem = state(store)
    if problem:
        return problem
    if now not in (before, after):
        return "the state is neither the one before nor the one after"
    failed = proc.returncode not in (0, 3)
    says_before = failed and any(w in proc.stderr for w in BEFORE_WORDS)
    says_after = not failed or any(w in proc.stderr for w in AFTER_WORDS)
    if says_before and now != before:
        return f"says nothing changed, but the state is the one after: {proc.stderr.strip()[-300:]}"
    if says_after and now != after:
        return f"{'succeeded' if not failed else 'says committed'}, but the state is the one before"
    if failed and not (says_before or says_after):
        return f"the message says neither what changed nor that nothing did: {proc.stderr.strip()[-300:]}"
    if now == before:
        rerun = edgetl(*op_args(op, s, store))
        if rerun.returncode not in (0, 3) or state(store)[0] != after:
            return f"an uninjected rerun did not reach the after-state: {rerun.stderr.strip()[-300:]}"
    shutil.rmtree(store)
    if now == before:
        return "ok: before (the operation failed and said nothing changed; a rerun completed it)"
    return "ok: after, reported as done" if not failed else "ok: after, error says it was committed"


def make_template(bundle: Path, data: Path, work: Path, adapt: str = "head") -> tuple[Path, Path]:
    """Two commits with kept examples (two thirds of DATA; ``adapt``: what they train);
    returns (template, the last third)."""
    import numpy as np

    with np.load(data) as z:
        x, y = z["x"], z["y"]
    thirds = np.array_split(np.arange(len(x)), 3)
    template = work / "template"
    for i, part in enumerate(thirds):
        np.savez(work / f"part{i}.npz", x=x[part], y=y[part])
    for i in (0, 1):
        setup = Setup(bundle, bundle, work / f"part{i}.npz", template, work, adapt)
        proc = edgetl(*op_args("personalize", setup, template))
        assert proc.returncode == 0, proc.stderr[-500:]
    return template, work / "part2.npz"


def sweep(
    s: Setup,
    ops: list[str],
    limit: int | None = None,
    jobs: int = 1,
    echo: Any = print,
    faults: list[tuple[str, str]] | None = None,
    picked: list[tuple[str, str, int]] | None = None,
) -> dict[str, Any]:
    """Every case (or, with ``limit``, at most that many occurrences per syscall, spread over
    the run); ``faults``: only these (syscall, error) pairs (default: all); ``picked``: only
    these (syscall, error, occurrence) cases, a negative occurrence counting from the last, a
    fraction in (0, 1) at that share of the calls (0.5: the middle one)."""
    faults = faults or [(sc, err) for sc in SYSCALLS for err in ("EIO", "ENOSPC") if err == "EIO" or sc in WRITES]
    results: dict[str, Any] = {"cases": 0, "failures": [], "by_op": {}, "outcomes": Counter()}
    before, _ = state(fresh(s, "before"))
    for op in ops:
        counts, after = trace_counts(s, op)
        cases = [(sc, err, n) for sc, err in faults for n in spread(counts.get(sc, 0), limit)]
        if picked is not None:
            cases = [(sc, err, occurrence(n, counts[sc])) for sc, err, n in picked if counts.get(sc)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:  # each case in its own store copy
            problems = list(pool.map(lambda case: run_case(s, op, case, before, after), cases))
        for (syscall, error, n), problem in zip(cases, problems):
            results["outcomes"][problem if problem.startswith("ok") else problem.split(":")[0]] += 1
            if not problem.startswith("ok"):
                results["failures"].append(f"{op} {syscall}:{error}:when={n}: {problem}")
                echo(f"FAIL {results['failures'][-1]}")
        results["by_op"][op] = {"cases": len(cases), "syscalls": dict(counts), "seconds": time.perf_counter() - t0}
        results["cases"] += len(cases)
        echo(f"{op}: {len(cases)} cases over {dict(counts)} in {time.perf_counter() - t0:.0f}s")
    return results


def occurrence(n: float, count: int) -> int:
    """The call a picked case means: ``n`` >= 1 itself, negative from the last, a fraction that share of ``count``."""
    if 0 < n < 1:
        return max(1, round(n * count))
    return int(n) if n >= 1 else count + 1 + int(n)


def spread(count: int, limit: int | None) -> list[int]:
    if limit is None or count <= limit:
        return list(range(1, count + 1))
    return sorted({1 + round(i * (count - 1) / max(limit - 1, 1)) for i in range(limit)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("new_bundle", type=Path, help="the bundle `store migrate` moves to")
    parser.add_argument("data", type=Path, help=".npz with x and y: the user's examples")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--limit", type=int, help="at most this many occurrences per syscall (default: every one)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    parser.add_argument(
        "--adapt", choices=("head", "tail"), default="head", help="tail: every personalization commits a tail layer"
    )
    args = parser.parse_args()
    if shutil.which("strace") is None:
        print("strace is not installed: apt-get install strace")
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        template, part = make_template(args.bundle, args.data, work, args.adapt)
        s = Setup(args.bundle, args.new_bundle, part, template, work, args.adapt)
        results = sweep(s, args.ops.split(","), args.limit, args.jobs)
    print(
        json.dumps({"cases": results["cases"], "outcomes": results["outcomes"], "failures": len(results["failures"])})
    )
    print(f"{results['cases']} cases, {len(results['failures'])} failures, in {time.perf_counter() - t0:.0f}s")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
