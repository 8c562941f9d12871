"""Backbone embeddings of streamed data, computed once and kept on disk.

Training a head on a frozen backbone needs each example's embedding once; computing them
is most of a run's time on large data. For streamed data (a :class:`edgetl.data.LazyArray`)
they are written, block by block, to an ``.npy`` file and read back memory-mapped, so peak
memory stays bounded by the input pipeline. The file is keyed by:

- the backbone: a digest of its layers' classes and configurations (names excluded: Keras
  numbers them per session) and of every weight (the input preprocessing is a layer, so it
  is included);
- how the inputs are produced: the decoder, size, channels and conform steps (``spec``);
- the data: every file's relative path and sha256 (or a mapped array's bytes), in order;
- the TensorFlow version and this cache's format.

Any change to one of these gives another key, so a stale file is never read: it is simply
not found. Entries live under ``$EDGETL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/edgetl`` or
``~/.cache/edgetl``) in ``embeddings/``, are written to a temporary name and renamed into
place (a crash leaves no half-written entry), and ``save_run`` links the entry into the run
directory (``embeddings.npy`` + ``embeddings.json``) for ``edgetl export``.

With ``MultiWorkerMirroredStrategy``, each worker embeds its share of every global step
(``batch_size`` rows per worker) and the shares are all-gathered, so every worker ends with
all embeddings, computed once across the cluster; whether the cache is used is agreed by
all workers first (a collective), so they never diverge.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._atomic import replace_file
from edgetl.data import LazyArray
from edgetl.errors import InputError
from edgetl.host._tf import tf
from edgetl.host._tf_data import rows_dataset

CACHE_FORMAT = 1
BATCH_SIZE = 256
RUN_FILES = ("embeddings.npy", "embeddings.json")


def cache_home() -> Path:
    """edgetl's host cache: ``$EDGETL_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgetl`` or ``~/.cache/edgetl``."""
    base = os.environ.get("EDGETL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "edgetl"
    )
    return Path(base)


def cache_root() -> Path:
    """Where embedding entries live: ``embeddings/`` in :func:`cache_home`."""
    return cache_home() / "embeddings"


def backbone_digest(model: Any) -> str:
    """sha256 of a Keras model's layers (class and configuration, without names) and weights."""
    h = hashlib.sha256()
    for layer in _leaves(model):
        try:
            config = {k: v for k, v in layer.get_config().items() if k != "name"}
        except (NotImplementedError, TypeError):  # a custom layer without a config: its weights still count
            config = {}
        h.update(json.dumps([type(layer).__name__, config], sort_keys=True, default=str).encode())
    for w in model.weights:
        value = np.asarray(w.numpy())
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def _leaves(model: Any) -> list[Any]:
    out = []
    for layer in model.layers:
        out.extend(_leaves(layer) if hasattr(layer, "layers") and layer.layers else [layer])
    return out


