#!/usr/bin/env python
"""Fuzz the bundle reader, the archive unpacker, Classifier.open and the bundle's .npz
arrays with mutations of a real bundle.

    python tools/fuzz_bundle.py BUNDLE [--cases 20000] [--seed 0] [--kinds a,b] [--save DIR]

Every case mutates a fresh copy of the bundle (or of its packed archive) and runs one
operation on it in a worker process (so a crash or a hang is seen, not suffered):

- ``read``: ``read_bundle``; ``unpack``: ``unpack_bundle`` into a target directory;
- ``open``: ``Classifier.open`` (onnxruntime or LiteRT, fp32 or int8), then a use probe:
  predict, ``Personalizer`` (loads the replay buffer), one training epoch, the guard's
  scores. These cases re-compute every sha256 and size in the manifest after mutating,
  so the hash check cannot refuse them on the code's behalf.

The properties checked per case, each a finding when broken:

- the outcome is success or an ``EdgeTLError`` (``BundleError`` for read/unpack), with a
  message; never another exception, a crash, or a hang (each case's time is bounded);
- hostile inputs are refused (a path leaving the bundle, a symlink, NaN/inf in the
  factory head or the replay buffer, pickles, wrong shapes, ...). Hostile names point at
  *real* files with the right bytes and hashes, so only the path check can refuse them,
  and the refusal must be about the path (not "missing");
- nothing changes outside the operation's own output: the whole work tree (the case
  root, its parent, and decoy files outside it) is snapshotted before and after each case
  (every path, type, size, mtime, ctime, inode, and the sha256 of every file up to
  8 MiB) and any difference is reported.

Prints a table of outcomes per mutation kind and every finding; exits 1 on any finding.
tests/reliability/test_kill_and_fuzz.py runs a bounded sample of the same engine, and
proves that each check can fail (naive readers and unpackers that escape, hang, crash).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from edgetl.bundle import pack_bundle  # noqa: E402

# Budgets: what a case may take before it is reported as slow, and before the worker is
# killed as hung. Generous, because the suite shares two cores with other jobs.
CASE_SECONDS = {"read": 2.0, "unpack": 2.0, "open": 20.0}
HANG_SECONDS = 60.0
WORKER_MEMORY = 16 << 30  # address-space limit of the worker (it needs about 1 GiB)
HASH_LIMIT = 8 << 20  # files up to this size are hashed by the snapshot
DEFAULT_TARGETS = {
    "read": "edgetl.bundle:read_bundle",
    "unpack": "edgetl.bundle:unpack_bundle",
    "open": "@open_and_use",
}

# A refusal of a hostile path must say it is about the path, not that a file is missing.
PATH_REASON = re.compile(r"plain file names|symlink|outside the bundle|link or directory", re.I)
# A rehashed case refused by the hash, size or presence check was refused for the wrong reason.
HASH_REASON = re.compile(r"sha256|the manifest says|missing from|missing\b", re.I)
# A refused .npz case must be refused for its file: loaded, then failing in training, is not that.
ROLE_REASON = {"head_init": re.compile(r"head", re.I), "replay": re.compile(r"replay", re.I)}
WEIRD_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    2**63,
    1e308,
    "",
    "x" * 10000,
    [],
    {},
    [[[]]],
    [1] * 10000,
    "../..",
    -(2**63),
]


class Expect:
    """What a mutation expects of the operation it sets up.

    ``must``: ``"refuse"`` (hostile: success is a finding), ``"open"`` (benign: refusal is
    a finding) or ``"any"``. ``reason``: a refusal must match it; ``not_reason``: it must
    not. ``args``: the operation's arguments; ``allowed``: paths the operation may create
    when it succeeds (its output). (Plain classes, not dataclasses: the tests load this
    file without registering it as a module, which dataclasses need.)
    """

    def __init__(
        self,
        op: str,
        must: str = "any",
        reason: re.Pattern[str] | None = None,
        not_reason: re.Pattern[str] | None = None,
        args: dict[str, Any] | None = None,
        allowed: tuple[str, ...] = (),
        note: str = "",
    ) -> None:
        self.op, self.must, self.reason, self.not_reason = op, must, reason, not_reason
        self.args, self.allowed, self.note = args or {}, allowed, note


class Context(NamedTuple):
    """One case's paths and the run's decoys (real files outside the case, with the bundle's bytes)."""

    case: Path  # the bundle copy
    root: Path  # the case root (bundle copy, archive, target, store)
    decoys: Path  # a directory of real files outside every case
    system_file: Path | None  # a real file outside the work tree (read only)
    rng: random.Random


# ----------------------------------------------------------------------------- helpers


def _manifest(case: Path) -> dict[str, Any]:
    return json.loads((case / "manifest.json").read_text())


def _write_manifest(case: Path, m: Any) -> None:
    (case / "manifest.json").write_text(json.dumps(m, allow_nan=True))


def _rehash(case: Path) -> None:
    """Re-compute every artifact's sha256 and size (regular files only), as a hostile author would."""
    m = _manifest(case)
    for a in m["artifacts"]:
        f = case / a["file"]
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            a["sha256"], a["size"] = hashlib.sha256(data).hexdigest(), len(data)
    _write_manifest(case, m)


def _artifact(m: dict[str, Any], role: str, fmt: str | None = None) -> str:
    return next(a["file"] for a in m["artifacts"] if a["role"] == role and fmt in (None, a["format"]))


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


def _files(case: Path) -> list[Path]:
    return sorted(p for p in case.iterdir() if p.is_file())


# ------------------------------------------------------------- directory mutations (read)


def truncate_file(ctx: Context) -> Expect:
    """A file cut short (an artifact fails its size check; a manifest its parse)."""
    f = ctx.rng.choice(_files(ctx.case))
    data = f.read_bytes()
    cut = data[: ctx.rng.randrange(len(data))]  # strictly shorter
    f.write_bytes(cut)
    # A manifest that loses only trailing whitespace is still the same manifest.
    same = f.name == "manifest.json" and cut.strip() == data.strip()
    return Expect("read", "any" if same else "refuse", args={"path": str(ctx.case)})


def flip_bits(ctx: Context) -> Expect:
    """A few bits flipped in one file."""
    f = ctx.rng.choice(_files(ctx.case))
    data = bytearray(f.read_bytes())
    for _ in range(ctx.rng.randint(1, 8)):
        data[ctx.rng.randrange(len(data))] ^= 1 << ctx.rng.randrange(8)
    f.write_bytes(bytes(data))
    # A flipped artifact fails its hash; a flipped manifest may still be a valid one.
    return Expect("read", "any" if f.name == "manifest.json" else "refuse", args={"path": str(ctx.case)})


def wrong_json_type(ctx: Context) -> Expect:
    """One manifest value (or the whole manifest) replaced by JSON of another type."""
    m = _manifest(ctx.case)
    _write_manifest(ctx.case, _set(m, _pick_path(m, ctx.rng), ctx.rng.choice(WEIRD_VALUES)))
    return Expect("read", args={"path": str(ctx.case)})


def huge_shape(ctx: Context) -> Expect:
    """An input shape and embedding size that are huge, negative or deeply nested."""
    m = _manifest(ctx.case)
    m["input_spec"]["shape"] = [ctx.rng.choice([2**31, 10**12, -5, 0, 3])] * ctx.rng.randint(0, 40)
    m["embedding_size"] = ctx.rng.choice([m["embedding_size"], 2**40, -1])
    _write_manifest(ctx.case, m)
    return Expect("read", args={"path": str(ctx.case)})


def deep_nesting(ctx: Context) -> Expect:
    """A manifest of nested empty lists, deep enough to exhaust a recursive parser."""
    depth = ctx.rng.choice([100, 1000, 100000])
    (ctx.case / "manifest.json").write_text("[" * depth + "]" * depth)
    return Expect("read", "refuse", args={"path": str(ctx.case)})


def unknown_fields(ctx: Context) -> Expect:
    """Fields a future edgetl may write, at the top and in an artifact: ignored, not refused."""
    m = _manifest(ctx.case)
    m[f"future_{ctx.rng.randrange(1000)}"] = {"nested": [1, 2, 3]}
    m["artifacts"][0][f"extra_{ctx.rng.randrange(1000)}"] = "x"
    _write_manifest(ctx.case, m)
    return Expect("read", "open", args={"path": str(ctx.case)})  # forward compatible: ignored


def hostile_path(ctx: Context) -> Expect:
    """An artifact entry whose name leads to a real file outside the bundle with exactly the
    bytes, size and sha256 the entry declares: only the path check can refuse it."""
    m = _manifest(ctx.case)
    entry = ctx.rng.choice(m["artifacts"])
    decoy = ctx.decoys / entry["file"]
    relative = os.path.relpath(decoy, ctx.case)
    choices = [relative, str(decoy), f"./{relative}", relative.replace("/", "\\"), f"sub/../{relative}"]
    sub = ctx.case / "sub"
    sub.mkdir()
    shutil.copyfile(ctx.case / entry["file"], sub / entry["file"])  # a real file one level down
    choices.append(f"sub/{entry['file']}")
    if ctx.system_file is not None:  # a real file outside the work tree, hashed as it is
        choices.append(str(ctx.system_file))
    name = ctx.rng.choice(choices)
    target = Path(name) if os.path.isabs(name) else ctx.case / name
    entry["file"] = name
    if target.is_file():
        data = target.read_bytes()
        entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)
    _write_manifest(ctx.case, m)
    return Expect("read", "refuse", PATH_REASON, re.compile("missing", re.I), {"path": str(ctx.case)}, note=name)


