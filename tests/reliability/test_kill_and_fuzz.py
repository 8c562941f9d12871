"""Bounded runs of tools/kill_test.py and tools/fuzz_bundle.py (the long runs are the tools)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetl.bundle import unpack_bundle, validate_manifest
from edgetl.errors import BundleError


def load_tool(name: str):
    """conftest.load_tool, imported on use: the fuzzer's worker loads this file by path to
    reach its targets below, where conftest is not importable."""
    from conftest import load_tool as load

    return load(name)


def _committed_store(path: Path, bundle, steps: int, tail_shape: tuple[int, int] | None = None):
    """A store at ``path`` with ``steps`` committed versions (head W + step, three kept
    examples each, and with ``tail_shape`` a tail layer of value step / -step): the factory head."""
    from dataclasses import replace

    import numpy as np

    from edgetl.device._head import HeadState
    from edgetl.device._store import HeadStore

    factory = HeadState.factory(bundle)
    store = HeadStore(path, bundle)
    x = np.zeros((3, 8, 8, 1), np.uint8)
    for step in range(1, steps + 1):
        x[:, 0, 0, 0] = np.arange(3) + 10 * step
        tail = None
        if tail_shape is not None:
            tail = {"W1": np.full(tail_shape, step, np.float32), "b1": np.full(tail_shape[1:], -step, np.float32)}
        head = replace(factory, W=factory.W + np.float32(step), tail=tail)
        store.commit(head, {"step": step}, examples=(x, [f"s{step}"] * 3))
    store.close()
    return factory


def _damaged(good: Path, path: Path, sql: str, *args) -> Path:
    """A copy of the store ``good`` at ``path`` with one SQL statement applied."""
    import sqlite3

    shutil.copytree(good, path)
    with sqlite3.connect(path / "store.db") as db:
        db.execute(sql, args)
    return path


@pytest.mark.slow  # hundreds of SIGKILLed commits, ~30 s
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install strace)")
def test_store_survives_kills_at_random_and_at_every_write_of_a_commit(tmp_path, digits_bundle):
    stats = load_tool("kill_test").run(digits_bundle[0].path, tmp_path, random_kills=6, per_step=1, sample=12)
    per_commit = stats["syscalls_per_commit"]
    assert {"fdatasync", "pwrite64"} <= set(per_commit), per_commit  # a commit writes and syncs
    assert set(stats["kills_by_kind"]) == {"random instant", *(f"{sc} of a commit" for sc in per_commit)}
    assert stats["kills"] >= 6 + 2 * len(per_commit) and stats["commits_seen"] > 0


def test_the_kill_check_sees_a_damaged_store(tmp_path, digits_bundle):
    """check_store refuses each kind of damage a kill could do (so the kill test can fail)."""
    from edgetl.device._store import HeadStore
    from edgetl.errors import StoreError

    kill = load_tool("kill_test")
    bundle = digits_bundle[0]
    good = tmp_path / "good"
    factory = _committed_store(good, bundle, 3)
    assert kill.check_store(good, bundle, factory, 3)["active"] == 3

    def damaged(name, sql, *args):
        return _damaged(good, tmp_path / name, sql, *args)

    with pytest.raises(AssertionError, match="older than committed"):  # a committed version lost
        kill.check_store(good, bundle, factory, 4)
    flipped = damaged("flipped", "UPDATE versions SET W = ? WHERE number = 1", b"\0" * 4 * factory.W.size)
    with pytest.raises(StoreError, match="sha256"):  # an old version, not the active one
        kill.check_store(flipped, bundle, factory, 3)
    wrong = tmp_path / "wrong"
    shutil.copytree(good, wrong)
    HeadStore(wrong, bundle).commit(factory, {"step": 9})
    with pytest.raises(AssertionError, match="another version's weights"):
        kill.check_store(wrong, bundle, factory, 3)
    lost = damaged("lost", "DELETE FROM versions WHERE number = 2")
    with pytest.raises(AssertionError, match="history names"):
        kill.check_store(lost, bundle, factory, 3)
    half = damaged("half", "DELETE FROM examples WHERE seq = 4")
    with pytest.raises(AssertionError, match="examples kept in part"):
        kill.check_store(half, bundle, factory, 3)


TAIL = (1024, 64)  # the tail layer of the test CNN (tools/tail_rates.py): 256 KiB, ~64 pages per commit


@pytest.mark.slow  # SIGKILLed tail commits, ~25 s
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install strace)")
def test_store_survives_kills_during_tail_commits(tmp_path, digits_bundle):
    """Every commit also writes a tail layer (the ``tails`` row of its version, same
    transaction): after a kill at random or inside any write of the commit, every version
    holds its own whole tail, the previous version is intact, and no tail is half-written."""
    stats = load_tool("kill_test").run(
        digits_bundle[0].path, tmp_path, random_kills=4, per_step=1, sample=10, tail_shape=TAIL
    )
    per_commit = stats["syscalls_per_commit"]
    assert per_commit["pwrite64"] >= 64, per_commit  # the tail's pages are written inside the commit
    assert stats["kills_by_kind"].get("pwrite64 of a commit", 0) >= 2 and stats["commits_seen"] > 0, stats


def test_the_kill_check_sees_a_damaged_tail(tmp_path, digits_bundle):
    """check_store refuses a version that lost its tail row, a tail holding another version's
    layer (re-hashed, so only the content check can see it), and a tail where none was committed."""
    import hashlib

    import numpy as np

    kill = load_tool("kill_test")
    bundle = digits_bundle[0]
    shape = (16, 4)
    good = tmp_path / "good"
    factory = _committed_store(good, bundle, 2, shape)
    assert kill.check_store(good, bundle, factory, 2, shape)["versions"] == 2
    with pytest.raises(AssertionError, match="committed without a tail layer and has one"):
        kill.check_store(good, bundle, factory, 2, None)

    def damaged(name, sql, *args):
        return _damaged(good, tmp_path / name, sql, *args)

    with pytest.raises(AssertionError, match="version 1 lost its tail layer"):
        kill.check_store(damaged("lost", "DELETE FROM tails WHERE version = 1"), bundle, factory, 2, shape)
    w1, b1 = np.full(shape, 2, np.float32).tobytes(), np.full(shape[1:], -1, np.float32).tobytes()
    mixed = damaged(
        "mixed", "UPDATE tails SET W1 = ?, sha256 = ? WHERE version = 1", w1, hashlib.sha256(w1 + b1).hexdigest()
    )
    with pytest.raises(AssertionError, match="version 1's tail layer holds another version's weights or a mix"):
        kill.check_store(mixed, bundle, factory, 2, shape)


# ----------------------------------------------------------------------------- fuzzing

# Operations on a bundle directory or archive (read_bundle, unpack_bundle): fast, 20 per kind.
READ_KINDS = [
    "truncate",
    "bit_flip",
    "json_type",
    "huge_shape",
    "deep_nesting",
    "unknown_fields",
    "hostile_path",
    "symlink_outside",
    "manifest_symlink",
    "missing_file",
    "zip_slip",
    "corrupt_archive",
    "archive_entries",
]
# Classifier.open + use on rehashed model and .npz mutations: ~0.06 s each, 9 per kind.
OPEN_KINDS = [
    "model_bytes",
    "model_swap",
    "head_nonfinite",
    "head_pickle",
    "head_huge",
    "head_missing_key",
    "head_dtype",
    "head_shape",
    "replay_nonfinite",
    "replay_pickle",
    "replay_huge",
    "replay_missing_key",
    "replay_labels",
    "replay_shape",
    "npz_garbage",
    "npz_extra_keys",
]
PER_OPEN_KIND = 9


@pytest.fixture(scope="module")
def fuzz():
    return load_tool("fuzz_bundle")


@pytest.fixture(scope="module")
def read_fuzz(fuzz, digits_bundle):
    return fuzz.run(digits_bundle[0].path, cases=20 * len(READ_KINDS), seed=0, kinds=READ_KINDS)


@pytest.mark.slow  # a fuzz campaign; the checks that each can fail stay fast
def test_fuzzed_bundles_and_archives_only_raise_bundle_errors(fuzz, read_fuzz):
    assert not read_fuzz["findings"], fuzz.table(read_fuzz)
    kinds = read_fuzz["kinds"]
    for kind in ("truncate", "deep_nesting", "hostile_path", "symlink_outside", "manifest_symlink", "missing_file"):
        assert kinds[kind]["refused"] == 20, kind  # hostile: every one refused, for the right reason
    for kind in ("zip_slip", "archive_entries"):
        assert kinds[kind]["refused"] == 20, kind
    assert kinds["unknown_fields"]["opened"] == 20  # forward compatible: ignored, not refused


@pytest.fixture(scope="module")
def open_fuzz(fuzz, digits_bundle):
    return fuzz.run(digits_bundle[0].path, cases=PER_OPEN_KIND * len(OPEN_KINDS), seed=0, kinds=OPEN_KINDS)


@pytest.mark.slow  # a fuzz campaign over both runtimes, ~30 s
@pytest.mark.parametrize(
    "kind",
    OPEN_KINDS,
)
def test_fuzzed_classifier_open_and_npz_arrays(fuzz, open_fuzz, kind):
    """Classifier.open (both backends) and the use that follows on rehashed mutations: a clean
    open or an EdgeTLError; NaN/inf, pickles, wrong shapes and dtypes refused."""
    assert open_fuzz["kinds"][kind]["cases"] == PER_OPEN_KIND
    found = [f for f in open_fuzz["findings"] if f["kind"] == kind]
    assert not found, "\n".join(f"case {f['case']} [{f['note']}]: {f['finding']}" for f in found)


# Targets the fuzzer's worker imports from this file (``targets=``) to prove each check can fail.


def naive_unpack(archive, out):
    """An unpacker without name checks: every entry is written where its name says."""
    import zipfile

    from edgetl.bundle import read_bundle

    out = Path(out)
    out.mkdir(parents=True)
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            if not info.is_dir():
                dest = out / info.filename  # an absolute name replaces `out` altogether
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(info))
    return read_bundle(out)


def naive_read(path):
    """A reader that checks sizes and hashes but not where a name leads."""
    import hashlib

    root = Path(path)
    for a in json.loads((root / "manifest.json").read_text())["artifacts"]:
        f = root / a["file"]
        if not f.is_file():
            raise BundleError(f"artifact {a['file']!r} is missing")
        if hashlib.sha256(f.read_bytes()).hexdigest() != a["sha256"]:
            raise BundleError(f"artifact {a['file']!r} fails its sha256 check")


def missing_read(path):
    """Refuses everything as missing: the wrong reason for a hostile path."""
    raise BundleError("artifact is missing from the bundle")


def naive_open(path, backend, precision, store):
    """Loads the factory head with pickles allowed and no checks."""
    import numpy as np

    with np.load(Path(path) / "head_init.npz", allow_pickle=True) as f:
        return {k: f[k] for k in f.files}


def hang(**_):
    """Never answers."""
    import time

    time.sleep(3600)


def crash(**_):
    """Kills the worker (SIGABRT)."""
    import os

    os.abort()


def type_error(**_):
    """Raises an exception that is no EdgeTLError."""
    raise TypeError("not an EdgeTLError")


def silent_refusal(**_):
    """A BundleError without a message."""
    raise BundleError("")


def input_error(**_):
    """An EdgeTLError, but not the BundleError a bundle operation owes."""
    from edgetl.errors import InputError

    raise InputError("an InputError where a BundleError is due")


def tamper_decoy(path):
    """Changes a file outside the case, keeping its size and restoring its mtime: only the
    snapshot's content hash and ctime can see it."""
    import os

    decoy = Path(path).parents[3] / "outside" / "manifest.json"
    st = decoy.stat()
    data = bytearray(decoy.read_bytes())
    data[0] ^= 1
    decoy.write_bytes(bytes(data))
    os.utime(decoy, ns=(st.st_atime_ns, st.st_mtime_ns))
    raise BundleError("refused, after tampering")


