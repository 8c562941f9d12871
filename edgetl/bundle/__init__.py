"""The bundle: the only contract between the host and the device (numpy + stdlib only).

A bundle is a directory ``NAME.edgetl/`` with ``manifest.json`` and the artifact files it
lists. :func:`read_bundle` trusts nothing until the schema and every hash check out;
:func:`write_bundle` builds the directory in a temporary sibling and renames it into place.

    >>> b = read_bundle("digits.edgetl")
    >>> b.labels, b.artifact("fused", "onnx", "int8")
"""

from edgetl.bundle.io import Bundle, pack_bundle, read_bundle, sha256_file, unpack_bundle, write_bundle
from edgetl.bundle.manifest import FORMATS, PRECISIONS, ROLES, SCHEMA_VERSION, validate_manifest

__all__ = ["Bundle", "read_bundle", "write_bundle", "pack_bundle", "unpack_bundle", "sha256_file", "validate_manifest", "SCHEMA_VERSION", "ROLES", "FORMATS", "PRECISIONS"]
