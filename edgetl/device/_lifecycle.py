"""A head store's life across bundles: migration to a new bundle, and forgetting.

Migration (``edgetl store migrate``): a device that personalized bundle A receives bundle B.

- Same backbone (``backbone_id``: the weights and input spec) and the same labels and head
  shape: the active personalized head carries over unchanged.
- Otherwise, with kept examples: they are embedded by B's backbone, a head is trained from
  B's factory head (classes the user added are added again, by imprinting then training),
  and the guard decides against B's factory head, as a commit would.
- Without kept examples (or when the guard refuses): B's factory head, with a message.

Crash safety: whatever the path, new files are written first (a version file, fsynced and
renamed into place) and the pointer ``ACTIVE.json`` is replaced last, in one rename. Until
that rename the store is A's, untouched; after it, B's. The history records the migration.

Forgetting (``edgetl store forget``): a class (``--label L``) or everything (``--all``). The
pointer is replaced first (the commit point: doomed versions marked removed, the label's
name replaced by ``<forgotten>`` in the history, the active head moved to the newest version
that survives, else the factory head, and the intent recorded); then the kept examples and
the doomed version files are shredded (zeros written through the inode, fsync, unlink,
directory fsync) and the intent dropped. A crash in between is finished when the store is
next opened. tests/reliability/test_power_loss.py cuts the power at every step of both.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetl import _atomic
from edgetl.bundle import Bundle
from edgetl.device._guard import FORGOTTEN, redact, redact_text
from edgetl.device._head import HeadState, TrainSettings
from edgetl.device._store import CREATES_VERSION, HeadStore, _now, bundle_identity, live_versions
from edgetl.errors import InputError, StoreError


@dataclass(frozen=True)
class Migration:
    """What :func:`migrate` did."""

    kind: str  # "carried_over", "retrained", "factory" or "unchanged"
    version: int  # the active version afterwards (0: the new bundle's factory head)
    bundle: str  # the new bundle's name
    reason: str
    decision: Any = None  # the guard's CommitResult when a head was retrained

    def describe(self) -> str:
        return f"{self.kind}: {self.reason}; active version {self.version} of bundle {self.bundle}"


def migrate(
    store: HeadStore,
    new_bundle: Bundle,
    *,
    backend: str | None = None,
    threads: int | None = None,
    settings: TrainSettings | None = None,
    trust: Any = None,
    **guard: Any,
) -> Migration:
    """Move ``store`` (opened with its current bundle, or without one) to ``new_bundle``.

    Args:
        store: the head store.
        new_bundle: the bundle that replaces the store's bundle (verified by read_bundle).
        backend, threads: the runtime that re-embeds kept examples and trains.
        settings: head training settings for a retrained head.
        trust: trusted public key(s) the new bundle must be signed by; default: the store's
            own (``TRUST.pem``, see :meth:`HeadStore.set_trust`), if any.
        **guard: ``margin``, ``forget_margin``, ``holdout_fraction`` for the guard.

    Raises:
        BundleError: the store requires a signature the new bundle does not have.
        StoreError: no store at that path, or it cannot be written (then it is unchanged).
    """
    pointer = store._read_pointer()
    if pointer is None:
        raise StoreError(f"{str(store.path)!r} is not a head store (no ACTIVE.json); nothing to migrate")
    _check_trust(store, new_bundle, trust)
    if pointer.get("bundle_id") == bundle_identity(new_bundle):
        return Migration(
            "unchanged", int(pointer["active"]), new_bundle.name, "the store already belongs to this bundle"
        )
    head = _active_head(store, pointer)
    if head is not None and _same_embedding(pointer, head, new_bundle):
        return _switch(
            store,
            pointer,
            new_bundle,
            head,
            "carried_over",
            "same backbone and labels: the personalized head carries over unchanged",
            None,
        )
    examples = store.examples()
    if examples is None or not examples.summary()["classes"]:
        why = "no kept examples to rebuild the personalized head from" if head is not None else "no personalized head"
        return _switch(
            store,
            pointer,
            new_bundle,
            None,
            "factory",
            f"{why}: the new bundle's factory head is active; personalize again",
            None,
        )
    return _retrain(store, pointer, new_bundle, examples, backend=backend, threads=threads, settings=settings, **guard)


def _check_trust(store: HeadStore, bundle: Bundle, trust: Any) -> None:
    trusted = trust if trust is not None else store.trusted_keys()
    if trusted is None:
        return
    from edgetl.bundle._signing import verify_bundle_signature

    verify_bundle_signature(bundle.path, _pem_list(trusted))


def _pem_list(trusted: Any) -> Any:
    """``TRUST.pem`` holds several PEM blocks: split them into one key each."""
    if not isinstance(trusted, bytes):
        return trusted
    blocks = [b"-----BEGIN" + part for part in trusted.split(b"-----BEGIN")[1:]]
    return blocks or trusted


def _active_head(store: HeadStore, pointer: dict[str, Any]) -> HeadState | None:
    """The personalized head now active (``None`` for the factory head), checksum-verified."""
    if not pointer["active"]:
        return None
    return store._load(pointer["file"], pointer["sha256"])


def _same_embedding(pointer: dict[str, Any], head: HeadState, new: Bundle) -> bool:
    old_id, new_id = pointer.get("backbone_id"), new.manifest.backbone_id
    factory = HeadState.factory(new)
    same_shape = head.W.shape == factory.W.shape
    same_labels = tuple(head.labels[: len(new.labels)]) == tuple(new.labels)
    return bool(old_id) and old_id == new_id and same_shape and same_labels


def _retrain(
    store: HeadStore,
    pointer: dict[str, Any],
    new: Bundle,
    examples: Any,
    *,
    backend: str | None,
    threads: int | None,
    settings: TrainSettings | None,
    **guard: Any,
) -> Migration:
    """Re-embed the kept examples with the new backbone and train from its factory head;
    the guard decides against the new factory head."""
    from edgetl.device._classifier import Classifier
    from edgetl.device._personalizer import Personalizer

    x, labels = examples.examples()
    if tuple(x.shape[1:]) != tuple(new.input_spec.shape):
        raise InputError(
            f"the kept examples have shape {tuple(x.shape[1:])}, bundle {new.name!r} takes "
            f"{tuple(new.input_spec.shape)}: inputs must have shape {tuple(new.input_spec.shape)}, so a head "
            "cannot be rebuilt from them; the store is unchanged"
        )
    clf = Classifier(new, backend=backend, threads=threads)
    p = Personalizer(clf, None, keep_examples=False, settings=settings or TrainSettings(), **guard)
    decision = p.personalize(x.astype(np.float32), labels, add_classes=True, commit=False)
    if not decision.accepted:
        why = (
            f"the head retrained on {len(labels)} kept examples was refused by the guard ({decision.reason}): "
            "the new bundle's factory head is active"
        )
        return _switch(store, pointer, new, None, "factory", why, decision)
    why = (
        f"retrained from the new factory head on {len(labels)} kept examples of {len(set(labels))} classes; "
        f"guard against the new factory head: {decision.reason}"
    )
    return _switch(store, pointer, new, p.candidate, "retrained", why, decision, example_labels=sorted(set(labels)))


def _switch(
    store: HeadStore,
    pointer: dict[str, Any],
    new: Bundle,
    head: HeadState | None,
    kind: str,
    reason: str,
    decision: Any,
    example_labels: list[str] | None = None,
) -> Migration:
    """Write the new version (if any), then replace the pointer: the one commit point."""
    entry: dict[str, Any] = {
        "action": "migrate",
        "kind": kind,
        "time": _now(),
        "from_bundle": pointer.get("bundle_name"),
        "to_bundle": new.name,
        "reason": reason,
    }
    file = sha = None
    number = 0
    if head is not None:
        number = store._new_version_number(pointer)
        file, data = f"v{number:06d}.npz", _head_bytes(head)
        sha = hashlib.sha256(data).hexdigest()
        carried = next((h for h in pointer["history"] if h["version"] == pointer["active"]), {})
        entry.update(
            labels=list(head.labels), example_labels=example_labels or carried.get("example_labels", []), sha256=sha
        )
        store._write(file, data)
    entry["version"] = number
    new_pointer = {
        "format": pointer["format"],
        "bundle_id": bundle_identity(new),
        "bundle_name": new.name,
        "backbone_id": new.manifest.backbone_id,
        "active": number,
        "file": file,
        "sha256": sha,
        "stack": [],  # versions of the old bundle cannot be activated with the new one
        "history": [*pointer["history"], entry],
    }
    store._write(_pointer_name(), json.dumps(new_pointer, indent=1).encode())
    return Migration(kind, number, new.name, reason, decision)


def _pointer_name() -> str:
    from edgetl.device._store import POINTER

    return POINTER


def _head_bytes(head: HeadState) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **head.arrays(), labels=np.asarray(head.labels, dtype=str))
    return buf.getvalue()


def forget(store: HeadStore, label: str | None) -> dict[str, Any]:
    """Forget ``label`` (its kept examples and every head version trained on them), or with
    ``None`` everything personal (every kept example and every personalized head).

    One commit point, then idempotent cleanup: the new pointer (doomed versions marked
    removed, the label's name scrubbed, the active head moved off them) is written first and
    records the intent (``pending_forget``); then the examples and version files are
    shredded and the pointer rewritten without the intent. A crash after the commit point is
    finished by the next :class:`HeadStore` opened on the directory (:func:`finish_forget`),
    so the label never comes back and no head refers to a shredded file.

    Returns:
        What was removed: ``examples``, ``versions`` and the ``active`` version afterwards.
    """
    pointer = store._read_pointer()
    if pointer is None:
        raise StoreError(f"{str(store.path)!r} is not a head store (no ACTIVE.json)")
    examples = store.examples()
    count = 0
    if examples is not None:  # counted now, removed after the commit point
        kept = _example_counts(examples)
        count = sum(kept.values()) if label is None else kept.get(label, 0)
    doomed = _versions_with(pointer, label)
    new_pointer = _without(pointer, doomed, label)
    new_pointer["history"].append(
        {
            "version": new_pointer["active"],
            "action": "forget",
            "time": _now(),
            "what": "everything" if label is None else "one class",
            "versions_removed": sorted(doomed),
            "examples_removed": count,
        }
    )
    # The intent names the label by its sha256: the pointer must not keep the name in clear.
    new_pointer[PENDING] = {"all": label is None, "label_sha256": _label_digest(label), "versions": sorted(doomed)}
    store._write(_pointer_name(), json.dumps(new_pointer, indent=1).encode())  # the commit point
    finish_forget(store)
    return {"examples": count, "versions": sorted(doomed), "active": new_pointer["active"]}


PENDING = "pending_forget"


def _example_counts(examples: Any) -> dict[str, int]:
    return {label: c["count"] for label, c in examples.summary()["classes"].items()}


def _label_digest(label: str | None) -> str | None:
    return None if label is None else hashlib.sha256(label.encode()).hexdigest()


def finish_forget(store: HeadStore) -> None:
    """Complete a forget whose pointer was committed: shred the examples and version files
    it names, then drop the intent from the pointer. Idempotent (a crash anywhere in here is
    finished by running it again); a no-op when nothing is pending."""
    pointer = store._read_pointer()
    intent = pointer.get(PENDING) if pointer else None
    if not intent:
        return
    examples = store.examples()
    if examples is not None:
        if intent["all"]:
            examples.forget_all()
        else:
            names = [name for name in _example_counts(examples) if _label_digest(name) == intent["label_sha256"]]
            for name in names:
                examples.forget(name)
    for number in intent["versions"]:
        _atomic.shred(store.path / f"v{number:06d}.npz")
    # No directory fsync of its own: the pointer write below fsyncs this directory, which
    # makes these unlinks durable too (tools/power_loss.py --drop-fsync found it redundant).
    # Were the unlinks lost, the files would come back zeroed and unreferenced, not readable.
    done = {k: v for k, v in pointer.items() if k != PENDING}
    store._write(_pointer_name(), json.dumps(done, indent=1).encode())


def _versions_with(pointer: dict[str, Any], label: str | None) -> set[int]:
    """Version numbers whose head was trained on ``label``'s examples (a class the user
    added is only ever in heads trained on its examples); ``None``: every personalized
    version."""
    out = set()
    for number, h in live_versions(pointer["history"]).items():
        trained_on = h.get("example_labels") or h.get("metrics", {}).get("example_labels", [])
        if label is None or label in trained_on:
            out.add(number)
    return out


def _without(pointer: dict[str, Any], doomed: set[int], label: str | None) -> dict[str, Any]:
    """The pointer after ``doomed`` versions are gone and ``label``'s name is scrubbed."""
    history = []
    for h in pointer["history"]:
        h = json.loads(json.dumps(h))
        if h.get("version") in doomed and h.get("action") in CREATES_VERSION:
            h["removed"] = True
        for key in ("labels", "example_labels"):
            if key in h:
                h[key] = [FORGOTTEN if label is None or v == label else v for v in h[key]]
        if "guard" in h.get("metrics", {}):
            h["metrics"]["guard"] = redact(h["metrics"]["guard"], label)
        if isinstance(h.get("reason"), str):
            h["reason"] = redact_text(h["reason"], label)
        if "example_labels" in h.get("metrics", {}):
            h["metrics"]["example_labels"] = [
                FORGOTTEN if label is None or v == label else v for v in h["metrics"]["example_labels"]
            ]
        history.append(h)
    survivors = [h for h in live_versions(history).values() if "sha256" in h]
    active, file, sha = int(pointer["active"]), pointer["file"], pointer["sha256"]
    if active in doomed:
        latest = max(survivors, key=lambda h: h["version"], default=None)
        active, file, sha = (
            (latest["version"], f"v{latest['version']:06d}.npz", latest["sha256"]) if latest else (0, None, None)
        )
    stack = [v for v in pointer["stack"] if v not in doomed]
    return {**pointer, "active": active, "file": file, "sha256": sha, "stack": stack, "history": history}
