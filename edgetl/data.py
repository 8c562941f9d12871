"""Datasets for both halves: image folders, ``.npz`` files and CSV tables (numpy + Pillow).

The one data path of edgetl: the host trains from it and the device personalizes from it,
so this module never imports TensorFlow (``tests/device/test_lean_imports.py``). Everything
loads into a :class:`Dataset`. Images stay ``uint8`` pixels in ``[0, 255]`` because every
edgetl model takes raw inputs and does its own preprocessing; feature vectors are
``float32``. :func:`read_image` is the one image decoder (folders, ``edgetl predict``).

A dataset's ``x`` is a numpy array in memory, or, for data too large for memory
(``load_dataset(..., streaming="auto"|"on")``), a :class:`LazyArray`: an array-like that
decodes only what is indexed (:class:`ImageFiles` for folders, :class:`MappedArray` for
memory-mapped ``.npz`` arrays). Both split the same way, by example index.

    >>> ds = load_dataset("photos/")            # photos/cat/*.jpg, photos/dog/*.png
    >>> splits = stratified_split(ds, seed=0)   # deterministic train / val / test
    >>> big = load_dataset("archive/", streaming="auto")   # streamed when it would not fit
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import warnings
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from edgetl.bundle import InputSpec
from edgetl.errors import DataError, DependencyError, InputError, describe

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # edgetl/


def _warn(message: str) -> None:
    """Warn at the first caller outside edgetl (the user's own line, as Python 3.12's
    ``skip_file_prefixes`` does): the loader's line inside edgetl means nothing to them."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


SKIPPED_SUMMARY = "skipped {count} file(s) that are not readable images"


def _warn_skipped(root: Path, count: int) -> None:
    """One line counting a folder's skipped files, said where the folder is loaded (the CLI lists
    only the first few ``skipping`` lines, so a long folder's count belongs with them, not after
    the command's results)."""
    if count:
        _warn(f"{root}: " + SKIPPED_SUMMARY.format(count=count))


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
    "LazyArray",
    "ImageFiles",
    "MappedArray",
    "FolderListing",
    "list_image_folder",
    "choose_streaming",
    "STREAMING_MODES",
    "load_for_shape",
    "load_for_spec",
    "read_inputs",
    "expand_input_folders",
    "image_size_arg",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