def symlink_outside(ctx: Context) -> Expect:
    """A listed file replaced by a symlink to a real file outside with the same bytes (or a
    symlinked directory holding it); size and hash match, so only the link can be refused."""
    m = _manifest(ctx.case)
    entry = ctx.rng.choice(m["artifacts"])
    victim = ctx.case / entry["file"]
    if ctx.rng.random() < 0.7:
        victim.unlink()
        victim.symlink_to(ctx.decoys / entry["file"])
        note = f"{entry['file']} -> decoy"
    else:
        (ctx.case / "linked").symlink_to(ctx.decoys, target_is_directory=True)
        entry["file"] = f"linked/{entry['file']}"
        _write_manifest(ctx.case, m)
        note = entry["file"]
    return Expect("read", "refuse", PATH_REASON, re.compile("missing", re.I), {"path": str(ctx.case)}, note=note)


def manifest_symlink(ctx: Context) -> Expect:
    """manifest.json as a symlink to an identical manifest outside the bundle."""
    (ctx.case / "manifest.json").unlink()
    (ctx.case / "manifest.json").symlink_to(ctx.decoys / "manifest.json")
    return Expect("read", "refuse", PATH_REASON, None, {"path": str(ctx.case)})


def remove_file(ctx: Context) -> Expect:
    """A listed file (or the manifest) removed."""
    ctx.rng.choice(_files(ctx.case)).unlink()
    return Expect("read", "refuse", args={"path": str(ctx.case)})


