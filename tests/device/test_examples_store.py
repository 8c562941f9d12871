"""The device keeps the user's labelled examples: round trip, budget with class balance,
forgetting that leaves no readable copy, crash safety, corruption and pickle refusal."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgetl import _atomic
from edgetl.device._examples import DEFAULT_BUDGET_BYTES, INDEX, ExampleStore
from edgetl.errors import InputError, StoreError

IMG = (8, 8, 3)


def _images(rng, n, shape=IMG):
    # Random pixels do not compress: their raw bytes sit verbatim in the deflate stream, so
    # a search for them would find them if any copy were left.
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _segment_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("seg-*.npz"))


def _all_file_bytes(root: Path) -> dict[str, bytes]:
    """The bytes of every file under ``root`` (hidden and temporary files included) and, for
    each file that is a zip (an .npz segment), the decompressed bytes of each member: raw
    example bytes are searched for both as stored and as they would be once decompressed."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            out[str(p)] = data = p.read_bytes()
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    for name in z.namelist():
                        out[f"{p}:{name}"] = z.read(name)
            except zipfile.BadZipFile:
                pass
    return out


def _found(needle: bytes, files: dict[str, bytes]) -> list[str]:
    return [p for p, data in files.items() if needle in data]


def _index(store: ExampleStore) -> dict:
    return json.loads((store.path / INDEX).read_bytes())


# ----------------------------------------------------------------------------- round trip


def test_round_trip_uint8_images(tmp_path, rng):
    store = ExampleStore(tmp_path / "STORE" / "examples", input_shape=IMG, dtype="uint8")
    x1, x2 = _images(rng, 5), _images(rng, 3)
    r = store.add(x1, ["cat", "dog", "cat", "cat", "dog"])
    assert r["total_bytes"] > 0
    expected = {"added": 5, "kept": 5, "evicted": {}, "budget_bytes": DEFAULT_BUDGET_BYTES}
    assert r == {**expected, "total_bytes": r["total_bytes"]}
    store.add(x2, ["bird", "cat", "bird"])
    store.add(x1[0], ["dog"])  # one example without a batch dimension
    x, labels = store.examples()
    assert x.dtype == np.uint8 and x.shape == (9, *IMG)
    np.testing.assert_array_equal(x, np.concatenate([x1, x2, x1[:1]]))  # in the order added
    assert labels == ["cat", "dog", "cat", "cat", "dog", "bird", "cat", "bird", "dog"]
    # A new process (a new instance, spec read from the index) sees the same data.
    again = ExampleStore(tmp_path / "STORE" / "examples")
    assert again.input_shape == IMG and again.dtype == np.uint8
    y, labels2 = again.examples()
    np.testing.assert_array_equal(y, x)
    assert labels2 == labels
    s = again.summary()
    assert s["classes"] == {
        "bird": {"count": 2, "bytes": s["classes"]["bird"]["bytes"]},
        "cat": {"count": 4, "bytes": s["classes"]["cat"]["bytes"]},
        "dog": {"count": 3, "bytes": s["classes"]["dog"]["bytes"]},
    }
    on_disk = sum(p.stat().st_size for p in _segment_files(store.path))
    assert s["segment_bytes"] == on_disk == sum(c["bytes"] for c in s["classes"].values())
    assert s["total_bytes"] == on_disk + (store.path / INDEX).stat().st_size
    assert s["budget_bytes"] == DEFAULT_BUDGET_BYTES and not s["over_budget"] and s["examples"] == 9
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o700  # the user's data: private


def test_round_trip_float32_features(tmp_path, rng):
    store = ExampleStore(tmp_path / "ex", input_shape=[16], dtype="float32")
    feats = rng.normal(size=(7, 16)).astype(np.float32)
    store.add(feats, [f"g{i % 3}" for i in range(7)])
    store.add(feats[:2].astype(np.float64), ["g0", "g1"])  # float64 is kept as float32
    x, labels = store.examples()
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, np.concatenate([feats, feats[:2]]))
    assert labels == ["g0", "g1", "g2", "g0", "g1", "g2", "g0", "g0", "g1"]