DataKind = Literal["image", "features"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Examples and integer labels with their class names.

    Attributes:
        x: ``(n, h, w, c)`` uint8 pixels for images, ``(n, d)`` float32 for features; a
            numpy array, or a :class:`LazyArray` that decodes on access (streamed data).
        y: ``(n,)`` int64 class indices into ``class_names``.
        class_names: one name per class, index = label.
        kind: ``"image"`` or ``"features"``.
        source: where it was loaded from (for messages and run records).
        loading: how it was loaded (in memory or streamed, and why), for the user.
    """

    x: Any  # np.ndarray | LazyArray
    y: np.ndarray
    class_names: tuple[str, ...]
    kind: DataKind
    source: str = ""
    # How to load it again (``load_dataset`` keyword arguments), recorded by runs so that
    # export can find the training data without being told (see ``Dataset.record``).
    origin: dict[str, Any] | None = None
    loading: str = ""

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
        if isinstance(self.x, np.ndarray) and self.x.dtype.kind == "f" and not np.all(np.isfinite(self.x)):
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

    @property
    def streamed(self) -> bool:
        """True when ``x`` is read from disk on access (a :class:`LazyArray`)."""
        return isinstance(self.x, LazyArray)

    def subset(self, index: np.ndarray | Sequence[int]) -> "Dataset":
        index = np.asarray(index, dtype=np.int64)
        x = self.x.take(index) if isinstance(self.x, LazyArray) else self.x[index]
        return Dataset(x, self.y[index], self.class_names, self.kind, self.source)

    def materialize(self) -> "Dataset":
        """This dataset with ``x`` decoded into memory (itself when it already is)."""
        if not isinstance(self.x, LazyArray):
            return self
        # Recorded as loaded in memory: its fingerprint now hashes pixels, as export's reload will.
        origin = {**self.origin, "streaming": "off"} if self.origin else self.origin
        return replace(self, x=np.asarray(self.x), origin=origin, loading="decoded into memory")

    def fingerprint(self) -> str:
        """sha256 of the examples, labels and class names: the same data loads the same.

        In-memory and memory-mapped arrays hash their bytes; image files read lazily hash
        each file's bytes (decoding every image just to hash it would cost a full pass).
        """
        h = hashlib.sha256()
        h.update(json.dumps([list(self.class_names), list(self.x.shape), str(self.x.dtype)]).encode())
        if isinstance(self.x, LazyArray):
            self.x.hash_into(h)
        else:
            _hash_rows(h, self.x)
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
            "streamed": self.streamed,
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
    """``train`` fits the model, ``val`` selects (and fits a small head too), ``test``
    reports. ``guard`` (``None``: none held out) is never trained on: the bundle ships some of
    it so the device's guard judges forgetting on factory examples the head has not
    memorized (see :func:`stratified_split`)."""

    train: Dataset
    val: Dataset
    test: Dataset
    guard: Dataset | None = None

    def parts(self) -> dict[str, Dataset]:
        """Every non-None split by name (``guard`` last, when there is one)."""
        out = {"train": self.train, "val": self.val, "test": self.test}
        return out if self.guard is None else {**out, "guard": self.guard}


def load_dataset(
    path: str | os.PathLike[str],
    *,
    image_size: tuple[int, int] | int | None = None,
    channels: int | None = None,
    label_column: str = "label",
    require_trainable: bool = True,
    streaming: str = "off",
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
        streaming: ``"off"`` decodes everything into memory; ``"on"`` reads image folders
            and uncompressed ``.npz`` arrays lazily (a :class:`LazyArray`); ``"auto"`` streams
            when loading into memory would take more than half the available memory (see
            :func:`choose_streaming`). The decision and its reason are in ``Dataset.loading``.

    Raises:
        DataError: missing path, unsupported format, fewer than two classes, an empty class.
        InputError: ``streaming`` is not one of ``auto``, ``on``, ``off``.
    """
    if streaming not in STREAMING_MODES:
        raise InputError(f"streaming must be one of {STREAMING_MODES}, received {describe(streaming)}")
    if str(path) == "builtin:digits":
        return replace(load_digits_dataset(), origin={"path": "builtin:digits"}, loading="loaded into memory")
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist; expected an image folder, a .npz file or a .csv file")
    if p.is_dir():
        ds = _load_folder(p, image_size, channels, streaming)
    elif p.suffix.lower() == ".npz":
        ds = _load_npz(p, streaming)
    elif p.suffix.lower() == ".csv":
        ds = replace(load_csv(p, label_column=label_column), loading="loaded into memory")
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
        # What was chosen (never "auto"), so export loads it again the same way.
        "streaming": "on" if ds.streamed else "off",
    }
    return replace(ds, origin=origin)


# ----------------------------------------------------------------------------- data for a model


def image_size_arg(values: Sequence[int] | int | None) -> tuple[int, int] | int | None:
    """An image size as users give it (``--image-size N`` or ``--image-size H W``): ``None``,
    one int (square) or ``(height, width)``."""
    if values is None or isinstance(values, int) or (isinstance(values, Sequence) and not values):
        return values or None
    if len(values) not in (1, 2):
        raise InputError(f"--image-size takes N or H W, received {list(values)}")
    return (values[0], values[1]) if len(values) == 2 else values[0]


def load_for_shape(
    path: str | os.PathLike[str],
    shape: Sequence[int] | None,
    *,
    image_size: tuple[int, int] | int | None = None,
    channels: int | None = None,
    label_column: str = "label",
    streaming: str = "off",
    require_trainable: bool = True,
) -> Dataset:
    """:func:`load_dataset` at a model's input size and channels.

    Args:
        shape: the model's input shape without the batch axis (``(h, w, c)`` for an image
            model), or ``None`` when it is not known yet (the data then decides).
        image_size, channels: override the shape's (``None``: the shape's).
        label_column, streaming, require_trainable: as for :func:`load_dataset`.
    """
    if shape is not None and len(shape) == 3:
        image_size = image_size or (int(shape[0]), int(shape[1]))
        channels = channels or int(shape[2])
    return load_dataset(
        path,
        image_size=image_size,
        channels=channels,
        label_column=label_column,
        streaming=streaming,
        require_trainable=require_trainable,
    )