# ------------------------------------------------------------------ archive mutations (unpack)


def _unpack_expect(ctx: Context, archive: Path, must: str, reason: re.Pattern[str] | None, note: str = "") -> Expect:
    out = ctx.root / "target" / "u.edgetl"
    out.parent.mkdir(exist_ok=True)
    args = {"archive": str(archive), "out": str(out)}
    return Expect("unpack", must, reason, re.compile("missing", re.I) if reason else None, args, (str(out),), note)


def zip_slip(ctx: Context) -> Expect:
    """A valid archive plus one entry that would land outside the target: over a real decoy
    file (relative or absolute), through a symlink entry, or in a subdirectory."""
    archive = pack_bundle(ctx.case, ctx.root / "bundle.zip")
    out = ctx.root / "target" / "u.edgetl"
    decoy = ctx.decoys / ctx.rng.choice(sorted(p.name for p in ctx.decoys.iterdir()))
    kind = ctx.rng.choice(["dotdot", "absolute", "escape", "symlink", "dir", "backslash"])
    with warnings.catch_warnings(), zipfile.ZipFile(archive, "a") as z:
        warnings.simplefilter("ignore")  # duplicate names are the point
        if kind == "dotdot":
            z.writestr(os.path.relpath(decoy, out), b"overwritten")
        elif kind == "absolute":
            z.writestr(str(decoy), b"overwritten")
        elif kind == "escape":  # a new file next to the case root, the classic ../../
            z.writestr(f"../../escaped-{ctx.rng.randrange(10**6)}.onnx", b"x")
        elif kind == "symlink":  # a link to a real file, then an entry written through it
            info = zipfile.ZipInfo("link.onnx")
            info.external_attr = 0o120777 << 16
            z.writestr(info, str(decoy))
            z.writestr("link.onnx", b"written through the link")
        elif kind == "dir":
            z.writestr("sub/", b"")
            z.writestr("sub/x.onnx", b"x")
        else:
            z.writestr("..\\..\\escaped.onnx", b"x")
    return _unpack_expect(ctx, archive, "refuse", PATH_REASON, kind)


def corrupt_archive(ctx: Context) -> Expect:
    """A packed bundle truncated or bit-flipped."""
    archive = pack_bundle(ctx.case, ctx.root / "bundle.zip")
    data = bytearray(archive.read_bytes())
    if ctx.rng.random() < 0.5:
        data = data[: ctx.rng.randrange(len(data))]
    else:
        for _ in range(ctx.rng.randint(1, 16)):
            data[ctx.rng.randrange(len(data))] ^= 1 << ctx.rng.randrange(8)
    archive.write_bytes(bytes(data))
    return _unpack_expect(ctx, archive, "any", None)


def archive_entries(ctx: Context) -> Expect:
    """Too many entries, no manifest, or an empty archive."""
    archive = ctx.root / "bundle.zip"
    kind = ctx.rng.choice(["many", "no_manifest", "empty"])
    with zipfile.ZipFile(archive, "w") as z:
        if kind == "many":
            z.write(ctx.case / "manifest.json", "manifest.json")
            for i in range(200):
                z.writestr(f"f{i}.bin", b"x")
        elif kind == "no_manifest":
            z.write(ctx.case / _artifact(_manifest(ctx.case), "head_init"), "head_init.npz")
    return _unpack_expect(ctx, archive, "refuse", None, kind)


# ------------------------------------------------ model and .npz mutations (open; rehashed)


def _open_expect(
    ctx: Context, must: str, note: str, backend: str | None = None, reason: re.Pattern[str] | None = None
) -> Expect:
    _rehash(ctx.case)
    m = _manifest(ctx.case)
    backend = backend or ctx.rng.choice(["onnxruntime", "litert"])
    fmt = "onnx" if backend == "onnxruntime" else "tflite"
    precisions = sorted({a["precision"] for a in m["artifacts"] if a["role"] == "backbone" and a["format"] == fmt})
    args = {"path": str(ctx.case), "backend": backend, "precision": ctx.rng.choice(precisions or ["fp32"])}
    args["store"] = str(ctx.root / "store")
    not_reason = HASH_REASON if must == "refuse" else None
    note = f"{backend}/{args['precision']}: {note}"
    return Expect("open", must, reason, not_reason, args, (args["store"],), note)