def test_float_pixels_kept_exactly_as_uint8(tmp_path, rng):
    store = ExampleStore(tmp_path / "ex", input_shape=IMG, dtype=np.uint8)
    pixels = _images(rng, 3)
    store.add(pixels.astype(np.float32), ["a", "b", "a"])  # a bundle's float32 raw pixels
    np.testing.assert_array_equal(store.examples()[0], pixels)
    with pytest.raises(InputError, match="fractional values.*dtype='float32'"):
        store.add((pixels // 2).astype(np.float32) + 0.5, ["a", "b", "a"])


def test_empty_store(tmp_path):
    store = ExampleStore(tmp_path / "ex", input_shape=(4,), dtype="int8")
    x, labels = store.examples()
    assert x.shape == (0, 4) and x.dtype == np.int8 and labels == []
    assert store.summary()["examples"] == 0 and store.forget("a") == 0 and store.forget_all() == 0
    assert not (tmp_path / "ex").exists()  # reading never creates the directory


def test_many_small_adds_are_merged(tmp_path, rng):
    store = ExampleStore(tmp_path / "ex", input_shape=IMG, dtype="uint8")
    added = []
    for i in range(30):
        x = _images(rng, 1)
        added.append(x)
        store.add(x, ["a" if i % 3 else "b"])
    per_class = {}
    for e in _index(store)["segments"]:
        per_class[e["label"]] = per_class.get(e["label"], 0) + 1
    assert max(per_class.values()) <= 8  # not one file per add
    assert len(_segment_files(store.path)) == len(_index(store)["segments"])
    np.testing.assert_array_equal(store.examples()[0], np.concatenate(added))


# ----------------------------------------------------------------------------- budget


def test_budget_eviction_keeps_class_balance_and_the_newest(tmp_path, rng):
    budget = 12_000
    store = ExampleStore(tmp_path / "ex", input_shape=IMG, dtype="uint8", budget_bytes=budget)
    per_batch = {"A": 10, "B": 6, "C": 2, "D": 1}  # 4 batches: A 40, B 24, C 8, D 4
    history: dict[str, list[np.ndarray]] = {k: [] for k in per_batch}
    evicted_total: dict[str, int] = {}
    for _ in range(4):
        labels = [k for k, n in per_batch.items() for _ in range(n)]
        x = _images(rng, len(labels))
        for k, row in zip(labels, x):
            history[k].append(row)
        r = store.add(x, labels)
        assert r["total_bytes"] <= budget
        for k, n in r["evicted"].items():
            evicted_total[k] = evicted_total.get(k, 0) + n
    assert evicted_total, "the test must actually exceed the budget"
    on_disk = sum(p.stat().st_size for p in store.path.iterdir() if p.name != "LOCK")
    s = store.summary()
    assert on_disk == s["total_bytes"] <= budget and not s["over_budget"]
    assert on_disk > budget - 3 * 400, f"evicted far more than needed ({on_disk} of {budget} bytes used)"
    counts = {k: s["classes"][k]["count"] for k in per_batch}
    assert {k: 4 * n - counts[k] for k, n in per_batch.items() if 4 * n != counts[k]} == evicted_total
    # Only the largest classes lost examples, and they end level (within one example).
    touched = [counts[k] for k in evicted_total]
    assert set(evicted_total) == {"A", "B"} and max(touched) - min(touched) <= 1
    assert counts["C"] == 8 and counts["D"] == 4
    # Each class kept its newest examples, in order.
    x, labels = store.examples()
    for k in per_batch:
        kept = x[[i for i, l in enumerate(labels) if l == k]]
        np.testing.assert_array_equal(kept, np.stack(history[k][len(history[k]) - counts[k] :]))

    # A smaller budget evicts now, still from the largest classes first.
    r = store.set_budget(8_000)
    assert r["evicted"] and r["total_bytes"] <= 8_000 and store.summary()["total_bytes"] <= 8_000
    after = {k: c["count"] for k, c in store.summary()["classes"].items()}
    assert {k: counts[k] - after[k] for k in counts if counts[k] != after[k]} == r["evicted"]
    level = [after[k] for k in after if after[k] < 4 * per_batch[k]]
    untouched = [after[k] for k in after if after[k] == 4 * per_batch[k]]
    assert max(level) - min(level) <= 1 and all(n <= max(level) for n in untouched)


def test_examples_beyond_the_budget_are_reported(tmp_path, rng):
    store = ExampleStore(tmp_path / "ex", input_shape=(32, 32, 3), dtype="uint8", budget_bytes=8_000)
    r = store.add(_images(rng, 4, (32, 32, 3)), ["a", "a", "b", "b"])  # 3 KiB each, incompressible
    assert r["added"] == 4 and r["kept"] == 2 and r["evicted"] == {"a": 1, "b": 1}
    assert store.summary()["total_bytes"] <= 8_000


# ----------------------------------------------------------------------------- forgetting


def test_forget_leaves_no_readable_copy(tmp_path, rng):
    root = tmp_path / "STORE"  # a head store directory; the examples live in a subdirectory
    root.mkdir()
    (root / "ACTIVE.json").write_text("{}")  # stands for the head store's own files
    store = ExampleStore(root / "examples", input_shape=(16, 16, 3), dtype="uint8")
    secret = _images(rng, 6, (16, 16, 3))
    keep = _images(rng, 6, (16, 16, 3))
    # Mixed batches: the forgotten class shares adds with the kept one.
    store.add(np.concatenate([secret[:3], keep[:3]]), ["secret-class"] * 3 + ["keep"] * 3)
    store.add(np.concatenate([keep[3:], secret[3:]]), ["keep"] * 3 + ["secret-class"] * 3)
    secret_segments = [store.path / e["file"] for e in _index(store)["segments"] if e["label"] == "secret-class"]
    old_segment_bytes = [p.read_bytes() for p in secret_segments]
    # The search can fail: before forgetting, every secret example and segment is found.
    before = _all_file_bytes(root)
    assert all(_found(row.tobytes(), before) for row in secret)
    assert all(_found(seg, before) for seg in old_segment_bytes) and _found(b"secret-class", before)

    assert store.forget("secret-class") == 6
    after = _all_file_bytes(root)
    for row in secret:
        assert not _found(row.tobytes(), after)
    for seg in old_segment_bytes:
        assert not _found(seg, after)
        for start in range(0, len(seg) - 64, 256):  # nor any 64-byte piece of the old files
            assert not _found(seg[start : start + 64], after)
    assert not _found(b"secret-class", after)  # the index no longer names the label
    assert not any(p.exists() for p in secret_segments)
    x, labels = store.examples()
    np.testing.assert_array_equal(x, keep)
    assert labels == ["keep"] * 6 and list(store.summary()["classes"]) == ["keep"]
    assert store.forget("secret-class") == 0  # idempotent


def test_forget_overwrites_contents_not_just_names(tmp_path, rng):
    """Unlinking alone would leave the bytes in the freed inode: the files (the forgotten
    segment and the previous index) are zeroed through their inode first. A descriptor kept
    open from before, and a hard link made elsewhere, both see only zeros afterwards."""
    store = ExampleStore(tmp_path / "ex", input_shape=IMG, dtype="uint8")
    store.add(_images(rng, 4), ["gone", "kept"] * 2)
    seg = next(store.path / e["file"] for e in _index(store)["segments"] if e["label"] == "gone")
    size, index_size = seg.stat().st_size, (store.path / INDEX).stat().st_size
    os.link(seg, tmp_path / "hardlink.npz")
    with open(seg, "rb", buffering=0) as held, open(store.path / INDEX, "rb", buffering=0) as held_index:
        assert held.read(4) == b"PK\x03\x04"
        store.forget("gone")
        held.seek(0)
        held_index.seek(0)
        assert held.read() == bytes(size)
        assert held_index.read() == bytes(index_size)
    assert (tmp_path / "hardlink.npz").read_bytes() == bytes(size)
    assert store.examples()[1] == ["kept", "kept"]


def test_forget_compressible_data(tmp_path):
    """Compressible examples never appear raw on disk: the check that matters is that the
    exact compressed bytes (and any piece of them) are gone."""
    store = ExampleStore(tmp_path / "ex", input_shape=(64,), dtype="float32")
    smooth = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (5, 1)) * np.arange(1, 6, dtype=np.float32)[:, None]
    store.add(smooth, ["s"] * 5)
    store.add(smooth[:2] + 10, ["t", "t"])
    seg = next(store.path / e["file"] for e in _index(store)["segments"] if e["label"] == "s")
    old = seg.read_bytes()
    assert _found(old[100:164], _all_file_bytes(store.path))
    store.forget("s")
    after = _all_file_bytes(store.path)
    assert not _found(old, after) and not any(_found(old[i : i + 32], after) for i in range(0, len(old) - 32, 16))
    np.testing.assert_array_equal(store.examples()[0], smooth[:2] + 10)


def test_forget_all_leaves_no_segment(tmp_path, rng):
    store = ExampleStore(tmp_path / "ex", input_shape=IMG, dtype="uint8")
    data = _images(rng, 10)
    store.add(data, ["a", "b"] * 5)
    store.add(data[:4], ["c"] * 4)
    next_seq = _index(store)["next_seq"]
    assert store.forget_all() == 14
    assert _segment_files(tmp_path) == [] and store.examples()[1] == []
    files = _all_file_bytes(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["INDEX.json", "LOCK"]
    for row in data:
        assert not _found(row.tobytes(), files)
    assert not _found(b'"a"', files) and store.summary()["examples"] == 0
    store.add(data[:1], ["a"])  # still usable; sequence numbers are never reused
    assert _index(store)["segments"][0]["seq"] == [next_seq]


def test_erase_destroys_even_an_unreadable_store(tmp_path, rng):
    store = ExampleStore(tmp_path / "ex", input_shape=IMG, dtype="uint8")
    data = _images(rng, 4)
    store.add(data, ["a"] * 4)
    (store.path / INDEX).write_text("{broken")
    with pytest.raises(StoreError, match="corrupt.*erase"):
        ExampleStore(store.path)
    assert len(_segment_files(store.path)) == 1  # an unreadable index never deletes data
    removed = ExampleStore.erase(store.path)
    assert INDEX in removed and not store.path.exists()


# ----------------------------------------------------------------------------- crashes


def test_failed_index_write_leaves_the_old_store(tmp_path, rng, monkeypatch):
    store = ExampleStore(tmp_path / "ex", input_shape=IMG, dtype="uint8")
    old = _images(rng, 4)
    store.add(old, ["a", "b", "a", "b"])
    index_before = (store.path / INDEX).read_bytes()
    real = _atomic.replace_file

    def crash_on_index(path, data):
        if Path(path).name == INDEX:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(_atomic, "replace_file", crash_on_index)
    with pytest.raises(StoreError, match="disk is full"):
        store.add(_images(rng, 3), ["c", "a", "c"])
    with pytest.raises(StoreError, match="disk is full"):
        store.forget("a")
    monkeypatch.setattr(_atomic, "replace_file", real)
    assert (store.path / INDEX).read_bytes() == index_before
    assert len(_segment_files(store.path)) == 2  # the new segments were destroyed again
    x, labels = ExampleStore(store.path).examples()
    np.testing.assert_array_equal(x, old)
    assert labels == ["a", "b", "a", "b"]


CRASHER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import numpy as np
    from edgetl import _atomic
    from edgetl.device._examples import ExampleStore

    path, op, crash_at, when = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    real, calls = _atomic.replace_file, []

    def crashing(p, data):
        calls.append(Path(p).name)
        if len(calls) == crash_at and when == "before":
            os._exit(17)  # power cut: no exception handler, no cleanup runs
        if len(calls) == crash_at and when == "during":
            os.replace = lambda a, b: os._exit(17)  # temporary file written, not yet renamed
        real(p, data)
        if len(calls) == crash_at and when == "after":
            os._exit(17)

    _atomic.replace_file = crashing
    store = ExampleStore(path)
    if op == "add":
        rng = np.random.default_rng(1)
        store.add(rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8), ["a", "new", "b", "new", "a", "b"])
    else:
        store.forget("a")
    print("no crash", calls)
    """
)


def _referenced(path: Path) -> set[str]:
    return {e["file"] for e in json.loads((path / INDEX).read_bytes())["segments"]}


def _crash(path, op, crash_at, when):
    args = [sys.executable, "-c", CRASHER, str(path), op, str(crash_at), when]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("op, writes", [("add", 4), ("forget", 1)])
def test_crash_at_every_write_leaves_old_or_new(tmp_path, rng, op, writes):
    """Kill the process before, during (temporary file written, not renamed) and after each
    file replace of one add (3 segments, then the index) or one forget (the index): after
    reopening, the store holds exactly the old or exactly the new examples, and no file that
    the index does not reference."""
    base = _images(rng, 6)
    for crash_at in range(1, writes + 1):
        for when in ("before", "during", "after"):
            path = tmp_path / f"{op}-{crash_at}-{when}"
            ExampleStore(path, input_shape=IMG, dtype="uint8").add(base, ["a", "b"] * 3)
            old = ExampleStore(path).examples()
            proc = _crash(path, op, crash_at, when)
            assert proc.returncode == 17, proc.stdout + proc.stderr
            leftovers = {p.name for p in path.iterdir()} - {INDEX, "LOCK"} - _referenced(path)
            committed = crash_at == writes and when == "after"
            if when == "during" or (op == "add" and not committed and not (crash_at == 1 and when == "before")):
                assert leftovers, "the crash must leave an orphan for this test to mean anything"
            if op == "forget" and committed:
                assert len(leftovers) == 1  # the forgotten class's segment, not yet destroyed
            reopened = ExampleStore(path)
            assert sorted(reopened.cleaned) == sorted(leftovers)
            assert {p.name for p in path.iterdir()} == {INDEX, "LOCK"} | _referenced(path)
            x, labels = reopened.examples()
            if not committed:
                np.testing.assert_array_equal(x, old[0])
                assert labels == old[1]
            elif op == "add":
                assert labels == old[1] + ["a", "new", "b", "new", "a", "b"]
            else:
                assert labels == ["b"] * 3
                files = _all_file_bytes(path)
                for row in base[0::2]:  # the forgotten class: its orphaned files were destroyed
                    assert not _found(row.tobytes(), files)


def test_concurrent_writers_lose_nothing(tmp_path, rng):
    path = tmp_path / "ex"
    ExampleStore(path, input_shape=(4,), dtype="float32")
    errors = []

    def writer(tag):
        try:
            store = ExampleStore(path, input_shape=(4,), dtype="float32")
            for i in range(10):
                store.add(np.full((1, 4), i, dtype=np.float32), [tag])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("x", "y", "z")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    x, labels = ExampleStore(path).examples()
    assert sorted(labels) == ["x"] * 10 + ["y"] * 10 + ["z"] * 10
    for tag in "xyz":
        np.testing.assert_array_equal(x[[i for i, l in enumerate(labels) if l == tag], 0], np.arange(10))


# ----------------------------------------------------------------------------- corruption


def test_corrupt_segment_is_detected_and_others_stay_readable(tmp_path, rng):
    store = ExampleStore(tmp_path / "ex", input_shape=IMG, dtype="uint8")
    a, b, c = _images(rng, 3), _images(rng, 2), _images(rng, 2)
    store.add(a, ["a"] * 3)
    store.add(b, ["b"] * 2)
    store.add(c, ["c"] * 2)
    seg_b = next(store.path / e["file"] for e in _index(store)["segments"] if e["label"] == "b")
    data = bytearray(seg_b.read_bytes())
    data[len(data) // 2] ^= 0x01
    seg_b.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"{seg_b.name}.*sha256.*drop_corrupt"):
        store.examples()
    assert list(store.verify()) == [seg_b.name]
    store.add(_images(rng, 1), ["a"])  # writing elsewhere still works
    assert store.drop_corrupt() == {"dropped": {seg_b.name: "b"}, "lost": {"b": 2}}
    x, labels = store.examples()
    assert labels == ["a"] * 3 + ["c"] * 2 + ["a"]
    np.testing.assert_array_equal(x[:3], a)
    np.testing.assert_array_equal(x[3:5], c)
    assert not seg_b.exists() and store.verify() == {}


@pytest.mark.parametrize("damage", ["truncate", "delete", "replace_with_other_segment"])
def test_other_segment_damage_is_named(tmp_path, rng, damage):
    store = ExampleStore(tmp_path / "ex", input_shape=IMG, dtype="uint8")
    store.add(_images(rng, 3), ["a"] * 3)
    store.add(_images(rng, 3), ["b"] * 3)
    seg_a, seg_b = (store.path / e["file"] for e in _index(store)["segments"])
    if damage == "truncate":
        seg_a.write_bytes(seg_a.read_bytes()[:-10])
        expected = "truncated or replaced"
    elif damage == "delete":
        seg_a.unlink()
        expected = "cannot be read"
    else:
        seg_a.write_bytes(seg_b.read_bytes())  # same size, valid npz, wrong content
        expected = "sha256"
    with pytest.raises(StoreError, match=rf"{seg_a.name}.*{expected}"):
        store.examples()
    assert store.forget("a") == 3  # forgetting needs no readable data
    assert store.examples()[1] == ["b"] * 3


class _Payload:
    """Unpickling this runs os.mkdir(marker): proof of code execution, if it ever happened."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _object_npz(marker, n):
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.array([_Payload(marker)] * n, dtype=object))
    return buf.getvalue()


