#!/usr/bin/env python
"""Fuzz the bundle reader, the manifest parser and the archive unpacker with mutations of
a real bundle.

    python tools/fuzz_bundle.py BUNDLE [--cases 20000] [--seed 0]

Every case mutates a copy of the bundle (or of its packed archive) and opens it. The
properties: the call returns a verified Bundle or raises BundleError with a message;
no other exception; no case takes longer than a second; nothing is written outside the
case's own directory. Prints counts per mutation kind. tests/reliability runs a bounded
sample of the same engine.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgetl.bundle import pack_bundle, read_bundle, unpack_bundle  # noqa: E402
from edgetl.errors import BundleError  # noqa: E402

CASE_SECONDS = 1.0
HOSTILE_NAMES = [
    "../evil.onnx",
    "/tmp/evil.onnx",
    "a/b.onnx",
    "..",
    ".",
    "",
    "manifest.json",
    "x" * 300,
    "model\x00.onnx",
    "C:\\evil.onnx",
    "~/.ssh/x",
    " model.onnx",
    "mödel.onnx",
]
WEIRD_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    2**63,
    1e308,
    float("inf"),
    "",
    "x" * 10000,
    [],
    {},
    [[[]]],
    {"a": {"b": {}}},
    [1] * 10000,
    "../..",
    -(2**63),
]


def _manifest(case: Path) -> dict[str, Any]:
    return json.loads((case / "manifest.json").read_text())


def _write_manifest(case: Path, m: Any) -> None:
    (case / "manifest.json").write_text(json.dumps(m, allow_nan=True))


def _pick_path(m: dict[str, Any], rng: random.Random) -> list[Any]:
    """A random path into the manifest (keys and indexes)."""
    path: list[Any] = []
    node: Any = m
    while isinstance(node, (dict, list)) and node and rng.random() < 0.7:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        node = node[key]
    return path


def _set(m: Any, path: list[Any], value: Any) -> Any:
    if not path:
        return value
    node = m
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return m


def truncate_file(case: Path, rng: random.Random) -> None:
    f = rng.choice([p for p in case.iterdir() if p.is_file()])
    data = f.read_bytes()
    f.write_bytes(data[: rng.randrange(len(data) + 1)])


def flip_bits(case: Path, rng: random.Random) -> None:
    f = rng.choice([p for p in case.iterdir() if p.is_file()])
    data = bytearray(f.read_bytes())
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(data))


def wrong_json_type(case: Path, rng: random.Random) -> None:
    m = _manifest(case)
    _write_manifest(case, _set(m, _pick_path(m, rng), rng.choice(WEIRD_VALUES)))


def huge_shape(case: Path, rng: random.Random) -> None:
    m = _manifest(case)
    m["input_spec"]["shape"] = [rng.choice([2**31, 10**12, -5, 0, 3])] * rng.randint(0, 40)
    m["embedding_size"] = rng.choice([m["embedding_size"], 2**40, -1])
    _write_manifest(case, m)


def deep_nesting(case: Path, rng: random.Random) -> None:
    depth = rng.choice([100, 1000, 100000])
    (case / "manifest.json").write_text("[" * depth + "]" * depth)


def unknown_fields(case: Path, rng: random.Random) -> None:
    m = _manifest(case)
    m[f"future_{rng.randrange(1000)}"] = {"nested": [1, 2, 3]}
    m["artifacts"][0][f"extra_{rng.randrange(1000)}"] = "x"
    _write_manifest(case, m)  # must still open: unknown fields are ignored


def hostile_path(case: Path, rng: random.Random) -> None:
    m = _manifest(case)
    m["artifacts"][rng.randrange(len(m["artifacts"]))]["file"] = rng.choice(HOSTILE_NAMES)
    _write_manifest(case, m)


def symlink_outside(case: Path, rng: random.Random) -> None:
    m = _manifest(case)
    victim = case / m["artifacts"][rng.randrange(len(m["artifacts"]))]["file"]
    outside = case.parent / "outside.bin"
    shutil.copyfile(victim, outside)  # same bytes, so only the link itself can be refused
    victim.unlink()
    victim.symlink_to(outside)


def remove_file(case: Path, rng: random.Random) -> None:
    rng.choice([p for p in case.iterdir() if p.is_file()]).unlink()


def zip_slip(case: Path, rng: random.Random) -> Path:
    """A packed archive with an entry that would land outside the target."""
    archive = case.parent / "bundle.zip"
    pack_bundle(case, archive)
    with zipfile.ZipFile(archive, "a") as z:
        kind = rng.choice(["dotdot", "absolute", "symlink", "dir"])
        if kind == "symlink":
            info = zipfile.ZipInfo("link.onnx")
            info.external_attr = 0o120777 << 16
            z.writestr(info, "/etc/passwd")
        elif kind == "dir":
            z.writestr("sub/x.onnx", b"x")
        else:
            z.writestr("../../escaped.onnx" if kind == "dotdot" else "/tmp/edgetl_escaped.onnx", b"x")
    return archive


def corrupt_archive(case: Path, rng: random.Random) -> Path:
    archive = case.parent / "bundle.zip"
    pack_bundle(case, archive)
    data = bytearray(archive.read_bytes())
    if rng.random() < 0.5:
        data = data[: rng.randrange(len(data))]
    else:
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    archive.write_bytes(bytes(data))
    return archive


DIRECTORY_MUTATIONS: dict[str, Callable[[Path, random.Random], None]] = {
    "truncate": truncate_file,
    "bit_flip": flip_bits,
    "json_type": wrong_json_type,
    "huge_shape": huge_shape,
    "deep_nesting": deep_nesting,
    "unknown_fields": unknown_fields,
    "hostile_path": hostile_path,
    "symlink_outside": symlink_outside,
    "missing_file": remove_file,
}
ARCHIVE_MUTATIONS: dict[str, Callable[[Path, random.Random], Path]] = {
    "zip_slip": zip_slip,
    "corrupt_archive": corrupt_archive,
}


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run(bundle: Path, cases: int, seed: int = 0) -> dict[str, Any]:
    """Run ``cases`` mutations; return counts. Raises AssertionError on a property violation."""
    rng = random.Random(seed)
    outcome: Counter[str] = Counter()
    slowest = 0.0
    kinds = list(DIRECTORY_MUTATIONS) + list(ARCHIVE_MUTATIONS)
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        sentinel_dir = work_dir / "outside_world"
        sentinel_dir.mkdir()
        for i in range(cases):
            kind = kinds[i % len(kinds)]
            case_root = work_dir / f"case{i}"
            case_root.mkdir()
            case = case_root / "b.edgetl"
            shutil.copytree(bundle, case)
            before_outside = _snapshot(sentinel_dir) | {p.name for p in Path("/tmp").glob("edgetl_escaped*")}
            started = time.perf_counter()
            try:
                if kind in DIRECTORY_MUTATIONS:
                    DIRECTORY_MUTATIONS[kind](case, rng)
                    read_bundle(case)
                else:
                    archive = ARCHIVE_MUTATIONS[kind](case, rng)
                    unpack_bundle(archive, case_root / "target" / "u.edgetl")
                outcome[f"{kind}:opened"] += 1
            except BundleError as exc:
                assert str(exc), f"{kind}: BundleError without a message"
                outcome[f"{kind}:refused"] += 1
            except Exception as exc:  # any other exception is a finding
                raise AssertionError(f"case {i} ({kind}): {type(exc).__name__}: {exc}") from exc
            elapsed = time.perf_counter() - started
            slowest = max(slowest, elapsed)
            assert elapsed < CASE_SECONDS, f"case {i} ({kind}) took {elapsed:.2f}s"
            after_outside = _snapshot(sentinel_dir) | {p.name for p in Path("/tmp").glob("edgetl_escaped*")}
            assert after_outside == before_outside, (
                f"case {i} ({kind}) wrote outside its directory: {after_outside - before_outside}"
            )
            escaped = [
                p
                for p in case_root.parent.iterdir()
                if p.name not in {f"case{i}", "outside_world"} and not p.name.startswith("case")
            ]
            assert not escaped, f"case {i} ({kind}) wrote {escaped}"
            shutil.rmtree(case_root)
    return {"cases": cases, "outcomes": dict(sorted(outcome.items())), "slowest_seconds": round(slowest, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    stats = run(args.bundle, args.cases, args.seed)
    print(json.dumps(stats, indent=1))
    print(
        f"{stats['cases']} cases in {time.perf_counter() - t0:.0f}s: no exception other than BundleError, no case over "
        f"{CASE_SECONDS}s, nothing written outside"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