def _model_files(m: dict[str, Any], backend: str) -> list[str]:
    fmt = "onnx" if backend == "onnxruntime" else "tflite"
    roles = {"fused", "backbone", "head", "head_infer", "head_train", "head_train_loop"}
    return [a["file"] for a in m["artifacts"] if a["format"] == fmt and a["role"] in roles]


def model_bytes(ctx: Context) -> Expect:
    """A model file truncated, bit-flipped or replaced by noise, with its hash re-computed."""
    backend = ctx.rng.choice(["onnxruntime", "litert"])
    name = ctx.rng.choice(_model_files(_manifest(ctx.case), backend))
    f = ctx.case / name
    data = bytearray(f.read_bytes())
    how = ctx.rng.choice(["truncate", "flip", "noise", "header"])
    if how == "truncate":
        data = data[: ctx.rng.randrange(1, len(data))]
    elif how == "flip":
        for _ in range(ctx.rng.randint(1, 16)):
            data[ctx.rng.randrange(len(data))] ^= 1 << ctx.rng.randrange(8)
    elif how == "noise":
        data = bytearray(ctx.rng.randbytes(len(data)))
    else:
        data = data[:64]
    f.write_bytes(bytes(data))
    return _open_expect(ctx, "any", f"{name} {how}", backend)


def model_swap(ctx: Context) -> Expect:
    """A model file replaced by another valid model of the same format (a fused model where
    the backbone goes, a train graph where inference goes), hash re-computed."""
    backend = ctx.rng.choice(["onnxruntime", "litert"])
    names = _model_files(_manifest(ctx.case), backend)
    a, b = ctx.rng.sample(names, 2)
    shutil.copyfile(ctx.case / b, ctx.case / a)
    return _open_expect(ctx, "any", f"{a} <- {b}", backend)


class _Unpickled:
    """A pickled object that, if ever unpickled, creates a directory in the case root: the
    snapshot then reports it (and the case is accepted hostile input)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def _npy(array: np.ndarray | None = None, *, header: dict[str, Any] | None = None) -> bytes:
    """One ``.npy`` member: an array (object arrays pickled), or a hand-written header that
    declares anything, followed by a few bytes of data."""
    buf = io.BytesIO()
    if header is not None:
        np.lib.format.write_array_header_1_0(buf, header)
        return buf.getvalue() + b"\0" * 64
    np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=True)
    return buf.getvalue()


def _write_npz(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(f"{name}.npy", data)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _npz_case(ctx: Context, role: str, key: str | None, variant: str, member: bytes | None, must: str) -> Expect:
    """Replace one array (``key``) of the .npz with ``role`` by ``member`` (or drop it when
    ``member`` is None), rehash, and open."""
    f = ctx.case / _artifact(_manifest(ctx.case), role)
    members = {k: _npy(v) for k, v in _arrays(f).items()}
    if key is not None:
        if member is None:
            members.pop(key)
        else:
            members[key] = member
    _write_npz(f, members)
    return _open_expect(ctx, must, f"{role}.{key}: {variant}", reason=ROLE_REASON[role])


def _nonfinite(ctx: Context, role: str, keys: tuple[str, ...]) -> Expect:
    key = ctx.rng.choice(keys)
    array = _arrays(ctx.case / _artifact(_manifest(ctx.case), role))[key].astype(np.float32)
    value = ctx.rng.choice([np.nan, np.inf, -np.inf])
    flat = array.reshape(-1)
    flat[ctx.rng.randrange(flat.size) if ctx.rng.random() < 0.7 else slice(None)] = value
    return _npz_case(ctx, role, key, f"{value} in {key}", _npy(array), "refuse")


def head_nonfinite(ctx: Context) -> Expect:
    """NaN or inf in the factory head's W or b."""
    return _nonfinite(ctx, "head_init", ("W", "b"))


def replay_nonfinite(ctx: Context) -> Expect:
    """NaN or inf in the replay buffer's embeddings."""
    return _nonfinite(ctx, "replay", ("embeddings",))


def _pickled(ctx: Context, role: str, keys: tuple[str, ...]) -> Expect:
    key = ctx.rng.choice(keys)
    payload = np.empty(2, dtype=object)
    payload[0], payload[1] = _Unpickled(str(ctx.root / "UNPICKLED")), 1.0
    return _npz_case(ctx, role, key, "object array (pickle)", _npy(payload), "refuse")


def head_pickle(ctx: Context) -> Expect:
    """An object array (a pickle with a payload) in head_init.npz."""
    return _pickled(ctx, "head_init", ("W", "b", "mask"))


def replay_pickle(ctx: Context) -> Expect:
    """An object array (a pickle with a payload) in replay.npz."""
    return _pickled(ctx, "replay", ("embeddings", "labels"))


def _huge(ctx: Context, role: str, keys: tuple[str, ...]) -> Expect:
    """A header that declares an enormous (or impossible) shape over a few bytes of data."""
    key = ctx.rng.choice(keys)
    shape = ctx.rng.choice([(2**40,), (2**20, 2**20), (10**30,), (3, 2**62), (2**31, 256)])
    member = _npy(header={"descr": "<f4", "fortran_order": False, "shape": shape})
    return _npz_case(ctx, role, key, f"declared shape {shape}", member, "refuse")