def load_for_spec(
    path: str | os.PathLike[str],
    spec: InputSpec | dict[str, Any],
    label_column: str = "label",
    image_size: tuple[int, int] | int | None = None,
    *,
    require_trainable: bool = True,
    labels: Sequence[str] | None = None,
) -> Dataset:
    """Load data the way a model's input spec (a bundle's or a run's) expects it.

    Args:
        spec: an :class:`edgetl.bundle.InputSpec` or its JSON (``run.input_spec``).
        image_size: resize images to this instead of the spec's size.
        require_trainable: as for :func:`load_dataset`.
        labels: when given, the data's classes must be exactly these (a bundle's labels).

    Raises:
        InputError: the data's classes differ from ``labels``.
    """
    spec = spec if isinstance(spec, InputSpec) else InputSpec.from_json(spec)
    if image_size is None and spec.is_image:
        image_size = (spec.shape[0], spec.shape[1])
    data = load_dataset(
        path,
        image_size=image_size if spec.is_image else None,
        channels=spec.channels if spec.is_image else None,
        label_column=label_column,
        require_trainable=require_trainable,
    )
    if labels is not None and list(data.class_names) != list(labels):
        raise InputError(f"--data classes {list(data.class_names)} differ from the bundle's labels {list(labels)}")
    return data


def expand_input_folders(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Every input file: a folder stands for the image, .npy and .npz files under it (sorted)."""
    allowed = (*IMAGE_SUFFIXES, ".npy", ".npz")
    out = []
    for raw in map(str, paths):
        if not Path(raw).is_dir():
            out.append(raw)
            continue
        found = sorted(str(f) for f in Path(raw).rglob("*") if f.is_file() and f.suffix.lower() in allowed)
        if not found:
            raise InputError(f"folder {raw!r} holds no input files (allowed: {', '.join(allowed)})")
        out += found
    return out


def read_inputs(paths: Sequence[str | os.PathLike[str]], shape: Sequence[int]) -> tuple[np.ndarray, list[str]]:
    """Unlabelled examples to predict on, shaped as a model's input, and a name for each.

    Args:
        paths: image files, ``.npy`` arrays (one example or a batch), ``.npz`` files with an
            array ``x``, or folders of those.
        shape: the model's input shape without the batch axis (``Classifier.input_shape``).

    Returns:
        ``(x, names)``: the examples as one batch, and ``file`` or ``file[i]`` per example.

    Raises:
        InputError: a missing file, an unreadable array, an image for a feature model, or
            inputs of different shapes.
    """
    shape = tuple(shape)
    arrays, names = [], []
    for raw in expand_input_folders(paths):
        path = Path(raw)
        if not path.is_file():
            raise InputError(f"input {raw!r} does not exist")
        if path.suffix.lower() in (".npy", ".npz"):
            arr = _input_array(path, shape)
            arrays.append(arr)
            names += [f"{path.name}[{i}]" for i in range(len(arr))] if len(arr) > 1 else [path.name]
        else:
            if len(shape) != 3:
                raise InputError(
                    f"the bundle takes feature vectors of shape {shape}, received the image file {raw!r}; pass .npy "
                    "arrays"
                )
            arrays.append(read_image(path, size=(shape[0], shape[1]), channels=shape[2])[None])
            names.append(path.name)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise InputError(f"inputs have different shapes {sorted(shapes)}; the bundle takes {shape}")
    return np.concatenate(arrays), names


def _input_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """One ``.npy`` array or an ``.npz``'s ``x``, as a batch (one example gets a batch axis)."""
    try:
        data = np.load(path, allow_pickle=False)
        arr = data["x"] if path.suffix.lower() == ".npz" else data
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read {str(path)!r} as an array ({exc}); .npz inputs need an array 'x'") from None
    return arr[None] if arr.shape == shape else arr


def _load_folder(root: Path, image_size: tuple[int, int] | int | None, channels: int | None, streaming: str) -> Dataset:
    """An image folder in memory (:func:`load_image_folder`) or as :class:`ImageFiles`."""
    if streaming == "off":
        return replace(load_image_folder(root, image_size=image_size, channels=channels), loading="loaded into memory")
    if channels not in (None, 1, 3):
        raise InputError(f"channels must be 1, 3 or None, received {describe(channels)}")
    listing = list_image_folder(root)
    size = _normalize_size(image_size) or listing.most_common_size()
    chans = channels or listing.channels()
    stream, reason = choose_streaming(streaming, len(listing.files) * size[0] * size[1] * chans)
    if not stream:
        # The in-memory loader itself, so in-memory data is exactly what it always was.
        ds = load_image_folder(root, image_size=image_size, channels=channels)
        return replace(ds, loading=reason)
    for message in listing.skipped:
        _warn(message)
    _warn_skipped(root, len(listing.skipped))
    if image_size is None and len(set(map(tuple, listing.sizes.tolist()))) > 1:
        _warn(
            f"{root}: images have {len(set(map(tuple, listing.sizes.tolist())))} different sizes; resizing all to the "
            f"most common, {size[0]}x{size[1]} (pass image_size / --image-size to choose)"
        )
    x = ImageFiles(root, listing.files, size=size, channels=chans)
    return Dataset(x, listing.labels, listing.class_names, "image", str(root), loading=reason)


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
    skipped = 0
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.iterdir()):
            if file.name.startswith(".") or file.is_dir():
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                _warn(f"skipping {file}: not an image file (allowed: {', '.join(IMAGE_SUFFIXES)})")
                skipped += 1
                continue
            try:
                with image.open(file) as im:
                    im.load()
                    images.append(im.copy())
            except (OSError, ValueError) as exc:
                _warn(f"skipping {file}: cannot be read as an image ({exc})")
                skipped += 1
                continue
            labels.append(label)
    _warn_skipped(root, skipped)
    names = tuple(d.name for d in class_dirs)
    if not images:
        raise DataError(f"{str(root)!r} has no readable images in its class folders ({', '.join(names)})")
    channels = channels or (3 if any(not _is_gray(im) for im in images) else 1)
    if size is None:  # mixed sizes: the most common one (ties: the first seen), reported
        sizes = Counter((im.height, im.width) for im in images)
        size = sizes.most_common(1)[0][0]
        if len(sizes) > 1:
            _warn(
                f"{root}: images have {len(sizes)} different sizes; resizing all to the most common, "
                f"{size[0]}x{size[1]} (pass image_size / --image-size to choose)"
            )
    x = np.stack([_to_array(im, size, channels) for im in images])
    return Dataset(x, np.asarray(labels, dtype=np.int64), names, "image", str(root))


