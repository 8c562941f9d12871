"""Crash-safe, versioned storage of personalized heads (numpy + stdlib only).

Layout of a store directory (everything personal edgetl keeps on a device is here)::

    ACTIVE.json       pointer: the bundle the store belongs to, the active version, its file
                      and sha256, the rollback stack, and the history (actions, times, the
                      labels and guard scores of each version; no example data)
    v000001.npz ...   one head per version (W, b, mask, anchor, labels): derived from the
                      user's examples
    examples/         the user's labelled examples, kept to rebuild heads for a new bundle
                      (edgetl/device/_examples.py: INDEX.json, seg-*.npz, LOCK)
    TRUST.pem         optional: public keys a new bundle must be signed by to migrate to

A commit writes the version file (temporary file, fsync, rename, directory fsync), then
replaces ``ACTIVE.json`` the same way. A crash at any instant therefore leaves either the
old pointer (the new version file, if present, is an unreferenced orphan) or the new one,
both pointing at complete, checksummed files. Version 0 is the bundle's factory head and
is never stored, so it can always be restored. Migration to a new bundle and forgetting
(:mod:`edgetl.device._lifecycle`) follow the same rule: new files first, the pointer last.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._atomic import make_dirs, replace_file
from edgetl.bundle import Bundle
from edgetl.device._head import HeadState
from edgetl.errors import StoreError

POINTER = "ACTIVE.json"
EXAMPLES = "examples"
TRUST = "TRUST.pem"
# History actions that create a version file (and record its sha256): a rollback may
# return to any of them.
CREATES_VERSION = ("commit", "migrate")
_VERSION_FILE = re.compile(r"^v(\d{6})\.npz$")
FORMAT = 1


def live_versions(history: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The history entries of versions that exist: created by a commit or a migration, not
    the factory head (0), not removed by a forget; by version number."""
    return {
        int(h["version"]): h
        for h in history
        if h.get("action") in CREATES_VERSION and h.get("version") and not h.get("removed")
    }


def bundle_identity(bundle: Bundle) -> str:
    """Which bundle a store belongs to: the hashes of its backbone and factory head."""
    parts = sorted(a.sha256 for a in bundle.manifest.artifacts if a.role in ("backbone", "head_init"))
    return hashlib.sha256(json.dumps([bundle.labels, parts]).encode()).hexdigest()


@dataclass(frozen=True)
class Version:
    number: int
    head: HeadState
    info: dict[str, Any]


