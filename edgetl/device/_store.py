"""The device store: one SQLite database per store (stdlib ``sqlite3``, numpy; nothing else).

``STORE/store.db`` (with SQLite's ``store.db-wal`` and ``store.db-shm`` beside it) holds
everything personal edgetl keeps on a device: the head versions, the active pointer, the
rollback stack, the history, the kept examples and the trusted keys. This module is the
only one that reads or writes it; docs/integration.md gives the schema for Kotlin/Swift.

Every user action (a personalize commit: examples + head version + pointer + history; a
rollback; a reset; a migration; a forget) is ONE transaction (``BEGIN IMMEDIATE``, WAL,
``synchronous=FULL``): it happens entirely or not at all, and concurrent processes wait
for each other (busy timeout) instead of failing or interleaving. Every fault becomes a
:class:`StoreError` that says which of the two happened: the transaction rolled back and
nothing changed, or it committed (then only what came after failed).

Forgetting deletes with ``secure_delete`` (freed content is overwritten with zeros) and
then checkpoints the WAL with TRUNCATE, so no byte of the forgotten examples or heads
remains in any file of the store. What no software store can promise: blocks the file
system freed earlier, copy-on-write file systems and snapshots, and flash wear-levelling
keep old physical copies until they are reused (README, "The device store").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgetl.bundle import Bundle, key_id, load_public_key
from edgetl.device._guard import FORGOTTEN, redact, redact_text
from edgetl.device._head import HeadState
from edgetl.errors import InputError, StoreError

DB = "store.db"
FORMAT = 1  # PRAGMA user_version
BUSY_TIMEOUT_MS = 30_000  # another process's transaction is waited for, not failed on
# 8 MiB of kept examples: ~300 raw 96x96x3 images, ~30,000 64-d float32 vectors; a rounding
# error of a phone's storage. Past it, the largest class loses its oldest example.
DEFAULT_BUDGET_BYTES = 8 << 20
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE versions (
    number INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after a forget
    bundle_id TEXT NOT NULL, labels TEXT NOT NULL, example_labels TEXT NOT NULL,
    rows INTEGER NOT NULL, cols INTEGER NOT NULL,  -- W and anchor are rows x cols, b and mask are cols
    W BLOB NOT NULL, b BLOB NOT NULL, mask BLOB NOT NULL, anchor BLOB NOT NULL,
    sha256 TEXT NOT NULL);
CREATE TABLE rollback_stack (position INTEGER PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, action TEXT NOT NULL,
    version INTEGER NOT NULL, txn TEXT NOT NULL, info TEXT NOT NULL);
CREATE TABLE examples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, label TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE, x BLOB NOT NULL);
CREATE TABLE trust (key_id TEXT PRIMARY KEY, pem TEXT NOT NULL);
"""
# The trained tail layer of a version (issue 24; sha256 of W1's then b1's bytes). Stores made
# before it get the table on their first tail commit, in that commit's transaction.
_TAILS = """CREATE TABLE IF NOT EXISTS tails (
    version INTEGER PRIMARY KEY, rows INTEGER NOT NULL, cols INTEGER NOT NULL,
    W1 BLOB NOT NULL, b1 BLOB NOT NULL, sha256 TEXT NOT NULL)"""
SCHEMA += _TAILS + ";\n"
_F32 = np.dtype("<f4")


def bundle_identity(bundle: Bundle) -> str:
    """Which bundle a store belongs to: the hashes of its backbone and factory head."""
    parts = sorted(a.sha256 for a in bundle.manifest.artifacts if a.role in ("backbone", "head_init"))
    return hashlib.sha256(json.dumps([bundle.labels, parts]).encode()).hexdigest()


@dataclass(frozen=True)
class Version:
    number: int
    head: HeadState
    info: dict[str, Any]


def _head_blobs(head: HeadState) -> dict[str, bytes]:
    return {k: np.ascontiguousarray(v, dtype=_F32).tobytes() for k, v in head.arrays().items()}


def _digest(blobs: dict[str, bytes], labels: str) -> str:
    """sha256 of the ``labels`` column's text (UTF-8) and the four blobs, in this order."""
    h = hashlib.sha256(labels.encode())
    for key in ("W", "b", "mask", "anchor"):
        h.update(blobs[key])
    return h.hexdigest()


