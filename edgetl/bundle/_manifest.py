"""The manifest, typed: parsed and validated in one place (stdlib only).

``manifest.json`` is plain JSON. :meth:`Manifest.from_json` walks it once, so every refusal
names the field (``artifacts[2].sha256``), what was received and what is allowed, and the
rest of edgetl reads typed, frozen objects instead of string keys. Fields a newer edgetl
adds are kept in ``extra`` (forward compatible); :meth:`Manifest.to_json` writes them back.

Schema versions: 1 (edgetl 0.1), 2 (adds ``data``, ``parity.omitted`` and signatures
beside the manifest) and 3 are read; edgetl writes 3. Schema 3 changed the meaning of a
graph input, so a reader of schema 2 must refuse it: the SGD training graphs take the
user's learning rate and normalize it themselves (before, the caller fed it normalized; an
old reader would normalize twice and train ~(mean |e|^2 + 1) times too slowly). Schema 3
also ships one head-training family (no one-step graphs), the training defaults in
``head``, ``head_init.*.bin`` and the same I/O names for every model. Anything else is
refused with a message saying which versions this edgetl reads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable

from edgetl.bundle._contract import (
    FEATURE_SECTIONS,
    HEAD_FIELDS,
    HEAD_TRAINING_FIELDS,
    MANIFEST_FIELDS,
    MANIFEST_FILE,
    SIGNATURE_FILE,
)
from edgetl.bundle._head import SHUFFLE
from edgetl.errors import BundleError, describe

SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
MAX_MANIFEST_BYTES = 1 << 20
# A plain file name inside the bundle: no directories, no "..", no hidden files.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Role(str, Enum):
    """What an artifact is for (see the bundle table in docs/architecture.md)."""

    FUSED = "fused"  # raw input -> class probabilities
    BACKBONE = "backbone"  # raw input -> embedding (the seam)
    HEAD_INFER = "head_infer"  # ONNX: embedding, W, b, mask -> probabilities
    HEAD_TRAIN = "head_train"  # ONNX: one optimizer step; only in bundles before schema 3, never run
    HEAD_TRAIN_LOOP = "head_train_loop"  # ONNX: many steps in one call (Scan)
    HEAD = "head"  # TFLite: signatures infer/train_steps/get_weights/set_weights
    HEAD_INIT = "head_init"  # npz (and raw .bin per array): the host-trained head, padded to the capacity
    PARITY = "parity"  # npz: Keras reference inputs and outputs
    REPLAY = "replay"  # npz: class-balanced embeddings of training examples
    MCU_BACKBONE = "mcu_backbone"  # TFLite for TFLM: full-integer backbone, int8 input and output
    MCU_SOURCE = "mcu_source"  # C: the MCU model and factory head as arrays, the C99 head trainer
    # The trainable tail (edgetl.bundle._tail): only when the backbone's last layer is eligible.
    TRUNK = "trunk"  # raw input -> trunk activations (the input of the last embedding layer)
    TAIL_INIT = "tail_init"  # npz: W1, b1, mean, inv_std
    TAIL_INFER = "tail_infer"  # ONNX: trunk + tail tensors -> probabilities
    TAIL_TRAIN_LOOP = "tail_train_loop"  # ONNX: many tail steps in one call (Scan)
    TAIL = "tail"  # TFLite: stateless signatures infer, train_steps_sgd, train_steps_adam

    def __str__(self) -> str:
        return self.value


class Format(str, Enum):
    TFLITE = "tflite"
    ONNX = "onnx"
    NPZ = "npz"
    C = "c"  # C source or header (export --target mcu)
    BIN = "bin"  # raw little-endian array, no header: member, shape and dtype in the artifact entry

    def __str__(self) -> str:
        return self.value


class Precision(str, Enum):
    FP32 = "fp32"
    DYNAMIC = "dynamic"
    FLOAT16 = "float16"
    INT8 = "int8"
    QAT = "qat"

    def __str__(self) -> str:
        return self.value


ROLES = tuple(r.value for r in Role)
FORMATS = tuple(f.value for f in Format)
PRECISIONS = tuple(p.value for p in Precision)


def safe_file_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise BundleError(
            f"{where}: {describe(name)} is not allowed; bundle paths must be plain file names inside the bundle "
            "(letters, digits, '.', '_', '-'; no '/', '..' or absolute paths)"
        )
    return name


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise BundleError(f"manifest: {where}{key} is missing")
    return _typed(obj[key], kind, f"{where}{key}")


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BundleError(f"manifest: {where} must be {names}, received {describe(value)}")
    return value


def _enum(value: Any, enum: type[Enum], where: str) -> Any:
    allowed = tuple(m.value for m in enum)  # type: ignore[attr-defined]
    if value not in allowed:
        raise BundleError(f"manifest: {where} must be one of {allowed}, received {describe(value)}")
    return enum(value)


def _shape(value: Any, where: str, *, allow_unknown: bool = True) -> tuple[int | None, ...]:
    ok = (
        isinstance(value, list)
        and len(value) <= 8
        and all(
            (v is None and allow_unknown) or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1 << 20)
            for v in value
        )
    )
    if not ok:
        unknown = ", or null" if allow_unknown else ""
        raise BundleError(
            f"manifest: {where} must be a list of at most 8 dimensions (non-negative ints up to 2^20{unknown}), "
            f"received {describe(value)}"
        )
    return tuple(value)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BundleError(f"manifest: {where} must be a finite number, received {describe(value)}")
    return float(value)


def _extra(obj: dict[str, Any], known: Iterable[str]) -> dict[str, Any]:
    known = set(known)
    return {k: v for k, v in obj.items() if k not in known}


@dataclass(frozen=True)
class TensorInfo:
    """An input or output tensor of an artifact, read back from the file at export."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str | None = None
    quantization: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "TensorInfo":
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise BundleError(f"manifest: {where} must be an object with a string name, received {describe(obj)}")
        q = obj.get("quantization")
        return cls(
            obj["name"],
            _shape(obj.get("shape", []), f"{where}.shape"),
            obj.get("dtype") if isinstance(obj.get("dtype"), str) else None,
            q if isinstance(q, dict) else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape)}
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.quantization is not None:
            out["quantization"] = self.quantization
        return out


