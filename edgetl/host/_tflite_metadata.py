"""TFLite Model Metadata (the ``TFLITE_METADATA`` entry MediaPipe Tasks reads), written by edgetl itself.

MediaPipe Tasks' ``ImageClassifier`` and ``ImageEmbedder`` load a float32-input ``.tflite`` only when it
carries the metadata flatbuffer of ``metadata_schema.fbs`` (file identifier ``M001``): they need the
input's ``NormalizationOptions`` to turn camera pixels into the input tensor, and a classifier's output
needs an associated ``labels.txt`` to name its categories. Neither official writer is usable here: the
current ``mediapipe`` wheel's writer needs a native module the wheel does not ship, and
``tflite-support`` pins protobuf 3.20, which breaks TensorFlow 2.21. So this module encodes the metadata
with the plain ``flatbuffers`` package, following the published schema, and places it in the model the
way MediaPipe's ``MetadataPopulator`` does (``mediapipe/tasks/python/metadata/metadata.py``):

* the ModelMetadata flatbuffer goes into a new ``Buffer`` of the model, referenced by a ``Metadata``
  entry named ``TFLITE_METADATA`` (an existing one is replaced in place);
* ``min_parser_version`` is computed as ``GetMinimumMetadataParserVersion`` in
  ``mediapipe/tasks/cc/metadata/metadata_version.cc`` does: the newest schema version among the
  fields actually populated, "1.0.0" at least;
* associated files are appended after the flatbuffer as an uncompressed (stored) zip archive, so the
  file is both a valid flatbuffer (readers follow the root offset and ignore trailing bytes) and a
  valid zip (readers find the central directory at the end). MediaPipe's C++ reader refuses
  compressed entries ("Expected uncompressed zip archive").

The model itself is touched only through the TFLite schema's generated classes (``ModelT``); the
metadata flatbuffer, whose generated module no edgetl dependency ships, is encoded from the table
descriptions below. edgetl only writes metadata (runtimes and MediaPipe read it); the tests read it
back with ``tests/model_metadata_readers.py``. Importing this module is cheap; the writer imports the
schema's generated Python code only when called.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetl.errors import DependencyError, InputError, describe

METADATA_NAME = "TFLITE_METADATA"  # Model.metadata entry name MediaPipe looks for
TFLITE_IDENTIFIER = b"TFL3"
METADATA_IDENTIFIER = b"M001"
LABELS_FILE = "labels.txt"
KINDS = ("classifier", "embedder")
COLOR_SPACES = {"RGB": 1, "GRAYSCALE": 2}  # metadata_schema.fbs ColorSpaceType (0 = UNKNOWN)
SCORE_TYPES = ("probability", "logit")
_CHANNELS_OF = {"RGB": 3, "GRAYSCALE": 1}
# schema.fbs TensorType values the metadata consumers handle (MediaPipe: float32 or uint8 images).
_TENSOR_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 7: "int16", 9: "int8"}
_IMAGE_TYPES = ("float32", "uint8")
# metadata_schema.fbs AssociatedFileType
_FILE_TENSOR_AXIS_LABELS = 2
_FILE_VOCABULARY = 5
_FILE_SCANN_INDEX = 6


# --------------------------------------------------------------------------------------------------
# A table-driven codec for the flatbuffer tables edgetl reads and writes.
#
# Each table lists its fields in schema order; a field's slot is its position, except that a union
# takes two slots (the type byte, then the value), as flatc lays them out. Kinds: "str", "bool",
# "int8" (byte enums), "uint8", "int32", "uint32", "uint64", "float", "[str]", "[float]", "[int32]",
# "[uint32]", "[ubyte]", "T" (a table) or "[T]" (a vector of tables), "union U", and "-" for a field
# edgetl never touches (it still occupies its slot). The slot numbers were checked against the
# generated code in the mediapipe 1.2.2 wheel (metadata_schema_py_generated.py).
# --------------------------------------------------------------------------------------------------

_UNIONS: dict[str, tuple[str, ...]] = {  # index 0 is NONE
    "ContentProperties": ("NONE", "FeatureProperties", "ImageProperties", "BoundingBoxProperties", "AudioProperties"),
    "ProcessUnitOptions": (
        "NONE",
        "NormalizationOptions",
        "ScoreCalibrationOptions",
        "ScoreThresholdingOptions",
        "BertTokenizerOptions",
        "SentencePieceTokenizerOptions",
        "RegexTokenizerOptions",
    ),
}

_TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    # metadata_schema.fbs (schema 1.5.0), complete.
    "ModelMetadata": (
        ("name", "str"),
        ("description", "str"),
        ("version", "str"),
        ("subgraph_metadata", "[SubGraphMetadata]"),
        ("author", "str"),
        ("license", "str"),
        ("associated_files", "[AssociatedFile]"),
        ("min_parser_version", "str"),
    ),
    "SubGraphMetadata": (
        ("name", "str"),
        ("description", "str"),
        ("input_tensor_metadata", "[TensorMetadata]"),
        ("output_tensor_metadata", "[TensorMetadata]"),
        ("associated_files", "[AssociatedFile]"),
        ("input_process_units", "[ProcessUnit]"),
        ("output_process_units", "[ProcessUnit]"),
        ("input_tensor_groups", "[TensorGroup]"),
        ("output_tensor_groups", "[TensorGroup]"),
        ("custom_metadata", "[CustomMetadata]"),
    ),
    "TensorMetadata": (
        ("name", "str"),
        ("description", "str"),
        ("dimension_names", "[str]"),
        ("content", "Content"),
        ("process_units", "[ProcessUnit]"),
        ("stats", "Stats"),
        ("associated_files", "[AssociatedFile]"),
    ),
    "AssociatedFile": (
        ("name", "str"),
        ("description", "str"),
        ("type", "int8"),
        ("locale", "str"),
        ("version", "str"),
    ),
    "Content": (("content_properties", "union ContentProperties"), ("range", "ValueRange")),
    "FeatureProperties": (),
    "ImageProperties": (("color_space", "int8"), ("default_size", "ImageSize")),
    "ImageSize": (("width", "uint32"), ("height", "uint32")),
    "BoundingBoxProperties": (("index", "[uint32]"), ("type", "int8"), ("coordinate_type", "int8")),
    "AudioProperties": (("sample_rate", "uint32"), ("channels", "uint32")),
    "ValueRange": (("min", "int32"), ("max", "int32")),
    "NormalizationOptions": (("mean", "[float]"), ("std", "[float]")),
    "ScoreCalibrationOptions": (("score_transformation", "int8"), ("default_score", "float")),
    "ScoreThresholdingOptions": (("global_score_threshold", "float"),),
    "BertTokenizerOptions": (("vocab_file", "[AssociatedFile]"),),
    "SentencePieceTokenizerOptions": (("sentencePiece_model", "[AssociatedFile]"), ("vocab_file", "[AssociatedFile]")),
    "RegexTokenizerOptions": (("delim_regex_pattern", "str"), ("vocab_file", "[AssociatedFile]")),
    "ProcessUnit": (("options", "union ProcessUnitOptions"),),
    "Stats": (("max", "[float]"), ("min", "[float]")),
    "TensorGroup": (("name", "str"), ("tensor_names", "[str]")),
    "CustomMetadata": (("name", "str"), ("data", "[ubyte]")),
}


_SCALARS = {
    "int8": "PrependInt8Slot",
    "uint8": "PrependUint8Slot",
    "int32": "PrependInt32Slot",
    "uint32": "PrependUint32Slot",
    "uint64": "PrependUint64Slot",
    "float": "PrependFloat32Slot",
    "bool": "PrependBoolSlot",
}


def _slots(table: str) -> list[tuple[str, str, int]]:
    out, slot = [], 0
    for name, kind in _TABLES[table]:
        out.append((name, kind, slot))
        slot += 2 if kind.startswith("union ") else 1
    return out


def _encode(builder: Any, table: str, value: dict[str, Any]) -> int:
    """Write ``value`` (nested dicts; a union member names its table in ``_type``) as a ``table``; return its offset."""
    children: dict[str, int] = {}
    fields = _slots(table)
    # Flatbuffers are built back to front and a table cannot be open while its children are written,
    # so strings, vectors and sub-tables go first.
    for name, kind, _ in fields:
        v = value.get(name)
        if v is None or kind in _SCALARS:
            continue
        if kind == "str":
            children[name] = builder.CreateString(v)
        elif kind.startswith("union "):
            children[name] = _encode(builder, v["_type"], v)
        elif kind == "[float]":
            builder.StartVector(4, len(v), 4)
            for x in reversed(v):
                builder.PrependFloat32(float(x))
            children[name] = builder.EndVector()
        elif kind == "[uint32]":
            builder.StartVector(4, len(v), 4)
            for x in reversed(v):
                builder.PrependUint32(int(x))
            children[name] = builder.EndVector()
        elif kind == "[ubyte]":
            children[name] = builder.CreateByteVector(bytes(v))
        elif kind == "[str]" or kind.startswith("["):
            items = [builder.CreateString(x) if kind == "[str]" else _encode(builder, kind[1:-1], x) for x in v]
            builder.StartVector(4, len(items), 4)
            for off in reversed(items):
                builder.PrependUOffsetTRelative(off)
            children[name] = builder.EndVector()
        else:
            children[name] = _encode(builder, kind, v)
    builder.StartObject(sum(2 if k.startswith("union ") else 1 for _, k in _TABLES[table]))
    for name, kind, slot in fields:
        v = value.get(name)
        if v is None:
            continue
        if kind.startswith("union "):
            builder.PrependUint8Slot(slot, _UNIONS[kind[6:]].index(v["_type"]), 0)
            builder.PrependUOffsetTRelativeSlot(slot + 1, children[name], 0)
        elif name in children:
            builder.PrependUOffsetTRelativeSlot(slot, children[name], 0)
        else:
            getattr(builder, _SCALARS[kind])(slot, v, 0)
    return builder.EndObject()


def _metadata_bytes(metadata: dict[str, Any]) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(_encode(builder, "ModelMetadata", metadata), METADATA_IDENTIFIER)
    return bytes(builder.Output())


def min_parser_version(metadata: dict[str, Any]) -> str:
    """The minimum metadata parser version able to read every populated field, as MediaPipe computes it.

    A line-by-line port of ``GetMinimumMetadataParserVersion`` (``metadata_version.cc``): "1.0.0",
    raised to the "Added in" version of each field or enum value the metadata uses. As in the C++, a
    vector counts as populated when present, even if empty.

    Args:
        metadata: a ModelMetadata as nested dicts (what :func:`_build_metadata` makes).

    Returns:
        A version string such as ``"1.0.0"``.
    """
    version = (1, 0, 0)

    def bump(v: tuple[int, int, int]) -> None:
        nonlocal version
        version = max(version, v)

    def files(items: list[dict[str, Any]] | None) -> None:
        for f in items or ():
            if f.get("type") == _FILE_VOCABULARY:
                bump((1, 0, 1))
            if f.get("type") == _FILE_SCANN_INDEX:
                bump((1, 4, 0))
            if f.get("version") is not None:
                bump((1, 4, 1))

    def units(items: list[dict[str, Any]] | None) -> None:
        for u in items or ():
            kind = (u.get("options") or {}).get("_type")
            if kind in ("BertTokenizerOptions", "SentencePieceTokenizerOptions"):
                bump((1, 1, 0))
            if kind == "RegexTokenizerOptions":
                bump((1, 2, 1))

    def tensor(t: dict[str, Any]) -> None:
        files(t.get("associated_files"))
        units(t.get("process_units"))
        if ((t.get("content") or {}).get("content_properties") or {}).get("_type") == "AudioProperties":
            bump((1, 3, 0))

    for sg in metadata.get("subgraph_metadata") or ():
        for t in (sg.get("input_tensor_metadata") or []) + (sg.get("output_tensor_metadata") or []):
            tensor(t)
        files(sg.get("associated_files"))
        for key in ("input_process_units", "output_process_units"):
            if sg.get(key) is not None:
                bump((1, 1, 0))
                units(sg[key])
        if sg.get("input_tensor_groups") is not None or sg.get("output_tensor_groups") is not None:
            bump((1, 2, 0))
        if sg.get("custom_metadata") is not None:
            bump((1, 5, 0))
    files(metadata.get("associated_files"))
    return ".".join(map(str, version))


# --------------------------------------------------------------------------------------------------
# What edgetl writes
# --------------------------------------------------------------------------------------------------


def _text(value: Any, field: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        allowed = "a string" if empty else "a non-empty string"
        raise InputError(f"TFLiteModelInfo.{field} must be {allowed}, received {describe(value)}")
    return value


def _floats(value: Any, field: str) -> tuple[float, ...]:
    items = (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    try:
        out = tuple(float(x) for x in items if not isinstance(x, bool))
        ok = len(out) == len(items) and all(math.isfinite(x) for x in out)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(
            f"TFLiteModelInfo.{field} must be a finite number or a sequence of finite numbers, "
            f"received {describe(value)}"
        )
    return out


@dataclass(frozen=True)
class TFLiteModelInfo:
    """What :func:`write_tflite_metadata` records about an image model.

    edgetl's models take raw pixels in [0, 255] and do their preprocessing inside the graph, so the
    defaults say so: normalization mean 0 and std 1 (MediaPipe computes ``(pixel - mean) / std``,
    which then leaves pixels unchanged) over a value range of (0, 255). No ScoreCalibration is written:
    a classifier's scores are its own softmax outputs.

    Attributes:
        name: model name (ModelMetadata.name).
        description: what the model does.
        version: model version, e.g. the bundle version.
        kind: ``"classifier"`` (output: one score per label, with ``labels.txt``) or ``"embedder"``
            (output: an embedding vector, no labels).
        width: input image width in pixels (the model's input tensor width).
        height: input image height in pixels.
        channels: 3 for RGB, 1 for GRAYSCALE. MediaPipe Tasks accept only RGB (3 channels).
        author: ModelMetadata.author.
        license: ModelMetadata.license; omitted when empty.
        color_space: ``"RGB"`` or ``"GRAYSCALE"``.
        mean: per-channel normalization mean, 1 value (used for every channel) or ``channels`` values.
        std: per-channel normalization std, same length as ``mean``, each > 0.
        value_range: (min, max) of the raw pixel values the model expects.
        labels: class names in output order (classifiers only): non-empty, distinct, single-line.
        score_type: ``"probability"`` (softmax outputs in [0, 1], recorded as output Stats min 0 max 1,
            as MediaPipe's own writer does) or ``"logit"`` (no Stats).
        input_name: TensorMetadata.name of the input (MediaPipe's writer uses ``"image"``).
        input_description: TensorMetadata.description of the input.
        output_name: TensorMetadata.name of the output; MediaPipe reports it as the ``head_name``.
            Defaults to ``"probability"`` (classifier) or ``"embedding"`` (embedder).
        output_description: TensorMetadata.description of the output.
    """

    name: str
    description: str
    version: str
    kind: str
    width: int
    height: int
    channels: int = 3
    author: str = "edgetl"
    license: str = ""
    color_space: str = "RGB"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    value_range: tuple[float, float] = (0.0, 255.0)
    labels: tuple[str, ...] = ()
    score_type: str = "probability"
    input_name: str = "image"
    input_description: str = "Input image: raw pixel values in the value range; preprocessing is inside the model."
    output_name: str | None = None
    output_description: str | None = None

    def __post_init__(self) -> None:
        for field in ("name", "version", "author", "input_name"):
            _text(getattr(self, field), field)
        for field in ("description", "license", "input_description"):
            _text(getattr(self, field), field, empty=True)
        if self.kind not in KINDS:
            raise InputError(f"TFLiteModelInfo.kind must be one of {KINDS}, received {describe(self.kind)}")
        for field in ("width", "height", "channels"):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 16:
                raise InputError(f"TFLiteModelInfo.{field} must be an integer in [1, 65536], received {describe(v)}")
        if self.color_space not in COLOR_SPACES:
            raise InputError(
                f"TFLiteModelInfo.color_space must be one of {tuple(COLOR_SPACES)}, "
                f"received {describe(self.color_space)}"
            )
        if self.channels != _CHANNELS_OF[self.color_space]:
            raise InputError(
                f"TFLiteModelInfo: color_space {self.color_space} has {_CHANNELS_OF[self.color_space]} "
                f"channel(s), received channels={self.channels}"
            )
        mean, std = _floats(self.mean, "mean"), _floats(self.std, "std")
        if len(mean) != len(std) or len(mean) not in {1, self.channels}:
            raise InputError(
                f"TFLiteModelInfo: mean and std must have the same length, 1 or channels "
                f"({self.channels}); received {len(mean)} mean and {len(std)} std values"
            )
        if not all(s > 0 for s in std):
            raise InputError(f"TFLiteModelInfo.std values must be > 0, received {describe(std)}")
        vr = _floats(self.value_range, "value_range")
        if len(vr) != 2 or not vr[0] < vr[1]:
            raise InputError(
                f"TFLiteModelInfo.value_range must be (min, max) with min < max, received {describe(self.value_range)}"
            )
        labels = _check_labels(self.kind, self.labels)
        if self.score_type not in SCORE_TYPES:
            raise InputError(
                f"TFLiteModelInfo.score_type must be one of {SCORE_TYPES}, received {describe(self.score_type)}"
            )
        output_name, output_description = self.output_name, self.output_description
        if output_name is None:
            output_name = "probability" if self.kind == "classifier" else "embedding"
        if output_description is None:
            output_description = (
                "Probability of each label, in labels.txt order."
                if self.kind == "classifier"
                else "Embedding vector of the input image."
            )
        _text(output_name, "output_name")
        _text(output_description, "output_description", empty=True)
        for field, value in (
            ("mean", mean),
            ("std", std),
            ("value_range", vr),
            ("labels", labels),
            ("output_name", output_name),
            ("output_description", output_description),
        ):
            object.__setattr__(self, field, value)


def _check_labels(kind: str, value: Any) -> tuple[str, ...]:
    """``TFLiteModelInfo.labels`` as a tuple: one distinct single-line name per score, none for an embedder."""
    if isinstance(value, str):
        raise InputError(f"TFLiteModelInfo.labels must be a sequence of strings, received the string {describe(value)}")
    labels = tuple(value)
    if kind != "classifier":
        if labels:
            raise InputError(f"TFLiteModelInfo.labels: an embedder has no labels, received {describe(labels)}")
        return labels
    if not labels:
        raise InputError(
            "TFLiteModelInfo.labels: a classifier needs at least one label (one per output score), received none"
        )
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip() or "\n" in label or "\r" in label:
            raise InputError(
                f"TFLiteModelInfo.labels[{i}] must be a non-empty single-line string (labels.txt "
                f"holds one label per line), received {describe(label)}"
            )
    if len(set(labels)) != len(labels):
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        raise InputError(f"TFLiteModelInfo.labels must be distinct, received duplicates {describe(dupes)}")
    return labels


def _tensor_spec(model: Any, index: int) -> tuple[list[int], str]:
    tensor = model.subgraphs[0].tensors[index]
    shape = [int(d) for d in (tensor.shape if tensor.shape is not None else [])]
    return shape, _TENSOR_TYPES.get(int(tensor.type), f"TensorType {int(tensor.type)}")


def _build_metadata(info: TFLiteModelInfo, input_dtype: str, output_dtype: str) -> dict[str, Any]:
    """The ModelMetadata for ``info``, laid out as MediaPipe's ImageClassifier writer lays it out."""
    channels = len(info.mean)
    lo, hi = info.value_range
    image: dict[str, Any] = {
        "name": info.input_name,
        "description": info.input_description,
        "content": {
            "content_properties": {
                "_type": "ImageProperties",
                "color_space": COLOR_SPACES[info.color_space],
                "default_size": {"width": info.width, "height": info.height},
            },
            # Content.range is a range of tensor *dimensions* (not of values); NULL means "the whole
            # tensor but the batch axis", which is what an image input is. The value range goes in Stats.
            "range": None,
        },
        "process_units": [
            {"options": {"_type": "NormalizationOptions", "mean": list(info.mean), "std": list(info.std)}},
        ],
    }
    # Stats describe the tensor's values, i.e. after normalization, as metadata_info.InputImageTensorMd does.
    if input_dtype == "float32":
        image["stats"] = {
            "min": [(lo - m) / s for m, s in zip(info.mean, info.std, strict=True)],
            "max": [(hi - m) / s for m, s in zip(info.mean, info.std, strict=True)],
        }
    elif input_dtype == "uint8":
        image["stats"] = {"min": [0.0] * channels, "max": [255.0] * channels}
    output: dict[str, Any] = {
        "name": info.output_name,
        "description": info.output_description,
        "content": {"content_properties": {"_type": "FeatureProperties"}, "range": None},
    }
    if info.kind == "classifier":
        output["associated_files"] = [
            {
                "name": LABELS_FILE,
                "description": "Labels for categories that the model can recognize.",
                "type": _FILE_TENSOR_AXIS_LABELS,
            }
        ]
        if info.score_type == "probability":
            output["stats"] = {"min": [0.0], "max": [1.0 if output_dtype == "float32" else 255.0]}
    metadata: dict[str, Any] = {
        "name": info.name,
        "description": info.description,
        "version": info.version,
        "author": info.author,
        "license": info.license or None,
        "subgraph_metadata": [{"input_tensor_metadata": [image], "output_tensor_metadata": [output]}],
    }
    metadata["min_parser_version"] = min_parser_version(metadata)
    return metadata


def _schema_module() -> Any:
    # The TFLite schema's generated Python code with the object API. ai_edge_litert ships it without
    # importing anything heavy (and its schema is the newer of the two); TensorFlow ships it too.
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        try:
            from tensorflow.lite.python import schema_py_generated  # type: ignore[no-redef]
        except ImportError as exc:
            raise DependencyError(
                "writing TFLite metadata needs the TFLite schema module from ai-edge-litert or "
                f'tensorflow ({exc}). Install: pip install "edgetl[host,device]"'
            ) from exc
    return schema_py_generated


def _check_tflite(model: Any) -> bytes:
    if not isinstance(model, (bytes, bytearray, memoryview)):
        raise InputError(f"the model must be the bytes of a .tflite file, received {type(model).__name__}")
    data = bytes(model)
    if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
        raise InputError(
            f"the model is not a TFLite flatbuffer: expected file identifier {TFLITE_IDENTIFIER!r} at "
            f"bytes 4-8, received {data[4:8]!r} ({len(data)} bytes)"
        )
    return data


def write_tflite_metadata(model: bytes, info: TFLiteModelInfo) -> bytes:
    """Return ``model`` with TFLite Model Metadata and, for classifiers, ``labels.txt`` attached.

    The result runs unchanged in LiteRT (only a buffer and a metadata entry are added) and loads in
    MediaPipe Tasks' ``ImageClassifier``/``ImageEmbedder``. Existing ``TFLITE_METADATA`` and any
    associated files already appended to ``model`` are replaced.

    How the model is rewritten: flatbuffers cannot be edited in place (tables are addressed by
    relative offsets), so the model is unpacked into the TFLite schema's generated object API
    (``ModelT``), given the new buffer and entry, and packed again; this is exactly what MediaPipe's
    ``MetadataPopulator`` does. The alternative, splicing a new root table in front of the old bytes
    with the bare ``flatbuffers`` builder, would also avoid a full rewrite but leaves dead tables and
    needs hand-maintained slot numbers of ``schema.fbs``; the object API needs neither. Packing an
    unmodified TF 2.21 model this way reproduces it byte for byte, and a 16 MB EfficientNetB0 takes
    about 0.2 s. Buffer payloads are numpy views, so nothing is copied per element. The one caveat
    of the object API, shared with the populator: a field newer than the generated schema would be
    dropped, so the schema of ai-edge-litert (newer than TensorFlow's) is preferred.

    Args:
        model: bytes of a ``.tflite`` file with one image input ``[1, height, width, channels]``
            (float32 or uint8, as MediaPipe requires) and one output (``[1, len(labels)]`` for a
            classifier, ``[1, D]`` for an embedder).
        info: what to record.

    Returns:
        The new ``.tflite`` bytes: the model flatbuffer followed by a stored zip of associated files.

    Raises:
        InputError: ``model`` is not a TFLite flatbuffer, or does not match ``info``.
        DependencyError: neither ai-edge-litert nor tensorflow is installed.
    """
    import flatbuffers

    if not isinstance(info, TFLiteModelInfo):
        raise InputError(f"info must be a TFLiteModelInfo, received {type(info).__name__}")
    data = _check_tflite(model)
    schema = _schema_module()
    try:
        m = schema.ModelT.InitFromPackedBuf(data, 0)
    except Exception as exc:  # the generated reader raises whatever struct/index error a corrupt file causes
        raise InputError(f"the model is not a readable TFLite flatbuffer ({type(exc).__name__}: {exc})") from exc
    in_dtype, out_dtype = _check_model_fits(m, info)
    metadata = _metadata_bytes(_build_metadata(info, in_dtype, out_dtype))
    _set_metadata_buffer(m, schema, metadata)
    builder = flatbuffers.Builder(len(data) + len(metadata) + 1024)
    builder.Finish(m.Pack(builder), TFLITE_IDENTIFIER)
    out = io.BytesIO()
    out.write(builder.Output())
    if info.kind == "classifier":
        _append_labels_zip(out, info.labels)
    return out.getvalue()


def _check_model_fits(m: Any, info: TFLiteModelInfo) -> tuple[str, str]:
    """Check that the unpacked model (``ModelT``) is the image model ``info`` describes; return its I/O dtypes."""
    if not m.subgraphs:
        raise InputError("the model has no subgraph; MediaPipe runs subgraph 0 of an image model")
    sg = m.subgraphs[0]
    n_in, n_out = len(sg.inputs if sg.inputs is not None else []), len(sg.outputs if sg.outputs is not None else [])
    if n_in != 1 or n_out != 1:
        raise InputError(
            f"image model metadata describes one input and one output tensor, received a model with "
            f"{n_in} input(s) and {n_out} output(s) in subgraph 0"
        )
    in_shape, in_dtype = _tensor_spec(m, int(sg.inputs[0]))
    out_shape, out_dtype = _tensor_spec(m, int(sg.outputs[0]))
    expected = [info.height, info.width, info.channels]
    if len(in_shape) != 4 or in_shape[1:] != expected:
        raise InputError(
            f"the model's input shape {in_shape} does not match TFLiteModelInfo (height, width, "
            f"channels) = {tuple(expected)}; expected [1, {', '.join(map(str, expected))}]"
        )
    for what, dtype in (("input", in_dtype), ("output", out_dtype)):
        if dtype not in _IMAGE_TYPES:
            raise InputError(
                f"the model's {what} is {dtype}; MediaPipe Tasks accept only float32 or uint8 image "
                "models (export the TFLite with float32 input/output, io_dtype='float32')"
            )
    if info.kind == "classifier" and (not out_shape or out_shape[-1] != len(info.labels)):
        raise InputError(
            f"the model's output shape {out_shape} does not match {len(info.labels)} labels; a "
            f"classifier's last output dimension must equal the number of labels"
        )
    if info.kind == "embedder" and len(out_shape) != 2:
        raise InputError(f"an embedder's output must be [1, D], received shape {out_shape}")
    for i, b in enumerate(m.buffers or []):
        if b.offset > 1:  # > 2 GB models keep tensor data outside the flatbuffer at absolute file offsets
            raise InputError(
                f"buffer {i} of the model is stored outside the flatbuffer (offset {b.offset}); models "
                "using external buffers (> 2 GB) are not supported"
            )
    return in_dtype, out_dtype


def _set_metadata_buffer(m: Any, schema: Any, metadata: bytes) -> None:
    """Put ``metadata`` in a buffer of the unpacked model ``m`` named by the ``TFLITE_METADATA`` entry."""

    buffer = schema.BufferT()
    buffer.data = np.frombuffer(metadata, dtype=np.uint8)
    m.buffers = m.buffers or []
    m.metadata = m.metadata or []
    entry = next((e for e in m.metadata if e.name is not None and e.name.decode("utf-8") == METADATA_NAME), None)
    if entry is not None:
        m.buffers[entry.buffer] = buffer  # replace, as the populator does; the old buffer is dropped
    else:
        m.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = METADATA_NAME
        entry.buffer = len(m.buffers) - 1
        m.metadata.append(entry)


def _append_labels_zip(out: io.BytesIO, labels: tuple[str, ...]) -> None:
    """Append ``labels.txt`` to the model bytes in ``out`` as a stored (uncompressed) zip archive."""
    # zipfile's append mode on a non-zip file writes the archive after the existing bytes with
    # absolute offsets, exactly as the populator's _populate_associated_files does. A fixed
    # timestamp keeps exports reproducible (the populator stamps the current time).
    with zipfile.ZipFile(out, "a") as zf:
        entry_info = zipfile.ZipInfo(LABELS_FILE, date_time=(1980, 1, 1, 0, 0, 0))
        entry_info.compress_type = zipfile.ZIP_STORED
        entry_info.external_attr = 0o600 << 16
        zf.writestr(entry_info, "\n".join(labels).encode("utf-8"))