# ----------------------------------------------------------------------------- streamed data

STREAMING_MODES = ("auto", "on", "off")
# Loading a folder into memory peaks at about this many times the decoded uint8 bytes:
# Pillow's decoded copies and the stacked array, then the float32 copy of the training split
# that embedding takes (4 bytes per pixel). Measured by tools/bench_data.py (in-memory peak
# RSS over the decoded size).
IN_MEMORY_PEAK_FACTOR = 5.0
# "auto" streams when that peak would exceed this share of the memory available now, so
# the rest of the run (model, embeddings, the OS's file cache) still fits.
IN_MEMORY_SHARE = 0.5


def available_memory() -> int:
    """Bytes of memory available to this process now: ``MemAvailable``, capped by a cgroup limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest machine
            avail = 8 << 30
    try:  # a container's limit (cgroup v2) binds before the machine's memory does
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return int(avail)


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def choose_streaming(mode: str, decoded_bytes: int, *, available: int | None = None) -> tuple[bool, str]:
    """Whether to stream data whose decoded examples take ``decoded_bytes``, and why (in words).

    ``"auto"`` streams when loading into memory would peak above :data:`IN_MEMORY_SHARE` of
    the available memory (the peak is :data:`IN_MEMORY_PEAK_FACTOR` times the decoded size);
    ``"on"`` and ``"off"`` decide by themselves.
    """
    if mode not in STREAMING_MODES:
        raise InputError(f"streaming must be one of {STREAMING_MODES}, received {describe(mode)}")
    peak = decoded_bytes * IN_MEMORY_PEAK_FACTOR
    if mode != "auto":
        what = "streamed from disk" if mode == "on" else "loaded into memory"
        return mode == "on", f"{what} (streaming={mode}; in memory it would peak at about {_gb(peak)})"
    available = available_memory() if available is None else available
    budget = IN_MEMORY_SHARE * available
    if peak > budget:
        return True, (
            f"streamed from disk: in memory it would peak at about {_gb(peak)}, more than half of the "
            f"{_gb(available)} available (streaming=off forces memory)"
        )
    return False, f"loaded into memory: about {_gb(peak)} at peak, within half of the {_gb(available)} available"


@dataclass(frozen=True)
class FolderListing:
    """What :func:`load_image_folder` would load, from the files' headers only.

    Attributes:
        root: the folder.
        files: ``"<class>/<file>"`` paths relative to ``root``, in the loader's order.
        labels: ``(n,)`` int64 class index of each file.
        class_names: the class folders, sorted.
        sizes: ``(n, 2)`` height and width of each file.
        gray: ``(n,)`` whether each file is grayscale.
        skipped: a message per file left out (not an image, unreadable header).
    """

    root: Path
    files: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    sizes: np.ndarray
    gray: np.ndarray
    skipped: tuple[str, ...] = ()

    def most_common_size(self) -> tuple[int, int]:
        """The most common (height, width), ties going to the first seen (as the loader)."""
        h, w = Counter(map(tuple, self.sizes.tolist())).most_common(1)[0][0]
        return int(h), int(w)

    def channels(self) -> int:
        return 3 if not bool(np.all(self.gray)) else 1


def list_image_folder(root: str | os.PathLike[str]) -> FolderListing:
    """List ``root/<class>/<image>`` as :func:`load_image_folder` orders it, decoding nothing.

    Each file's header is read (size, colour mode); a file whose header cannot be read is
    skipped, as the loader skips it. Headers are read by a few threads (file I/O releases
    the GIL), so a folder of 200,000 images lists in seconds.

    Raises:
        DataError: no class subfolders, or no readable image in them.
    """
    root = Path(root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{str(root)!r} has no class subfolders; expected one folder per class, e.g. {root}/cat/img1.png"
        )
    candidates: list[tuple[str, int]] = []
    skipped: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.iterdir()):
            if file.name.startswith(".") or file.is_dir():
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(f"skipping {file}: not an image file (allowed: {', '.join(IMAGE_SUFFIXES)})")
                continue
            candidates.append((f"{class_dir.name}/{file.name}", label))
    headers = list(_thread_pool().map(lambda c: _header(root / c[0]), candidates))
    files, labels, sizes, gray = [], [], [], []
    for (rel, label), head in zip(candidates, headers):
        if isinstance(head, str):
            skipped.append(f"skipping {root / rel}: cannot be read as an image ({head})")
            continue
        files.append(rel)
        labels.append(label)
        sizes.append(head[:2])
        gray.append(head[2])
    names = tuple(d.name for d in class_dirs)
    if not files:
        raise DataError(f"{str(root)!r} has no readable images in its class folders ({', '.join(names)})")
    return FolderListing(
        root,
        tuple(files),
        np.asarray(labels, np.int64),
        names,
        np.asarray(sizes, np.int64).reshape(-1, 2),
        np.asarray(gray, bool),
        tuple(skipped),
    )


def _header(path: Path) -> tuple[int, int, bool] | str:
    """(height, width, grayscale) from the file's header, or why it cannot be read."""
    image = _pillow()
    try:
        with image.open(path) as im:
            return im.height, im.width, _is_gray(im)
    except (OSError, ValueError) as exc:
        return str(exc)


