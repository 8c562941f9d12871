"""The bundle: the only contract between the host and the device (numpy + stdlib only).

A bundle is a directory ``NAME.edgetl/`` with ``manifest.json`` (typed as
:class:`Manifest`), the artifact files it lists, and optionally ``manifest.sig``.
:func:`read_bundle` trusts nothing until the schema and every hash (and, with ``trust=``,
the signature) check out; :func:`write_bundle` builds the directory in a temporary sibling
and renames it into place. The contract's names (files, tensors, signatures, manifest
fields) live in :mod:`edgetl.bundle._contract`; what the head computes and how it is
trained (the reference step, the batch order, the defaults) in :mod:`edgetl.bundle._head`.

    >>> b = read_bundle("digits.edgetl")
    >>> b.labels, b.artifact("fused", "onnx", "int8")
"""

from edgetl.bundle._io import Bundle, pack_bundle, read_bundle, sha256_file, unpack_bundle, write_bundle
from edgetl.bundle._manifest import (
    FORMATS,
    PRECISIONS,
    ROLES,
    SCHEMA_VERSION,
    ArtifactSpec,
    Check,
    Format,
    HeadSpec,
    InputSpec,
    Manifest,
    Precision,
    Role,
    TensorInfo,
    format_checks,
    validate_manifest,
)
from edgetl.bundle._signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_bundle,
    verify_bundle_signature,
)

__all__ = [
    "Bundle",
    "read_bundle",
    "write_bundle",
    "pack_bundle",
    "unpack_bundle",
    "sha256_file",
    "Manifest",
    "ArtifactSpec",
    "InputSpec",
    "HeadSpec",
    "TensorInfo",
    "Check",
    "format_checks",
    "Role",
    "Format",
    "Precision",
    "validate_manifest",
    "SCHEMA_VERSION",
    "ROLES",
    "FORMATS",
    "PRECISIONS",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "key_id",
    "sign_bundle",
    "verify_bundle_signature",
]
