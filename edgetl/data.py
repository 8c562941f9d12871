"""Datasets for both halves: image folders, ``.npz`` files and CSV tables (numpy + Pillow).

The one data path of edgetl: the host trains from it and the device personalizes from it,
so this module never imports TensorFlow (``tests/device/test_lean_imports.py``). Everything
loads into a :class:`Dataset` held in memory as numpy arrays. Images stay ``uint8``
pixels in ``[0, 255]`` because every edgetl model takes raw inputs and does its own
preprocessing; feature vectors are ``float32``. :func:`read_image` is the one image
decoder (folders, ``edgetl predict``).

    >>> ds = load_dataset("photos/")            # photos/cat/*.jpg, photos/dog/*.png
    >>> splits = stratified_split(ds, seed=0)   # deterministic train / val / test
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from edgetl.errors import DataError, DependencyError, InputError, describe

__all__ = [
    "Dataset",
    "Splits",
    "load_dataset",
    "load_image_folder",
    "load_npz",
    "load_csv",
    "read_image",
    "conform_images",
    "stratified_split",
    "sample_shots",
    "class_weights",
    "load_digits_dataset",
    "restyle_digits",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
DataKind = Literal["image", "features"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Examples and integer labels with their class names.

    Attributes:
        x: ``(n, h, w, c)`` uint8 pixels for images, ``(n, d)`` float32 for features.
        y: ``(n,)`` int64 class indices into ``class_names``.
        class_names: one name per class, index = label.
        kind: ``"image"`` or ``"features"``.
        source: where it was loaded from (for messages and run records).
    """

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    kind: DataKind
    source: str = ""
    # How to load it again (``load_dataset`` keyword arguments), recorded by runs so that
    # export can find the training data without being told (see ``Dataset.record``).
    origin: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(
                f"x and y differ in length: received {len(self.x)} examples and {len(self.y)} labels in "
                f"{self.source or 'dataset'}"
            )
        if self.kind not in ("image", "features"):
            raise DataError(f"dataset kind must be 'image' or 'features', received {describe(self.kind)}")
        expected_rank = 4 if self.kind == "image" else 2
        if self.x.ndim != expected_rank:
            raise DataError(f"{self.kind} data must have rank {expected_rank}, received x.shape={self.x.shape}")
        if self.x.dtype.kind == "f" and not np.all(np.isfinite(self.x)):
            bad = int(np.argwhere(~np.isfinite(self.x))[0][0])
            raise DataError(
                f"{self.source or 'dataset'}: example {bad} has a NaN or infinite feature; clean the data before "
                "training"
            )
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= len(self.class_names)):
            raise DataError(
                f"labels must lie in [0, {len(self.class_names) - 1}], received range [{self.y.min()}, {self.y.max()}]"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.y, minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def subset(self, index: np.ndarray | Sequence[int]) -> "Dataset":
        index = np.asarray(index, dtype=np.int64)
        return Dataset(self.x[index], self.y[index], self.class_names, self.kind, self.source)

    def fingerprint(self) -> str:
        """sha256 of the examples, labels and class names: the same data loads the same."""
        h = hashlib.sha256()
        h.update(json.dumps([list(self.class_names), list(self.x.shape), str(self.x.dtype)]).encode())
        h.update(np.ascontiguousarray(self.x).tobytes())
        h.update(np.ascontiguousarray(self.y, dtype=np.int64).tobytes())
        return h.hexdigest()

    def record(self) -> dict[str, Any]:
        """What a run records about its data: where it came from, how it was loaded, a hash."""
        return {
            "source": self.source,
            "load": self.origin,
            "examples": len(self),
            "shape": list(self.input_shape),
            "sha256": self.fingerprint(),
        }

    def require_trainable(self) -> None:
        """Raise :class:`DataError` unless there are two or more classes, none empty."""
        counts = self.class_counts()
        if len(counts) < 2:
            raise DataError(
                f"{self.source or 'dataset'} has {len(counts)} class ({', '.join(counts) or 'none'}); at least two "
                "classes are needed to train a classifier"
            )
        empty = [name for name, c in counts.items() if c == 0]
        if empty:
            raise DataError(
                f"{self.source or 'dataset'}: class(es) {', '.join(map(repr, empty))} have no usable examples; add "
                "examples or remove the class"
            )


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset


def load_dataset(
    path: str | os.PathLike[str],
    *,
    image_size: tuple[int, int] | int | None = None,
    channels: int | None = None,
    label_column: str = "label",
    require_trainable: bool = True,
) -> Dataset:
    """Load an image folder, an ``.npz`` file or a CSV file, chosen by what ``path`` is.

    Args:
        path: ``"builtin:digits"`` (scikit-learn's digits, offline), a directory with one
            subfolder per class, a ``.npz`` with arrays ``x`` and ``y`` (optionally
            ``class_names``), or a ``.csv`` with a header row.
        image_size: ``(height, width)`` or one int; images are resized to it. ``None``
            uses the most common size in the folder.
        channels: 1 (grayscale) or 3 (RGB) for images; ``None`` picks 3 when any image
            has colour, else 1.
        label_column: the CSV column that holds the class.
        require_trainable: refuse data with fewer than two classes or an empty class (what
            training needs); ``False`` for examples added to an existing model.

    Raises:
        DataError: missing path, unsupported format, fewer than two classes, an empty class.
    """
    if str(path) == "builtin:digits":
        return replace(load_digits_dataset(), origin={"path": "builtin:digits"})
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist; expected an image folder, a .npz file or a .csv file")
    if p.is_dir():
        ds = load_image_folder(p, image_size=image_size, channels=channels)
    elif p.suffix.lower() == ".npz":
        ds = load_npz(p)
    elif p.suffix.lower() == ".csv":
        ds = load_csv(p, label_column=label_column)
    else:
        raise DataError(
            f"cannot load {str(p)!r}: unsupported file type {p.suffix!r}; allowed: a directory of class folders, .npz, "
            ".csv"
        )
    if require_trainable:
        ds.require_trainable()
    size = _normalize_size(image_size)
    origin = {
        "path": str(p.resolve()),
        "image_size": list(size) if size else None,
        "channels": channels,
        "label_column": label_column,
    }
    return replace(ds, origin=origin)


def _normalize_size(image_size: tuple[int, int] | int | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    h, w = (int(v) for v in image_size)
    if h < 1 or w < 1:
        raise InputError(f"image_size must be positive, received {image_size}")
    return h, w


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is in both extras
        raise DependencyError(f'reading image files needs Pillow ({exc}): pip install "edgetl[device]"') from exc
    return Image


def read_image(
    path: str | os.PathLike[str], *, size: tuple[int, int] | None = None, channels: int | None = None
) -> np.ndarray:
    """Decode one image file to ``uint8`` ``(height, width, channels)``.

    Args:
        path: a PNG, JPEG or BMP file.
        size: ``(height, width)`` to resize to (bilinear), or ``None`` to keep its size.
        channels: 1 (grayscale, ITU-R 601 luma) or 3 (RGB); ``None`` keeps 1 for
            grayscale files and 3 for everything else.

    Raises:
        DataError: the file cannot be read as an image.
    """
    image = _pillow()
    try:
        with image.open(path) as im:
            im.load()
            return _to_array(im, size, channels)
    except (OSError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(
            f"cannot read {str(path)!r} as an image ({exc}); allowed: {', '.join(IMAGE_SUFFIXES)}"
        ) from None


def _is_gray(im: Any) -> bool:
    return im.mode in ("L", "1", "I", "I;16", "F", "LA")


def _to_array(im: Any, size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    image = _pillow()
    channels = channels or (1 if _is_gray(im) else 3)
    im = im.convert("L" if channels == 1 else "RGB")
    if size is not None and (im.height, im.width) != tuple(size):
        im = im.resize((size[1], size[0]), image.BILINEAR)
    return np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, channels)


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    image_size: tuple[int, int] | int | None = None,
    channels: int | None = None,
) -> Dataset:
    """Load ``root/<class name>/<image>`` files; unreadable files are skipped with a warning."""
    image = _pillow()
    root = Path(root)
    size = _normalize_size(image_size)
    if channels not in (None, 1, 3):
        raise InputError(f"channels must be 1, 3 or None, received {describe(channels)}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{str(root)!r} has no class subfolders; expected one folder per class, e.g. {root}/cat/img1.png"
        )

    images: list[Any] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.iterdir()):
            if file.name.startswith(".") or file.is_dir():
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                warnings.warn(
                    f"skipping {file}: not an image file (allowed: {', '.join(IMAGE_SUFFIXES)})", stacklevel=2
                )
                continue
            try:
                with image.open(file) as im:
                    im.load()
                    images.append(im.copy())
            except (OSError, ValueError) as exc:
                warnings.warn(f"skipping {file}: cannot be read as an image ({exc})", stacklevel=2)
                continue
            labels.append(label)
    names = tuple(d.name for d in class_dirs)
    if not images:
        raise DataError(f"{str(root)!r} has no readable images in its class folders ({', '.join(names)})")
    channels = channels or (3 if any(not _is_gray(im) for im in images) else 1)
    if size is None:  # mixed sizes: the most common one (ties: the first seen), reported
        sizes = Counter((im.height, im.width) for im in images)
        size = sizes.most_common(1)[0][0]
        if len(sizes) > 1:
            warnings.warn(
                f"{root}: images have {len(sizes)} different sizes; resizing all to the most common, "
                f"{size[0]}x{size[1]} (pass image_size / --image-size to choose)",
                stacklevel=2,
            )
    x = np.stack([_to_array(im, size, channels) for im in images])
    return Dataset(x, np.asarray(labels, dtype=np.int64), names, "image", str(root))


def conform_images(ds: Dataset, shape: Sequence[int]) -> tuple[Dataset, list[str]]:
    """Resize images to ``shape[:2]`` and convert them to ``shape[2]`` channels.

    Returns the conformed dataset (``ds`` itself when nothing changes) and what was done,
    in words, for the run record. Resizing is bilinear (Pillow), as the folder loader's;
    RGB -> gray uses ITU-R 601 luma, gray -> RGB repeats the channel.
    """
    if ds.kind != "image":
        return ds, []
    h, w, c = (int(v) for v in shape)
    notes = []
    x = ds.x
    if x.shape[-1] != c:
        if c == 3:
            x = np.repeat(x, 3, axis=-1)
            notes.append("grayscale images repeated to 3 channels")
        elif c == 1:
            x = np.round(x[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None].astype(
                np.uint8
            )
            notes.append("RGB images converted to grayscale")
        else:
            raise DataError(
                f"the model takes {c} channels; images can be converted to 1 or 3 channels, the data has {x.shape[-1]}"
            )
    if x.shape[1:3] != (h, w):
        image = _pillow()
        notes.append(f"images resized from {x.shape[1]}x{x.shape[2]} to {h}x{w}")
        x = np.stack(
            [_to_array(image.fromarray(im[..., 0] if im.shape[-1] == 1 else im), (h, w), im.shape[-1]) for im in x]
        )
    if not notes:
        return ds, []
    return Dataset(x, ds.y, ds.class_names, ds.kind, ds.source, ds.origin), notes


def _encode_labels(
    raw: np.ndarray, class_names: Sequence[str] | None, source: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map raw labels (ints or strings) to indices 0..k-1 and names."""
    if class_names is not None:
        names = tuple(str(n) for n in class_names)
        if raw.dtype.kind not in "iu":
            raise DataError(
                f"{source}: with class_names given, y must hold integer indices, received dtype {raw.dtype}"
            )
        return raw.astype(np.int64), names
    values = np.unique(raw)
    names = tuple(str(v) for v in values)
    index = {v: i for i, v in enumerate(values.tolist())}
    return np.asarray([index[v] for v in raw.tolist()], dtype=np.int64), names


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """Load arrays ``x`` and ``y`` (and optional ``class_names``) from an ``.npz`` file.

    ``x`` of rank 3 or 4 (with uint8 or float values in [0, 255]) is treated as images;
    rank 2 as feature vectors. Loaded with ``allow_pickle=False``.
    """
    path = Path(path)
    try:
        # Open the file ourselves: np.load leaks its handle when the zip is corrupt.
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {str(path)!r} as .npz ({exc})") from exc
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"{str(path)!r} lacks array(s) {missing}; an edgetl .npz needs 'x' and 'y', found {sorted(arrays)}"
        )
    x, raw_y = arrays["x"], arrays["y"].reshape(-1)
    names = arrays.get("class_names")
    y, class_names = _encode_labels(raw_y, None if names is None else names.tolist(), str(path))
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim == 4:
        if x.dtype != np.uint8:
            if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 255:
                raise DataError(
                    f"{str(path)!r}: image pixels must lie in [0, 255]; received range [{np.nanmin(x)}, {np.nanmax(x)}]"
                )
            x = np.round(x).astype(np.uint8)
        return Dataset(x, y, class_names, "image", str(path))
    if x.ndim == 2:
        return Dataset(x.astype(np.float32), y, class_names, "features", str(path))
    raise DataError(f"{str(path)!r}: x must have rank 2 (features) or 3/4 (images), received shape {x.shape}")


def load_csv(path: str | os.PathLike[str], *, label_column: str = "label") -> Dataset:
    """Load a CSV with a header; every column except ``label_column`` must be numeric."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {str(path)!r} as CSV ({exc})") from exc
    if not rows:
        raise DataError(f"{str(path)!r} is empty; expected a header row and data rows")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise DataError(
            f"{str(path)!r} has no label column {label_column!r}; its columns are {header}. Pass --label-column NAME"
        )
    li = header.index(label_column)
    features, labels = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{str(path)}:{line_no}: expected {len(header)} columns, received {len(row)}")
        values = []
        for ci, cell in enumerate(row):
            if ci == li:
                continue
            try:
                values.append(float(cell))
            except ValueError:
                raise DataError(
                    f"{str(path)}:{line_no}: column {header[ci]!r} must be numeric, received {describe(cell)}"
                ) from None
        features.append(values)
        labels.append(row[li].strip())
    if not features:
        raise DataError(f"{str(path)!r} has a header but no data rows")
    raw = np.asarray(labels)
    try:  # numeric labels sort numerically ("2" before "10")
        numeric = raw.astype(np.int64)
        y, names = _encode_labels(numeric, None, str(path))
    except ValueError:
        y, names = _encode_labels(raw, None, str(path))
    return Dataset(np.asarray(features, dtype=np.float32), y, names, "features", str(path))


def stratified_split(ds: Dataset, *, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Split each class by the same fractions, deterministically for a given seed.

    Every class keeps at least one training example; a class too small for a validation
    or test example simply has none there.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise InputError(f"{name} must be in [0, 1), received {value}")
    if val_fraction + test_fraction >= 1.0:
        raise InputError(f"val_fraction + test_fraction must be below 1, received {val_fraction} + {test_fraction}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(ds.num_classes):
        idx = rng.permutation(np.flatnonzero(ds.y == c))
        n = len(idx)
        n_test = min(int(round(n * test_fraction)), max(n - 1, 0))
        n_val = min(int(round(n * val_fraction)), max(n - 1 - n_test, 0))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    out = {k: ds.subset(np.sort(np.concatenate(v))) for k, v in parts.items()}
    return Splits(**out)


def sample_shots(ds: Dataset, shots: int, *, seed: int = 0) -> Dataset:
    """Take ``shots`` examples of every class (all of a class if it has fewer)."""
    if shots < 1:
        raise InputError(f"shots must be a positive integer, received {shots}")
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(np.flatnonzero(ds.y == c))[:shots] for c in range(ds.num_classes)]
    return ds.subset(np.sort(np.concatenate(idx)))


def class_weights(y: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced class weights ``n / (k * n_c)``, as scikit-learn's ``"balanced"``."""
    counts = Counter(y.tolist())
    n = len(y)
    return {c: n / (num_classes * counts[c]) if counts.get(c) else 0.0 for c in range(num_classes)}


BUILTIN_DATASETS = ("builtin:digits",)


def load_digits_dataset(classes: Sequence[int] | None = None) -> Dataset:
    """scikit-learn's handwritten digits (1,797 images, 8x8) as uint8 pixels in [0, 255].

    Ships inside scikit-learn, so it works offline. ``classes`` keeps only those digits
    (relabelled 0..k-1, names stay the digits).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DependencyError(
            f'builtin:digits ships with scikit-learn ({exc}): pip install "edgetl[host]", or pass your own data'
        ) from exc

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    keep = list(range(10)) if classes is None else [int(c) for c in classes]
    mask = np.isin(y, keep)
    remap = {c: i for i, c in enumerate(keep)}
    return Dataset(
        x[mask],
        np.asarray([remap[v] for v in y[mask]], dtype=np.int64),
        tuple(str(c) for c in keep),
        "image",
        "builtin:digits",
    )


def restyle_digits(x: np.ndarray, *, thickness: int = 1, slant: float = 0.35) -> np.ndarray:
    """Draw digit images the way a different person might: thicker strokes, slanted.

    Thickness is a dilation (max over ``thickness`` pixels to the right and below); the
    slant shifts each row horizontally in proportion to its height (a shear). Returns a
    new uint8 array; ``x`` is not modified.
    """
    out = x.astype(np.float32).copy()
    for _ in range(thickness):
        right = np.zeros_like(out)
        right[:, :, 1:] = out[:, :, :-1]
        down = np.zeros_like(out)
        down[:, 1:] = out[:, :-1]
        out = np.maximum(out, np.maximum(right, down))
    h = out.shape[1]
    sheared = np.zeros_like(out)
    for r in range(h):
        shift = int(round(slant * ((h - 1) / 2 - r)))
        sheared[:, r] = np.roll(out[:, r], shift, axis=1)
        if shift > 0:
            sheared[:, r, :shift] = 0
        elif shift < 0:
            sheared[:, r, shift:] = 0
    return np.clip(sheared, 0, 255).astype(np.uint8)