def test_pickled_segment_with_matching_checksum_is_refused(tmp_path, rng):
    # The payload is live: loading it with pickles allowed does run it.
    probe = tmp_path / "probe-ran"
    with np.load(io.BytesIO(_object_npz(probe, 1)), allow_pickle=True) as z:
        z["x"]
    assert probe.is_dir()

    store = ExampleStore(tmp_path / "ex", input_shape=IMG, dtype="uint8")
    store.add(_images(rng, 2), ["a", "a"])
    marker = tmp_path / "payload-ran"
    index = _index(store)
    entry = index["segments"][0]
    evil = _object_npz(marker, 2)
    (store.path / entry["file"]).write_bytes(evil)
    entry.update(sha256=hashlib.sha256(evil).hexdigest(), bytes=len(evil))  # checksum matches
    (store.path / INDEX).write_text(json.dumps(index))
    with pytest.raises(StoreError, match="never unpickles"):
        store.examples()
    with pytest.raises(StoreError, match="never unpickles"):
        ExampleStore(store.path, budget_bytes=4096).add(_images(rng, 30), ["a"] * 30)  # eviction reads it
    assert not marker.exists()


def test_decompression_bomb_segment_is_refused(tmp_path, rng):
    store = ExampleStore(tmp_path / "ex", input_shape=IMG, dtype="uint8")
    store.add(_images(rng, 1), ["a"])
    index = _index(store)
    entry = index["segments"][0]
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((20000, *IMG), dtype=np.uint8))  # 3.8 MB from a few KB
    bomb = buf.getvalue()
    (store.path / entry["file"]).write_bytes(bomb)
    entry.update(sha256=hashlib.sha256(bomb).hexdigest(), bytes=len(bomb))
    (store.path / INDEX).write_text(json.dumps(index))
    with pytest.raises(StoreError, match="unpacks to"):
        store.examples()


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "x, labels, message",
    [
        (
            np.zeros((2, 8, 8, 1), np.uint8),
            ["a", "b"],
            r"shape \(8, 8, 3\) \(one example\) or \(n, 8, 8, 3\), received \(2, 8, 8, 1\)",
        ),
        (np.zeros((0, 8, 8, 3), np.uint8), [], "empty batch"),
        (np.zeros((2, 8, 8, 3), bool), ["a", "b"], "numeric.*received dtype bool"),
        (np.array([["x"] * 3] * 2), ["a", "b"], "numeric"),
        (np.zeros((2, 8, 8, 3), np.uint8), ["a"], "2 examples but 1 labels"),
        (np.zeros((2, 8, 8, 3), np.uint8), "ab", "sequence of strings.*received 'ab'"),
        (np.zeros((2, 8, 8, 3), np.uint8), ["a", ""], r"labels\[1\] must be a non-empty string"),
        (np.zeros((2, 8, 8, 3), np.uint8), ["a", 3], r"labels\[1\] must be a non-empty string.*received 3"),
        (np.zeros((1, 8, 8, 3), np.uint8), ["x" * 257], "at most 256"),
        (np.full((2, 8, 8, 3), np.nan), ["a", "b"], r"NaN or infinite values \(first at example 0\)"),
        (np.full((1, 8, 8, 3), 256), ["a"], r"from 256 to 256; a uint8 store keeps whole numbers in 0..255"),
        (np.full((1, 8, 8, 3), -1), ["a"], "0..255"),
    ],
)
def test_bad_examples_are_refused(tmp_path, x, labels, message):
    store = ExampleStore(tmp_path / "ex", input_shape=IMG, dtype="uint8")
    with pytest.raises(InputError, match=message):
        store.add(x, labels)
    assert not (tmp_path / "ex" / INDEX).exists()


