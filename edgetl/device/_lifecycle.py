"""Migration of a head store to a new bundle (``edgetl store migrate``, :func:`edgetl.device.migrate`).

A device that personalized bundle A receives bundle B:

- Same backbone (``backbone_id``: the weights and input spec), labels and head shape: the
  active personalized head carries over unchanged.
- Otherwise, with kept examples: they are embedded by B's backbone, a head is trained from
  B's factory head (classes the user added are added again, by imprinting then training),
  and the guard decides against B's factory head, as a commit would.
- Without kept examples (or when the guard refuses): B's factory head, with a message.

A version that also trained the backbone's last layer (a tail, issue 24) carries over only
to a bundle with the same backbone and the tail's files. Anywhere else the store keeps
head-only, and the migration's reason says so, once (B has no trainable tail, or another
backbone, labels or head shape: ``personalize --adapt tail`` trains a new one).

Whatever the path, the switch is one transaction of the store
(:meth:`HeadStore.switch_bundle`): until it commits the store is A's, untouched; after it,
B's. This module decides; only :mod:`edgetl.device._store` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetl.bundle import Bundle, check_signature
from edgetl.device._classifier import Classifier
from edgetl.device._head import HeadState, TrainSettings
from edgetl.device._personalizer import Personalizer
from edgetl.device._store import HeadStore, bundle_identity
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
            own (:meth:`HeadStore.set_trust`), if any.
        **guard: ``margin``, ``forget_margin``, ``holdout_fraction`` for the guard.

    Raises:
        BundleError: the store requires a signature the new bundle does not have.
        StoreError: no store at that path, or it cannot be written (then it is unchanged).
    """
    if not store.db_path.exists():
        raise StoreError(f"{str(store.path)!r} is not a head store; nothing to migrate")
    trusted = trust if trust is not None else store.trusted_keys()
    if trusted is not None:  # on the manifest bytes new_bundle was parsed from
        check_signature(new_bundle, trusted)
    active = store.active_version
    head = store.active().head if active else None  # checksum-verified
    # The identity is the backbone and factory head: the same bundle with its tail files taken
    # out is "the same", yet cannot run a version with a trained tail layer (rebuilt head-only).
    if store.bundle_id == bundle_identity(new_bundle) and not _tail_dropped(head, new_bundle, same_backbone=True):
        return Migration("unchanged", store.active_version, new_bundle.name, "the store already belongs to this bundle")
    entry = {"from_bundle": store.describe().get("bundle_name"), "to_bundle": new_bundle.name}
    if head is not None and _same_embedding(store, head, new_bundle):
        why = "same backbone and labels: the personalized head carries over unchanged"
        trained_on = next((h.get("metrics", {}).get("example_labels", []) for h in store.history() if
                           h["version"] == active and h["action"] in ("commit", "migrate")), [])  # fmt: skip
        return _switch(store, new_bundle, head, "carried_over", why, None, {**entry, "example_labels": trained_on})
    entry["tail_dropped"] = _tail_dropped(head, new_bundle)
    x, labels = store.kept_examples()
    if not labels:
        why = "no kept examples to rebuild the personalized head from" if head is not None else "no personalized head"
        reason = f"{why}: the new bundle's factory head is active; personalize again"
        return _switch(store, new_bundle, None, "factory", reason, None, entry)
    if tuple(x.shape[1:]) != tuple(new_bundle.input_spec.shape):
        raise InputError(
            f"the kept examples have shape {tuple(x.shape[1:])}, bundle {new_bundle.name!r} takes "
            f"{tuple(new_bundle.input_spec.shape)}: inputs must have shape {tuple(new_bundle.input_spec.shape)}, so "
            "a head cannot be rebuilt from them; the store is unchanged"
        )
    return _retrain(store, new_bundle, x, labels, entry, backend=backend, threads=threads, settings=settings, **guard)


def _same_embedding(store: HeadStore, head: HeadState, new: Bundle) -> bool:
    old_id, new_id = store.describe().get("backbone_id"), new.manifest.backbone_id
    factory = HeadState.factory(new)
    same_labels = tuple(head.labels[: len(new.labels)]) == tuple(new.labels)
    # A version with a trained tail layer carries over only to a bundle that has the tail's
    # files; otherwise the head is rebuilt from the kept examples (head-only).
    tail_ok = head.tail is None or bool((new.manifest.extra.get("tail") or {}).get("available"))
    return bool(old_id) and old_id == new_id and head.W.shape == factory.W.shape and same_labels and tail_ok


def _tail_dropped(head: HeadState | None, new: Bundle, *, same_backbone: bool = False) -> str:
    """Why the active version's trained tail layer does not move to ``new`` ("" when it has none,
    or when ``same_backbone`` and ``new`` has a tail to run it)."""
    if head is None or head.tail is None:
        return ""
    section = new.manifest.extra.get("tail") or {}
    if not section.get("available"):
        why = section.get("reason", "it was exported before tails existed")
        return f"bundle {new.name!r} has no trainable tail ({why})"
    if same_backbone:
        return ""
    return f"bundle {new.name!r} has another backbone, labels or head shape, and a migration rebuilds the head only"


def _retrain(
    store: HeadStore,
    new: Bundle,
    x: np.ndarray,
    labels: list[str],
    entry: dict[str, Any],
    *,
    backend: str | None,
    threads: int | None,
    settings: TrainSettings | None,
    **guard: Any,
) -> Migration:
    """Re-embed the kept examples with the new backbone and train from its factory head;
    the guard decides against the new factory head."""
    clf = Classifier(new, backend=backend, threads=threads)
    p = Personalizer(clf, None, keep_examples=False, settings=settings or TrainSettings(), **guard)
    decision = p.personalize(x.astype(np.float32), labels, add_classes=True, commit=False)
    entry = {**entry, "guard": getattr(decision, "evidence", {})}
    if not decision.accepted:
        why = (
            f"the head retrained on {len(labels)} kept examples was refused by the guard ({decision.reason}): "
            "the new bundle's factory head is active"
        )
        return _switch(store, new, None, "factory", why, decision, entry)
    why = (
        f"retrained from the new factory head on {len(labels)} kept examples of {len(set(labels))} classes; "
        f"guard against the new factory head: {decision.reason}"
    )
    entry["example_labels"] = sorted(set(labels))
    return _switch(store, new, p.candidate, "retrained", why, decision, entry)


def _switch(
    store: HeadStore,
    new: Bundle,
    head: HeadState | None,
    kind: str,
    reason: str,
    decision: Any,
    entry: dict[str, Any],
) -> Migration:
    dropped = entry.pop("tail_dropped", "")
    if dropped:  # said once, in the reason (printed by `store migrate`, kept in the history)
        reason = f"head only: the personalized tail layer does not carry over ({dropped}); {reason}"
    number = store.switch_bundle(new, head, {**entry, "kind": kind, "reason": reason})
    return Migration(kind, number, new.name, reason, decision)
