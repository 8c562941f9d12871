#!/usr/bin/env python
"""Cut the power at every step of every store operation and check what survives.

    python tools/power_loss.py BUNDLE [--same SAME_BACKBONE_BUNDLE] [--other OTHER_BUNDLE] [--worlds 4]

The head store (``edgetl/device/_store.py``), the example store and the lifecycle write only
through ``edgetl._atomic.FS``. Here it is a :class:`SimulatedFS`: every operation really
happens on disk, and a model records what a power cut would keep: file data only once the
file is fsynced, directory entries (creations, renames, unlinks) only once the directory is
fsynced. For each scenario (commit, keeping examples, rollback, reset, forget, migration)
the operation runs once to count its steps N, then once per crash point k = 1..N+1 from the
same starting store, stopping before step k (k = N+1: after it returned). Each crash leaves
several worlds, materialized as real directories and opened with the real store:

- ``durable``: only what was fsynced;
- ``everything``: all that was written (what SIGKILL leaves: the page cache survives);
- ``torn-S``: per directory a random prefix of its unsynced entry changes, per file its
  durable data, its written data, or a torn mix (seeded).

In every world the store must open (finishing an interrupted forget), every version its
history names must pass its checksum, and its state (bundle, active version, rollback
stack, history, active weights, kept examples) must be the state before the operation or
after it. After the operation returned (k = N+1) the durable world must be exactly the live
directory (nothing the caller was told is done can be lost) and, after a forget, no durable
block anywhere (reachable or not) may still hold the forgotten files' bytes.

``--drop-fsync`` proves each fsync is needed: for every fsync call site the scenarios
exercise, the run is repeated with that one fsync skipped and must find a failure.
tests/reliability/test_power_loss.py runs all of it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgetl import _atomic  # noqa: E402


class PowerCut(BaseException):
    """The machine lost power: no handler may run more file operations (BaseException, so
    ``except Exception``/``except OSError`` in the code under test cannot swallow it)."""


def _call_site() -> str:
    """Where the current fsync was asked for: the first frame outside the FS layer."""
    frame = sys._getframe(2)
    while frame is not None:
        name = Path(frame.f_code.co_filename).name
        if name != Path(__file__).name and not (name == "_atomic.py" and frame.f_code.co_name == "fsync_dir"):
            return f"{name}:{frame.f_code.co_name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class SimulatedFS(_atomic.FileSystem):
    """The real file system plus a model of what is durable (see the module docstring).

    Args:
        root: the directory holding the store; its contents at construction are durable.
        crash_at: stop before this step (1-based); ``None`` runs to the end.
        drop: an fsync call site (``_call_site()`` format) whose fsyncs are skipped.
    """

    def __init__(self, root: Path, crash_at: int | None = None, drop: str | None = None) -> None:
        super().__init__()
        self._crash_at = None  # never the environment hook
        self.root, self.crash_point, self.drop = Path(root), crash_at, drop
        self.ops: list[str] = []
        self.sites: Counter[str] = Counter()
        self.cur: dict[str, dict[str, tuple[str, Any]]] = {}
        self.dur: dict[str, dict[str, tuple[str, Any]]] = {}
        self.pending: dict[str, list[tuple[str, str, Any]]] = {}
        self.data: dict[int, bytearray] = {}
        self.ddata: dict[int, bytes] = {}
        self.fds: dict[int, int] = {}
        self._snapshot(self.root)

    def _snapshot(self, d: Path) -> None:
        key = str(d)
        self.cur[key], self.pending[key] = {}, []
        for p in sorted(d.iterdir()):
            if p.is_dir():
                self.cur[key][p.name] = ("d", str(p))
                self._snapshot(p)
            else:
                fid = len(self.data)
                self.data[fid], self.ddata[fid] = bytearray(p.read_bytes()), p.read_bytes()
                self.cur[key][p.name] = ("f", fid)
        self.dur[key] = dict(self.cur[key])

    # -- every operation: count it, crash when it is the chosen one
    def _step(self, op: str, path: Any) -> None:
        self.steps += 1
        if self.crash_point is not None and self.steps >= self.crash_point:
            raise PowerCut(f"power cut before step {self.steps} ({op})")
        self.ops.append(f"{op} {Path(str(path)).name}")

    def _entry(self, d: str, name: str, value: tuple[str, Any] | None) -> None:
        if value is None:
            self.cur[d].pop(name, None)
        else:
            self.cur[d][name] = value
        self.pending[d].append((name, value))

    def create_temp(self, directory: Path, prefix: str) -> tuple[int, str]:
        fd, path = super().create_temp(directory, prefix)
        fid = len(self.data)
        self.data[fid], self.ddata[fid] = bytearray(), b""
        self.fds[fd] = fid
        self._entry(str(Path(path).parent), Path(path).name, ("f", fid))
        return fd, path

    def open_existing(self, path: Path) -> int:
        fd = super().open_existing(path)
        self.fds[fd] = self.cur[str(Path(path).parent)][Path(path).name][1]
        return fd

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        super().pwrite(fd, data, offset)
        buf = self.data[self.fds[fd]]
        if len(buf) < offset + len(data):
            buf.extend(bytes(offset + len(data) - len(buf)))
        buf[offset : offset + len(data)] = data

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        site = _call_site()
        self.sites[site] += 1
        if site != self.drop:
            self.ddata[self.fds[fd]] = bytes(self.data[self.fds[fd]])

    def close(self, fd: int) -> None:
        super().close(fd)
        self.fds.pop(fd, None)

    def rename(self, src: Any, dst: Any) -> None:
        super().rename(src, dst)
        src, dst = Path(src), Path(dst)
        assert src.parent == dst.parent, "the store renames within a directory"
        self._entry(str(dst.parent), dst.name, self.cur[str(src.parent)][src.name])
        self._entry(str(src.parent), src.name, None)

    def unlink(self, path: Any) -> None:
        super().unlink(path)
        self._entry(str(Path(path).parent), Path(path).name, None)

    def mkdir(self, path: Path, mode: int) -> None:
        super().mkdir(path, mode)
        self.cur[str(path)], self.dur[str(path)], self.pending[str(path)] = {}, {}, []
        self._entry(str(Path(path).parent), Path(path).name, ("d", str(path)))

    def fsync_dir(self, path: Any) -> None:
        super().fsync_dir(path)
        site = _call_site()
        self.sites[site] += 1
        if site != self.drop:
            self.dur[str(path)] = dict(self.cur[str(path)])
            self.pending[str(path)] = []

    # -- what a power cut leaves
    def materialize(self, out: Path, world: str) -> None:
        """Write the world ``world`` (durable, everything, torn-SEED) as a real directory."""
        rng = random.Random(world)

        def entries(d: str) -> dict[str, tuple[str, Any]]:
            if world == "everything":
                return self.cur.get(d, {})
            e = dict(self.dur.get(d, {}))
            if world.startswith("torn"):
                changes = self.pending.get(d, [])
                for name, value in changes[: rng.randint(0, len(changes))]:
                    if value is None:
                        e.pop(name, None)
                    else:
                        e[name] = value
            return e

        def content(fid: int) -> bytes:
            new, old = bytes(self.data[fid]), self.ddata[fid]
            if world == "everything":
                return new
            if world == "durable" or new == old:
                return old
            choice = rng.choice(("old", "new", "torn"))
            if choice != "torn":
                return old if choice == "old" else new
            cut = rng.randint(0, len(new))
            return new[:cut] + old[cut : len(new)]

        def write(d: str, target: Path) -> None:
            target.mkdir(parents=True, exist_ok=True)
            for name, (kind, ref) in entries(d).items():
                if kind == "d":
                    write(ref, target / name)
                else:
                    (target / name).write_bytes(content(ref))

        write(str(self.root), out)

    def durable_blobs(self) -> list[bytes]:
        """Every file's durable data, reachable or not (what the disk's blocks still hold)."""
        return list(self.ddata.values())


# ----------------------------------------------------------------------------- observing


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (but flock files) and the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "LOCK"
    }


def observe(store_path: Path, bundles: dict[str, Any]) -> dict[str, Any]:
    """Open the store the way a device would and describe its state; raises if it cannot."""
    from edgetl.device._store import POINTER, HeadStore

    if not (store_path / POINTER).exists():
        return {"store": None}
    raw = json.loads((store_path / POINTER).read_text())
    store = HeadStore(store_path, bundles[raw["bundle_id"]])  # finishes an interrupted forget
    store.verified_versions()  # every named version verifies
    pointer = store._read_pointer()
    active = store.active()
    examples = store.examples()
    kept = None
    if examples is not None:
        x, labels = examples.examples()
        kept = sorted(f"{label}:{hashlib.sha256(row.tobytes()).hexdigest()}" for row, label in zip(x, labels))
    history = [{k: v for k, v in h.items() if k != "time"} for h in pointer["history"]]
    return {
        "store": pointer["bundle_id"],
        "active": pointer["active"],
        "stack": pointer["stack"],
        "history": history,
        "W": active.head.W,
        "examples": kept,
    }


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if k == "W":
            if a[k].shape != b[k].shape or not np.allclose(a[k], b[k], atol=1e-5):
                return False
        elif json.dumps(a[k], sort_keys=True) != json.dumps(b[k], sort_keys=True):
            return False
    return True


def _brief(state: dict[str, Any]) -> str:
    if state.get("store") is None:
        return "no store"
    n = len(state["examples"]) if state["examples"] is not None else 0
    return f"active v{state['active']}, {len(state['history'])} history entries, {n} examples"


# ----------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    """A store operation and how to prepare the store it starts from."""

    name: str
    prepare: Callable[[Path], None]
    run: Callable[[Path], Any]
    secrets: Callable[[Path], list[bytes]] = field(default=lambda path: [])  # bytes a completed run must destroy


def scenarios(bundle: Any, same: Any = None, other: Any = None) -> list[Scenario]:
    """Every store operation, each from a store that makes it do real work."""
    from edgetl.device._head import HeadState
    from edgetl.device._store import HeadStore

    factory = HeadState.factory(bundle)
    shape = bundle.input_spec.shape
    labels = list(bundle.labels)

    def head(step: float) -> Any:
        return HeadState(factory.W + np.float32(step), factory.b, factory.mask, factory.anchor, factory.labels)

    def examples(n: int, label: str) -> tuple[np.ndarray, list[str]]:
        """The same pixels every time it is asked (each crash run repeats the operation)."""
        seed = int(hashlib.sha256(f"{n}:{label}".encode()).hexdigest()[:8], 16)
        return np.random.default_rng(seed).integers(0, 256, (n, *shape)).astype(np.uint8), [label] * n

    def personalized(path: Path) -> None:
        """Two commits, each with its examples: v1 trained on labels[0], v2 on labels[1]."""
        store = HeadStore(path, bundle)
        for i, label in enumerate(labels[:2]):
            store.keep_examples(*examples(6, label))
            store.commit(head(i + 1), {"example_labels": [label]})

    def segments_of(label: str) -> Callable[[Path], list[bytes]]:
        def secrets(path: Path) -> list[bytes]:
            index = json.loads((path / "examples" / "INDEX.json").read_text())
            files = [path / "examples" / e["file"] for e in index["segments"] if e["label"] == label]
            files += [path / "v000002.npz"] if label == labels[1] else []
            return [f.read_bytes() for f in files]

        return secrets

    def all_personal(path: Path) -> list[bytes]:
        return [p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name.endswith(".npz")]

    out = [
        Scenario("commit, new store", lambda p: None, lambda p: HeadStore(p, bundle).commit(head(1))),
        Scenario("commit", personalized, lambda p: HeadStore(p, bundle).commit(head(3))),
        Scenario(
            "keep examples, first",
            lambda p: HeadStore(p, bundle).commit(head(1)),
            lambda p: HeadStore(p, bundle).keep_examples(*examples(5, labels[0])),
        ),
        Scenario("keep examples", personalized, lambda p: HeadStore(p, bundle).keep_examples(*examples(5, labels[2]))),
        Scenario("rollback", personalized, lambda p: HeadStore(p, bundle).rollback()),
        Scenario("reset", personalized, lambda p: HeadStore(p, bundle).reset()),
        Scenario(
            "forget one class", personalized, lambda p: HeadStore(p, bundle).forget(labels[1]), segments_of(labels[1])
        ),
        Scenario("forget everything", personalized, lambda p: HeadStore(p, bundle).forget(None), all_personal),
    ]
    if same is not None:
        out.append(Scenario("migrate, same backbone", personalized, lambda p: HeadStore(p, bundle).migrate(same)))
    if other is not None:
        # Margins of 1: the retraining path (version file + pointer) whatever the guard would say.
        retrain = {"margin": 1.0, "forget_margin": 1.0}
        out.append(
            Scenario("migrate, retrained", personalized, lambda p: HeadStore(p, bundle).migrate(other, **retrain))
        )
    return out


# ----------------------------------------------------------------------------- running


def _run(scenario: Scenario, template: Path, work: Path, crash_at: int | None, drop: str | None) -> SimulatedFS:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, work)
    fs = SimulatedFS(work, crash_at, drop)
    saved, _atomic.FS = _atomic.FS, fs
    try:
        scenario.run(work / "store")
    except PowerCut:
        pass
    finally:
        _atomic.FS = saved
    return fs


def check_scenario(
    scenario: Scenario, bundles: dict[str, Any], base: Path, *, worlds: int = 4, drop: str | None = None
) -> dict[str, Any]:
    """Crash at every step of one scenario; returns the counts, the fsync sites, and failures."""
    template = base / "template"
    shutil.rmtree(template, ignore_errors=True)
    template.mkdir(parents=True)
    scenario.prepare(template / "store")
    before = observe(template / "store", bundles)
    secrets = scenario.secrets(template / "store") if (template / "store").exists() else []
    reference = _run(scenario, template, base / "live", None, drop)
    after = observe(base / "live" / "store", bundles)
    steps = reference.steps
    names = ["durable", "everything", *[f"torn-{s}" for s in range(max(worlds - 2, 0))]]
    failures: list[str] = []
    checked = 0
    for k in range(1, steps + 2):
        fs = _run(scenario, template, base / "live", k if k <= steps else None, drop)
        live_tree = _tree(base / "live" / "store") if (base / "live" / "store").exists() else {}
        where = (
            f"{scenario.name}: power cut before step {k}/{steps} ({reference.ops[k - 1] if k <= steps else 'returned'})"
        )
        for world in names:
            out = base / "world"
            shutil.rmtree(out, ignore_errors=True)
            fs.materialize(out, world)
            checked += 1
            if k > steps and world == "durable":  # it returned: all of it must be durable
                tree = _tree(out / "store") if (out / "store").exists() else {}
                if tree != live_tree:
                    lost = sorted(set(live_tree) ^ set(tree) | {f for f in tree if tree[f] != live_tree.get(f)})
                    failures.append(f"{where}, {world}: after it returned, not durable: {lost[:4]}")
                    continue
                left = [blob for blob in fs.durable_blobs() for s in secrets if s and s in blob]
                if left:
                    failures.append(f"{where}, {world}: forgotten bytes still in {len(left)} durable block(s)")
            try:
                state = observe(out / "store", bundles)
            except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
                failures.append(f"{where}, {world}: store does not open: {type(exc).__name__}: {exc}")
                continue
            if not (same_state(state, before) or same_state(state, after)):
                failures.append(
                    f"{where}, {world}: neither before ({_brief(before)}) nor after ({_brief(after)}): {_brief(state)}"
                )
    return {
        "scenario": scenario.name,
        "steps": steps,
        "crash_points": steps + 1,
        "worlds": checked,
        "failures": failures,
        "sites": reference.sites,
        "before": _brief(before),
        "after": _brief(after),
    }


def run(
    bundle_path: Path, same: Path | None = None, other: Path | None = None, *, worlds: int = 4, drop_fsync: bool = False
) -> dict[str, Any]:
    """Every scenario at every crash point; with ``drop_fsync``, every fsync site dropped in turn."""
    from edgetl.bundle import read_bundle
    from edgetl.device._store import bundle_identity

    loaded = [read_bundle(p) for p in (bundle_path, same, other) if p is not None]
    bundles = {bundle_identity(b): b for b in loaded}
    main = loaded[0]
    same_b = read_bundle(same) if same else None
    other_b = read_bundle(other) if other else None
    results = []
    sites: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as d:
        for i, scenario in enumerate(scenarios(main, same_b, other_b)):
            r = check_scenario(scenario, bundles, Path(d) / str(i), worlds=worlds)
            sites.update(r["sites"])
            results.append(r)
        dropped = {}
        if drop_fsync:
            for site in sorted(sites):
                found = None
                for i, scenario in enumerate(scenarios(main, same_b, other_b)):
                    r = check_scenario(scenario, bundles, Path(d) / f"drop{i}", worlds=worlds, drop=site)
                    if r["failures"]:
                        found = r["failures"][0]
                        break
                dropped[site] = found
    return {"scenarios": results, "fsync_sites": dict(sites), "dropped": dropped}


def report(stats: dict[str, Any]) -> int:
    """Print the tables; returns the number of problems (failures, fsyncs nothing needed)."""
    problems = 0
    print(f"{'scenario':<24} {'steps':>5} {'crash points':>12} {'worlds':>7} {'failures':>8}  before -> after")
    for r in stats["scenarios"]:
        print(
            f"{r['scenario']:<24} {r['steps']:>5} {r['crash_points']:>12} {r['worlds']:>7} {len(r['failures']):>8}  "
            f"{r['before']} -> {r['after']}"
        )
        for f in r["failures"][:5]:
            print(f"    FAIL {f}")
        problems += len(r["failures"])
    if stats["dropped"]:
        print("\nfsync call site dropped -> first failure found")
        for site, found in stats["dropped"].items():
            print(f"  {site:<48} {'MISSED: nothing failed' if found is None else found[:110]}")
            problems += found is None
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--same", type=Path, help="a bundle with the same backbone (migration carries the head over)")
    parser.add_argument("--other", type=Path, help="a bundle with another backbone (migration retrains)")
    parser.add_argument("--worlds", type=int, default=4, help="worlds per crash point (durable, everything, torn...)")
    parser.add_argument("--drop-fsync", action="store_true", help="prove each fsync call site is needed")
    args = parser.parse_args()
    stats = run(args.bundle, args.same, args.other, worlds=args.worlds, drop_fsync=args.drop_fsync)
    return 1 if report(stats) else 0


if __name__ == "__main__":
    sys.exit(main())
