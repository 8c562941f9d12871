"""ONNX model metadata: ``metadata_props``, the model's ``doc_string`` and per-input/output doc strings.

onnxruntime exposes ``ModelProto.metadata_props`` as ``InferenceSession.get_modelmeta().custom_metadata_map``
and ``ModelProto.doc_string`` as its ``description``, so a device can learn the labels and input spec
of an edgetl ONNX file from the file alone. Keys edgetl writes (see :func:`edgetl_onnx_props`):

* ``edgetl.labels``: JSON list of class names in output order (absent for embedders);
* ``edgetl.input_spec``: JSON object (shape, layout, dtype, value range, preprocessing), as in the
  bundle manifest's ``input_spec``;
* ``edgetl.producer``, ``edgetl.bundle_name``, ``edgetl.bundle_version``;
* ``model_author``, ``model_license``: the two "standard optional metadata" keys of the ONNX IR spec
  (docs/IR.md, "Optional Metadata");
* ``Image.BitmapPixelFormat``, ``Image.ColorSpaceGamma``, ``Image.NominalPixelRange``: the image keys
  of ONNX's docs/MetadataProps.md (``Rgb8``/``Gray8``, ``SRGB``, ``NominalRange_0_255``), which tell a
  consumer how to featurize an image without reading edgetl's own keys. edgetl does not set the
  ``IMAGE`` type denotation on the input: that spec's example implies NCHW, and edgetl's inputs are
  NHWC float tensors.

Namespaced keys follow the IR spec's advice to qualify custom keys ("ai.onnxruntime.key1"); MediaPipe
has no ONNX convention. The writer needs the ``onnx`` package (host side); onnxruntime reads the keys back
(``InferenceSession.get_modelmeta()``; the tests' reader is ``tests/model_metadata_readers.py``).
"""

from __future__ import annotations

import json
from typing import Any

from edgetl import __version__
from edgetl.errors import DependencyError, InputError, describe

LABELS_KEY = "edgetl.labels"
INPUT_SPEC_KEY = "edgetl.input_spec"
_JSON_KEYS = {LABELS_KEY: list, INPUT_SPEC_KEY: dict}


def edgetl_onnx_props(
    *,
    bundle_name: str,
    bundle_version: str,
    input_spec: dict[str, Any],
    labels: list[str] | None = None,
    producer: str | None = None,
    author: str = "edgetl",
    license: str | None = None,
) -> dict[str, str]:
    """The ``metadata_props`` edgetl writes for a bundle's ONNX file.

    Args:
        bundle_name: the bundle's name (manifest ``name``).
        bundle_version: the bundle's version string.
        input_spec: the manifest's ``input_spec`` (``shape`` without batch, ``layout``, ``dtype``,
            ``value_range``, ``preprocessing``, ``kind``).
        labels: class names in output order, or ``None`` for models without a class output.
        producer: who wrote the file; defaults to ``"edgetl <version>"``.
        author: ``model_author``.
        license: ``model_license``; omitted when ``None``.

    Returns:
        A ``dict[str, str]`` for :func:`write_onnx_metadata`.
    """

    if not isinstance(input_spec, dict):
        raise InputError(f"input_spec must be a dict (the manifest's input_spec), received {describe(input_spec)}")
    props = {
        INPUT_SPEC_KEY: json.dumps(input_spec, sort_keys=True),
        "edgetl.producer": producer or f"edgetl {__version__}",
        "edgetl.bundle_name": bundle_name,
        "edgetl.bundle_version": bundle_version,
        "model_author": author,
    }
    if labels is not None:
        props[LABELS_KEY] = json.dumps(list(labels))
    if license:
        props["model_license"] = license
    shape = input_spec.get("shape") or []
    if input_spec.get("kind") == "image" and shape and shape[-1] in (1, 3):
        props["Image.BitmapPixelFormat"] = "Gray8" if shape[-1] == 1 else "Rgb8"
        props["Image.ColorSpaceGamma"] = "SRGB"
        if list(input_spec.get("value_range") or []) == [0, 255]:
            props["Image.NominalPixelRange"] = "NominalRange_0_255"
    return props