def head_huge(ctx: Context) -> Expect:
    """A head_init.npz array whose header declares an enormous shape."""
    return _huge(ctx, "head_init", ("W", "b", "mask"))


def replay_huge(ctx: Context) -> Expect:
    """A replay.npz array whose header declares an enormous shape."""
    return _huge(ctx, "replay", ("embeddings", "labels"))


def _missing(ctx: Context, role: str, keys: tuple[str, ...]) -> Expect:
    key = ctx.rng.choice(keys)
    return _npz_case(ctx, role, key, "missing", None, "refuse")


def head_missing_key(ctx: Context) -> Expect:
    """head_init.npz without one of W, b, mask."""
    return _missing(ctx, "head_init", ("W", "b", "mask"))


def replay_missing_key(ctx: Context) -> Expect:
    """replay.npz without embeddings or labels."""
    return _missing(ctx, "replay", ("embeddings", "labels"))


def head_dtype(ctx: Context) -> Expect:
    """Factory head arrays of a dtype that is no head (strings, complex, records: refused) or
    a numeric one that converts exactly (float64, int, big-endian: either outcome)."""
    key = ctx.rng.choice(["W", "b", "mask"])
    array = _arrays(ctx.case / _artifact(_manifest(ctx.case), "head_init"))[key]
    dtype = ctx.rng.choice(
        ["U8", "S4", "complex64", "V8", "M8[s]", "float64", ">f4", "int32" if key == "mask" else "f2"]
    )
    hostile = dtype in ("U8", "S4", "complex64", "V8", "M8[s]")
    if dtype == "complex64":
        member = _npy(array.astype(np.complex64) + 1j)
    elif dtype == "V8":
        member = _npy(np.zeros(array.shape, dtype=[("a", "<f4"), ("b", "<f4")]))
    elif dtype == "M8[s]":
        member = _npy(np.zeros(array.shape, dtype="M8[s]"))
    else:
        member = _npy(array.astype(dtype))
    return _npz_case(ctx, "head_init", key, f"dtype {dtype}", member, "refuse" if hostile else "any")


def head_shape(ctx: Context) -> Expect:
    """Factory head arrays that do not fit the manifest's embedding_size x max_classes, or a
    mask whose active count is not the number of labels."""
    arrays = _arrays(ctx.case / _artifact(_manifest(ctx.case), "head_init"))
    W, b, mask = arrays["W"], arrays["b"], arrays["mask"]
    variants = {
        "W transposed": ("W", W.T),
        "W one row more": ("W", np.vstack([W, W[:1]])),
        "W one column less": ("W", W[:, :-1]),
        "W flat": ("W", W.reshape(-1)),
        "W empty": ("W", W[:0]),
        "W 3-d": ("W", W[None]),
        "b one more": ("b", np.append(b, 0)),
        "b 2-d": ("b", b[None]),
        "mask shorter": ("mask", mask[:-1]),
        "mask all active": ("mask", np.ones_like(mask)),
        "mask none active": ("mask", np.zeros_like(mask)),
        "mask not 0/1": ("mask", mask * 0.5),
    }
    variant = ctx.rng.choice(sorted(variants))
    key, value = variants[variant]
    return _npz_case(ctx, "head_init", key, variant, _npy(value), "refuse")