def _reason(exc: BaseException) -> str:
    code, name = getattr(exc, "errno", None), getattr(exc, "sqlite_errorname", "")
    if code == errno.ENOSPC or name == "SQLITE_FULL":
        return "the disk is full"
    if code in (errno.EACCES, errno.EROFS, errno.EPERM) or name.startswith("SQLITE_READONLY"):
        return "it is read-only"
    return str(exc) or type(exc).__name__


class HeadStore:
    """Versioned heads, kept examples and trusted keys for one bundle, in one SQLite database.

    Args:
        path: the store directory (created, mode 0700, on the first write; opening alone
            writes nothing).
        bundle: the bundle whose heads it holds; a store of another bundle is refused.
            ``None`` opens an existing store for history, rollback, reset, forget, migrate.
    """

    def __init__(self, path: str | os.PathLike[str], bundle: Bundle | None) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None  # opened on first use, kept: one per instance
        self._lock = threading.RLock()  # the connection serves one thread at a time
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store {str(self.path)!r} exists and is not a directory")
        self.bundle = bundle
        self._factory = HeadState.factory(bundle) if bundle is not None else None
        meta = self.describe()
        if bundle is None:
            if not meta:
                raise StoreError(f"{str(self.path)!r} is not a head store (no {DB}); give the bundle to create one")
            self.bundle_id = meta["bundle_id"]
            return
        self.bundle_id = bundle_identity(bundle)
        if meta and meta["bundle_id"] != self.bundle_id:
            raise StoreError(
                f"store {str(self.path)!r} belongs to another bundle ({meta.get('bundle_name')!r}); use a separate "
                "store directory per bundle"
            )

    # ----------------------------------------------------------------- connection

    @property
    def db_path(self) -> Path:
        return self.path / DB

    def _connect(self, *, create: bool) -> sqlite3.Connection | None:
        """A connection with the store's settings; ``None`` when there is no store yet and
        ``create`` is false. Creating makes the directory and the schema."""
        if not create and not self.db_path.exists():
            return None
        if create:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        db = sqlite3.connect(
            self.db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            for pragma in (f"busy_timeout={BUSY_TIMEOUT_MS}", "synchronous=FULL", "secure_delete=ON"):
                db.execute(f"PRAGMA {pragma}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and create:
                self._create_schema(db)
            elif version not in (0, FORMAT):
                raise StoreError(f"store {str(self.db_path)!r} has format {version}; this edgetl reads {FORMAT}")
            return db
        except BaseException:
            db.close()
            raise

    def _create_schema(self, db: sqlite3.Connection) -> None:
        if self.bundle is None:
            raise StoreError("creating a store needs its bundle")
        db.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the database file
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:  # another process may have won the race
                for statement in SCHEMA.split(";")[:-1]:  # executescript would COMMIT first
                    db.execute(statement)
                spec = self.bundle.input_spec
                meta = {
                    "bundle_id": self.bundle_id,
                    "bundle_name": self.bundle.name,
                    "backbone_id": self.bundle.manifest.backbone_id or "",
                    "active": "0",
                    "example_shape": json.dumps(list(spec.shape)),
                    "example_dtype": "uint8" if spec.is_image else "float32",
                    "budget_bytes": str(DEFAULT_BUDGET_BYTES),
                }
                db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                db.execute(f"PRAGMA user_version={FORMAT}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _db(self, *, create: bool) -> sqlite3.Connection | None:
        """The instance's connection, opened on first use (``None``: no store yet, and not ``create``)."""
        if self._conn is None:
            self._conn = self._connect(create=create)
        elif create and self._conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            self._create_schema(self._conn)
        return self._conn

    def close(self) -> None:
        """Close the connection (also done on any fault: a broken connection is never reused)."""
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error, OSError):
                    self._conn.close()
                self._conn = None

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection | None]:
        """The connection in a read transaction (``None``: no store yet); every fault becomes a StoreError."""
        with self._lock:
            try:
                db = self._db(create=False)
                if db is not None:
                    db.execute("BEGIN")  # one snapshot for every read of the block (WAL: writers go on)
                yield db
            except (sqlite3.Error, OSError) as exc:
                self.close()
                raise StoreError(f"cannot read store {str(self.path)!r}: {_reason(exc)}; nothing was changed") from None
            finally:
                if self._conn is not None and self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error, OSError):
                        self._conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def _transaction(self, action: str) -> Iterator[tuple[sqlite3.Connection, str]]:
        """One user action: ``BEGIN IMMEDIATE`` ... ``COMMIT``. The body must write one
        history row with the token it is given. On a fault, the truth is read back from a
        fresh connection (what any next process sees): committed -> the action happened and
        no error is raised; else StoreError saying it rolled back and nothing changed."""
        with self._lock:
            token, committing = secrets.token_hex(16), False
            try:
                db = self._db(create=True)
                db.execute("BEGIN IMMEDIATE")
                yield db, token
                committing = True
                db.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                self.close()  # rolls back what did not commit
                # Only a failed COMMIT may have committed (its frames can reach the WAL before the error).
                if committing and self._committed(token):
                    return
                raise StoreError(
                    f"cannot {action} in store {str(self.path)!r}: {_reason(exc)}; the transaction was rolled back "
                    "and nothing changed"
                ) from None
            except BaseException:
                if self._conn is not None and self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error, OSError):
                        self._conn.execute("ROLLBACK")
                raise

    def _committed(self, token: str) -> bool:
        """Whether the transaction marked ``token`` is in the store (three tries: a read can
        fail too). Unknown after three failures: raise, saying so."""
        for _ in range(3):
            try:
                with contextlib.closing(self._connect(create=False)) as db:
                    if db is None or not _has_schema(db):
                        return False
                    return bool(db.execute("SELECT 1 FROM history WHERE txn=?", (token,)).fetchone())
            except (sqlite3.Error, OSError, StoreError):
                time.sleep(0.05)
        raise StoreError(
            f"store {str(self.path)!r} failed during a write and cannot be read back, so whether the action took "
            "effect is unknown; `edgetl store history` shows it once the store is readable"
        )

    # ----------------------------------------------------------------- reading

    def describe(self, db: sqlite3.Connection | None = None) -> dict[str, str]:
        """The store's settings: ``bundle_id``, ``bundle_name``, ``backbone_id``, ``active``,
        ``example_shape``, ``example_dtype``, ``budget_bytes`` (empty: no store yet)."""
        if db is None:
            with self._reading() as db:
                return self.describe(db) if db is not None else {}
        return dict(db.execute("SELECT key, value FROM meta").fetchall()) if _has_schema(db) else {}

    @property
    def active_version(self) -> int:
        return int(self.describe().get("active", 0))

    def active(self) -> Version:
        """The active head, checksum-verified; version 0 is the bundle's factory head."""
        with self._reading() as db:
            number = int(self.describe(db).get("active", 0)) if db is not None else 0
            if number == 0:
                if self._factory is None:
                    raise StoreError("the factory head lives in the bundle: open the store with its bundle")
                return Version(0, self._factory, {"action": "factory"})
            info = db.execute("SELECT info FROM history WHERE version=? ORDER BY id LIMIT 1", (number,)).fetchone()
            return Version(number, self._load(db, number), json.loads(info[0]) if info else {})

    def _load(self, db: sqlite3.Connection, number: int) -> HeadState:
        row = db.execute(
            "SELECT labels, rows, cols, W, b, mask, anchor, sha256, bundle_id FROM versions WHERE number=?", (number,)
        ).fetchone()
        if row is None:
            raise StoreError(f"head version {number} is not in store {str(self.path)!r}")
        labels, rows, cols, *arrays, sha, owner = row
        blobs = dict(zip(("W", "b", "mask", "anchor"), arrays))
        if _digest(blobs, labels) != sha:
            raise StoreError(f"head version {number} fails its sha256 check: corrupted; roll back or reset the store")
        sizes = {"W": rows * cols * 4, "b": cols * 4, "mask": cols * 4, "anchor": rows * cols * 4}
        if any(len(blobs[k]) != n for k, n in sizes.items()):
            raise StoreError(f"head version {number} has blobs of the wrong size for {rows}x{cols}")
        a = {k: np.frombuffer(v, _F32).astype(np.float32) for k, v in blobs.items()}
        head = HeadState(
            a["W"].reshape(rows, cols), a["b"], a["mask"], a["anchor"].reshape(rows, cols), tuple(json.loads(labels))
        )
        if self._factory is not None and owner == self.bundle_id and head.W.shape != self._factory.W.shape:
            raise StoreError(f"head version {number} has shape {head.W.shape}, the bundle's is {self._factory.W.shape}")
        return replace(head, tail=self._load_tail(db, number))

    def _load_tail(self, db: sqlite3.Connection, number: int) -> dict | None:
        """The version's trained tail layer (``W1``, ``b1``), checksum-verified, or None."""
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='tails'").fetchone():
            return None
        row = db.execute("SELECT rows, cols, W1, b1, sha256 FROM tails WHERE version=?", (number,)).fetchone()
        if row is None:
            return None
        rows, cols, w1, b1, sha = row
        if hashlib.sha256(w1 + b1).hexdigest() != sha or len(w1) != rows * cols * 4 or len(b1) != cols * 4:
            raise StoreError(f"the tail of head version {number} fails its sha256 check: corrupted; roll back or reset")
        return {"W1": np.frombuffer(w1, _F32).reshape(rows, cols).copy(), "b1": np.frombuffer(b1, _F32).copy()}

    def history(self) -> list[dict[str, Any]]:
        """Every action, oldest first: ``{"version", "action", "time", ...}`` (a commit's
        ``metrics``; ``removed`` once a forget destroyed the version)."""
        with self._reading() as db:
            if db is None or not _has_schema(db):
                return []
            live = {n for (n,) in db.execute("SELECT number FROM versions")}
            out = []
            for t, action, version, info in db.execute("SELECT time, action, version, info FROM history ORDER BY id"):
                entry = {"version": version, "action": action, "time": t, **json.loads(info)}
                if action in ("commit", "migrate") and version and version not in live:
                    entry["removed"] = True
                out.append(entry)
            return out

    def rollback_stack(self) -> list[int]:
        with self._reading() as db:
            return [v for (v,) in db.execute("SELECT version FROM rollback_stack ORDER BY position")] if db else []

    def verified_versions(self) -> dict[int, HeadState]:
        """Every stored version, loaded and sha256-checked, by number (StoreError if damaged)."""
        with self._reading() as db:
            if db is None:
                return {}
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise StoreError(f"store {str(self.db_path)!r} fails SQLite's integrity check")
            return {n: self._load(db, n) for (n,) in db.execute("SELECT number FROM versions").fetchall()}

    def kept_examples(self) -> tuple[np.ndarray, list[str]]:
        """Every kept example, in the order it was kept: ``(x, labels)``, each checked against its sha256."""
        with self._reading() as db:
            meta = self.describe(db) if db is not None else {}
            if not meta:
                return np.zeros((0,)), []
            shape, dtype = tuple(json.loads(meta["example_shape"])), np.dtype(meta["example_dtype"]).newbyteorder("<")
            xs, labels = [], []
            for seq, label, digest, blob in db.execute("SELECT seq, label, sha256, x FROM examples ORDER BY seq"):
                if _example_digest(label, blob) != digest or len(blob) != math.prod(shape) * dtype.itemsize:
                    raise StoreError(f"kept example {seq} ({label!r}) fails its sha256 check: corrupted")
                xs.append(np.frombuffer(blob, dtype).reshape(shape))
                labels.append(label)
            return (np.stack(xs) if xs else np.zeros((0, *shape), dtype)), labels

    def example_summary(self) -> dict[str, Any]:
        """``{"classes": {label: {"count", "bytes"}}, "examples", "total_bytes", "budget_bytes"}``."""
        with self._reading() as db:
            meta = self.describe(db) if db is not None else {}
            rows = (
                db.execute("SELECT label, COUNT(*), SUM(LENGTH(x)) FROM examples GROUP BY label").fetchall()
                if meta
                else []
            )
        classes = {label: {"count": n, "bytes": b} for label, n, b in sorted(rows)}
        return {
            "classes": classes,
            "examples": sum(c["count"] for c in classes.values()),
            "total_bytes": sum(c["bytes"] for c in classes.values()),
            "budget_bytes": int(meta.get("budget_bytes", DEFAULT_BUDGET_BYTES)),
        }

    def trusted_keys(self) -> list[bytes] | None:
        """The public keys (PEM) a new bundle must be signed by to migrate to, if set."""
        with self._reading() as db:
            pems = [pem.encode() for (pem,) in db.execute("SELECT pem FROM trust ORDER BY key_id")] if db else []
        return pems or None

    # ----------------------------------------------------------------- writing

    def commit(
        self,
        head: HeadState,
        metrics: dict[str, Any] | None = None,
        *,
        examples: tuple[np.ndarray, list[str]] | None = None,
    ) -> int:
        """In one transaction: keep ``examples`` (deduplicated by content, within the budget),
        store ``head`` as a new version, make it active and record ``metrics`` (verbatim JSON)
        in the history. Returns the version number.

        Raises:
            StoreError: nothing was committed (read-only, disk full, I/O error).
        """
        if self._factory is None:
            raise StoreError("committing a head needs the bundle: open the store with it")
        if head.W.shape != self._factory.W.shape:
            raise StoreError(f"head shape {head.W.shape} does not match the bundle's {self._factory.W.shape}")
        metrics = dict(metrics or {})
        info = {"labels": list(head.labels), "metrics": metrics}
        trained_on = sorted(set(metrics.get("example_labels", [])))
        rows = self._example_rows(*examples) if examples is not None else []
        with self._transaction("commit the head") as (db, txn):
            self._check_owner(db)
            if rows:
                db.executemany("INSERT OR IGNORE INTO examples (label, sha256, x) VALUES (?, ?, ?)", rows)
                self._fit_budget(db)
            number = self._insert_version(db, head, trained_on)
            db.execute(
                "INSERT INTO rollback_stack (version) VALUES (CAST((SELECT value FROM meta WHERE key='active') AS INT))"
            )
            self._set_active(db, number)
            self._log(db, txn, "commit", number, info)
        return number

    def record_rejection(self, info: dict[str, Any]) -> None:
        """Keep a refused candidate's reason (``info``, verbatim JSON) in the history, in one
        transaction that changes nothing else: whoever reads the history later sees why a
        personalization did not take, as well as why the others did."""
        if self._factory is None:
            raise StoreError("recording a personalization needs the bundle: open the store with it")
        with self._transaction("record the refusal") as (db, txn):
            self._check_owner(db)
            self._log(db, txn, "rejected", self._active(db), {"metrics": dict(info)})

    def rollback(self) -> int:
        """Make the previously active version active again; returns its number.

        Entries naming the version that is active already are passed over (and dropped): after a
        reset at the factory head, or a forget that removed the versions between, they would
        "roll back" to where the store is."""
        with self._transaction("roll back") as (db, txn):
            self._check_owner(db)
            previous = self._active(db)
            stack = db.execute("SELECT position, version FROM rollback_stack ORDER BY position DESC").fetchall()
            top = next((entry for entry in stack if entry[1] != previous), None)
            if top is None:
                raise StoreError(f"nothing to roll back to: no earlier version than the active one ({previous})")
            if top[1]:
                self._load(db, top[1])  # refuse to activate a damaged version
            db.execute("DELETE FROM rollback_stack WHERE position>=?", (top[0],))
            self._set_active(db, top[1])
            self._log(db, txn, "rollback", top[1], {"from": previous})
        return top[1]

    def reset(self) -> int:
        """Make the factory head (version 0) active; earlier versions stay (rollback undoes it)."""
        with self._transaction("reset") as (db, txn):
            self._check_owner(db)
            previous = self._active(db)
            db.execute("INSERT INTO rollback_stack (version) VALUES (?)", (previous,))
            self._set_active(db, 0)
            self._log(db, txn, "reset", 0, {"from": previous})
        return 0

    def switch_bundle(self, new: Bundle, head: HeadState | None, info: dict[str, Any]) -> int:
        """Migration's one transaction: the store now belongs to ``new``, with ``head`` as a
        new active version (``None``: the new factory head); the rollback stack is emptied
        (the old bundle's versions cannot run with the new one). Returns the active version."""
        new_id = bundle_identity(new)
        with self._transaction("migrate") as (db, txn):
            self._check_owner(db)
            number = 0
            if head is not None:
                number = self._insert_version(db, head, sorted(info.get("example_labels", [])), bundle_id=new_id)
                info = {**info, "labels": list(head.labels)}
            db.execute("DELETE FROM rollback_stack")
            meta = {"bundle_id": new_id, "bundle_name": new.name, "backbone_id": new.manifest.backbone_id or ""}
            db.executemany("UPDATE meta SET value=? WHERE key=?", [(v, k) for k, v in meta.items()])
            self._set_active(db, number)
            self._log(db, txn, "migrate", number, info)
        self.bundle, self.bundle_id, self._factory = new, new_id, HeadState.factory(new)
        return number

    def forget(self, label: str | None = None) -> dict[str, Any]:
        """Forget ``label``'s kept examples and every head version trained on them, or
        (``None``) every kept example and every personalized head, in one transaction; the
        label's name is scrubbed from the history. Then the WAL is checkpointed and truncated
        so that no byte of what was deleted remains in any file of the store.

        Returns:
            ``{"examples": removed, "versions": [removed numbers], "active": version}``.
        """
        if label is not None and (not isinstance(label, str) or not label):
            raise InputError(f"label must be a non-empty string, received {label!r}")
        with self._transaction("forget") as (db, txn):
            self._check_owner(db)
            where, args = ("", ()) if label is None else (" WHERE label=?", (label,))
            count = db.execute(f"SELECT COUNT(*) FROM examples{where}", args).fetchone()[0]
            db.execute(f"DELETE FROM examples{where}", args)
            doomed = sorted(
                n
                for n, trained_on in db.execute("SELECT number, example_labels FROM versions")
                if label is None or label in json.loads(trained_on)
            )
            db.executemany("DELETE FROM versions WHERE number=?", [(n,) for n in doomed])
            if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='tails'").fetchone():
                db.executemany("DELETE FROM tails WHERE version=?", [(n,) for n in doomed])  # trained on it too
            db.executemany("DELETE FROM rollback_stack WHERE version=?", [(n,) for n in doomed])
            active = self._active(db)
            if active in doomed:
                survivor = db.execute("SELECT MAX(number) FROM versions WHERE bundle_id=?", (self._owner(db),))
                active = survivor.fetchone()[0] or 0
                self._set_active(db, active)
            for row_id, info in db.execute("SELECT id, info FROM history").fetchall():
                scrubbed = json.dumps(_scrub(json.loads(info), label))
                if scrubbed != info:
                    db.execute("UPDATE history SET info=? WHERE id=?", (scrubbed, row_id))
            what = {"what": "everything" if label is None else "one class", "versions_removed": doomed}
            self._log(db, txn, "forget", active, {**what, "examples_removed": count})
        self._truncate_wal("forget")
        return {"examples": count, "versions": doomed, "active": active}

    def set_trust(self, public_keys: list[str | os.PathLike[str]]) -> list[str]:
        """Require every bundle this store migrates to be signed by one of these Ed25519
        public keys (PEM files); returns their key ids."""

        try:
            pems = [Path(p).read_bytes() for p in public_keys]
        except OSError as exc:
            raise InputError(f"cannot read public key: {exc}") from None
        keys = {key_id(load_public_key(pem)): pem.decode() for pem in pems}  # refuses non-Ed25519 keys
        with self._transaction("set the trusted keys") as (db, txn):
            db.execute("DELETE FROM trust")
            db.executemany("INSERT INTO trust VALUES (?, ?)", keys.items())
            self._log(db, txn, "trust", self._active(db), {"key_ids": sorted(keys)})
        return sorted(keys)

    # ----------------------------------------------------------------- helpers

    def _example_rows(self, x: np.ndarray, labels: list[str]) -> list[tuple[str, str, bytes]]:
        """Rows to keep: raw bytes in the store's example dtype (images as uint8 pixels)."""
        spec = self.bundle.input_spec
        x = np.asarray(x)
        if tuple(x.shape[1:]) != tuple(spec.shape) or len(x) != len(labels):
            raise InputError(f"examples must be (n, {tuple(spec.shape)}) with one label each, received {x.shape}")
        if spec.is_image:
            x = np.clip(np.round(np.asarray(x, np.float32)), 0, 255).astype(np.uint8)
        else:
            x = np.asarray(x, _F32)
        out = []
        for row, label in zip(x, labels):
            blob = np.ascontiguousarray(row).tobytes()
            out.append((str(label), _example_digest(str(label), blob), blob))
        return out

    def _fit_budget(self, db: sqlite3.Connection) -> None:
        """Evict the oldest example of the largest class until the examples fit the budget."""
        budget = int(db.execute("SELECT value FROM meta WHERE key='budget_bytes'").fetchone()[0])
        total = db.execute("SELECT COALESCE(SUM(LENGTH(x)), 0) FROM examples").fetchone()[0]
        while total > budget:
            seq, size = db.execute(
                "SELECT MIN(seq), LENGTH(x) FROM examples WHERE label=(SELECT label FROM examples GROUP BY label "
                "ORDER BY COUNT(*) DESC, MIN(seq) LIMIT 1)"
            ).fetchone()
            db.execute("DELETE FROM examples WHERE seq=?", (seq,))
            total -= size

    def _insert_version(
        self, db: sqlite3.Connection, head: HeadState, trained_on: list[str], bundle_id: str | None = None
    ) -> int:
        blobs = _head_blobs(head)
        labels = json.dumps(list(head.labels))
        cur = db.execute(
            "INSERT INTO versions (bundle_id, labels, example_labels, rows, cols, W, b, mask, anchor, sha256) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (bundle_id or self.bundle_id, labels, json.dumps(trained_on), *head.W.shape,
             blobs["W"], blobs["b"], blobs["mask"], blobs["anchor"], _digest(blobs, labels)),
        )  # fmt: skip
        number = int(cur.lastrowid)
        if head.tail is not None:  # same transaction: a version and its tail, or neither
            db.execute(_TAILS)
            w1, b1 = (np.ascontiguousarray(head.tail[k], dtype=_F32).tobytes() for k in ("W1", "b1"))
            db.execute(
                "INSERT INTO tails (version, rows, cols, W1, b1, sha256) VALUES (?, ?, ?, ?, ?, ?)",
                (number, *np.shape(head.tail["W1"]), w1, b1, hashlib.sha256(w1 + b1).hexdigest()),
            )
        return number

    def _owner(self, db: sqlite3.Connection) -> str:
        return db.execute("SELECT value FROM meta WHERE key='bundle_id'").fetchone()[0]

    def _check_owner(self, db: sqlite3.Connection) -> None:
        """Refuse to write a store another process migrated to another bundle meanwhile."""
        if self._owner(db) != self.bundle_id:
            raise StoreError(f"store {str(self.path)!r} now belongs to another bundle (migrated meanwhile)")

    def _active(self, db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT value FROM meta WHERE key='active'").fetchone()[0])

    def _set_active(self, db: sqlite3.Connection, number: int) -> None:
        db.execute("UPDATE meta SET value=? WHERE key='active'", (str(number),))

    def _log(self, db: sqlite3.Connection, txn: str, action: str, version: int, info: dict[str, Any]) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        db.execute(
            "INSERT INTO history (time, action, version, txn, info) VALUES (?, ?, ?, ?, ?)",
            (now, action, version, txn, json.dumps(info)),
        )

    def _truncate_wal(self, action: str) -> None:
        """Copy the WAL into the database and truncate it to zero bytes (after a forget, the
        WAL still holds the deleted rows' old pages)."""
        busy, why, deadline = 1, "another process kept reading it", time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while busy and time.monotonic() < deadline:  # readers of other processes make it busy: retry
            try:
                with self._lock:
                    db = self._db(create=False)
                    busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] if db is not None else 0
            except (sqlite3.Error, OSError) as exc:
                self.close()
                busy, why = 1, _reason(exc)
                break
            if busy:
                time.sleep(0.01)
        if busy:
            raise StoreError(
                f"{action} committed, but the store's write-ahead log could not be truncated ({why}): until it is, "
                f"the deleted data's old pages remain in {DB}-wal; run the {action} again"
            )


def _has_schema(db: sqlite3.Connection) -> bool:
    return db.execute("PRAGMA user_version").fetchone()[0] == FORMAT


def _example_digest(label: str, blob: bytes) -> str:
    return hashlib.sha256(label.encode() + b"\0" + blob).hexdigest()


def _scrub(value: Any, label: str | None, key: str = "") -> Any:
    """``value`` with ``label`` (``None``: every label in a ``labels``/``example_labels``
    list) replaced by ``<forgotten>``, wherever it appears (values, dict keys, and the
    quoted class names in texts such as the guard's reasons; its evidence by its own rule)."""
    if key == "guard" and isinstance(value, dict):
        return redact(value, label)
    if isinstance(value, dict):
        return {(FORGOTTEN if k == label else k): _scrub(v, label, k) for k, v in value.items()}
    if isinstance(value, list):
        if label is None and key in ("labels", "example_labels"):
            return [FORGOTTEN] * len(value)
        return [_scrub(v, label) for v in value]
    if isinstance(value, str):
        return FORGOTTEN if value == label else redact_text(value, label)
    return value