INPUT_KINDS = ("image", "features")


@dataclass(frozen=True)
class InputSpec:
    """What every model of the bundle takes: raw inputs of this shape (without the batch).

    ``value_range`` is the range of raw values (pixels: ``(0, 255)``); ``preprocessing``
    says in words what the models do to them (it is inside the models).
    """

    shape: tuple[int, ...]
    dtype: str = "float32"
    kind: str = "image"
    layout: str = "NHWC"
    value_range: tuple[float, float] | None = None
    preprocessing: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return self.kind == "image"

    @property
    def channels(self) -> int:
        return int(self.shape[-1])

    @classmethod
    def from_json(cls, obj: Any, where: str = "input_spec") -> "InputSpec":
        obj = _typed(obj, dict, where)
        shape = _shape(_require(obj, "shape", list, f"{where}."), f"{where}.shape", allow_unknown=False)
        if not shape or any(d == 0 for d in shape):
            raise BundleError(
                f"manifest: {where}.shape must have at least one dimension, all positive, received {list(shape)}"
            )
        dtype = _require(obj, "dtype", str, f"{where}.")
        if dtype not in ("float32", "uint8", "int8"):
            raise BundleError(f"manifest: {where}.dtype must be float32, uint8 or int8, received {dtype!r}")
        kind = obj.get("kind", "image" if len(shape) == 3 else "features")
        if kind not in INPUT_KINDS:
            raise BundleError(f"manifest: {where}.kind must be one of {INPUT_KINDS}, received {describe(kind)}")
        if (kind == "image") != (len(shape) == 3):
            raise BundleError(
                f"manifest: {where}.kind {kind!r} does not fit shape {list(shape)} (images are (height, width, "
                "channels), features (n,))"
            )
        layout = obj.get("layout", "NHWC" if kind == "image" else "NC")
        if layout != ("NHWC" if kind == "image" else "NC"):
            raise BundleError(
                f"manifest: {where}.layout must be 'NHWC' for images and 'NC' for features, received {describe(layout)}"
            )
        vr = obj.get("value_range")
        if vr is not None:
            if not isinstance(vr, list) or len(vr) != 2:
                raise BundleError(f"manifest: {where}.value_range must be [low, high] or null, received {describe(vr)}")
            lo, hi = _number(vr[0], f"{where}.value_range[0]"), _number(vr[1], f"{where}.value_range[1]")
            if not lo < hi:
                raise BundleError(f"manifest: {where}.value_range must have low < high, received {vr}")
            vr = (lo, hi)
        pre = obj.get("preprocessing", "")
        known = ("shape", "dtype", "kind", "layout", "value_range", "preprocessing")
        return cls(
            tuple(int(d) for d in shape),
            dtype,
            kind,
            layout,
            vr,
            pre if isinstance(pre, str) else str(pre),
            _extra(obj, known),
        )

    def to_json(self) -> dict[str, Any]:
        out = {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "kind": self.kind,
            "layout": self.layout,
            "value_range": list(self.value_range) if self.value_range else None,
            "preprocessing": self.preprocessing,
        }
        return {**out, **self.extra}


