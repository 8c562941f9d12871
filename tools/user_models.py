"""Files a user brings, made offline: model files edgetl did not write and messy image folders.

Used by ``tools/linear_probe_gap.py`` and by the tests, so both exercise edgetl the way a
new user does. Every model here is trained (briefly) on scikit-learn's handwritten digits
upscaled to the model's input size, so its embeddings carry real information.

    dense_classifier_model(path)   # .keras, 32x32x3 raw pixels, Dense(64) embedding, Dense classifier
    allconv_h5_model(path)         # Keras 2 .h5, 64x64x1, expects (x/255 - 0.5) * 2, Conv2D 1x1 -> GAP -> softmax
    write_image_folder(root, ...)  # class folders of PNG/JPEG at mixed sizes, gray and RGB mixed
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def digit_images(
    classes: Sequence[int],
    size: int,
    channels: int,
    *,
    seed: int = 0,
    per_class: int | None = None,
    restyle: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Digits ``classes`` as uint8 images ``(n, size, size, channels)`` and labels ``0..k-1``.

    Upscaled bilinearly from 8x8, shifted by up to 1/8 of the size, and for RGB tinted
    with a random colour on a random background level, so images are not trivially alike.
    ``restyle`` draws them as another person would (thicker, slanted strokes).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    from edgetl.data import restyle_digits

    d = load_digits()
    if restyle:
        d.images[:] = restyle_digits(np.round(d.images * (255 / 16)).astype(np.uint8)[..., None])[..., 0] * (16 / 255)
    rng = np.random.default_rng(seed)
    keep = np.flatnonzero(np.isin(d.target, classes))
    if per_class is not None:
        keep = np.concatenate([rng.permutation(np.flatnonzero(d.target == c))[:per_class] for c in classes])
    out = np.empty((len(keep), size, size, channels), np.uint8)
    shift = max(1, size // 8)
    for i, j in enumerate(keep):
        img = Image.fromarray(np.round(d.images[j] * (255 / 16)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        a = np.roll(np.asarray(img, np.float32), tuple(rng.integers(-shift, shift + 1, size=2)), axis=(0, 1))
        if channels == 3:
            tint = rng.uniform(0.5, 1.0, size=3)
            background = rng.uniform(0, 60)
            a = np.clip(background + a[..., None] * tint, 0, 255)
        else:
            a = a[..., None]
        out[i] = np.round(a).astype(np.uint8)
    remap = {c: i for i, c in enumerate(classes)}
    return out, np.asarray([remap[int(t)] for t in d.target[keep]], np.int64)


def dense_classifier_model(
    path: str | Path, *, classes: Sequence[int] = tuple(range(10)), epochs: int = 4, seed: int = 0
) -> Path:
    """A user's small CNN (32x32x3 raw pixels in, its own ``Rescaling(1/255)``), a
    ``Dense(64, relu)`` embedding, ``Dropout`` and a ``Dense`` softmax classifier, trained
    on ``classes``; saved as ``.keras``."""
    from edgetl.host._tf import keras

    k = keras()
    k.utils.set_random_seed(seed)
    x, y = digit_images(classes, 32, 3, seed=seed)
    inputs = k.Input((32, 32, 3), name="image")
    h = k.layers.Rescaling(1 / 255.0, name="scale")(inputs)
    h = k.layers.Conv2D(16, 3, activation="relu", name="c1")(h)
    h = k.layers.MaxPooling2D(name="p1")(h)
    h = k.layers.Conv2D(32, 3, activation="relu", name="c2")(h)
    h = k.layers.MaxPooling2D(name="p2")(h)
    h = k.layers.Flatten(name="flat")(h)
    h = k.layers.Dense(64, activation="relu", name="fc")(h)
    h = k.layers.Dropout(0.2, name="drop")(h)
    out = k.layers.Dense(len(classes), activation="softmax", name="predictions")(h)
    model = k.Model(inputs, out, name="user_cnn")
    model.compile(optimizer=k.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(x.astype(np.float32), y, epochs=epochs, batch_size=32, verbose=0)
    path = Path(path)
    model.save(path)
    return path


def allconv_h5_model(
    path: str | Path, *, classes: Sequence[int] = (0, 1, 2, 3, 4, 5, 6), epochs: int = 3, seed: int = 0
) -> Path:
    """A Keras 2 HDF5 file like the public face/emotion classifiers: 64x64x1 input, Conv2D +
    BatchNorm blocks, classifier ``Conv2D(k, 1x1)`` -> ``GlobalAveragePooling2D`` ->
    ``Activation("softmax")``, no Dense. It was trained on ``(x/255 - 0.5) * 2`` inputs,
    a preprocessing that is NOT inside the file (the user's package applied it)."""
    from edgetl.host._tf import keras

    k = keras()
    k.utils.set_random_seed(seed)
    x, y = digit_images(classes, 64, 1, seed=seed)
    inputs = k.Input((64, 64, 1), name="input_1")
    h = inputs
    for i, filters in enumerate((8, 16, 32)):
        h = k.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv2d_{i + 1}")(h)
        h = k.layers.BatchNormalization(name=f"batch_normalization_{i + 1}")(h)
        h = k.layers.Activation("relu", name=f"activation_{i + 1}")(h)
        h = k.layers.MaxPooling2D(name=f"max_pooling2d_{i + 1}")(h)
    h = k.layers.Conv2D(len(classes), 1, name="conv2d_last")(h)
    h = k.layers.GlobalAveragePooling2D(name="global_average_pooling2d_1")(h)
    out = k.layers.Activation("softmax", name="predictions")(h)
    model = k.Model(inputs, out, name="mini_classifier")
    model.compile(optimizer=k.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit((x.astype(np.float32) / 255.0 - 0.5) * 2.0, y, epochs=epochs, batch_size=32, verbose=0)
    path = Path(path)
    model.save(path, save_format="h5")
    return path


def write_image_folder(
    root: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    names: Sequence[str],
    *,
    sizes: Sequence[int] = (28, 32, 40),
    gray_every: int = 0,
    seed: int = 0,
) -> Path:
    """Write ``root/<name>/<i>.png|.jpg`` with sizes cycling through ``sizes``, PNG and
    JPEG alternating, and (for RGB data) every ``gray_every``-th image saved grayscale."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for i, (img, label) in enumerate(zip(x, y)):
        folder = root / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        if gray_every and i % gray_every == 0:
            im = im.convert("L")
        size = int(sizes[rng.integers(len(sizes))])
        im = im.resize((size, size), Image.BILINEAR)
        if i % 2:
            im.save(folder / f"{i:05d}.jpg", quality=95)
        else:
            im.save(folder / f"{i:05d}.png")
    return root


def write_csv(path: str | Path, x: np.ndarray, y: np.ndarray, names: Sequence[str]) -> Path:
    path = Path(path)
    rows = [",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])]
    rows += [",".join(f"{v:g}" for v in row) + f",{names[int(label)]}" for row, label in zip(x, y)]
    path.write_text("\n".join(rows) + "\n")
    return path