def test_bad_float_features_are_refused(tmp_path):
    store = ExampleStore(tmp_path / "ex", input_shape=(3,), dtype="float32")
    with pytest.raises(InputError, match=r"first at example 1"):
        store.add(np.array([[0, 1, 2], [0, np.inf, 2]], np.float32), ["a", "b"])
    with pytest.raises(InputError, match="beyond float32's range"):
        store.add(np.array([[0, 1e300, 2]]), ["a"])


def test_bad_store_arguments(tmp_path, rng):
    with pytest.raises(InputError, match="budget_bytes must be an int of at least 4096, received 100"):
        ExampleStore(tmp_path / "a", input_shape=IMG, dtype="uint8", budget_bytes=100)
    with pytest.raises(InputError, match="input_shape must be"):
        ExampleStore(tmp_path / "a", input_shape=(None, 8), dtype="uint8")
    with pytest.raises(InputError, match=r"dtype must be one of \('uint8', 'int8', 'float32'\), received 'float64'"):
        ExampleStore(tmp_path / "a", input_shape=IMG, dtype="float64")
    with pytest.raises(InputError, match="give input_shape and dtype to create"):
        ExampleStore(tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        ExampleStore(tmp_path / "file", input_shape=IMG, dtype="uint8")
    store = ExampleStore(tmp_path / "b", input_shape=IMG, dtype="uint8")
    store.add(_images(rng, 1), ["a"])
    with pytest.raises(StoreError, match=r"holds examples of shape \(8, 8, 3\) uint8, not \(4,\) float32"):
        ExampleStore(tmp_path / "b", input_shape=(4,), dtype="float32")