def cache_key(backbone: str, x: LazyArray) -> str:
    """The entry's key: backbone digest, how rows are produced, and the rows' contents."""
    data = hashlib.sha256()
    x.hash_into(data)
    ident = {
        "format": CACHE_FORMAT,
        "backbone": backbone,
        "spec": x.spec(),
        "rows": len(x),
        "data": data.hexdigest(),
        "tensorflow": tf().__version__,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


@dataclass
class Embeddings:
    """Raw (unstandardized) backbone embeddings of ``x``'s rows, memory-mapped.

    Attributes:
        array: ``(n, D)`` float32, row ``i`` the embedding of ``x[i]``.
        key: the cache key (``None`` when not cached).
        path: the ``.npy`` file (a temporary one when not cached).
        reused: read from an existing entry (nothing computed).
        seconds: time spent computing (0 when reused).
        source_rows: the rows of ``x``'s source each row of ``array`` holds.
    """

    array: np.ndarray
    key: str | None
    path: Path | None
    reused: bool
    seconds: float
    source_rows: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    _position: np.ndarray | None = field(default=None, repr=False)

    def rows_of(self, view: LazyArray) -> np.ndarray:
        """``view``'s embeddings (a view of the same source whose rows are all here), in memory."""
        if self._position is None:
            self._position = np.full(int(self.source_rows.max()) + 1, -1, np.int64)
            self._position[self.source_rows] = np.arange(len(self.source_rows))
        pos = self._position[view.rows]
        if len(pos) and pos.min() < 0:  # pragma: no cover - callers pass views of the embedded source
            raise InputError("these rows were not embedded; embed the union of every split first")
        return np.asarray(self.array[pos], np.float32)

    def info(self) -> dict[str, Any]:
        """What the run records (metrics.json) about these embeddings."""
        return {
            "key": self.key,
            "path": str(self.path) if self.key else None,
            "reused": self.reused,
            "rows": int(self.array.shape[0]),
            "dim": int(self.array.shape[1]),
            "seconds": round(self.seconds, 3),
        }


def embed(
    model: Any,
    x: LazyArray,
    *,
    strategy: Any = None,
    use_cache: bool = True,
    batch_size: int = BATCH_SIZE,
    record: dict[str, Any] | None = None,
    segments: list[np.ndarray] | None = None,
) -> Embeddings:
    """``model``'s embeddings of every row of ``x``: from the cache, else computed and cached.

    Args:
        model: the frozen backbone (raw input -> embedding).
        x: streamed inputs.
        strategy: the run's ``tf.distribute`` strategy (multi-worker shares the work).
        use_cache: look up and store the entry; ``False`` computes into a temporary file
            that is deleted when the process ends.
        batch_size: rows per worker per step.
        record: what to note in the entry's metadata (e.g. the data's run record).
        segments: positions in ``x`` embedded as separate runs of batches (the splits, so
            the numbers equal ``model.predict`` on each split in memory); default: all rows.
    """
    dim = int(model.output_shape[-1])
    key = cache_key(backbone_digest(model), x) if use_cache else None
    found = _lookup(key, len(x), dim) if key else None
    if key and _workers(strategy)[0] > 1:  # every worker must take the same path (collectives)
        found = found if _all_agree(strategy, found is not None) else None
    if found is not None:
        return Embeddings(found[0], key, found[1], True, 0.0, x.rows, found[2])
    t0 = time.perf_counter()
    root = cache_root() if key else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key or 'embeddings'}.", suffix=".npy", dir=root)
    os.close(fd)
    try:
        offset = _create_npy(Path(tmp), (len(x), dim))
        compute_embeddings(model, x, Path(tmp), offset, segments=segments, strategy=strategy, batch_size=batch_size)
        seconds = time.perf_counter() - t0
        if key is None:
            array = np.load(tmp, mmap_mode="r")
            os.unlink(tmp)  # the mapping keeps the data until the process lets it go
            return Embeddings(array, None, None, False, seconds, x.rows)
        path = root / f"{key}.npy"
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    meta = {"key": key, "rows": len(x), "dim": dim, "spec": x.spec(), "created": time.time(), "record": record}
    replace_file(root / f"{key}.json", (json.dumps(meta, indent=2, default=str) + "\n").encode())
    return Embeddings(np.load(path, mmap_mode="r"), key, path, False, seconds, x.rows, meta)


def _lookup(key: str, rows: int, dim: int) -> tuple[np.ndarray, Path, dict[str, Any]] | None:
    """The entry for ``key`` when both its files are there and agree on its shape."""
    path, meta_path = cache_root() / f"{key}.npy", cache_root() / f"{key}.json"
    try:
        meta = json.loads(meta_path.read_text())
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if array.shape != (rows, dim) or array.dtype != np.float32 or meta.get("key") != key:
        return None
    return array, path, meta


