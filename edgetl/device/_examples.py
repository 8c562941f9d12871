"""The user's labelled examples, kept on the device so heads can be rebuilt (numpy + stdlib only).

Personalization learns a head from a few examples the user labelled. A head belongs to one
bundle; when a new bundle arrives (a better backbone), the head must be learned again from
the *raw* examples, so they are kept here, within a byte budget, and can be forgotten on
request.

Layout of an example store directory (normally ``STORE/examples/`` beside a head store)::

    INDEX.json          the only source of truth: which segments exist, and for each its
                        label, the sequence numbers of its examples, its sha256 and size
    seg-00000001.npz    one segment: a compressed ``.npz`` holding one array ``x`` of shape
    seg-00000002.npz    (n, *input_shape) in the store's dtype (no labels, no pickles)
    LOCK                advisory lock file (flock) serialising writers across processes

``INDEX.json`` (sorted keys, compact)::

    {"format": "edgetl-examples", "version": 1, "input_shape": [28, 28, 1], "dtype": "uint8",
     "next_seq": 57, "next_segment": 12,
     "segments": [{"file": "seg-00000003.npz", "label": "cat", "seq": [0, 1, 2],
                   "sha256": "<64 hex>", "bytes": 2113}, ...]}

Every segment holds the examples of **one** class (an ``add`` with three labels writes three
segments). So each example's label is its segment's label, per-class bytes on disk are exact,
and forgetting a class deletes whole files: another class's data is never re-written for it.
Sequence numbers grow monotonically (``next_seq``) and are never reused, even after a forget.

Crash safety. A write never modifies an existing file in place: new and re-written segments
get new names and are written with :func:`edgetl._atomic.replace_file` (temporary file,
fsync, rename, directory fsync); only then is ``INDEX.json`` replaced the same way: that
rename is the commit point. A crash before it leaves the old index, whose segments are all
untouched; a crash after it leaves the new one, whose segments were all fsynced before it.
Either way the files the index does not reference (new segments of a failed commit, old
segments of a committed one, temporary files) are orphans; opening the store destroys them
(zero-overwrite, fsync, unlink), which also finishes a ``forget`` interrupted between the
index replace and the shredding. An unreadable index is never "repaired": the store refuses
to open (StoreError) rather than treat every segment as an orphan.

Corruption. Each segment is checked against its sha256 and size before it is decoded, with
``allow_pickle=False`` and a bound on its decompressed size. :meth:`ExampleStore.examples`
*refuses* (StoreError naming every damaged file) rather than silently return a subset: a
head rebuilt from a partial set would be biased without anyone knowing. Other segments are
never affected (separate files, never re-written in place); :meth:`ExampleStore.drop_corrupt`
removes the damaged ones after which everything else is readable again.

What ``forget`` leaves on disk. The forgotten segments' contents are overwritten with zeros
through the same inode, fsynced, then unlinked, and the directory fsynced; the index no
longer names the label or its sequence numbers, and the previous index's inode is zeroed
too after the replace. What this does NOT guarantee: on flash storage (eMMC, UFS, SSD) the
translation layer writes the zeros to new physical blocks and the old ones stay readable by
forensic means until garbage-collected; log-structured or copy-on-write file systems (F2FS
on Android, APFS, btrfs, ZFS) do the same at the file-system level, and snapshots or backups
may hold copies. Only full-disk / file-based encryption whose key is destroyed (e.g. the
OS's crypto-erase) is a real guarantee. The zeroing removes the data from every path an app
or a file-system reader can reach.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgetl import _atomic
from edgetl.errors import InputError, StoreError, describe

try:  # POSIX (Linux, Android, macOS, iOS); elsewhere one writer per store is assumed
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

INDEX = "INDEX.json"
LOCK = "LOCK"
FORMAT = "edgetl-examples"
VERSION = 1
DTYPES = ("uint8", "int8", "float32")
# 8 MiB: few-shot personalization needs tens of examples per class, not thousands. A raw
# 96x96x3 uint8 image is 27 KiB (photos barely deflate), so 8 MiB keeps ~300 of them (30 per
# class for 10 classes), ~50 raw 224x224 photos, or ~30,000 64-d float32 feature vectors;
# yet it is a rounding error of a phone's storage and well below the size at which the OS
# or the user starts to notice and clear an app's data.
DEFAULT_BUDGET_BYTES = 8 << 20
MIN_BUDGET_BYTES = 4096  # below this not even an index with a few segments fits
# Adding one example at a time would otherwise make one file per add (a file costs a 4 KiB
# block on most file systems); past this many segments a class is merged into one.
MAX_SEGMENTS_PER_CLASS = 8
MAX_LABEL_CHARS = 256
MAX_INDEX_BYTES = 16 << 20
_SEGMENT = re.compile(r"^seg-(\d{8})\.npz$")
# Temporary files of edgetl._atomic.replace_file: ".NAME.<random>" beside NAME.
_TEMP = re.compile(r"^\.(INDEX\.json|seg-\d{8}\.npz)\..+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NPY_HEADER_SLACK = 64 * 1024  # an .npy header is < 64 KiB; anything beyond the data is suspect


@dataclass
class _Seg:
    """A segment while a change is planned: an unchanged index entry, or new data to write."""

    label: str
    seq: list[int]
    entry: dict[str, Any] | None = None  # set while the segment is unchanged on disk
    x: np.ndarray | None = None  # loaded or new examples (the segment will be (re)written)
    data: bytes | None = None  # encoded x, once its exact size is needed
    est: float = 0.0  # estimated bytes on disk, for eviction planning

    @property
    def size(self) -> int:
        if self.entry is not None:
            return int(self.entry["bytes"])
        if self.data is None:
            self.data = _encode(self.x)
        return len(self.data)


@dataclass(frozen=True)
class _Spec:
    shape: tuple[int, ...]
    dtype: np.dtype


class ExampleStore:
    """Labelled raw examples kept crash-safely within a byte budget.

    Args:
        path: the store directory, e.g. ``STORE/examples`` (created, mode 0700, on the first
            write).
        input_shape: shape of one example, as the bundle's ``input_spec["shape"]`` (e.g.
            ``(28, 28, 1)`` or ``(16,)``). May be omitted for an existing store.
        dtype: ``"uint8"``, ``"int8"`` or ``"float32"``: how examples are stored. Images
            whose pixels are whole numbers in 0..255 can be kept as uint8 even if the bundle
            takes float32 (4x smaller; :meth:`add` checks the conversion is exact).
        budget_bytes: upper bound of the bytes on disk (segments + index); default
            :data:`DEFAULT_BUDGET_BYTES`. Applied on every :meth:`add` and by
            :meth:`set_budget`; opening a store never evicts.

    Opening removes orphans left by a crash (listed in :attr:`cleaned`).

    Raises:
        InputError: bad shape, dtype or budget; a new store without shape and dtype.
        StoreError: the path is not a directory, the index is unreadable, or the store holds
            examples of another shape or dtype.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        input_shape: Sequence[int] | None = None,
        dtype: str | np.dtype | None = None,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
    ) -> None:
        self.path = Path(path)
        self._budget = _check_budget(budget_bytes)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"example store {str(self.path)!r} exists and is not a directory")
        wanted = None
        if input_shape is not None or dtype is not None:
            if input_shape is None or dtype is None:
                raise InputError("give both input_shape and dtype, or neither (to open an existing store)")
            wanted = _Spec(_check_shape(input_shape), _check_dtype(dtype))
        self.cleaned: list[str] = []
        with self._lock(exclusive=True, create=False):
            index = self._read_index()
            if index is None:
                if wanted is None:
                    raise InputError(
                        f"{str(self.path)!r} holds no examples yet; give input_shape and dtype to create the store"
                    )
                self._spec = wanted
            else:
                self._spec = _Spec(tuple(index["input_shape"]), np.dtype(index["dtype"]))
                if wanted is not None and wanted != self._spec:
                    raise StoreError(
                        f"example store {str(self.path)!r} holds examples of shape {self._spec.shape} "
                        f"{self._spec.dtype}, "
                        f"not {wanted.shape} {wanted.dtype}; use another directory for a bundle with another input, "
                        f"or forget_all() first"
                    )
            if self.path.is_dir() and os.access(self.path, os.W_OK):
                self.cleaned = self._remove_orphans(index)

    # ------------------------------------------------------------------ properties

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._spec.shape

    @property
    def dtype(self) -> np.dtype:
        return self._spec.dtype

    @property
    def budget_bytes(self) -> int:
        return self._budget

    # ------------------------------------------------------------------ public API

    def add(self, x: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
        """Keep new labelled examples, then evict to stay within the budget.

        Eviction takes the oldest example of the class with the most examples, again and
        again, so classes stay balanced and the newest examples of each class survive.

        Args:
            x: one example of shape ``input_shape`` or a batch ``(n, *input_shape)``; any
                numeric dtype that converts exactly to the store's dtype (float32 stores
                take any finite numbers).
            labels: one non-empty string per example.

        Returns:
            ``{"added": n, "kept": how many of them survived eviction, "evicted": {label:
            count}, "total_bytes": bytes on disk after, "budget_bytes": budget}``.

        Raises:
            InputError: wrong shape, dtype, non-finite or out-of-range values, label count.
            StoreError: the store cannot be written (read-only, disk full) or a segment that
                eviction or merging must re-write is corrupt; the store is then left as it was.
        """
        x, labels = self._check_examples(x, labels)
        with self._lock(exclusive=True, create=True):
            index = self._read_index() or self._empty_index()
            segs = [_Seg(e["label"], list(e["seq"]), entry=e) for e in index["segments"]]
            first = index["next_seq"]
            new_seq = list(range(first, first + len(x)))  # row i gets first + i: batch order is kept
            index["next_seq"] = first + len(x)
            for label in dict.fromkeys(labels):  # one segment per class
                rows = [i for i, l in enumerate(labels) if l == label]
                segs.append(_Seg(label, [first + i for i in rows], x=x[rows]))
            segs = self._compact(segs)
            evicted = self._fit_budget(segs, index, self._budget)
            total = self._commit(index, segs)
        kept = {s for seg in segs for s in seg.seq}
        return {
            "added": len(x),
            "kept": sum(s in kept for s in new_seq),
            "evicted": evicted,
            "total_bytes": total,
            "budget_bytes": self._budget,
        }

    def set_budget(self, budget_bytes: int) -> dict[str, Any]:
        """Change the budget and evict now if the store is over it.

        Returns:
            ``{"evicted": {label: count}, "total_bytes": ..., "budget_bytes": ...}``.
        """
        budget = _check_budget(budget_bytes)
        with self._lock(exclusive=True, create=False):
            self._budget = budget
            index = self._read_index() or self._empty_index()
            segs = [_Seg(e["label"], list(e["seq"]), entry=e) for e in index["segments"]]
            evicted = self._fit_budget(segs, index, budget)
            total = self._commit(index, segs) if evicted else self._total_bytes(index)
        return {"evicted": evicted, "total_bytes": total, "budget_bytes": budget}

    def examples(self) -> tuple[np.ndarray, list[str]]:
        """Every kept example, each segment verified, in the order they were added.

        Returns:
            ``(x, labels)``: ``x`` of shape ``(n, *input_shape)`` in the store's dtype.

        Raises:
            StoreError: one or more segments are missing or corrupt (all are named; nothing
                is returned, so a head is never rebuilt from a silently partial set). Call
                :meth:`drop_corrupt` to remove them; the other segments stay readable.
        """
        with self._lock(exclusive=False, create=False):
            index = self._read_index() or self._empty_index()
            arrays, labels, seqs, bad = [], [], [], {}
            for e in index["segments"]:
                try:
                    arrays.append(self._load(e))
                except StoreError as exc:
                    bad[e["file"]] = str(exc)
                    continue
                labels += [e["label"]] * len(e["seq"])
                seqs += e["seq"]
        if bad:
            names = ", ".join(sorted(bad))
            raise StoreError(
                f"example store {str(self.path)!r}: {len(bad)} segment(s) are damaged ({names}): "
                f"{'; '.join(bad.values())}. The other {len(index['segments']) - len(bad)} segment(s) are intact; "
                f"drop_corrupt() removes the damaged ones"
            )
        if not arrays:
            return np.zeros((0, *self.input_shape), dtype=self.dtype), []
        order = np.argsort(np.asarray(seqs), kind="stable")
        x = np.concatenate(arrays)[order]
        return x, [labels[i] for i in order]

    def verify(self) -> dict[str, str]:
        """Check every segment; return ``{file: reason}`` for the damaged ones (empty if none)."""
        with self._lock(exclusive=False, create=False):
            index = self._read_index() or self._empty_index()
            bad = {}
            for e in index["segments"]:
                try:
                    self._load(e)
                except StoreError as exc:
                    bad[e["file"]] = str(exc)
        return bad

    def drop_corrupt(self) -> dict[str, Any]:
        """Remove damaged segments from the index (and destroy their files).

        Returns:
            ``{"dropped": {file: label}, "lost": {label: example count}}``.
        """
        with self._lock(exclusive=True, create=True):
            index = self._read_index() or self._empty_index()
            dropped, lost, keep = {}, {}, []
            for e in index["segments"]:
                try:
                    self._load(e)
                    keep.append(_Seg(e["label"], list(e["seq"]), entry=e))
                except StoreError:
                    dropped[e["file"]] = e["label"]
                    lost[e["label"]] = lost.get(e["label"], 0) + len(e["seq"])
            if dropped:
                self._commit(index, keep)
        return {"dropped": dropped, "lost": lost}

    def summary(self) -> dict[str, Any]:
        """Counts and bytes, from the index (no segment is read).

        Returns:
            ``{"classes": {label: {"count": n, "bytes": b}}, "examples": n, "segments": k,
            "segment_bytes": ..., "index_bytes": ..., "total_bytes": ..., "budget_bytes":
            ..., "over_budget": bool, "input_shape": [...], "dtype": "..."}``.
        """
        with self._lock(exclusive=False, create=False):
            index = self._read_index() or self._empty_index()
            index_bytes = self._index_file_bytes()
        classes: dict[str, dict[str, int]] = {}
        for e in index["segments"]:
            c = classes.setdefault(e["label"], {"count": 0, "bytes": 0})
            c["count"] += len(e["seq"])
            c["bytes"] += e["bytes"]
        seg_bytes = sum(e["bytes"] for e in index["segments"])
        return {
            "classes": dict(sorted(classes.items())),
            "examples": sum(c["count"] for c in classes.values()),
            "segments": len(index["segments"]),
            "segment_bytes": seg_bytes,
            "index_bytes": index_bytes,
            "total_bytes": seg_bytes + index_bytes,
            "budget_bytes": self._budget,
            "over_budget": seg_bytes + index_bytes > self._budget,
            "input_shape": list(self.input_shape),
            "dtype": str(self.dtype),
        }

    def forget(self, label: str) -> int:
        """Remove every example of ``label`` and destroy its segment files.

        The index is replaced first (the commit point), then each of the class's segment
        files is overwritten with zeros, fsynced and unlinked, and the directory fsynced;
        see the module docstring for what this does and does not guarantee on flash.

        Returns:
            How many examples were removed (0 if the label has none: forgetting is idempotent).
        """
        label = _check_label(label, "label")
        with self._lock(exclusive=True, create=False):
            index = self._read_index()
            if index is None:
                return 0
            gone = [e for e in index["segments"] if e["label"] == label]
            if not gone:
                return 0
            keep = [_Seg(e["label"], list(e["seq"]), entry=e) for e in index["segments"] if e["label"] != label]
            self._commit(index, keep)
        return sum(len(e["seq"]) for e in gone)

    def forget_all(self) -> int:
        """Remove every example: the index becomes empty and every segment file (and any
        orphan or temporary file) is destroyed as in :meth:`forget`.

        Returns:
            How many examples were removed.
        """
        with self._lock(exclusive=True, create=False):
            index = self._read_index()
            if index is None:
                self._remove_orphans(None)
                return 0
            count = sum(len(e["seq"]) for e in index["segments"])
            self._commit(index, [])
            self._remove_orphans(self._read_index())
        return count

    @classmethod
    def erase(cls, path: str | os.PathLike[str]) -> list[str]:
        """Destroy a store whatever its state (even with an unreadable index): every file
        this module writes is zero-overwritten, fsynced and unlinked; the directory is
        removed if nothing else is in it.

        Returns:
            The names of the files destroyed.
        """
        root = Path(path)
        if not root.is_dir():
            return []
        try:
            fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # wait for a writer to finish
                names = sorted(p.name for p in root.iterdir() if _SEGMENT.match(p.name) or _TEMP.match(p.name))
                names += [INDEX] if (root / INDEX).exists() else []
                for name in names:
                    _atomic.shred(root / name)
                (root / LOCK).unlink(missing_ok=True)
                _atomic.fsync_dir(root)
            finally:
                os.close(fd)
            if not any(root.iterdir()):
                root.rmdir()
        except OSError as exc:
            raise _store_error(exc, root, "erase the example store") from exc
        return names

    # ------------------------------------------------------------------ validation

    def _check_examples(self, x: Any, labels: Any) -> tuple[np.ndarray, list[str]]:
        shape, dtype = self.input_shape, self.dtype
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except (ValueError, TypeError) as exc:
                raise InputError(f"examples must be a numeric array, received {describe(x)} ({exc})") from None
        if x.dtype.kind not in "uif":
            raise InputError(f"examples must be numeric (uint8, int or float), received dtype {x.dtype}")
        if x.shape == shape:
            x = x[None]
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            dims = ", ".join(map(str, shape))
            raise InputError(f"examples must have shape {shape} (one example) or (n, {dims}), received {x.shape}")
        n = len(x)
        if n == 0:
            raise InputError("received an empty batch; pass at least one example")
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence) and not isinstance(labels, np.ndarray):
            raise InputError(f"labels must be a sequence of strings, one per example, received {describe(labels)}")
        labels = [_check_label(l, f"labels[{i}]") for i, l in enumerate(labels)]
        if len(labels) != n:
            raise InputError(f"received {n} examples but {len(labels)} labels; give one label per example")
        flat = x.reshape(n, -1)
        if x.dtype.kind == "f":
            finite = np.isfinite(flat).all(axis=1)
            if not finite.all():
                first = int(np.flatnonzero(~finite)[0])
                raise InputError(
                    f"examples contain NaN or infinite values (first at example {first}); expected raw values, "
                    "e.g. pixels in [0, 255]"
                )
        if dtype.kind == "f":
            with np.errstate(over="ignore"):  # overflow is reported just below, with the value
                out = x.astype(np.float32)
            if not np.isfinite(out).all():  # e.g. float64 1e300 overflows float32
                raise InputError(
                    f"examples have values beyond float32's range (max |value| {float(np.max(np.abs(x)))!r}); "
                    "expected raw inputs"
                )
            return out, labels
        info = np.iinfo(dtype)
        lo, hi = flat.min(), flat.max()
        if lo < info.min or hi > info.max:
            raise InputError(
                f"examples range from {lo} to {hi}; a {dtype} store keeps whole numbers in {info.min}..{info.max}"
            )
        if x.dtype.kind == "f" and not np.array_equal(flat, np.round(flat)):
            raise InputError(
                f"examples have fractional values; a {dtype} store keeps whole numbers in {info.min}..{info.max} "
                "(create the store with dtype='float32' for such inputs)"
            )
        return x.astype(dtype), labels

    # ------------------------------------------------------------------ planning

    def _compact(self, segs: list[_Seg]) -> list[_Seg]:
        """Merge a class's segments into one once it has more than MAX_SEGMENTS_PER_CLASS."""
        out: list[_Seg] = []
        by_label: dict[str, list[_Seg]] = {}
        for s in segs:
            by_label.setdefault(s.label, []).append(s)
        for label, group in by_label.items():
            if len(group) <= MAX_SEGMENTS_PER_CLASS:
                out += group
                continue
            group.sort(key=lambda s: s.seq[0])
            xs = [self._data_of(s) for s in group]
            out.append(_Seg(label, [q for s in group for q in s.seq], x=np.concatenate(xs)))
        return out

    def _data_of(self, seg: _Seg) -> np.ndarray:
        """The examples of a segment: loaded (and verified) if it is still only on disk."""
        if seg.x is None:
            seg.x = self._load(seg.entry)
        return seg.x

    def _fit_budget(self, segs: list[_Seg], index: dict[str, Any], budget: int) -> dict[str, int]:
        """Evict, in place, the oldest example of the largest class until segments plus the
        index fit in ``budget``. Sizes after compression are only known once encoded, so the
        plan uses per-example estimates, then checks the exact size and goes on if needed."""
        evicted: dict[str, int] = {}
        while True:
            for s in segs:
                s.est = float(s.size)
            total = sum(s.est for s in segs) + len(self._index_bytes(index, segs))
            if total <= budget or not segs:
                return dict(sorted(evicted.items()))
            while total > budget and segs:
                counts: dict[str, int] = {}
                oldest: dict[str, int] = {}
                for s in segs:
                    counts[s.label] = counts.get(s.label, 0) + len(s.seq)
                    oldest[s.label] = min(oldest.get(s.label, s.seq[0]), s.seq[0])
                # The largest class loses its oldest example; ties: the class with the older one.
                label = min(counts, key=lambda l: (-counts[l], oldest[l]))
                seg = min((s for s in segs if s.label == label), key=lambda s: s.seq[0])
                per = seg.est / len(seg.seq)
                if len(seg.seq) == 1:  # the whole file goes: no need to read it
                    segs.remove(seg)
                    total -= seg.est
                else:
                    x = self._data_of(seg)
                    seg.seq, seg.x, seg.entry, seg.data = seg.seq[1:], x[1:], None, None
                    seg.est -= per
                    total -= per
                evicted[label] = evicted.get(label, 0) + 1

    # ------------------------------------------------------------------ committing

    def _commit(self, index: dict[str, Any], segs: list[_Seg]) -> int:
        """Write new segments, replace the index (the commit point), destroy what it no
        longer references. Returns the bytes on disk after. On failure before the index
        replace, the new files are destroyed and the store is as it was."""
        written: list[Path] = []
        try:
            self._mkdir()
            for s in segs:
                if s.entry is None:
                    data = s.data if s.data is not None else _encode(s.x)
                    name = f"seg-{index['next_segment']:08d}.npz"
                    index["next_segment"] += 1
                    path = self.path / name
                    written.append(path)
                    _atomic.replace_file(path, data)
                    digest = hashlib.sha256(data).hexdigest()
                    s.entry = {"file": name, "label": s.label, "seq": list(s.seq), "sha256": digest, "bytes": len(data)}
            old_files = {e["file"] for e in index["segments"]}
            index_data = self._index_bytes(index, segs)
            self._replace_index(index_data)
        except BaseException as exc:
            for path in written:  # never referenced by a committed index: destroy them
                try:
                    _atomic.shred(path)
                except OSError:
                    pass  # removed as an orphan on the next open
            if isinstance(exc, OSError):
                raise _store_error(exc, self.path, "write the example store") from exc
            raise
        index["segments"] = [s.entry for s in segs]
        stale = old_files - {s.entry["file"] for s in segs}
        try:
            for name in sorted(stale):
                _atomic.shred(self.path / name)
            if stale:
                _atomic.fsync_dir(self.path)
        except OSError as exc:  # committed; the leftovers are orphans destroyed on the next open
            action = "destroy replaced example segments (they are removed on the next open)"
            raise _store_error(exc, self.path, action) from exc
        return sum(s.entry["bytes"] for s in segs) + len(index_data)

    def _index_bytes(self, index: dict[str, Any], segs: list[_Seg]) -> bytes:
        entries = []
        for s in segs:
            if s.entry is not None:
                entries.append(s.entry)
            else:  # not written yet: a placeholder of the length its entry will have
                entries.append(
                    {
                        "file": "seg-00000000.npz",
                        "label": s.label,
                        "seq": list(s.seq),
                        "sha256": "0" * 64,
                        "bytes": s.size,
                    }
                )
        doc = {k: v for k, v in index.items() if k != "segments"}
        doc["segments"] = entries
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def _replace_index(self, data: bytes) -> None:
        """Replace INDEX.json atomically, then zero the previous index's contents (it names
        labels and sequence numbers that may have just been forgotten). The old inode is held
        open across the rename, so zeroing happens only after the new index is durable."""
        path = self.path / INDEX
        try:
            old_fd = _atomic.FS.open_existing(path)
        except FileNotFoundError:
            old_fd = None
        try:
            _atomic.replace_file(path, data)  # looked up on the module: tests make it crash
            if old_fd is not None:
                _atomic.zero_fd(old_fd)
        finally:
            if old_fd is not None:
                _atomic.FS.close(old_fd)

    # ------------------------------------------------------------------ reading

    def _empty_index(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "input_shape": list(self.input_shape),
            "dtype": str(self.dtype),
            "next_seq": 0,
            "next_segment": 1,
            "segments": [],
        }

    def _index_file_bytes(self) -> int:
        try:
            return (self.path / INDEX).stat().st_size
        except FileNotFoundError:
            return 0

    def _total_bytes(self, index: dict[str, Any]) -> int:
        return sum(e["bytes"] for e in index["segments"]) + self._index_file_bytes()

    def _read_index(self) -> dict[str, Any] | None:
        f = self.path / INDEX
        try:
            if f.is_symlink():
                raise ValueError("it is a symlink")
            with open(f, "rb") as fh:
                raw = fh.read(MAX_INDEX_BYTES + 1)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"example index {str(f)!r} cannot be read ({exc}); nothing was changed. ExampleStore.erase() "
                "destroys the store"
            ) from None
        try:
            if len(raw) > MAX_INDEX_BYTES:
                raise ValueError(f"larger than {MAX_INDEX_BYTES} bytes")
            return _check_index(json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError, RecursionError, TypeError, KeyError) as exc:
            raise StoreError(
                f"example index {str(f)!r} is corrupt ({exc}); nothing was changed. ExampleStore.erase() destroys "
                "the store"
            ) from None

    def _load(self, e: dict[str, Any]) -> np.ndarray:
        """One segment's examples, after its size, sha256 and decompressed size are checked."""
        f = self.path / e["file"]
        try:
            if f.is_symlink():
                raise OSError("it is a symlink")
            data = f.read_bytes()
        except OSError as exc:
            raise StoreError(f"example segment {str(f)!r} cannot be read ({exc})") from None
        if len(data) != e["bytes"]:
            raise StoreError(
                f"example segment {str(f)!r} is {len(data)} bytes, the index says {e['bytes']}: truncated or replaced"
            )
        if hashlib.sha256(data).hexdigest() != e["sha256"]:
            raise StoreError(f"example segment {str(f)!r} fails its sha256 check: corrupted")
        n = len(e["seq"])
        expected = n * math.prod(self.input_shape) * self.dtype.itemsize
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                infos = z.infolist()
                if [i.filename for i in infos] != ["x.npy"]:
                    raise ValueError(f"entries {[i.filename for i in infos]}, expected ['x.npy']")
                if infos[0].file_size > expected + _NPY_HEADER_SLACK:  # no decompression bombs
                    raise ValueError(f"x.npy unpacks to {infos[0].file_size} bytes, {n} examples take {expected}")
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                x = z["x"]
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
            # ValueError includes "Object arrays cannot be loaded when allow_pickle=False".
            raise StoreError(
                f"example segment {str(f)!r} cannot be loaded safely ({exc}); edgetl never unpickles stored data"
            ) from None
        if x.dtype != self.dtype or x.shape != (n, *self.input_shape):
            raise StoreError(
                f"example segment {str(f)!r} holds {x.shape} {x.dtype}, the index says {(n, *self.input_shape)} "
                f"{self.dtype}"
            )
        return x

    # ------------------------------------------------------------------ files

    def _mkdir(self) -> None:
        if not self.path.is_dir():
            _atomic.make_dirs(self.path, 0o700)  # the user's own examples: no other account reads them

    def _remove_orphans(self, index: dict[str, Any] | None) -> list[str]:
        """Destroy segment and temporary files the index does not reference (crash leftovers)."""
        if not self.path.is_dir():
            return []
        referenced = {e["file"] for e in index["segments"]} if index else set()
        names = sorted(
            p.name
            for p in self.path.iterdir()
            if (_SEGMENT.match(p.name) and p.name not in referenced) or _TEMP.match(p.name)
        )
        try:
            for name in names:
                _atomic.shred(self.path / name)
            if names:
                _atomic.fsync_dir(self.path)
        except OSError as exc:
            raise _store_error(exc, self.path, "remove orphan files") from exc
        return names

    @contextmanager
    def _lock(self, *, exclusive: bool, create: bool) -> Iterator[None]:
        """flock on LOCK: writers exclusive, readers shared. Without a writable directory a
        reader goes on unlocked (nobody can write there either)."""
        if create:
            try:
                self._mkdir()
            except OSError as exc:
                raise _store_error(exc, self.path, "create the example store") from exc
        if not self.path.is_dir():
            yield
            return
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            if exclusive and create:
                raise _store_error(exc, self.path, "lock the example store") from exc
            yield
            return
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the flock