def leave_temp(archive, out):
    """Refuses, leaving a temporary directory next to the target."""
    (Path(out).parent / ".u.edgetl.tmp-left-behind").mkdir()
    raise BundleError("corrupt archive, temporary directory left behind")


def _findings(fuzz, bundle, kinds, cases, op, target, **kw):
    stats = fuzz.run(bundle, cases=cases, seed=0, kinds=kinds, targets={op: f"{__file__}:{target}"}, **kw)
    return stats, stats["findings"]


def test_the_escape_check_sees_a_naive_unpacker_write_outside(fuzz, digits_bundle):
    stats, found = _findings(fuzz, digits_bundle[0].path, ["zip_slip"], 18, "unpack", "naive_unpack")
    per_case = {}
    for f in found:
        per_case.setdefault(f["case"], (f["note"], []))[1].append(f["finding"])
    assert len(per_case) == 18  # every hostile archive was accepted by the naive unpacker, and reported
    assert all("accepted hostile input" in fs for _, fs in per_case.values())
    wrote = {note for note, fs in per_case.values() if any(x.startswith("wrote outside its output") for x in fs)}
    assert {"dotdot", "absolute", "escape"} <= wrote, per_case
    lines = [x for _, fs in per_case.values() for x in fs]
    assert any("escaped-" in x and "created" in x for x in lines)  # ../../ next to the case root
    assert any("/outside/" in x and "changed" in x for x in lines)  # a real decoy file overwritten