def _create_npy(path: Path, shape: tuple[int, int]) -> int:
    """Write an ``.npy`` header for a float32 array of ``shape`` (data left sparse); return the data offset."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
        )
        offset = f.tell()
        f.truncate(offset + shape[0] * shape[1] * 4)
    return offset


def compute_embeddings(
    model: Any,
    x: LazyArray,
    path: Path,
    offset: int,
    *,
    segments: list[np.ndarray] | None = None,
    strategy: Any = None,
    batch_size: int = BATCH_SIZE,
) -> None:
    """Write ``model(x)`` into the float32 ``.npy`` at ``path`` (row ``i`` at ``offset + i * D * 4``).

    Blocks are written with ordinary file writes, not through a writable memory map: the
    written pages stay in the OS's file cache instead of this process's resident memory.

    One process embeds each segment of rows (e.g. the training split, then validation) in
    batches of ``B`` from its start, exactly as ``model.predict`` batches that split in
    memory: a batch's size changes the numbers in the last bits, and the head's fit follows
    them. With ``W`` workers, global step ``s`` covers rows ``[s * W * B, (s + 1) * W * B)``
    of all segments: worker ``r`` embeds its ``B`` (the last step padded with the final row,
    as every worker must run the same collectives), then the shares are gathered in worker
    order, so every worker writes every row.
    """

    t = tf()
    workers, rank = _workers(strategy)
    segments = [np.arange(len(x))] if segments is None else [np.asarray(s, np.int64) for s in segments if len(s)]
    if workers > 1:
        whole = np.concatenate(segments)
        steps = max(1, math.ceil(len(whole) / (workers * batch_size)))
        mine = np.arange(steps)[:, None] * workers * batch_size + rank * batch_size + np.arange(batch_size)[None, :]
        jobs = [(whole, np.minimum(mine.ravel(), len(whole) - 1), workers * batch_size)]

        @t.function
        def step(batch: Any) -> Any:
            local = strategy.run(lambda b: model(b, training=False), args=(batch,))
            return strategy.gather(local, axis=0)

    else:
        jobs = [(seg, np.arange(len(seg)), batch_size) for seg in segments]
        step = model.predict_on_batch  # Keras' own predict function: model.predict's numbers
    fd = os.open(path, os.O_RDWR)
    try:
        for rows, mine, step_rows in jobs:
            for s, batch in enumerate(rows_dataset(x, rows[mine], batch_size)):
                done = rows[s * step_rows : (s + 1) * step_rows]
                _write_rows(fd, offset, done, np.asarray(step(batch), np.float32)[: len(done)])
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_rows(fd: int, offset: int, rows: np.ndarray, block: np.ndarray) -> None:
    """Write ``block[i]`` as row ``rows[i]``: one write for consecutive rows, else one per row."""
    width = block.shape[1] * 4
    data = np.ascontiguousarray(block, np.float32)
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and np.all(np.diff(rows) == 1):
        os.pwrite(fd, data.tobytes(), offset + int(rows[0]) * width)
        return
    for r, row in zip(rows, data):
        os.pwrite(fd, row.tobytes(), offset + int(r) * width)


def _workers(strategy: Any) -> tuple[int, int]:
    """(workers sharing the embedding work, this worker's rank among them).

    Only multi-worker strategies with one device per worker share it; anything else embeds
    every row in each process (correct, and the usual case: one machine).
    """
    if strategy is None:
        return 1, 0
    t = tf()
    if not isinstance(strategy, t.distribute.MultiWorkerMirroredStrategy) or strategy.num_replicas_in_sync < 2:
        return 1, 0
    if len(strategy.extended.worker_devices) != 1:
        return 1, 0
    ids = strategy.experimental_local_results(
        strategy.run(lambda: t.distribute.get_replica_context().replica_id_in_sync_group)
    )
    return int(strategy.num_replicas_in_sync), int(ids[0])


def _all_agree(strategy: Any, flag: bool) -> bool:
    """True on every worker when ``flag`` is true on every worker (one all-reduce)."""
    t = tf()
    total = strategy.reduce(t.distribute.ReduceOp.SUM, strategy.run(lambda: t.constant(int(flag))), axis=None)
    return int(total) == strategy.num_replicas_in_sync


def store_in_run(info: dict[str, Any], run_dir: Path, record: dict[str, Any] | None) -> bool:
    """Link (or copy) a cache entry (``Embeddings.info()``) into ``run_dir`` with what export
    needs to trust it: the sha256 of the data it describes."""

    path = Path(info.get("path") or "")
    if not info.get("key") or not path.is_file():
        return False
    target = run_dir / RUN_FILES[0]
    try:
        os.link(path, target)  # same file system: no copy, no extra space
    except OSError:
        shutil.copyfile(path, target)
    meta = {**info, "data_sha256": (record or {}).get("sha256")}
    (run_dir / RUN_FILES[1]).write_text(json.dumps(meta, indent=2) + "\n")
    return True


def load_from_run(run_dir: Path, data_sha256: str | None) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The run's embeddings (memory-mapped) when they describe data hashing to ``data_sha256``."""
    try:
        meta = json.loads((run_dir / RUN_FILES[1]).read_text())
        array = np.load(run_dir / RUN_FILES[0], mmap_mode="r")
    except (OSError, ValueError):
        return None
    if not data_sha256 or meta.get("data_sha256") != data_sha256 or array.shape[0] != meta.get("rows"):
        return None
    return array, meta