def replay_labels(ctx: Context) -> Expect:
    """Replay labels that name no class, are not integers, or do not match the embeddings."""
    arrays = _arrays(ctx.case / _artifact(_manifest(ctx.case), "replay"))
    y, n = arrays["labels"], len(_manifest(ctx.case)["labels"])
    variants = {
        "label = number of labels": np.where(np.arange(len(y)) == 0, n, y),
        "label 99": np.where(np.arange(len(y)) == 0, 99, y),
        "label -1": np.where(np.arange(len(y)) == 0, -1, y),
        "float labels 0.5": y.astype(np.float64) + 0.5,
        "string labels": y.astype(str),
        "fewer labels than embeddings": y[: len(y) // 2],
        "2-d labels": y[:, None],
        "bool labels": y.astype(bool),
    }
    variant = ctx.rng.choice(sorted(variants))
    return _npz_case(ctx, "replay", "labels", variant, _npy(variants[variant]), "refuse")


def replay_shape(ctx: Context) -> Expect:
    """Replay embeddings whose width is not the manifest's embedding_size (or not 2-d)."""
    e = _arrays(ctx.case / _artifact(_manifest(ctx.case), "replay"))["embeddings"]
    variants = {
        "one wider": np.hstack([e, e[:, :1]]),
        "one narrower": e[:, :-1],
        "flat": e.reshape(-1),
        "3-d": e[:, None, :],
        "no columns": e[:, :0],
    }
    variant = ctx.rng.choice(sorted(variants))
    return _npz_case(ctx, "replay", "embeddings", variant, _npy(variants[variant]), "refuse")


def npz_garbage(ctx: Context) -> Expect:
    """The head or replay .npz replaced by something that is no .npz."""
    role = ctx.rng.choice(["head_init", "replay"])
    f = ctx.case / _artifact(_manifest(ctx.case), role)
    data = f.read_bytes()
    variant = ctx.rng.choice(["noise", "truncated zip", "bare npy", "bad member", "empty zip"])
    if variant == "noise":
        f.write_bytes(ctx.rng.randbytes(len(data)))
    elif variant == "truncated zip":
        f.write_bytes(data[: ctx.rng.randrange(1, len(data))])
    elif variant == "bare npy":
        f.write_bytes(_npy(np.zeros(3, np.float32)))
    elif variant == "bad member":
        _write_npz(f, {k: b"\x93NUMPY garbage" for k in _arrays(f)})
    else:
        _write_npz(f, {})
    return _open_expect(ctx, "refuse", f"{role}: {variant}", reason=ROLE_REASON[role])


def npz_extra_keys(ctx: Context) -> Expect:
    """Extra arrays in the head and replay files are ignored (forward compatible)."""
    for role in ("head_init", "replay"):
        f = ctx.case / _artifact(_manifest(ctx.case), role)
        members = {k: _npy(v) for k, v in _arrays(f).items()}
        members[f"future_{ctx.rng.randrange(1000)}"] = _npy(np.arange(3))
        _write_npz(f, members)
    return _open_expect(ctx, "open", "extra arrays")


MUTATIONS: dict[str, Callable[[Context], Expect]] = {
    "truncate": truncate_file,
    "bit_flip": flip_bits,
    "json_type": wrong_json_type,
    "huge_shape": huge_shape,
    "deep_nesting": deep_nesting,
    "unknown_fields": unknown_fields,
    "hostile_path": hostile_path,
    "symlink_outside": symlink_outside,
    "manifest_symlink": manifest_symlink,
    "missing_file": remove_file,
    "zip_slip": zip_slip,
    "corrupt_archive": corrupt_archive,
    "archive_entries": archive_entries,
    "model_bytes": model_bytes,
    "model_swap": model_swap,
    "head_nonfinite": head_nonfinite,
    "head_pickle": head_pickle,
    "head_huge": head_huge,
    "head_missing_key": head_missing_key,
    "head_dtype": head_dtype,
    "head_shape": head_shape,
    "replay_nonfinite": replay_nonfinite,
    "replay_pickle": replay_pickle,
    "replay_huge": replay_huge,
    "replay_missing_key": replay_missing_key,
    "replay_labels": replay_labels,
    "replay_shape": replay_shape,
    "npz_garbage": npz_garbage,
    "npz_extra_keys": npz_extra_keys,
}


# ----------------------------------------------------------------------------- snapshot


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under ``root`` with its type and identity: files by size, mtime, ctime,
    inode and (up to HASH_LIMIT) sha256; symlinks by target; directories by mode (their
    mtimes follow their entries, which are compared themselves)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[p] = ("link", os.readlink(p), st.st_ino)
            elif stat.S_ISDIR(st.st_mode):
                out[p] = ("dir", st.st_mode, st.st_ino)
            elif stat.S_ISREG(st.st_mode):
                digest = _sha256(p) if st.st_size <= HASH_LIMIT else None
                out[p] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest)
            else:
                out[p] = ("other", st.st_mode, st.st_ino)
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def changes(
    before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]], allowed: tuple[str, ...]
) -> list[str]:
    """Paths created, removed or changed between two snapshots, outside the ``allowed`` subtrees."""

    def inside(p: str) -> bool:
        return any(p == a or p.startswith(a.rstrip(os.sep) + os.sep) for a in allowed)

    found = []
    for p in sorted(set(before) | set(after)):
        if before.get(p) != after.get(p) and not inside(p):
            what = "created" if p not in before else "removed" if p not in after else "changed"
            found.append(f"{what} {p}")
    return found


# ----------------------------------------------------------------------- the worker process


def open_and_use(path: str, backend: str, precision: str, store: str) -> None:
    """What ``open`` cases run: Classifier.open, a prediction, a Personalizer (which loads
    the replay buffer), one training epoch and the guard's scores. A bundle that opens but
    then fails with anything but an EdgeTLError was not a clean open."""
    from edgetl.device import Classifier, Personalizer, TrainSettings

    clf = Classifier.open(path, backend=backend, precision=precision)
    x = np.random.default_rng(0).uniform(0, 255, (10, *clf.input_shape)).astype(np.float32)
    clf.predict(x)
    p = Personalizer(clf, store)
    p.add_examples(x, [clf.head.labels[i % len(clf.head.labels)] for i in range(len(x))])
    p.train(TrainSettings(epochs=1, batch_size=4))
    p.guard_scores(p.candidate)


def _resolve(spec: str) -> Callable[..., Any]:
    """``@name`` (a function of this file), ``module:function`` or ``path/to/file.py:function``."""
    if spec.startswith("@"):
        return globals()[spec[1:]]
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        import importlib.util

        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        import importlib

        module = importlib.import_module(where)
    return getattr(module, name)


