"""The SQLite device store: one transaction per action, content-hashed examples, a format
other languages read with plain SQLite, forgetting that leaves no byte behind, and errors
that say what happened."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from edgetl.cli import main
from edgetl.device import Classifier, HeadStore, Personalizer
from edgetl.device._head import HeadState
from edgetl.errors import StoreError


def personalize(path, bundle, x, y):
    p = Personalizer(Classifier.open(bundle.path, backend="onnxruntime"), path, margin=1.0, forget_margin=1.0)
    result = p.personalize(x, y)
    assert result.accepted, result
    return result.version


def raw_bytes(store_dir):
    """Every byte of every file of the store (database, WAL, shared memory, journal)."""
    return b"".join(f.read_bytes() for f in sorted(store_dir.iterdir()) if f.is_file())


def test_commit_keeps_examples_once_and_records_metrics_verbatim(tmp_path, digits_bundle, restyled_user):
    bundle, _ = digits_bundle
    (x, y), _ = restyled_user
    assert personalize(tmp_path / "s", bundle, x, y) == 1
    assert personalize(tmp_path / "s", bundle, x, y) == 2  # the same personalize again: a new head...
    store = HeadStore(tmp_path / "s", bundle)
    kept, labels = store.kept_examples()
    assert len(labels) == len(y) and sorted(labels) == sorted(y.tolist())  # ...and no example kept twice
    np.testing.assert_array_equal(kept[np.argsort(labels, kind="stable")], x[np.argsort(y, kind="stable")])
    history = store.history()
    assert [h["action"] for h in history] == ["commit", "commit"]
    assert history[0]["metrics"]["example_labels"] == sorted(set(y.tolist()))
    assert store.example_summary()["examples"] == len(y)


def test_heads_are_little_endian_float32_blobs_any_sqlite_reads(tmp_path, digits_bundle, restyled_user):
    """What a Kotlin or Swift app does with the platform's SQLite (docs/integration.md)."""
    bundle, _ = digits_bundle
    (x, y), _ = restyled_user
    personalize(tmp_path / "s", bundle, x, y)
    db = sqlite3.connect(tmp_path / "s" / "store.db")
    active = int(db.execute("SELECT value FROM meta WHERE key='active'").fetchone()[0])
    rows, cols, W, b = db.execute("SELECT rows, cols, W, b FROM versions WHERE number=?", (active,)).fetchone()
    head = HeadStore(tmp_path / "s", bundle).active().head
    np.testing.assert_array_equal(np.frombuffer(W, "<f4").reshape(rows, cols), head.W)
    np.testing.assert_array_equal(np.frombuffer(b, "<f4"), head.b)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_rollback_never_rolls_back_to_the_active_version(tmp_path, digits_bundle):
    """A reset at the factory head, or a forget of every version, leaves stack entries naming the
    active version: rollback passes over them instead of "succeeding" from version 0 to 0."""
    bundle, _ = digits_bundle
    store = HeadStore(tmp_path / "s", bundle)
    factory = HeadState.factory(bundle)
    store.reset()  # at version 0 already: the stack now holds 0
    with pytest.raises(StoreError, match=r"nothing to roll back to: no earlier version than the active one \(0\)"):
        store.rollback()
    store.commit(replace(factory, W=factory.W + np.float32(1)), {"step": 1})
    store.commit(replace(factory, W=factory.W + np.float32(2)), {"step": 2})
    assert store.rollback_stack() == [0, 0, 1]
    assert store.forget()["active"] == 0 and store.rollback_stack() == [0, 0]
    with pytest.raises(StoreError, match="nothing to roll back to"):
        store.rollback()
    assert store.history()[-1]["action"] == "forget"  # the refusal changed nothing
    store.commit(replace(factory, W=factory.W + np.float32(3)), {"step": 3})
    store.reset()
    assert store.rollback() == 3 and store.rollback() == 0  # the entries that differ still roll back, in order