# ---------------------------------------------------------------------- helpers


def _encode(x: np.ndarray | None) -> bytes:
    assert x is not None
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.ascontiguousarray(x))
    return buf.getvalue()


def _store_error(exc: OSError, path: Path, action: str) -> StoreError:
    if exc.errno == errno.ENOSPC:
        reason = "the disk is full"
    elif exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        reason = "it is read-only"
    else:
        reason = str(exc)
    return StoreError(f"cannot {action} in {str(path)!r}: {reason}; the kept examples are unchanged")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_budget(budget: Any) -> int:
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or budget < MIN_BUDGET_BYTES:
        raise InputError(f"budget_bytes must be an int of at least {MIN_BUDGET_BYTES}, received {describe(budget)}")
    return int(budget)


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        dims = None
    if not dims or len(dims) > 8 or not all(_is_int(d) and 0 < d <= 1 << 20 for d in dims):
        raise InputError(
            f"input_shape must be 1 to 8 positive ints (one example, no batch dimension), received {describe(shape)}"
        )
    return tuple(int(d) for d in dims)


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise InputError(f"dtype must be one of {DTYPES}, received {describe(dtype)}")
    return dt


def _check_label(label: Any, where: str) -> str:
    if not isinstance(label, str) or not 0 < len(label) <= MAX_LABEL_CHARS:
        raise InputError(
            f"{where} must be a non-empty string of at most {MAX_LABEL_CHARS} characters, received {describe(label)}"
        )
    return str(label)