def worker_main() -> int:
    """Serve cases from stdin, one JSON request per line, one JSON reply per line on the
    original stdout (fd 1 itself goes to /dev/null: runtimes print from native code)."""
    import resource

    from edgetl.errors import BundleError, EdgeTLError

    # No core files from a crashing runtime; and a bound on memory, so a declared-huge array
    # fails the same way on every machine (whatever its overcommit policy) and never swaps.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    warnings.simplefilter("ignore")
    for line in sys.stdin:
        request = json.loads(line)
        started = time.perf_counter()
        try:
            _resolve(request["target"])(**request["args"])
            reply: dict[str, Any] = {"outcome": "opened"}
        except EdgeTLError as exc:
            reply = {"outcome": "refused", "bundle_error": isinstance(exc, BundleError), "message": str(exc)}
            reply["type"] = type(exc).__name__
        except BaseException as exc:  # noqa: BLE001 -- every other exception is what we look for
            where = traceback.extract_tb(exc.__traceback__)[-3:]
            trail = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(where))
            reply = {"outcome": "error", "type": f"{type(exc).__module__}.{type(exc).__name__}", "message": str(exc)}
            reply["where"] = trail
        reply["seconds"] = time.perf_counter() - started
        reply["message"] = reply.get("message", "")[:500]
        replies.write(json.dumps(reply) + "\n")
    return 0


class Worker:
    """A worker process this run started; restarted after a crash or a hang."""

    def __init__(self, log: Path) -> None:
        self.log, self.proc = log, None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=self.log.parent,  # nothing the worker might drop lands in the caller's directory
            )

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one case; its reply, or a hang or crash record (the worker is then restarted)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if line:
            return json.loads(line)
        if not ready:
            self.stop()
            return {"outcome": "hang", "message": f"no answer within {timeout:.0f}s; worker killed"}
        code = self.proc.wait()
        self.proc = None
        tail = self.log.read_text(errors="replace")[-300:] if self.log.exists() else ""
        return {"outcome": "crash", "message": f"worker died with exit code {code}; stderr tail: {tail!r}"}

    def stop(self) -> None:
        """Kill the worker this object started, if it runs."""
        if self.proc is not None:
            self.proc.kill()  # only the process this object started
            self.proc.wait()
            self.proc = None


# ------------------------------------------------------------------------------- the run


def judge(expect: Expect, reply: dict[str, Any], seconds_budget: float) -> list[str]:
    """The findings of one case: every property the reply breaks."""
    outcome, message = reply["outcome"], reply.get("message", "")
    if outcome in ("hang", "crash"):
        return [f"{outcome}: {message}"]
    if outcome == "error":
        return [f"raised {reply['type']} (not an EdgeTLError): {message[:200]} at {reply.get('where', '?')}"]
    found = []
    if reply["seconds"] > seconds_budget:
        found.append(f"slow: {reply['seconds']:.2f}s (budget {seconds_budget}s)")
    if outcome == "opened" and expect.must == "refuse":
        found.append("accepted hostile input")
    if outcome == "refused":
        if not message.strip():
            found.append(f"{reply['type']} without a message")
        if expect.op in ("read", "unpack") and not reply["bundle_error"]:
            found.append(f"refused with {reply['type']}, not a BundleError")
        if expect.must == "open":
            found.append(f"refused benign input: {message[:200]}")
        elif expect.reason is not None and not expect.reason.search(message):
            found.append(f"refused for the wrong reason: {message[:200]}")
        elif expect.not_reason is not None and expect.not_reason.search(message):
            found.append(f"refused for the wrong reason: {message[:200]}")
    return found


def _work_tree(bundle: Path) -> tuple[Path, Path, Path]:
    """A fresh tree per run (unique name): ``base/outside`` holds decoys (copies of the
    bundle's files), ``base/run/cases`` the case roots. Every case snapshots all of ``base``."""
    base = Path(tempfile.mkdtemp(prefix=f"edgetl-fuzz-{os.getpid()}-"))
    decoys = base / "outside"
    shutil.copytree(bundle, decoys, symlinks=True)
    cases = base / "run" / "cases"
    cases.mkdir(parents=True)
    return base, decoys, cases


def _system_file() -> Path | None:
    for candidate in ("/etc/passwd", "/etc/hostname", "/etc/os-release"):
        p = Path(candidate)
        if p.is_file() and os.access(p, os.R_OK) and 0 < p.stat().st_size <= 1 << 20:
            return p
    return None


class Tally:
    """Per-kind outcome counts and the findings of a run."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.findings: list[dict[str, Any]] = []
        self.slowest: dict[str, float] = {}
        self.reasons: dict[str, Counter[str]] = {}

    def add(self, kind: str, expect: Expect, reply: dict[str, Any], found: list[str], case: int) -> None:
        """Count one case's outcome and keep its findings."""
        row = self.counts.setdefault(kind, {"cases": 0, "opened": 0, "refused": 0, "failed": 0, "findings": 0})
        row["cases"] += 1
        row[reply["outcome"] if reply["outcome"] in ("opened", "refused") else "failed"] += 1
        row["findings"] += bool(found)
        if reply["outcome"] == "refused":  # what refusals say, paths and numbers folded
            said = re.sub(r"'[^']*'|\d+", "_", reply.get("message", ""))[:100]
            self.reasons.setdefault(kind, Counter())[said] += 1
        if "seconds" in reply:
            self.slowest[expect.op] = max(self.slowest.get(expect.op, 0.0), reply["seconds"])
        for what in found:
            self.findings.append({"case": case, "kind": kind, "op": expect.op, "note": expect.note, "finding": what})