@pytest.mark.parametrize(
    "target, kinds, expected",
    [
        ("naive_read", ["hostile_path", "symlink_outside", "manifest_symlink"], "accepted hostile input"),
        ("missing_read", ["hostile_path", "symlink_outside"], "refused for the wrong reason"),
        ("missing_read", ["unknown_fields"], "refused benign input"),
        ("type_error", ["missing_file"], "raised builtins.TypeError (not an EdgeTLError)"),
        ("silent_refusal", ["missing_file"], "BundleError without a message"),
        ("input_error", ["missing_file"], "not a BundleError"),
        ("crash", ["missing_file"], "crash: worker died with exit code -6"),
        ("tamper_decoy", ["missing_file"], "wrote outside its output: changed"),
    ],
)
def test_each_fuzz_check_can_fail(fuzz, digits_bundle, target, kinds, expected):
    cases = 4 * len(kinds)
    stats, found = _findings(fuzz, digits_bundle[0].path, kinds, cases, "read", target)
    assert {f["case"] for f in found if expected in f["finding"]} == set(range(cases)), fuzz.table(stats)


def test_the_fuzzer_bounds_a_hang_and_sees_leftovers(fuzz, digits_bundle):
    stats, found = _findings(fuzz, digits_bundle[0].path, ["missing_file"], 1, "read", "hang", hang_seconds=3)
    assert [f["finding"][:5] for f in found] == ["hang:"]
    stats, found = _findings(fuzz, digits_bundle[0].path, ["corrupt_archive"], 2, "unpack", "leave_temp")
    assert all(".u.edgetl.tmp-left-behind" in f["finding"] for f in found) and len(found) == 2