def _check_index(doc: Any) -> dict[str, Any]:
    """Validate a parsed index (ValueError on anything unexpected)."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(
            f"not an edgetl example index (format {describe(doc.get('format') if isinstance(doc, dict) else doc)})"
        )
    if doc.get("version") != VERSION:
        raise ValueError(
            f"version {describe(doc.get('version'))} is not supported; this edgetl reads version {VERSION}"
        )
    _check_shape(doc["input_shape"])
    _check_dtype(doc["dtype"])
    for key in ("next_seq", "next_segment"):
        if not isinstance(doc[key], int) or isinstance(doc[key], bool) or doc[key] < 0:
            raise ValueError(f"{key} must be a non-negative int, received {describe(doc[key])}")
    if not isinstance(doc["segments"], list):
        raise ValueError("segments must be a list")
    files, seqs = set(), set()
    for i, e in enumerate(doc["segments"]):
        if not isinstance(e, dict) or set(e) != {"file", "label", "seq", "sha256", "bytes"}:
            raise ValueError(f"segments[{i}] must have exactly file, label, seq, sha256, bytes")
        m = _SEGMENT.match(e["file"]) if isinstance(e["file"], str) else None
        if not m or int(m.group(1)) >= doc["next_segment"] or e["file"] in files:
            raise ValueError(
                f"segments[{i}].file {describe(e['file'])} is not a segment name of this store, or is listed twice"
            )
        files.add(e["file"])
        _check_label(e["label"], f"segments[{i}].label")
        seq = e["seq"]
        if not isinstance(seq, list) or not seq or not all(_is_int(s) and 0 <= s < doc["next_seq"] for s in seq):
            raise ValueError(f"segments[{i}].seq must be a non-empty list of sequence numbers below next_seq")
        if any(a >= b for a, b in zip(seq, seq[1:])) or seqs.intersection(seq):
            raise ValueError(f"segments[{i}].seq must be increasing and unique across the store")
        seqs.update(seq)
        if not isinstance(e["sha256"], str) or not _SHA256.match(e["sha256"]):
            raise ValueError(f"segments[{i}].sha256 must be 64 lowercase hex digits")
        if not isinstance(e["bytes"], int) or isinstance(e["bytes"], bool) or e["bytes"] <= 0:
            raise ValueError(f"segments[{i}].bytes must be a positive int")
    return doc


__all__ = ["ExampleStore", "DEFAULT_BUDGET_BYTES", "MIN_BUDGET_BYTES"]