@dataclass(frozen=True)
class HeadTraining:
    """How edgetl trains the head by default (schema 3): what a client without Python needs
    to train it the same way (the rule is in :mod:`edgetl.bundle._head`)."""

    optimizer: str
    learning_rate: float
    l2: float
    momentum: float
    epochs: int
    batch_size: int
    seed: int
    shuffle: str

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "HeadTraining | None":
        """The training fields of the ``head`` section, or None when it has none (schema < 3)."""
        if not any(k in obj for k in HEAD_TRAINING_FIELDS):
            return None
        values = {k: obj.get(k) for k in HEAD_TRAINING_FIELDS}
        if values["optimizer"] not in ("sgd", "adam") or values["shuffle"] != SHUFFLE:
            raise BundleError(
                f"manifest: head.optimizer must be 'sgd' or 'adam' and head.shuffle {SHUFFLE!r}, received "
                f"{describe(values['optimizer'])} and {describe(values['shuffle'])}"
            )
        for key in ("epochs", "batch_size", "seed"):
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "seed" else 1) or v >= 1 << 32:
                raise BundleError(f"manifest: head.{key} must be an integer in range, received {describe(v)}")
        for key in ("learning_rate", "l2", "momentum"):
            values[key] = _number(values[key], f"head.{key}")
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in HEAD_TRAINING_FIELDS}


@dataclass(frozen=True)
class HeadSpec:
    """The trainable head: a linear softmax with ``max_classes`` columns, ``active_classes`` in use,
    and (schema 3) the training defaults."""

    max_classes: int
    active_classes: int
    kind: str = "linear_softmax"
    optimizers: tuple[str, ...] = ("sgd", "adam")
    loss: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    training: HeadTraining | None = None

    @classmethod
    def from_json(cls, obj: Any, n_labels: int) -> "HeadSpec":
        obj = _typed(obj, dict, "head")
        cap = _require(obj, "max_classes", int, "head.")
        if not n_labels <= cap <= 4096:
            raise BundleError(
                f"manifest: head.max_classes must be between the label count ({n_labels}) and 4096, received {cap}"
            )
        active = obj.get("active_classes", n_labels)
        if not isinstance(active, int) or isinstance(active, bool) or active != n_labels:
            raise BundleError(
                f"manifest: head.active_classes must equal the number of labels ({n_labels}), received "
                f"{describe(active)}"
            )
        kind = obj.get("kind", "linear_softmax")
        if kind != "linear_softmax":
            raise BundleError(f"manifest: head.kind must be 'linear_softmax', received {describe(kind)}")
        opts = obj.get("optimizers", ["sgd", "adam"])
        if not isinstance(opts, list) or not all(o in ("sgd", "adam") for o in opts):
            raise BundleError(f"manifest: head.optimizers must be a list of 'sgd'/'adam', received {describe(opts)}")
        loss = obj.get("loss", "")
        return cls(
            cap,
            active,
            kind,
            tuple(opts),
            loss if isinstance(loss, str) else "",
            _extra(obj, HEAD_FIELDS + HEAD_TRAINING_FIELDS),
            HeadTraining.from_json(obj),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "max_classes": self.max_classes,
            "active_classes": self.active_classes,
            "optimizers": list(self.optimizers),
            "loss": self.loss,
            **(self.training.to_json() if self.training else {}),
            **self.extra,
        }