def test_rollback_reset_and_damage_are_refused_or_undone(tmp_path, digits_bundle):
    bundle, _ = digits_bundle
    store = HeadStore(tmp_path / "s", bundle)
    factory = HeadState.factory(bundle)
    with pytest.raises(StoreError, match="nothing to roll back"):
        store.rollback()
    for step in (1, 2):
        store.commit(replace(factory, W=factory.W + np.float32(step)), {"step": step})
    assert store.rollback() == 1 and store.reset() == 0 and store.rollback() == 1
    assert [h["action"] for h in store.history()] == ["commit", "commit", "rollback", "reset", "rollback"]
    with sqlite3.connect(tmp_path / "s" / "store.db") as db:  # one flipped weight in version 2
        W = bytearray(db.execute("SELECT W FROM versions WHERE number=2").fetchone()[0])
        W[8] ^= 0x40
        db.execute("UPDATE versions SET W=? WHERE number=2", (bytes(W),))
        db.execute("INSERT INTO rollback_stack (version) VALUES (2)")
    with pytest.raises(StoreError, match="sha256"):
        store.rollback()
    assert store.active_version == 1  # refused: nothing changed
    with pytest.raises(StoreError, match="sha256"):
        store.verified_versions()
    with sqlite3.connect(tmp_path / "s" / "store.db") as db:
        db.execute("UPDATE meta SET value='0' WHERE key='bundle_id'")
    with pytest.raises(StoreError, match="belongs to another bundle"):
        HeadStore(tmp_path / "s", bundle)


def test_examples_stay_within_the_budget_largest_class_oldest_first(tmp_path, digits_bundle):
    bundle, _ = digits_bundle
    store = HeadStore(tmp_path / "s", bundle)
    factory = HeadState.factory(bundle)
    x = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1)).astype(np.uint8)  # 30 distinct examples
    store.commit(factory, {}, examples=(x[:5], ["5"] * 5))
    with sqlite3.connect(tmp_path / "s" / "store.db") as db:
        db.execute("UPDATE meta SET value='1024' WHERE key='budget_bytes'")  # 16 examples of 64 bytes
    store.commit(factory, {}, examples=(x[5:], ["6"] * 25))
    summary = store.example_summary()
    assert summary["total_bytes"] <= 1024 and summary["classes"]["5"]["count"] == 5
    kept, labels = store.kept_examples()
    assert summary["classes"]["6"]["count"] == 11 and kept[-1].tobytes() == x[-1].tobytes()  # the newest survive


def test_forget_leaves_no_byte_of_the_examples_or_heads_in_any_file(tmp_path, digits_bundle, restyled_user):
    bundle, _ = digits_bundle
    (x, y), _ = restyled_user
    store_dir = tmp_path / "s"
    personalize(store_dir, bundle, x, y)
    head = HeadStore(store_dir, bundle).active().head.W.astype("<f4").tobytes()
    victims = [im.astype(np.uint8).tobytes() for im in x[y == "7"]]
    # An app holding the store open keeps the WAL alive (closing the last connection would
    # checkpoint and delete it anyway, which would make this test pass without forget's work).
    app = sqlite3.connect(store_dir / "store.db")
    app.execute("SELECT COUNT(*) FROM meta").fetchone()
    blob = raw_bytes(store_dir)
    assert head[:256] in blob and all(v in blob for v in victims)  # the search can find them
    result = HeadStore(store_dir, bundle).forget("7")
    assert result == {"examples": len(victims), "versions": [1], "active": 0}
    blob = raw_bytes(store_dir)
    assert not any(v in blob for v in victims) and head[:256] not in blob
    assert b'"7"' not in blob  # the label's name is scrubbed from the history
    assert (store_dir / "store.db-wal").stat().st_size == 0
    app.close()
    assert sorted(HeadStore(store_dir, bundle).example_summary()["classes"]) == ["5", "6", "8", "9"]
    assert main(["store", "forget", "--all", "--store", str(store_dir)]) == 0
    assert not any(im.astype(np.uint8).tobytes() in raw_bytes(store_dir) for im in x)
    assert HeadStore(store_dir, bundle).kept_examples()[1] == []


def test_a_broken_stdout_is_never_a_traceback(tmp_path, digits_bundle):
    bundle, _ = digits_bundle
    store = HeadStore(tmp_path / "s", bundle)
    factory = HeadState.factory(bundle)
    for step in range(300):  # a history longer than a pipe buffer
        store.commit(factory, {"step": step})
    shell = f"{sys.executable} -m edgetl.cli store history --store {tmp_path / 's'} | head -2"
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert len(proc.stdout.splitlines()) == 2 and proc.stderr == "", proc.stderr
    full = subprocess.run(
        [sys.executable, "-m", "edgetl.cli", "store", "history", "--store", str(tmp_path / "s")],
        stdout=open("/dev/full", "w"),
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    assert full.returncode == 2 and "Traceback" not in full.stderr and "report could not be written" in full.stderr