def _check_props(props: Any) -> dict[str, str]:
    if not isinstance(props, dict):
        raise InputError(f"props must be a dict of str to str, received {type(props).__name__}")
    for key, value in props.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise InputError(
                f"props must map non-empty str keys to str values, received {describe(key)}: {describe(value)}"
            )
        if key in _JSON_KEYS:
            try:
                parsed = json.loads(value)
            except ValueError as exc:
                raise InputError(f"props[{key!r}] must be JSON, received {describe(value)} ({exc})") from exc
            if not isinstance(parsed, _JSON_KEYS[key]):
                raise InputError(
                    f"props[{key!r}] must be a JSON {'list' if _JSON_KEYS[key] is list else 'object'}, "
                    f"received {describe(value)}"
                )
            if key == LABELS_KEY and not all(isinstance(x, str) and x for x in parsed):
                raise InputError(f"props[{key!r}] must be a JSON list of non-empty strings, received {describe(value)}")
    return props


def write_onnx_metadata(
    model: bytes, props: dict[str, str], *, doc_string: str, input_docs: dict[str, str], output_docs: dict[str, str]
) -> bytes:
    """Return ``model`` with ``metadata_props`` set and doc strings on the model and its inputs/outputs.

    Existing ``metadata_props`` keys not in ``props`` are kept; keys in ``props`` are replaced. Only
    metadata fields change, so onnxruntime's outputs are identical.

    Args:
        model: bytes of an ``.onnx`` file.
        props: string keys and values (JSON text for ``edgetl.labels`` and ``edgetl.input_spec``).
        doc_string: the model's ``doc_string`` (onnxruntime's ``ModelMetadata.description``).
        input_docs: graph input name -> doc string.
        output_docs: graph output name -> doc string.

    Returns:
        The new ``.onnx`` bytes.

    Raises:
        InputError: ``model`` is not an ONNX model, or props/doc names are not acceptable.
        DependencyError: the ``onnx`` package is not installed.
    """
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DependencyError(
            f'writing ONNX metadata needs the onnx package ({exc}). Install the host extra: pip install "edgetl[host]"'
        ) from exc
    if not isinstance(model, (bytes, bytearray, memoryview)):
        raise InputError(f"the model must be the bytes of an .onnx file, received {type(model).__name__}")
    _check_props(props)
    if not isinstance(doc_string, str):
        raise InputError(f"doc_string must be a str, received {describe(doc_string)}")
    try:
        proto = onnx.ModelProto.FromString(bytes(model))
    except (DecodeError, ValueError) as exc:
        raise InputError(f"the model is not an ONNX ModelProto ({len(model)} bytes): {exc}") from exc
    if proto.ir_version == 0 or not proto.graph.node:
        raise InputError(f"the model is not an ONNX model: no IR version or no graph nodes ({len(model)} bytes)")
    initializers = {t.name for t in proto.graph.initializer}
    inputs = {v.name: v for v in proto.graph.input if v.name not in initializers}
    outputs = {v.name: v for v in proto.graph.output}
    for what, docs, values in (("input_docs", input_docs, inputs), ("output_docs", output_docs, outputs)):
        if not isinstance(docs, dict):
            raise InputError(f"{what} must be a dict of tensor name to doc string, received {type(docs).__name__}")
        for name, text in docs.items():
            if name not in values:
                raise InputError(
                    f"{what}: the graph has no {what[:-5]} named {name!r}; its {what[:-5]}s are {sorted(values)}"
                )
            if not isinstance(text, str):
                raise InputError(f"{what}[{name!r}] must be a str, received {describe(text)}")
            values[name].doc_string = text
    merged = {p.key: p.value for p in proto.metadata_props}
    merged.update(props)
    del proto.metadata_props[:]
    for key in sorted(merged):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, merged[key]
    proto.doc_string = doc_string
    return proto.SerializeToString()
