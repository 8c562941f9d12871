"""TensorFlow input pipelines for training: augmentation and ``tf.data`` datasets (host only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from edgetl.errors import InputError


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
        from edgetl.host._tf import keras

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
    x: np.ndarray,
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

    Augmentation runs in the input pipeline with ``training=True`` so it never becomes
    part of the model that gets exported.
    """
    from edgetl.host._tf import tf

    t = tf()
    items: tuple[Any, ...] = (x.astype(np.float32, copy=False),)
    if y is not None:
        items += (np.eye(num_classes, dtype=np.float32)[y],)
        if sample_weights is not None:
            items += (sample_weights.astype(np.float32),)
    ds = t.data.Dataset.from_tensor_slices(items if len(items) > 1 else items[0])
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augmentation is not None:
        aug = augmentation.build()
        ds = ds.map(lambda xb, *rest: (aug(xb, training=True), *rest), num_parallel_calls=t.data.AUTOTUNE)
    return ds.prefetch(t.data.AUTOTUNE)