def test_the_fuzzer_sees_an_unpickling_loader(fuzz, digits_bundle):
    """A loader that allows pickles runs the planted payload (it creates a directory): the
    snapshot reports it, and the hostile head counts as accepted."""
    stats, found = _findings(fuzz, digits_bundle[0].path, ["head_pickle", "head_nonfinite"], 4, "open", "naive_open")
    text = [f["finding"] for f in found]
    assert any("created" in t and "UNPICKLED" in t for t in text), fuzz.table(stats)
    assert sum(t == "accepted hostile input" for t in text) == 4


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_manifest_validation_never_raises_anything_but_bundle_error(value):
    try:
        validate_manifest(value)
    except BundleError as exc:
        assert str(exc)


VALID = {
    "schema_version": 1,
    "name": "tiny",
    "labels": ["a", "b"],
    "input_spec": {"shape": [3], "dtype": "float32"},
    "embedding_size": 3,
    "head": {"max_classes": 4},
    "artifacts": [
        {"file": "w.npz", "role": "head_init", "format": "npz", "precision": "fp32", "sha256": "0" * 64, "size": 1}
    ],
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["schema_version", "name", "labels", "input_spec", "embedding_size", "head", "artifacts"]), JSON)
def test_each_manifest_field_with_any_json_value(field, value):
    manifest = json.loads(json.dumps(VALID))
    manifest[field] = value
    try:
        validate_manifest(manifest)
    except BundleError as exc:
        assert str(exc)


def test_zip_slip_entries_write_nothing_outside(tmp_path, digits_bundle):
    import zipfile

    from edgetl.bundle import pack_bundle

    archive = pack_bundle(digits_bundle[0].path, tmp_path / "b.zip")
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("../../escaped.txt", b"x")
    target = tmp_path / "deep" / "er" / "u.edgetl"
    with pytest.raises(BundleError, match="plain file names"):
        unpack_bundle(archive, target)
    assert not list(tmp_path.rglob("escaped.txt")) and not target.exists()
    clean = pack_bundle(digits_bundle[0].path, tmp_path / "clean.zip")
    assert unpack_bundle(clean, tmp_path / "ok.edgetl").labels == digits_bundle[0].labels


@pytest.mark.parametrize("value", [7, "abc", {"name": "x"}, None, [1] * 65])
def test_artifact_tensor_lists_of_the_wrong_type(value):
    """Regression: the long fuzz run found `inputs: 7` raising TypeError instead of BundleError."""
    manifest = json.loads(json.dumps(VALID))
    manifest["artifacts"][0]["inputs"] = value
    with pytest.raises(BundleError, match="inputs"):
        validate_manifest(manifest)