def run(
    bundle: str | os.PathLike[str],
    cases: int,
    seed: int = 0,
    *,
    kinds: list[str] | None = None,
    targets: dict[str, str] | None = None,
    hang_seconds: float = HANG_SECONDS,
    save: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run ``cases`` mutations (round-robin over ``kinds``, default all) and return the
    outcome counts per kind and every finding (never raises on a finding).

    ``targets`` replaces what an operation calls (``{"unpack": "file.py:function"}``):
    the tests use it to prove that each check can fail.
    """
    bundle = Path(bundle)
    kinds = kinds or list(MUTATIONS)
    unknown = sorted(set(kinds) - set(MUTATIONS))
    if unknown:
        raise ValueError(f"unknown mutation kinds {unknown}; known: {sorted(MUTATIONS)}")
    targets = {**DEFAULT_TARGETS, **(targets or {})}
    base, decoys, case_dir = _work_tree(bundle)
    log = Path(tempfile.mkstemp(prefix="edgetl-fuzz-worker-", suffix=".log")[1])
    worker, tally, system_file = Worker(log), Tally(), _system_file()
    try:
        for i in range(cases):
            kind = kinds[i % len(kinds)]
            root = case_dir / f"c{i:06d}"
            root.mkdir()
            shutil.copytree(bundle, root / "b.edgetl")
            expect = MUTATIONS[kind](
                Context(root / "b.edgetl", root, decoys, system_file, random.Random(f"{seed}:{i}"))
            )
            before = snapshot(base)
            reply = worker.call({"target": targets[expect.op], "args": expect.args}, hang_seconds)
            allowed = expect.allowed if reply["outcome"] == "opened" else ()
            written = changes(before, snapshot(base), allowed)
            found = judge(expect, reply, CASE_SECONDS[expect.op])
            found += [f"wrote outside its output: {w}" for w in written[:5]]
            tally.add(kind, expect, reply, found, i)
            if found and save is not None:
                shutil.copytree(root, Path(save) / f"{kind}-{i:06d}", symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(root)
            if written:  # restore the decoys and anything else the case changed
                shutil.rmtree(decoys)
                shutil.copytree(bundle, decoys, symlinks=True)
    finally:
        worker.stop()
        shutil.rmtree(base, ignore_errors=True)
        log.unlink(missing_ok=True)
    outcomes = {f"{k}:{o}": n for k, row in tally.counts.items() for o in ("opened", "refused") if (n := row[o])}
    return {
        "cases": cases,
        "kinds": tally.counts,
        "outcomes": dict(sorted(outcomes.items())),
        "findings": tally.findings,
        "slowest_seconds": {k: round(v, 3) for k, v in tally.slowest.items()},
        "reasons": {k: c.most_common(3) for k, c in tally.reasons.items()},
    }


def table(stats: dict[str, Any]) -> str:
    """The per-kind outcome table and the findings, for people."""
    lines = [f"{'kind':<20}{'cases':>7}{'opened':>8}{'refused':>9}{'failed':>8}{'findings':>10}"]
    for kind, row in stats["kinds"].items():
        lines.append(
            f"{kind:<20}{row['cases']:>7}{row['opened']:>8}{row['refused']:>9}{row['failed']:>8}{row['findings']:>10}"
        )
    lines.append("(failed = another exception, a crash or a hang; findings = cases breaking any property)")
    seen: set[tuple[str, str]] = set()
    for f in stats["findings"]:
        key = (f["kind"], re.sub(r"\d+", "N", f["finding"])[:80])
        if key not in seen:  # one line per kind and finding shape
            seen.add(key)
            lines.append(f"  FINDING {f['kind']} case {f['case']} [{f['note']}]: {f['finding']}")
    return "\n".join(lines)


def main() -> int:
    """The command line: run, print the table, exit 1 on any finding."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, nargs="?")
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", help=f"comma-separated subset of: {','.join(MUTATIONS)}")
    parser.add_argument("--save", type=Path, help="copy every case with a finding here, to reproduce it")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON too")
    parser.add_argument("--reasons", action="store_true", help="print what the refusals said, per kind")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main()
    if args.bundle is None:
        parser.error("BUNDLE is required")
    t0 = time.perf_counter()
    stats = run(args.bundle, args.cases, args.seed, kinds=args.kinds.split(",") if args.kinds else None, save=args.save)
    if args.json:
        print(json.dumps(stats, indent=1))
    print(table(stats))
    if args.reasons:
        for kind, said in stats["reasons"].items():
            print(f"  {kind}: " + "; ".join(f"{n}x {m!r}" for m, n in said))
    n = len(stats["findings"])
    print(
        f"{stats['cases']} cases in {time.perf_counter() - t0:.0f}s, slowest per operation {stats['slowest_seconds']}"
    )
    print(f"FAIL: {n} finding(s)" if n else "PASS: no findings")
    return 1 if n else 0


if __name__ == "__main__":
    sys.exit(main())