class HeadStore:
    """Versioned heads for one bundle in one directory.

    Args:
        path: the store directory (created if missing).
        bundle: the bundle whose heads it holds; a store of another bundle is refused.
    """

    def __init__(self, path: str | os.PathLike[str], bundle: Bundle | None) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store {str(self.path)!r} exists and is not a directory")
        pointer = self._read_pointer()
        if bundle is None:  # history, rollback and reset of an existing store need no bundle
            if pointer is None:
                raise StoreError(
                    f"{str(self.path)!r} is not a head store (no {POINTER}); give the bundle to create one"
                )
            self.bundle, self.bundle_id, self._factory = None, pointer.get("bundle_id"), None
            self._recover(pointer)
            return
        self.bundle = bundle
        self.bundle_id = bundle_identity(bundle)
        self._factory = HeadState.factory(bundle)
        if pointer is not None and pointer.get("bundle_id") != self.bundle_id:
            raise StoreError(
                f"store {str(self.path)!r} belongs to another bundle ({pointer.get('bundle_name')!r}); use a separate "
                "store directory per bundle"
            )
        self._recover(pointer)

    def _recover(self, pointer: dict[str, Any] | None) -> None:
        """Finish a forget a crash interrupted after its commit point (the label must not
        come back; see edgetl/device/_lifecycle.py)."""
        if pointer is not None and pointer.get("pending_forget"):
            from edgetl.device._lifecycle import finish_forget

            finish_forget(self)

    # ----------------------------------------------------------------- reading

    def _read_pointer(self) -> dict[str, Any] | None:
        f = self.path / POINTER
        if not f.exists():
            return None
        try:
            pointer = json.loads(f.read_text())
            if not isinstance(pointer, dict) or pointer.get("format") != FORMAT:
                raise ValueError(
                    f"unknown store format {pointer.get('format') if isinstance(pointer, dict) else pointer!r}"
                )
            return pointer
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"store pointer {str(f)!r} is unreadable ({exc})") from None

    def _pointer(self) -> dict[str, Any]:
        return self._read_pointer() or {
            "format": FORMAT,
            "bundle_id": self.bundle_id,
            "bundle_name": self.bundle.name if self.bundle else None,
            "backbone_id": self.bundle.manifest.backbone_id if self.bundle else None,
            "active": 0,
            "file": None,
            "sha256": None,
            "stack": [],
            "history": [],
        }

    @property
    def active_version(self) -> int:
        return int(self._pointer()["active"])

    def active(self) -> Version:
        """The active head, checksum-verified; version 0 is the factory head."""
        p = self._pointer()
        if p["active"] == 0:
            if self._factory is None:
                raise StoreError("the factory head lives in the bundle: open the store with its bundle")
            return Version(0, self._factory, {"action": "factory"})
        return Version(int(p["active"]), self._load(p["file"], p["sha256"]), p["history"][-1] if p["history"] else {})

    def _load(self, name: str, sha256: str) -> HeadState:
        f = self.path / name
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise StoreError(f"head version file {str(f)!r} cannot be read ({exc})") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StoreError(
                f"head version file {str(f)!r} fails its sha256 check: corrupted; roll back or reset the store"
            )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                labels = tuple(str(v) for v in z["labels"].tolist())
                head = HeadState(z["W"], z["b"], z["mask"], z["anchor"], labels)
        except (ValueError, KeyError, OSError, EOFError) as exc:  # e.g. a pickled object array
            raise StoreError(f"head version file {str(f)!r} cannot be loaded safely ({exc})") from None
        if self._factory is not None and head.W.shape != self._factory.W.shape:
            raise StoreError(
                f"head version {name!r} has shape {head.W.shape}, the bundle's head is {self._factory.W.shape}"
            )
        return head

    def history(self) -> list[dict[str, Any]]:
        return list(self._pointer()["history"])

    def verified_versions(self) -> dict[int, HeadState]:
        """Every version the history names, loaded and sha256-checked, by number.

        Raises:
            StoreError: a version file is missing, damaged or of another shape.
        """
        return {n: self._load(f"v{n:06d}.npz", h["sha256"]) for n, h in live_versions(self.history()).items()}

    def versions(self) -> list[int]:
        if not self.path.is_dir():
            return []
        return sorted(int(m.group(1)) for f in self.path.iterdir() if (m := _VERSION_FILE.match(f.name)))

    # ----------------------------------------------------------------- writing

    def commit(self, head: HeadState, metrics: dict[str, Any] | None = None) -> int:
        """Store ``head`` as a new version and make it active; returns its number.

        Raises:
            StoreError: the store cannot be written (read-only, disk full); the active head
                and every committed version are left as they were.
        """
        if self._factory is None:
            raise StoreError("committing a head needs the bundle: open the store with it")
        if head.W.shape != self._factory.W.shape:
            raise StoreError(f"head shape {head.W.shape} does not match the bundle's {self._factory.W.shape}")
        pointer = self._pointer()
        number = max([0, *self.versions(), *(h["version"] for h in pointer["history"])]) + 1
        name = f"v{number:06d}.npz"
        buf = io.BytesIO()
        np.savez(buf, **head.arrays(), labels=np.asarray(head.labels, dtype=str))
        data = buf.getvalue()
        entry = {
            "version": number,
            "action": "commit",
            "time": _now(),
            "labels": list(head.labels),
            "metrics": metrics or {},
        }
        new = {
            **pointer,
            "active": number,
            "file": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "stack": [*pointer["stack"], pointer["active"]],
            "history": [*pointer["history"], entry],
        }
        self._write(name, data)
        self._write_pointer(new)
        return number

    def rollback(self) -> int:
        """Make the previously active version active again; returns its number."""
        pointer = self._pointer()
        if not pointer["stack"]:
            raise StoreError("nothing to roll back to: the store is at its first version")
        target = pointer["stack"][-1]
        return self._activate(pointer, target, pointer["stack"][:-1], "rollback")

    def reset(self) -> int:
        """Make the factory head (version 0) active; earlier versions stay on disk."""
        pointer = self._pointer()
        return self._activate(pointer, 0, [*pointer["stack"], pointer["active"]], "reset")

    def _activate(self, pointer: dict[str, Any], target: int, stack: list[int], action: str) -> int:
        file = sha = None
        if target:
            entry = live_versions(pointer["history"]).get(target)
            if entry is None or "sha256" not in entry:
                raise StoreError(
                    f"version {target} has no commit record with a checksum in {str(self.path)!r}; cannot verify it"
                )
            file, sha = f"v{target:06d}.npz", entry["sha256"]
            self._load(file, sha)  # refuse to activate a damaged version
        entry = {"version": target, "action": action, "time": _now(), "from": pointer["active"]}
        self._write_pointer(
            {
                **pointer,
                "active": target,
                "file": file,
                "sha256": sha,
                "stack": stack,
                "history": [*pointer["history"], entry],
            }
        )
        return target

    def _write(self, name: str, data: bytes) -> None:
        try:
            make_dirs(self.path)
            replace_file(self.path / name, data)
        except OSError as exc:
            reason = (
                "the disk is full"
                if exc.errno == errno.ENOSPC
                else "it is read-only"
                if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
                else str(exc)
            )
            raise StoreError(
                f"cannot write to store {str(self.path)!r}: {reason}; the active head is unchanged"
            ) from exc

    def _write_pointer(self, pointer: dict[str, Any]) -> None:
        # The entry that created the active version records its file's hash, so later
        # rollbacks can verify it.
        if pointer["history"] and pointer["history"][-1]["action"] in CREATES_VERSION and pointer["file"]:
            pointer["history"][-1].setdefault("sha256", pointer["sha256"])
        self._write(POINTER, json.dumps(pointer, indent=1).encode())

    def _new_version_number(self, pointer: dict[str, Any]) -> int:
        return max([0, *self.versions(), *(h["version"] for h in pointer["history"])]) + 1

    # ----------------------------------------------------------------- lifecycle

    def examples(self, *, create: bool = False) -> Any:
        """The user's kept examples (:class:`edgetl.device._examples.ExampleStore`), or
        ``None`` when none were kept (and ``create`` is false)."""
        from edgetl.device._examples import ExampleStore

        path = self.path / EXAMPLES
        if (path / "INDEX.json").exists():
            return ExampleStore(path)
        if not create:
            return None
        if self.bundle is None:
            raise StoreError("keeping examples needs the bundle (their input spec): open the store with it")
        spec = self.bundle.input_spec
        return ExampleStore(path, input_shape=spec.shape, dtype="uint8" if spec.is_image else "float32")

    def keep_examples(self, x: np.ndarray, labels: list[str]) -> dict[str, Any]:
        """Keep raw examples (images as uint8 pixels) to rebuild heads for a new bundle."""
        store = self.examples(create=True)
        if self.bundle is not None and self.bundle.input_spec.is_image:
            x = np.clip(np.round(np.asarray(x, np.float32)), 0, 255).astype(np.uint8)
        return store.add(np.asarray(x), labels)

    def trusted_keys(self) -> bytes | None:
        """The public keys (PEM) a new bundle must be signed by to migrate to, if set."""
        f = self.path / TRUST
        return f.read_bytes() if f.is_file() else None

    def set_trust(self, public_keys: list[str | os.PathLike[str]]) -> list[str]:
        """Require every bundle this store migrates to be signed by one of these Ed25519
        public keys (PEM files); returns their key ids."""
        from edgetl.bundle import key_id, load_public_key

        pems = [Path(p).read_bytes() for p in public_keys]
        ids = [key_id(load_public_key(pem)) for pem in pems]  # refuses anything not an Ed25519 public key
        self._write(TRUST, b"".join(pem if pem.endswith(b"\n") else pem + b"\n" for pem in pems))
        return ids

    def migrate(self, new_bundle: Bundle, **options: Any) -> Any:
        """Move this store to ``new_bundle``; see :func:`edgetl.device._lifecycle.migrate`."""
        from edgetl.device._lifecycle import migrate

        return migrate(self, new_bundle, **options)

    def forget(self, label: str | None = None) -> dict[str, Any]:
        """Forget one class's examples and every head trained on them, or (``None``)
        everything personal; see :func:`edgetl.device._lifecycle.forget`."""
        from edgetl.device._lifecycle import forget

        return forget(self, label)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