def _check_raw_array(a: dict[str, Any], size: int, where: str) -> None:
    """A raw ``.bin`` array: its member, shape, dtype and byte order, and a size that fits them."""
    shape = _shape(_require(a, "shape", list, where), f"{where}shape", allow_unknown=False)
    _require(a, "member", str, where)
    if a.get("dtype") != "float32" or a.get("byte_order") != "little":
        raise BundleError(
            f"manifest: {where}dtype and byte_order must be 'float32' and 'little', received "
            f"{describe(a.get('dtype'))} and {describe(a.get('byte_order'))}"
        )
    if size != 4 * math.prod(shape):
        need = 4 * math.prod(shape)
        raise BundleError(f"manifest: {where}size {size} does not hold float32 {list(shape)} ({need} bytes)")


@dataclass(frozen=True)
class ArtifactSpec:
    """One file of the bundle: what it is, its checksum and its tensors.

    ``extra`` holds what only some artifacts have: ``quantization`` (how it was
    quantized), ``optimizer`` (head train graphs), ``signatures`` (the TFLite head),
    ``int8_method``/``int8_ladder`` (int8 ONNX: the remedy ladder's record), ``selection``
    (quantized models: the split that chose the file and the one it is reported on), ``per_class`` (replay).
    """

    file: str
    role: Role
    format: Format
    precision: Precision
    sha256: str
    size: int
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def optimizer(self) -> str | None:
        return self.extra.get("optimizer")

    @classmethod
    def from_json(cls, a: Any, i: int) -> "ArtifactSpec":
        where = f"artifacts[{i}]."
        if not isinstance(a, dict):
            raise BundleError(f"manifest: artifacts[{i}] must be an object, received {describe(a)}")
        name = safe_file_name(_require(a, "file", str, where), f"manifest {where}file")
        role = _enum(_require(a, "role", str, where), Role, f"{where}role")
        fmt = _enum(_require(a, "format", str, where), Format, f"{where}format")
        precision = _enum(_require(a, "precision", str, where), Precision, f"{where}precision")
        sha = _require(a, "sha256", str, where)
        if not _SHA256.match(sha):
            raise BundleError(f"manifest: {where}sha256 must be 64 lowercase hex digits, received {describe(sha)}")
        size = _require(a, "size", int, where)
        if not 0 < size <= 1 << 32:
            raise BundleError(f"manifest: {where}size must be in 1..2^32 bytes, received {size}")
        tensors = {}
        for key in ("inputs", "outputs"):
            items = a.get(key, [])
            if not isinstance(items, list) or len(items) > 64:  # found by tools/fuzz_bundle.py
                raise BundleError(
                    f"manifest: {where}{key} must be a list of at most 64 tensors, received {describe(items)}"
                )
            tensors[key] = tuple(TensorInfo.from_json(t, f"{where}{key}[{j}]") for j, t in enumerate(items))
        known = ("file", "role", "format", "precision", "sha256", "size", "inputs", "outputs")
        if fmt == Format.BIN:
            _check_raw_array(a, size, where)
        return cls(name, role, fmt, precision, sha, size, tensors["inputs"], tensors["outputs"], _extra(a, known))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "role": self.role.value,
            "format": self.format.value,
            "precision": self.precision.value,
            "sha256": self.sha256,
            "size": self.size,
        }
        if self.inputs or self.outputs:
            out["inputs"], out["outputs"] = [t.to_json() for t in self.inputs], [t.to_json() for t in self.outputs]
        return {**out, **self.extra}


