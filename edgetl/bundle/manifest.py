"""Manifest schema and validation (stdlib only).

The manifest is plain JSON; validation walks it by hand so every refusal names the field
(``artifacts[2].sha256``), what was received and what is allowed.
"""

from __future__ import annotations

import re
from typing import Any

from edgetl.errors import BundleError, describe

SCHEMA_VERSION = 1
ROLES = ("fused", "backbone", "head_infer", "head_train", "head", "head_init", "parity", "replay")
FORMATS = ("tflite", "onnx", "npz")
PRECISIONS = ("fp32", "dynamic", "float16", "int8", "qat")
# A plain file name inside the bundle: no directories, no "..", no hidden files.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_MANIFEST_BYTES = 1 << 20


def safe_file_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise BundleError(f"{where}: {describe(name)} is not allowed; bundle paths must be plain file names inside the bundle (letters, digits, '.', '_', '-'; no '/', '..' or absolute paths)")
    return name


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise BundleError(f"manifest: {where}{key} is missing")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BundleError(f"manifest: {where}{key} must be {names}, received {describe(value)}")
    return value


def _shape(value: Any, where: str) -> list[int | None]:
    if not isinstance(value, list) or len(value) > 8 or not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1 << 20) for v in value):
        raise BundleError(f"manifest: {where} must be a list of at most 8 dimensions (non-negative ints up to 2^20, or null), received {describe(value)}")
    return value


def validate_manifest(m: Any) -> dict[str, Any]:
    """Check a parsed manifest; return it unchanged or raise :class:`BundleError`."""
    if not isinstance(m, dict):
        raise BundleError(f"manifest must be a JSON object, received {type(m).__name__}")
    version = _require(m, "schema_version", int, "")
    if version != SCHEMA_VERSION:
        raise BundleError(f"manifest schema_version {version} is not supported; this edgetl reads version {SCHEMA_VERSION}. Re-export the bundle or upgrade edgetl")
    _require(m, "name", str, "")
    labels = _require(m, "labels", list, "")
    if len(labels) < 2 or not all(isinstance(l, str) and 0 < len(l) <= 256 for l in labels) or len(set(labels)) != len(labels):
        raise BundleError(f"manifest: labels must be at least two distinct non-empty strings, received {describe(labels)}")
    spec = _require(m, "input_spec", dict, "")
    _shape(_require(spec, "shape", list, "input_spec."), "input_spec.shape")
    if _require(spec, "dtype", str, "input_spec.") not in ("float32", "uint8", "int8"):
        raise BundleError(f"manifest: input_spec.dtype must be float32, uint8 or int8, received {spec['dtype']!r}")
    emb = _require(m, "embedding_size", int, "")
    if not 0 < emb <= 1 << 16:
        raise BundleError(f"manifest: embedding_size must be in 1..65536, received {emb}")
    head = _require(m, "head", dict, "")
    cap = _require(head, "max_classes", int, "head.")
    if not len(labels) <= cap <= 4096:
        raise BundleError(f"manifest: head.max_classes must be between the label count ({len(labels)}) and 4096, received {cap}")
    artifacts = _require(m, "artifacts", list, "")
    if not artifacts or len(artifacts) > 64:
        raise BundleError(f"manifest: artifacts must list 1..64 files, received {len(artifacts)}")
    seen: set[str] = set()
    for i, a in enumerate(artifacts):
        where = f"artifacts[{i}]."
        if not isinstance(a, dict):
            raise BundleError(f"manifest: artifacts[{i}] must be an object, received {describe(a)}")
        name = safe_file_name(_require(a, "file", str, where), f"manifest {where}file")
        if name == "manifest.json" or name in seen:
            raise BundleError(f"manifest: {where}file {name!r} is reserved or listed twice")
        seen.add(name)
        for key, allowed in (("role", ROLES), ("format", FORMATS), ("precision", PRECISIONS)):
            if _require(a, key, str, where) not in allowed:
                raise BundleError(f"manifest: {where}{key} must be one of {allowed}, received {a[key]!r}")
        if not _SHA256.match(_require(a, "sha256", str, where)):
            raise BundleError(f"manifest: {where}sha256 must be 64 lowercase hex digits, received {describe(a['sha256'])}")
        size = _require(a, "size", int, where)
        if not 0 < size <= 1 << 32:
            raise BundleError(f"manifest: {where}size must be in 1..2^32 bytes, received {size}")
        for key in ("inputs", "outputs"):
            tensors = a.get(key, [])
            if not isinstance(tensors, list) or len(tensors) > 64:  # found by tools/fuzz_bundle.py
                raise BundleError(f"manifest: {where}{key} must be a list of at most 64 tensors, received {describe(tensors)}")
            for j, t in enumerate(tensors):
                if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                    raise BundleError(f"manifest: {where}{key}[{j}] must be an object with a string name, received {describe(t)}")
                _shape(t.get("shape", []), f"{where}{key}[{j}].shape")
    return m
