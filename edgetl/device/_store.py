"""Crash-safe, versioned storage of personalized heads (numpy + stdlib only).

Layout of a store directory::

    ACTIVE.json       pointer: active version, its file and sha256, the rollback stack,
                      the bundle it belongs to, and the history
    v000001.npz ...   one head per committed version (W, b, mask, anchor, labels)

A commit writes the version file (temporary file, fsync, rename, directory fsync), then
replaces ``ACTIVE.json`` the same way. A crash at any instant therefore leaves either the
old pointer (the new version file, if present, is an unreferenced orphan) or the new one,
both pointing at complete, checksummed files. Version 0 is the bundle's factory head and
is never stored, so it can always be restored.
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

from edgetl._atomic import replace_file
from edgetl.bundle import Bundle
from edgetl.device._head import HeadState
from edgetl.errors import StoreError

POINTER = "ACTIVE.json"
_VERSION_FILE = re.compile(r"^v(\d{6})\.npz$")
FORMAT = 1


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
            return
        self.bundle = bundle
        self.bundle_id = bundle_identity(bundle)
        self._factory = HeadState.factory(bundle)
        if pointer is not None and pointer.get("bundle_id") != self.bundle_id:
            raise StoreError(
                f"store {str(self.path)!r} belongs to another bundle ({pointer.get('bundle_name')!r}); use a separate "
                "store directory per bundle"
            )

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
            entry = next((h for h in pointer["history"] if h["version"] == target and h["action"] == "commit"), None)
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
            self.path.mkdir(parents=True, exist_ok=True)
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
        # The commit entry records its file's hash so later rollbacks can verify it.
        if pointer["history"] and pointer["history"][-1]["action"] == "commit":
            pointer["history"][-1].setdefault("sha256", pointer["sha256"])
        self._write(POINTER, json.dumps(pointer, indent=1).encode())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