# What a check measured, and the JSON key of its limit (the on-disk names since schema 1).
_MEASURES = {
    "max_abs_diff": "tolerance",
    "p99_abs_diff": "tolerance",
    "top1_agreement": "min_agreement",
    "relative_error": "max_relative_error",
    "cosine": "min_cosine",
}


@dataclass(frozen=True)
class Check:
    """One verification check of one artifact: what was measured against what limit."""

    file: str
    role: str
    format: str
    precision: str
    ok: bool
    measure: str
    value: float
    limit: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def _lower_is_better(self) -> bool:
        return self.measure in ("max_abs_diff", "p99_abs_diff", "relative_error")

    def measure_within_limit(self) -> bool:
        """Whether the measure itself is within its limit (a check can still fail on its
        accuracy drop or an evidence gate, which ``extra`` records)."""
        if self.limit is None:
            return True
        return self.value <= self.limit if self._lower_is_better else self.value >= self.limit

    def describe(self) -> str:
        """The check in words, e.g. ``max|diff| 3.1e-06 <= 1.0e-04``."""
        lower_is_better = self._lower_is_better
        label = {
            "max_abs_diff": "max|diff|",
            "p99_abs_diff": "p99|diff|",
            "top1_agreement": "top-1 agreement",
            "relative_error": "relative error",
            "cosine": "cosine",
        }.get(self.measure, self.measure)
        value = f"{self.value:.2e}" if lower_is_better else f"{self.value:.3f}"
        if self.limit is None:
            return f"{label} {value}"
        limit = f"{self.limit:.1e}" if lower_is_better else f"{self.limit:g}"
        within = self.measure_within_limit()
        op = ("<=" if within else ">") if lower_is_better else (">=" if within else "<")
        return f"{label} {value} {op} {limit}"

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Check":
        measure = next((m for m in _MEASURES if m in obj), "")
        value = obj.get(measure, float("nan"))
        known = ("file", "role", "format", "precision", "ok", measure, _MEASURES.get(measure, ""))
        return cls(
            str(obj.get("file", "")),
            str(obj.get("role", "")),
            str(obj.get("format", "")),
            str(obj.get("precision", "")),
            bool(obj.get("ok")),
            measure,
            float(value) if isinstance(value, (int, float)) else float("nan"),
            obj.get(_MEASURES.get(measure, "")),
            _extra(obj, known),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "role": self.role,
            "format": self.format,
            "precision": self.precision,
            self.measure: self.value,
        }
        if self.limit is not None:
            out[_MEASURES.get(self.measure, "limit")] = self.limit
        return {**out, **self.extra, "ok": self.ok}

    def __getitem__(self, key: str) -> Any:  # read like the JSON it is written as
        return self.to_json()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.to_json()

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)


def _failed_on(check: Check) -> str:
    """What failed a check whose own measure passed, in a few words (the accuracy drop, or
    an evidence gate whose counts the report's ``failed:`` lines give)."""
    drop, allowed = check.extra.get("accuracy_drop"), check.extra.get("max_accuracy_drop")
    if drop is not None and allowed is not None and drop > allowed:
        return f"accuracy {drop * 100:.1f} points below fp32 > {allowed * 100:g}"
    if check.extra.get("outcome") in ("fail", "thin"):
        return f"evidence gate: {check.extra['outcome']}"
    return "failed (see below)"


