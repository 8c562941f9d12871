"""TensorFlow input pipelines for training: augmentation and ``tf.data`` datasets (host only).

In-memory arrays are sliced into tensors; streamed data (a :class:`edgetl.data.LazyArray`)
goes through ``tf.data`` lazily: a dataset of row indices (shuffled when training, the same
permutation as in-memory data gets for the same seed), each row decoded in parallel by
:func:`edgetl.data.read_image` (the pixels the in-memory loader gives), batched, augmented,
prefetched. Peak memory is a few batches, whatever the dataset's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from edgetl.data import LazyArray
from edgetl.errors import InputError
from edgetl.host._tf import keras, tf


@dataclass(frozen=True)
class Augmentation:
    """Image augmentation applied to training batches only (never to val/test/export).

    The preset ``"default"`` equals ``Augmentation()``.
    """

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "horizontal"
    rotation: float = 0.05  # fraction of a full turn
    zoom: float = 0.1
    brightness: float = 0.1  # fraction of the [0, 255] range

    def __post_init__(self) -> None:
        if self.flip not in ("none", "horizontal", "vertical", "horizontal_and_vertical"):
            raise InputError(f"flip must be none|horizontal|vertical|horizontal_and_vertical, received {self.flip!r}")
        for name in ("rotation", "zoom", "brightness"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise InputError(f"augmentation {name} must be in [0, 1), received {v}")

    def build(self) -> Any:
        """A ``tf_keras.Sequential`` of preprocessing layers (random only when training=True)."""

        k = keras()
        layers = []
        if self.flip != "none":
            layers.append(k.layers.RandomFlip(self.flip))
        if self.rotation:
            layers.append(k.layers.RandomRotation(self.rotation, fill_mode="constant"))
        if self.zoom:
            layers.append(k.layers.RandomZoom(self.zoom, fill_mode="constant"))
        if self.brightness:
            layers.append(k.layers.RandomBrightness(self.brightness, value_range=(0, 255)))
        return k.Sequential(layers, name="augmentation")


def to_tf_dataset(
    x: np.ndarray | LazyArray,
    y: np.ndarray | None,
    *,
    num_classes: int,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    augmentation: Augmentation | None = None,
    sample_weights: np.ndarray | None = None,
) -> Any:
    """Batched, prefetched ``tf.data.Dataset`` of ``(float32 x, one-hot y)``.

    ``x`` is an array in memory or a :class:`~edgetl.data.LazyArray` (streamed: rows are
    read in parallel as the pipeline needs them). Augmentation runs in the input pipeline
    with ``training=True`` so it never becomes part of the model that gets exported.
    """

    t = tf()
    lazy = isinstance(x, LazyArray)
    items: tuple[Any, ...] = (np.arange(len(x), dtype=np.int64) if lazy else x.astype(np.float32, copy=False),)
    if y is not None:
        items += (np.eye(num_classes, dtype=np.float32)[y],)
        if sample_weights is not None:
            items += (sample_weights.astype(np.float32),)
    ds = t.data.Dataset.from_tensor_slices(items if len(items) > 1 else items[0])
    if shuffle:
        # Shuffling indices permutes exactly as shuffling the arrays would (the order depends
        # on the seed and the length only), so streamed and in-memory data train alike.
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if lazy:
        read = _row_reader(x)
        ds = ds.map(
            (lambda i, *rest: (read(i), *rest)) if len(items) > 1 else read,
            num_parallel_calls=t.data.AUTOTUNE,
            deterministic=True,
        )
    ds = ds.batch(batch_size)
    if augmentation is not None:
        aug = augmentation.build()
        ds = ds.map(lambda xb, *rest: (aug(xb, training=True), *rest), num_parallel_calls=t.data.AUTOTUNE)
    return ds.prefetch(t.data.AUTOTUNE)


def _row_reader(x: LazyArray) -> Any:
    """A graph function: row index -> that row of ``x`` as float32 (decoded in Python, off the GIL
    for most of the work: Pillow releases it while decoding and resizing)."""

    t = tf()
    shape = tuple(int(d) for d in x.shape[1:])
    one = getattr(x, "read_one", None) or (lambda i: x[int(i)])

    def read(i: Any) -> Any:
        row = t.numpy_function(lambda k: np.asarray(one(int(k)), np.float32), [i], t.float32, stateful=False)
        return t.ensure_shape(row, shape)

    return read


def rows_dataset(x: LazyArray | np.ndarray, rows: np.ndarray, batch_size: int) -> Any:
    """``x[rows]`` as float32 batches of ``batch_size``, read in parallel and prefetched (for
    embedding extraction: no labels, no shuffling, order kept)."""

    t = tf()
    rows = np.asarray(rows, np.int64)
    if isinstance(x, LazyArray):
        view = x.take(rows)
        ds = t.data.Dataset.range(len(rows)).map(
            _row_reader(view), num_parallel_calls=t.data.AUTOTUNE, deterministic=True
        )
    else:
        ds = t.data.Dataset.from_tensor_slices(x[rows].astype(np.float32))
    return ds.batch(batch_size).prefetch(t.data.AUTOTUNE)
