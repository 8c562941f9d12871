"""Readers of the model metadata edgetl writes, for the tests (not shipped in the product).

The product only writes metadata (:mod:`edgetl.host._tflite_metadata`, :mod:`edgetl.host._onnx_metadata`);
runtimes and MediaPipe read it. The tests read it back here to check what was written:

* TFLite: the model is read through the TFLite schema's generated classes (``schema_py_generated``
  from ai-edge-litert or TensorFlow), as ai-edge-quantizer's ``utils/tfl_flatbuffer_utils.py`` does.
  The ``TFLITE_METADATA`` buffer (``metadata_schema.fbs``) has no generated module in any package
  edgetl depends on (mediapipe's is not a dependency; tflite-support pins protobuf 3.20), so it is
  decoded with the table descriptions the writer encodes from (``_TABLES``), bounds-checked.
* ONNX: onnxruntime's ``get_modelmeta()`` only (no onnx package, no TensorFlow).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from typing import Any

from edgetl.errors import DependencyError, InputError, describe
from edgetl.host._onnx_metadata import _JSON_KEYS, INPUT_SPEC_KEY, LABELS_KEY
from edgetl.host._tflite_metadata import (
    _FILE_TENSOR_AXIS_LABELS,
    _TENSOR_TYPES,
    _UNIONS,
    COLOR_SPACES,
    METADATA_IDENTIFIER,
    METADATA_NAME,
    _check_tflite,
    _schema_module,
    _slots,
)


class _Malformed(Exception):
    """A flatbuffer offset or length points outside the buffer."""


_ARRAYS = {"[float]": "<f4", "[int32]": "<i4", "[uint32]": "<u4"}


class _TableReader:
    """Bounds-checked access to the fields of one flatbuffer table (raises :class:`_Malformed`)."""

    def __init__(self, buf: Any, pos: int, table: str) -> None:
        import flatbuffers.number_types as nt
        from flatbuffers.table import Table

        self.buf, self.table, self.size, self.nt = buf, table, len(buf), nt
        self.tab = Table(buf, pos)
        self.scalars = {
            "bool": nt.BoolFlags,
            "int8": nt.Int8Flags,
            "uint8": nt.Uint8Flags,
            "int32": nt.Int32Flags,
            "uint32": nt.Uint32Flags,
            "uint64": nt.Uint64Flags,
            "float": nt.Float32Flags,
        }

    def vector(self, o: int, elem: int) -> tuple[int, int]:
        start, n = self.tab.Vector(o), self.tab.VectorLen(o)
        if start < 0 or start + n * elem > self.size:
            raise _Malformed(
                f"{self.table}: a vector of {n} elements at byte {start} runs past the end ({self.size} bytes)"
            )
        return start, n

    def string(self, at: int) -> str:
        uoffset = self.nt.UOffsetTFlags
        start = at + uoffset.py_type(self.tab.Get(uoffset, at))
        n = self.tab.Get(uoffset, start)
        if start + 4 + n > self.size:
            raise _Malformed(f"{self.table}: a string at byte {start} runs past the end ({self.size} bytes)")
        return bytes(self.buf[start + 4 : start + 4 + n]).decode("utf-8")

    def union(self, name: str, kind: str, slot: int) -> dict[str, Any] | None:
        """The union in ``slot`` (type byte) and ``slot + 1`` (value), with its member in ``_type``."""
        tab = self.tab
        t_off, v_off = tab.Offset(4 + 2 * slot), tab.Offset(6 + 2 * slot)
        members = _UNIONS[kind[6:]]
        index = tab.Get(self.nt.Uint8Flags, t_off + tab.Pos) if t_off else 0
        if not index or not v_off:
            return None
        if index >= len(members):
            raise _Malformed(f"{self.table}.{name}: unknown union member {index}")
        value = _decode(self.buf, tab.Indirect(v_off + tab.Pos), members[index])
        value["_type"] = members[index]
        return value

    def field(self, kind: str, slot: int) -> Any:
        """The value of a non-union field; absent scalars are 0 (their default), other absent fields ``None``."""
        import numpy as np

        tab = self.tab
        o = tab.Offset(4 + 2 * slot)
        if not o:
            # Flatbuffers omit scalars equal to their default (0 for every scalar here).
            return 0 if kind in self.scalars else None
        if kind in self.scalars:
            return tab.Get(self.scalars[kind], o + tab.Pos)
        if kind == "str":
            return self.string(o + tab.Pos)
        if kind in _ARRAYS:
            start, n = self.vector(o, 4)
            return np.frombuffer(self.buf, _ARRAYS[kind], n, start).tolist()
        if kind == "[ubyte]":
            start, n = self.vector(o, 1)
            return memoryview(self.buf)[start : start + n]  # zero-copy: model buffers can be large
        if kind == "[str]":
            start, n = self.vector(o, 4)
            return [self.string(start + 4 * i) for i in range(n)]
        if kind.startswith("["):
            start, n = self.vector(o, 4)
            return [_decode(self.buf, tab.Indirect(start + 4 * i), kind[1:-1]) for i in range(n)]
        return _decode(self.buf, tab.Indirect(o + tab.Pos), kind)


def _decode(buf: Any, pos: int, table: str, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Decode the table at ``pos`` into a dict (absent fields are ``None``; unions carry ``_type``)."""
    reader = _TableReader(buf, pos, table)
    out: dict[str, Any] = {}
    for name, kind, slot in _slots(table):
        if kind == "-" or (only is not None and name not in only):
            continue
        if kind.startswith("union "):
            out[name] = reader.union(name, kind, slot)
        else:
            out[name] = reader.field(kind, slot)
    return out