def format_checks(checks: Iterable[Check | dict[str, Any]]) -> str:
    """The verification checks as a table: the one renderer for the CLI, export and demo."""
    lines = [f"{'file':<26} {'role':<15} {'check':<40} {'accuracy':>8}  ok"]
    for c in checks:
        c = c if isinstance(c, Check) else Check.from_json(c)
        acc = c.extra.get("accuracy")
        acc = f"{acc:.4f}" if isinstance(acc, (int, float)) else ""
        what = c.describe() + (f" ({c.extra['optimizer']})" if c.extra.get("optimizer") else "")
        if not c.ok and c.measure_within_limit():  # the row's measure passed: say what failed instead
            what += f"; {_failed_on(c)}"
        lines.append(f"{c.file:<26} {c.role:<15} {what:<40} {acc:>8}  {'yes' if c.ok else 'NO'}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. Build one with :meth:`from_json`; write with :meth:`to_json`."""

    name: str
    labels: tuple[str, ...]
    input_spec: InputSpec
    embedding_size: int
    head: HeadSpec
    artifacts: tuple[ArtifactSpec, ...]
    schema_version: int = SCHEMA_VERSION
    metrics: dict[str, Any] = field(default_factory=dict)
    producer: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    version: str | None = None  # the bundle's version, chosen at export
    # sha256 of the backbone's weights and input spec (None in bundles written before it existed): equal ids
    # mean the same embedding, so a personalized head carries over to a new bundle.
    backbone_id: str | None = None

    @classmethod
    def from_json(cls, m: Any) -> "Manifest":
        """Validate a parsed manifest; raise :class:`BundleError` naming the first bad field."""
        if not isinstance(m, dict):
            raise BundleError(f"manifest must be a JSON object, received {type(m).__name__}")
        version = _require(m, "schema_version", int, "")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise BundleError(
                f"manifest schema_version {version} is not supported; this edgetl reads versions "
                f"{list(READABLE_SCHEMA_VERSIONS)}. Re-export the bundle or upgrade edgetl"
            )
        name = _require(m, "name", str, "")
        labels = _require(m, "labels", list, "")
        if (
            len(labels) < 2
            or not all(isinstance(l, str) and 0 < len(l) <= 256 for l in labels)
            or len(set(labels)) != len(labels)
        ):
            raise BundleError(
                f"manifest: labels must be at least two distinct non-empty strings, received {describe(labels)}"
            )
        spec = InputSpec.from_json(_require(m, "input_spec", dict, ""))
        emb = _require(m, "embedding_size", int, "")
        if not 0 < emb <= 1 << 16:
            raise BundleError(f"manifest: embedding_size must be in 1..65536, received {emb}")
        head = HeadSpec.from_json(_require(m, "head", dict, ""), len(labels))
        raw = _require(m, "artifacts", list, "")
        if not raw or len(raw) > 64:
            raise BundleError(f"manifest: artifacts must list 1..64 files, received {len(raw)}")
        artifacts = tuple(ArtifactSpec.from_json(a, i) for i, a in enumerate(raw))
        names = [a.file for a in artifacts]
        dup = next((n for n in names if names.count(n) > 1 or n in (MANIFEST_FILE, SIGNATURE_FILE)), None)
        if dup:
            raise BundleError(f"manifest: artifact file {dup!r} is reserved or listed twice")
        dicts = {k: m.get(k) if isinstance(m.get(k), dict) else {} for k in ("metrics", "producer", "data")}
        parity = m.get("parity") if isinstance(m.get("parity"), dict) else None
        bundle_version, backbone = m.get("version"), m.get("backbone_id")
        for key, value in (("version", bundle_version), ("backbone_id", backbone)):
            if value is not None and not isinstance(value, str):
                raise BundleError(f"manifest: {key} must be a string, received {describe(value)}")
        known = tuple(f for f in MANIFEST_FIELDS if f not in FEATURE_SECTIONS)
        return cls(
            name,
            tuple(labels),
            spec,
            emb,
            head,
            artifacts,
            version,
            dicts["metrics"],
            dicts["producer"],
            dicts["data"],
            parity,
            _extra(m, known),
            bundle_version,
            backbone,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "name": self.name,
            "labels": list(self.labels),
            "input_spec": self.input_spec.to_json(),
            "embedding_size": self.embedding_size,
            "head": self.head.to_json(),
            "artifacts": [a.to_json() for a in self.artifacts],
            "metrics": self.metrics,
            "producer": self.producer,
            "data": self.data,
        }
        if self.parity is not None:
            out["parity"] = self.parity
        if self.version is not None:
            out["version"] = self.version
        if self.backbone_id is not None:
            out["backbone_id"] = self.backbone_id
        return {**out, **self.extra}

    def find(self, role: str | None = None, fmt: str | None = None, precision: str | None = None) -> list[ArtifactSpec]:
        """The artifacts with this role, format and precision (``None`` matches any)."""
        return [
            a
            for a in self.artifacts
            if (role is None or a.role == role)
            and (fmt is None or a.format == fmt)
            and (precision is None or a.precision == precision)
        ]

    @property
    def mcu(self) -> dict[str, Any] | None:
        """What ``export --target mcu`` measured (arena and flash bytes, TFLM agreement), if it ran."""
        value = self.extra.get("mcu")
        ok = isinstance(value, dict) and isinstance(value.get("arena_bytes"), int)
        return value if ok and isinstance(value.get("flash_bytes"), dict) else None

    @property
    def checks(self) -> list[Check]:
        return [Check.from_json(c) for c in (self.parity or {}).get("checks", []) if isinstance(c, dict)]

    def describe(self, path: str = "") -> str:
        """A readable summary (what ``edgetl inspect`` prints)."""
        spec = self.input_spec
        lines = [f"bundle {self.name} (schema {self.schema_version})" + (f" at {path}" if path else "")]
        lines.append(f"  labels ({len(self.labels)}): {', '.join(self.labels)}")
        lines.append(f"  input: {list(spec.shape)} {spec.dtype} {spec.layout}; {spec.preprocessing}")
        lines.append(
            f"  embedding size {self.embedding_size}; head {self.head.kind} with capacity {self.head.max_classes} "
            "classes"
        )
        lines.append(f"  trainable tail: {self._describe_tail()}")
        lines.append(f"  {'file':<26} {'role':<15} {'format':<7} {'precision':<9} {'bytes':>10}  sha256")
        for a in self.artifacts:
            lines.append(
                f"  {a.file:<26} {a.role.value:<15} {a.format.value:<7} {a.precision.value:<9} {a.size:>10,}  "
                f"{a.sha256[:12]}"
            )
        if self.parity:
            omitted = self.parity.get("omitted") or []
            lines.append(
                f"  verified at export: {'passed' if self.parity.get('ok') else 'FAILED'} ({len(self.checks)} checks)"
                + (f"; left out: {', '.join(f for o in omitted for f in o.get('files', []))}" if omitted else "")
            )
        if self.mcu:
            m, flash = self.mcu, self.mcu["flash_bytes"]
            lines.append(
                f"  microcontroller (TFLM): {m.get('model')}, arena {m['arena_bytes']:,} bytes (measured "
                f"{int(m.get('arena_bytes_measured', 0)):,}), flash {flash.get('total', 0):,} bytes (model "
                f"{flash.get('model', 0):,}, head {flash.get('head', 0):,}, replay {flash.get('replay', 0):,}); "
                f"top-1 agreement with LiteRT {m.get('tflm_top1_agreement', float('nan')):.3f}"
            )
        producer = ", ".join(f"{k} {v}" for k, v in self.producer.items() if k != "run")
        if producer:
            lines.append(f"  produced by {producer}")
        return "\n".join(lines)

    def _describe_tail(self) -> str:
        """Whether personalization can train the backbone's last layer, and if not, why."""
        tail = self.extra.get("tail") or {}
        if not tail.get("available"):
            return f"none, the head trains alone ({tail.get('reason', 'exported before tails existed')})"
        shape = f"{tail.get('positions')} x {tail.get('trunk_size')} -> {tail.get('embedding_size')}"
        return f"layer {tail.get('layer')!r} ({tail.get('activation')}, trunk {shape}): personalize --adapt tail|auto"


def validate_manifest(m: Any) -> dict[str, Any]:
    """Check a parsed manifest; return it unchanged or raise :class:`BundleError`."""
    Manifest.from_json(m)
    return m