_POOL: ThreadPoolExecutor | None = None


def _thread_pool() -> ThreadPoolExecutor:
    """One shared pool for file I/O and decoding (Pillow releases the GIL while it decodes)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="edgetl-io")
    return _POOL


class LazyArray:
    """An array-like whose rows are read from disk only when indexed.

    It has what numpy code and Keras' array-like adapter use: ``shape``, ``ndim``,
    ``dtype``, ``len``, indexing (an int, a slice or an index array; returns numpy arrays)
    and ``astype`` (a lazy view with another dtype). ``take(index)`` selects rows without
    reading them; ``np.asarray(x)`` reads everything (only for data known to be small).
    Subclasses implement ``_read(rows)``, ``_row_shape``, ``_with(**changes)``,
    ``hash_into(h)`` and ``spec()``.
    """

    def __init__(self, rows: np.ndarray, dtype: Any) -> None:
        self._rows = np.asarray(rows, np.int64)
        self.dtype = np.dtype(dtype)

    # -- what subclasses provide
    @property
    def _row_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _read(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _with(self, **changes: Any) -> "LazyArray":
        raise NotImplementedError

    def hash_into(self, h: Any) -> None:
        """Feed what identifies these rows' contents to hashlib object ``h``."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """How rows are produced (decoding options): part of the embedding cache's key."""
        raise NotImplementedError

    # -- numpy-like surface
    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._rows), *self._row_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._read(self._rows[[int(key)]])[0].astype(self.dtype, copy=False)
        if isinstance(key, slice) or (isinstance(key, (np.ndarray, list, tuple)) and np.ndim(key) == 1):
            return self._read(self._rows[key]).astype(self.dtype, copy=False)
        raise InputError(f"{type(self).__name__} takes an int, a slice or an index array, received {describe(key)}")

    def astype(self, dtype: Any, copy: bool = True) -> "LazyArray":
        """A view that reads as ``dtype`` (nothing is read now; ``copy`` is accepted for numpy's signature)."""
        return self._with(dtype=np.dtype(dtype))

    def take(self, index: np.ndarray | Sequence[int]) -> "LazyArray":
        """The rows at ``index`` (nothing is read)."""
        return self._with(rows=self._rows[np.asarray(index, np.int64)])

    @property
    def rows(self) -> np.ndarray:
        """Which rows of the underlying source (file listing, mapped array) this view holds."""
        return self._rows

    def with_rows(self, rows: np.ndarray) -> "LazyArray":
        """A view of the same source, read the same way, holding source rows ``rows``."""
        return self._with(rows=np.asarray(rows, np.int64))

    def same_source(self, other: Any) -> bool:
        """Whether ``other`` views the same source read the same way (so their rows combine)."""
        return type(other) is type(self) and self._source_token() == other._source_token()

    def _source_token(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def batches(self, batch_size: int) -> Any:
        """Yield consecutive ``(start, rows)`` blocks, each read as one array."""
        for start in range(0, len(self), batch_size):
            yield start, self[start : start + batch_size]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class ImageFiles(LazyArray):
    """Image files as a lazy ``(n, h, w, c)`` array: each is decoded by :func:`read_image` when read.

    The pixels equal the in-memory loader's, bit for bit: the same decoder, size and channel
    conversion, then the same :func:`conform_images` steps. Files' sha256 digests (for
    :meth:`hash_into`) are computed once and shared by every view of the same listing.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        files: Sequence[str],
        *,
        size: tuple[int, int],
        channels: int,
        conform: tuple[tuple[int, int, int], ...] = (),
        rows: np.ndarray | None = None,
        dtype: Any = np.uint8,
        _digests: dict[str, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.files = files if isinstance(files, np.ndarray) else np.asarray(list(files), dtype=object)
        self.size = (int(size[0]), int(size[1]))
        self.channels = int(channels)
        self.conform = tuple(conform)
        self._digests = {} if _digests is None else _digests
        super().__init__(np.arange(len(self.files)) if rows is None else rows, dtype)

    @property
    def _row_shape(self) -> tuple[int, ...]:
        return tuple(self.conform[-1]) if self.conform else (*self.size, self.channels)

    @property
    def paths(self) -> list[str]:
        """The relative paths of these rows, in order."""
        return [str(f) for f in self.files[self._rows]]

    def _with(self, **changes: Any) -> "ImageFiles":
        kw = dict(size=self.size, channels=self.channels, conform=self.conform, rows=self._rows, dtype=self.dtype)
        kw.update(changes)
        return ImageFiles(self.root, self.files, _digests=self._digests, **kw)

    def _source_token(self) -> tuple[Any, ...]:
        return (id(self.files), str(self.root), json.dumps(self.spec(), sort_keys=True), str(self.dtype))

    def conformed(self, shape: Sequence[int]) -> "ImageFiles":
        """These images then resized/converted to ``shape`` (as :func:`conform_images` does)."""
        return self._with(conform=(*self.conform, tuple(int(v) for v in shape)))

    def read_one(self, row: int) -> np.ndarray:
        """Row ``row`` of this view, decoded (what ``tf.data`` maps over)."""
        return self._decode(str(self.files[self._rows[row]]))

    def _decode(self, rel: str) -> np.ndarray:
        im = read_image(self.root / rel, size=self.size, channels=self.channels)
        for h, w, c in self.conform:
            im = _conform_array(im[None], h, w, c)[0][0]
        return im

    def _read(self, rows: np.ndarray) -> np.ndarray:
        rels = [str(self.files[r]) for r in rows]
        if not rels:
            return np.zeros((0, *self._row_shape), np.uint8)
        images = list(_thread_pool().map(self._decode, rels)) if len(rels) > 1 else [self._decode(rels[0])]
        return np.stack(images)

    def digests(self) -> list[str]:
        """sha256 of each file of this view (each file read once per listing)."""
        missing = [str(f) for f in self.files[self._rows] if str(f) not in self._digests]
        if missing:
            for rel, digest in zip(missing, _thread_pool().map(lambda r: _file_sha256(self.root / r), missing)):
                self._digests[rel] = digest
        return [self._digests[str(f)] for f in self.files[self._rows]]

    def hash_into(self, h: Any) -> None:
        h.update(json.dumps(self.spec(), sort_keys=True).encode())
        for rel, digest in zip(self.paths, self.digests()):
            h.update(f"{rel}\0{digest}\n".encode())

    def spec(self) -> dict[str, Any]:
        return {
            "decoder": "read_image",
            "pillow": _pillow().__version__,
            "size": list(self.size),
            "channels": self.channels,
            "conform": [list(c) for c in self.conform],
        }


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r} ({exc}); the folder changed while in use") from None
    return h.hexdigest()


class MappedArray(LazyArray):
    """Rows of an array memory-mapped from a file (an uncompressed ``.npz`` member), read on access."""

    def __init__(self, base: np.ndarray, *, rows: np.ndarray | None = None, dtype: Any = None, label: str = "") -> None:
        self.base = base
        self.label = label
        super().__init__(np.arange(len(base)) if rows is None else rows, base.dtype if dtype is None else dtype)

    @property
    def _row_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.base.shape[1:])

    def _read(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) and np.all(np.diff(rows) == 1):  # a contiguous block: one slice, no gather
            return np.array(self.base[rows[0] : rows[-1] + 1])
        return self.base[rows]

    def _with(self, **changes: Any) -> "MappedArray":
        kw = dict(rows=self._rows, dtype=self.dtype, label=self.label)
        kw.update(changes)
        return MappedArray(self.base, **kw)

    def _source_token(self) -> tuple[Any, ...]:
        return (id(self.base), str(self.dtype))

    def hash_into(self, h: Any) -> None:
        # The same bytes Dataset.fingerprint hashes for an in-memory array.
        for _, block in self.batches(4096):
            h.update(np.ascontiguousarray(block).tobytes())

    def spec(self) -> dict[str, Any]:
        return {"array": self.label, "dtype": str(self.dtype)}


def _hash_rows(h: Any, x: np.ndarray, block: int = 4096) -> None:
    """``h.update(x.tobytes())`` a block of rows at a time (same digest, no full copy)."""
    for start in range(0, len(x), block):
        h.update(np.ascontiguousarray(x[start : start + block]).tobytes())


def _stored_member(path: Path, name: str) -> tuple[int, Any] | None:
    """(offset of the array data, the .npy header) of an uncompressed member of ``path``, else None."""
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{name}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # a newer .npy header: read it the ordinary way
            return None
        return f.tell(), (shape, fortran, dtype)


def _load_npz(path: Path, streaming: str) -> Dataset:
    """``load_npz``, or its ``x`` memory-mapped when streaming applies (uncompressed, uint8
    images or float32 features, so no conversion is needed)."""
    if streaming == "off":
        return replace(load_npz(path), loading="loaded into memory")
    try:
        member = _stored_member(path, "x")
    except (OSError, ValueError, zipfile.BadZipFile):
        member = None  # load_npz reports what is wrong with the file
    usable = False
    if member is not None:
        offset, (shape, fortran, dtype) = member
        image = len(shape) in (3, 4) and dtype == np.uint8
        usable = not fortran and (image or (len(shape) == 2 and dtype == np.float32))
    if not usable:
        why = "only uncompressed uint8 images or float32 features (np.savez) are memory-mapped"
        return replace(load_npz(path), loading=f"loaded into memory ({why})")
    stream, reason = choose_streaming(streaming, int(np.prod(shape)) * (1 if image else 4))
    if not stream:
        return replace(load_npz(path), loading=reason)
    base = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
    return _mapped_npz(path, base.reshape(*shape, 1) if len(shape) == 3 else base, reason)


def _mapped_npz(path: Path, base: np.ndarray, reason: str) -> Dataset:
    with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
        raw_y = f["y"].reshape(-1) if "y" in f.files else None
        names = f["class_names"] if "class_names" in f.files else None
    if raw_y is None:
        raise DataError(f"{str(path)!r} lacks array 'y'; an edgetl .npz needs 'x' and 'y'")
    y, class_names = _encode_labels(raw_y, None if names is None else names.tolist(), str(path))
    if base.ndim == 2:  # features: a read-only memory map is an ndarray, used as is
        return Dataset(base, y, class_names, "features", str(path), loading=reason)
    return Dataset(MappedArray(base, label=f"{path.name}:x"), y, class_names, "image", str(path), loading=reason)


def conform_images(ds: Dataset, shape: Sequence[int]) -> tuple[Dataset, list[str]]:
    """Resize images to ``shape[:2]`` and convert them to ``shape[2]`` channels.

    Returns the conformed dataset (``ds`` itself when nothing changes) and what was done,
    in words, for the run record. Resizing is bilinear (Pillow), as the folder loader's;
    RGB -> gray uses ITU-R 601 luma, gray -> RGB repeats the channel. Streamed images are
    conformed as they are read (the same steps, image by image).
    """
    if ds.kind != "image":
        return ds, []
    h, w, c = (int(v) for v in shape)
    if isinstance(ds.x, ImageFiles):
        notes = _conform_notes(ds.x.shape, h, w, c)
        if not notes:
            return ds, []
        return Dataset(
            ds.x.conformed((h, w, c)), ds.y, ds.class_names, ds.kind, ds.source, ds.origin, ds.loading
        ), notes
    if isinstance(ds.x, LazyArray) and _conform_notes(ds.x.shape, h, w, c):
        ds = ds.materialize()  # memory-mapped arrays of another shape: converted in memory
    x, notes = _conform_array(ds.x, h, w, c)
    if not notes:
        return ds, []
    return Dataset(x, ds.y, ds.class_names, ds.kind, ds.source, ds.origin, ds.loading), notes


def _conform_notes(shape: Sequence[int], h: int, w: int, c: int) -> list[str]:
    notes = []
    if shape[-1] != c:
        if c == 3:
            notes.append("grayscale images repeated to 3 channels")
        elif c == 1:
            notes.append("RGB images converted to grayscale")
        else:
            raise DataError(
                f"the model takes {c} channels; images can be converted to 1 or 3 channels, the data has {shape[-1]}"
            )
    if tuple(shape[1:3]) != (h, w):
        notes.append(f"images resized from {shape[1]}x{shape[2]} to {h}x{w}")
    return notes


def _conform_array(x: np.ndarray, h: int, w: int, c: int) -> tuple[np.ndarray, list[str]]:
    """``x`` (n, H, W, C) uint8 converted to ``c`` channels, then resized to ``h`` x ``w``."""
    notes = _conform_notes(x.shape, h, w, c)
    if x.shape[-1] != c:
        if c == 3:
            x = np.repeat(x, 3, axis=-1)
        else:
            x = np.round(x[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None].astype(
                np.uint8
            )
    if x.shape[1:3] != (h, w) and not len(x):  # an empty split (e.g. --test-fraction 0) has nothing to resize
        x = np.zeros((0, h, w, x.shape[-1]), x.dtype)
    elif x.shape[1:3] != (h, w):
        image = _pillow()
        x = np.stack(
            [_to_array(image.fromarray(im[..., 0] if im.shape[-1] == 1 else im), (h, w), im.shape[-1]) for im in x]
        )
    return x, notes


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


# A class's guard split never holds more than this: the bundle ships at most this many
# held-out replay examples per class (edgetl.host._export.REPLAY_PER_CLASS), so a large
# dataset gives up a few examples per class, not a tenth of itself.
GUARD_MAX_PER_CLASS = 100


def stratified_split(
    ds: Dataset,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    guard_fraction: float = 0.0,
) -> Splits:
    """Split each class by the same fractions, deterministically for a given seed.

    Every class keeps at least one training example; a class too small for a validation
    or test example simply has none there. ``guard_fraction`` > 0 also holds out a guard
    split (at most :data:`GUARD_MAX_PER_CLASS` per class) taken from what would have been
    the class's training examples, so train, val and test are otherwise the same as with
    ``guard_fraction=0`` (runs recorded before the guard split re-split identically).
    """
    for name, value in (
        ("val_fraction", val_fraction),
        ("test_fraction", test_fraction),
        ("guard_fraction", guard_fraction),
    ):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
            raise InputError(f"{name} must be a number in [0, 1), received {value!r}")
    if val_fraction + test_fraction + guard_fraction >= 1.0:
        raise InputError(
            "val_fraction + test_fraction + guard_fraction must be below 1, received "
            f"{val_fraction} + {test_fraction} + {guard_fraction}"
        )
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": [], "guard": []}
    for c in range(ds.num_classes):
        idx = rng.permutation(np.flatnonzero(ds.y == c))
        n = len(idx)
        n_test = min(int(round(n * test_fraction)), max(n - 1, 0))
        n_val = min(int(round(n * val_fraction)), max(n - 1 - n_test, 0))
        n_guard = min(int(round(n * guard_fraction)), GUARD_MAX_PER_CLASS, max(n - 1 - n_test - n_val, 0))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val : n - n_guard])
        parts["guard"].append(idx[n - n_guard :])
    out = {k: ds.subset(np.sort(np.concatenate(v))) for k, v in parts.items()}
    if not guard_fraction:
        out.pop("guard")
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