def decode_metadata(metadata_buffer: bytes | memoryview) -> dict[str, Any]:
    """Decode a ModelMetadata flatbuffer (identifier ``M001``) into nested dicts.

    Raises:
        InputError: the buffer is not a ModelMetadata flatbuffer.
    """
    if len(metadata_buffer) < 8 or bytes(metadata_buffer[4:8]) != METADATA_IDENTIFIER:
        head = bytes(metadata_buffer[4:8])
        raise InputError(
            f"the {METADATA_NAME} buffer must be a ModelMetadata flatbuffer with file identifier "
            f"{METADATA_IDENTIFIER!r}, received identifier {head!r} ({len(metadata_buffer)} bytes)"
        )
    try:
        import flatbuffers.encode as enc
        import flatbuffers.packer as packer

        root = enc.Get(packer.uoffset, metadata_buffer, 0)
        return _decode(metadata_buffer, root, "ModelMetadata")
    except (_Malformed, IndexError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise InputError(f"the {METADATA_NAME} buffer is not a valid ModelMetadata flatbuffer: {exc}") from exc


def read_tflite_metadata(model: bytes) -> dict[str, Any] | None:
    """Read back the metadata of a ``.tflite`` (TensorFlow-free: flatbuffers, zipfile, numpy).

    Args:
        model: bytes of a ``.tflite`` file.

    Returns:
        ``None`` when the model has no ``TFLITE_METADATA``; otherwise a dict with ``name``,
        ``description``, ``version``, ``author``, ``license``, ``min_parser_version``, ``kind``
        (``"classifier"`` when the output carries a TENSOR_AXIS_LABELS file, else ``"embedder"``),
        ``labels`` (from the appended zip; ``None`` for embedders), ``associated_files`` (names in the
        zip), ``input`` (``name``, ``description``, ``color_space``, ``width``, ``height`` from
        ImageProperties, ``shape`` and ``dtype`` of the model's input tensor, ``channels``, ``mean``,
        ``std``, ``value_range`` from Stats and normalization), ``output`` (``name``, ``description``,
        ``shape``, ``dtype``, ``score_type``) and ``metadata``, the complete decoded ModelMetadata.

    Raises:
        InputError: ``model`` is not a TFLite flatbuffer, its metadata is malformed, or a file the
            metadata names is missing from the zip.
    """
    data = _check_tflite(model)
    located = _locate_metadata(data)
    if located is None:
        return None
    raw, in_t, out_t = located
    md = decode_metadata(raw)
    files = _associated_files(data)
    sgm = (md.get("subgraph_metadata") or [{}])[0]
    in_md = (sgm.get("input_tensor_metadata") or [{}])[0]
    out_md = (sgm.get("output_tensor_metadata") or [{}])[0]
    image = _input_description(in_md, in_t)
    label_file = next(
        (f for f in out_md.get("associated_files") or [] if f.get("type") == _FILE_TENSOR_AXIS_LABELS), None
    )
    labels = None if label_file is None else _read_labels(label_file.get("name"), files)
    return {
        "name": md.get("name"),
        "description": md.get("description"),
        "version": md.get("version"),
        "author": md.get("author"),
        "license": md.get("license"),
        "min_parser_version": md.get("min_parser_version"),
        "kind": "classifier" if label_file is not None else "embedder",
        "labels": labels,
        "associated_files": sorted(files),
        "input": image,
        "output": _output_description(out_md, out_t, has_labels=label_file is not None),
        "metadata": _plain(md),
    }


def _locate_metadata(data: bytes) -> tuple[Any, dict[str, Any], dict[str, Any]] | None:
    """The ``TFLITE_METADATA`` buffer's bytes and subgraph 0's input and output tensors, or ``None``.

    The model is read through the TFLite schema's generated classes (``schema_py_generated``, as
    ai-edge-quantizer's ``tfl_flatbuffer_utils`` does); the tensors are ``{"shape", "type"}``, ``{}``
    where the model has none.
    """
    schema = _schema_module()
    try:
        model = schema.Model.GetRootAs(data, 0)
        entries = [model.Metadata(i) for i in range(model.MetadataLength())]
        entry = next((e for e in entries if (e.Name() or b"").decode("utf-8") == METADATA_NAME), None)
        if entry is None:
            return None
        if not 0 <= entry.Buffer() < model.BuffersLength():
            raise InputError(
                f"the {METADATA_NAME} entry points to buffer {entry.Buffer()}, but the model has "
                f"{model.BuffersLength()} buffers"
            )
        buf = model.Buffers(entry.Buffer())
        # Models over 2 GB keep buffers outside the flatbuffer, at an absolute offset in the file.
        raw = buf.DataAsNumpy().tobytes() if buf.DataLength() else data[buf.Offset() : buf.Offset() + buf.Size()]
        tensors: list[dict[str, Any]] = []
        ins: list[int] = []
        outs: list[int] = []
        if model.SubgraphsLength():
            sg = model.Subgraphs(0)
            tensors = [_tensor(sg.Tensors(i)) for i in range(sg.TensorsLength())]
            ins = [sg.Inputs(i) for i in range(sg.InputsLength())]
            outs = [sg.Outputs(i) for i in range(sg.OutputsLength())]
        in_t = tensors[ins[0]] if ins and 0 <= ins[0] < len(tensors) else {}
        out_t = tensors[outs[0]] if outs and 0 <= outs[0] < len(tensors) else {}
    except (IndexError, ValueError, UnicodeDecodeError, struct.error, TypeError, AttributeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"the model is not a valid TFLite flatbuffer: {exc}") from exc
    return raw, in_t, out_t


def _tensor(t: Any) -> dict[str, Any]:
    return {"shape": [int(d) for d in t.ShapeAsNumpy()] if t.ShapeLength() else [], "type": int(t.Type())}


def _associated_files(data: bytes) -> dict[str, bytes]:
    """The files of the zip archive appended to the model, by name (``{}`` when there is none)."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _input_description(in_md: dict[str, Any], in_t: dict[str, Any]) -> dict[str, Any]:
    """The ``input`` entry of :func:`read_tflite_metadata`, from the input's TensorMetadata and Tensor."""
    props = (in_md.get("content") or {}).get("content_properties") or {}
    norm = next(
        (
            u["options"]
            for u in in_md.get("process_units") or []
            if (u.get("options") or {}).get("_type") == "NormalizationOptions"
        ),
        {},
    )
    mean, std = norm.get("mean"), norm.get("std")
    in_shape, in_dtype = in_t.get("shape"), _TENSOR_TYPES.get(in_t.get("type") or 0)
    color = {v: k for k, v in COLOR_SPACES.items()}.get(props.get("color_space"), "UNKNOWN")
    size = props.get("default_size") or {}
    return {
        "name": in_md.get("name"),
        "description": in_md.get("description"),
        "color_space": color,
        "width": size.get("width"),
        "height": size.get("height"),
        "channels": in_shape[-1] if in_shape else None,
        "shape": in_shape,
        "dtype": in_dtype,
        "mean": mean,
        "std": std,
        "value_range": _value_range(in_dtype, mean, std, in_md.get("stats") or {}),
    }


def _value_range(dtype: str | None, mean: Any, std: Any, stats: dict[str, Any]) -> list[float] | None:
    """The raw pixel range the input expects: its Stats with the normalization undone (float32), or 0-255."""
    if dtype == "float32" and mean and std and stats.get("min") and stats.get("max"):
        # Undo the normalization the writer applied to the raw range; keep it when channels agree.
        lo = {round(v * std[i % len(std)] + mean[i % len(mean)], 4) for i, v in enumerate(stats["min"])}
        hi = {round(v * std[i % len(std)] + mean[i % len(mean)], 4) for i, v in enumerate(stats["max"])}
        return [lo.pop(), hi.pop()] if len(lo) == len(hi) == 1 else None
    if dtype == "uint8":
        return [0.0, 255.0]
    return None


def _read_labels(name: Any, files: dict[str, bytes]) -> list[str]:
    """The labels in the associated file ``name``, one per line, as MediaPipe reads them."""
    if name not in files:
        raise InputError(
            f"the metadata names the label file {name!r}, but the model's appended zip holds "
            f"{sorted(files) or 'no files'}"
        )
    try:
        lines = files[name].decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise InputError(f"the label file {name!r} is not UTF-8 text: {exc}") from exc
    if lines and lines[-1] == "":  # MediaPipe's BuildLabelMapFromFiles drops one trailing empty line
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _output_description(out_md: dict[str, Any], out_t: dict[str, Any], *, has_labels: bool) -> dict[str, Any]:
    """The ``output`` entry of :func:`read_tflite_metadata`; ``score_type`` only for a classifier."""
    out_stats = out_md.get("stats") or {}
    score_type = None
    if has_labels:
        probability = out_stats.get("min") == [0.0] and out_stats.get("max") in ([1.0], [255.0])
        score_type = "probability" if probability else "logit"
    return {
        "name": out_md.get("name"),
        "description": out_md.get("description"),
        "shape": out_t.get("shape"),
        "dtype": _TENSOR_TYPES.get(out_t.get("type") or 0),
        "score_type": score_type,
    }


def _plain(value: Any) -> Any:
    """JSON-friendly copy of a decoded table (memoryviews become bytes)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def read_onnx_metadata(path_or_bytes: str | os.PathLike[str] | bytes) -> dict[str, Any]:
    """Read an ONNX file's metadata with onnxruntime only (no TensorFlow, no onnx package).

    Args:
        path_or_bytes: a path to an ``.onnx`` file or its bytes.

    Returns:
        ``props`` (the raw ``custom_metadata_map``), ``labels`` and ``input_spec`` (parsed from their
        JSON keys, ``None`` when absent), ``description`` (the model doc string), ``producer_name``,
        ``graph_name``, ``domain``, ``version``, and ``inputs``/``outputs`` (name, shape, type).

    Raises:
        InputError: not an ONNX model onnxruntime can load, or a JSON key holds invalid JSON.
        DependencyError: onnxruntime is not installed.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DependencyError(
            f'reading ONNX metadata needs onnxruntime ({exc}). Install the device extra: pip install "edgetl[device]"'
        ) from exc
    is_bytes = isinstance(path_or_bytes, (bytes, bytearray, memoryview))
    source: Any = bytes(path_or_bytes) if is_bytes else os.fspath(path_or_bytes)
    options = ort.SessionOptions()
    # Only the metadata is wanted: skip graph optimizations, the bulk of session creation time.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/NoSuchFile types
        what = f"{len(source)} bytes" if isinstance(source, bytes) else repr(source)
        raise InputError(f"onnxruntime cannot load {what} as an ONNX model: {exc}") from exc
    meta = session.get_modelmeta()
    props = dict(meta.custom_metadata_map)
    parsed: dict[str, Any] = {}
    for key, kind in _JSON_KEYS.items():
        if key not in props:
            parsed[key] = None
            continue
        try:
            parsed[key] = json.loads(props[key])
        except ValueError as exc:
            raise InputError(f"metadata_props[{key!r}] is not valid JSON: {describe(props[key])}") from exc
        if not isinstance(parsed[key], kind):
            raise InputError(f"metadata_props[{key!r}] must be a JSON {kind.__name__}, received {describe(props[key])}")
    return {
        "props": props,
        "labels": parsed[LABELS_KEY],
        "input_spec": parsed[INPUT_SPEC_KEY],
        "description": meta.description,
        "producer_name": meta.producer_name,
        "graph_name": meta.graph_name,
        "domain": meta.domain,
        "version": meta.version,
        "inputs": [{"name": i.name, "shape": i.shape, "type": i.type} for i in session.get_inputs()],
        "outputs": [{"name": o.name, "shape": o.shape, "type": o.type} for o in session.get_outputs()],
    }
