"""Reading and writing bundle directories (stdlib + numpy only)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgetl._atomic import atomic_directory, replace_file
from edgetl.bundle._manifest import (
    MAX_MANIFEST_BYTES,
    SCHEMA_VERSION,
    ArtifactSpec,
    InputSpec,
    Manifest,
    safe_file_name,
)
from edgetl.bundle._signing import SIGNATURE_FILE, read_signature, sign_manifest, verify_manifest_signature
from edgetl.errors import BundleError


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A bundle whose manifest and every file hash have been checked."""

    path: Path
    manifest: Manifest
    signer: str | None = None  # key id of the trusted key that signed it, when checked
    # The exact bytes the manifest was parsed from: signatures are checked (and made) on
    # these, never on a second read of manifest.json that a swapped file could answer.
    manifest_bytes: bytes = field(default=b"", repr=False, compare=False)

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    @property
    def input_spec(self) -> InputSpec:
        return self.manifest.input_spec

    @property
    def name(self) -> str:
        return self.manifest.name

    def artifacts(
        self, role: str | None = None, fmt: str | None = None, precision: str | None = None
    ) -> list[ArtifactSpec]:
        return self.manifest.find(role, fmt, precision)

    def artifact(self, role: str, fmt: str, precision: str = "fp32") -> Path:
        """Path of the one artifact with this role, format and precision."""
        found = self.artifacts(role, fmt, precision)
        if not found:
            have = sorted({(a.role.value, a.format.value, a.precision.value) for a in self.manifest.artifacts})
            raise BundleError(f"bundle {self.path.name!r} has no {role} artifact in {fmt}/{precision}; it has {have}")
        return self.path / found[0].file

    def arrays(self, role: str, keys: tuple[str, ...]) -> dict[str, Any]:
        """The named arrays of the bundle's ``.npz`` with this role, loaded without pickle.

        A bundle's author also writes its hashes, so a verified file can still be hostile.
        Each member's header is read first: object arrays (pickles), non-numeric dtypes,
        arrays of more than :data:`MAX_ARRAY_ELEMENTS` elements (numpy would allocate a
        declared 2**40 floats before reading one) and missing keys are refused with a
        BundleError; shapes are for the caller to check against the manifest.
        """

        path = self.artifact(role, "npz")
        try:
            with zipfile.ZipFile(path) as z:
                for key in keys:
                    _check_npz_member(z, key, path.name)
            with np.load(path, allow_pickle=False) as f:
                return {k: np.asarray(f[k]) for k in keys}
        except BundleError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, MemoryError, OverflowError, TypeError) as exc:
            raise BundleError(
                f"{path.name} cannot be loaded safely ({type(exc).__name__}: {exc}); edgetl never unpickles bundle data"
            ) from None

    def precisions(self, role: str = "fused", fmt: str | None = None) -> list[str]:
        return sorted({a.precision.value for a in self.artifacts(role, fmt)})


def read_bundle(path: str | os.PathLike[str], *, verify_hashes: bool = True, trust: Any = None) -> Bundle:
    """Open a bundle directory: parse and validate the manifest, then check every file.

    Args:
        path: the bundle directory.
        verify_hashes: check every artifact's sha256 (sizes are always checked).
        trust: a trusted Ed25519 public key, or a list of them (key objects, PEM bytes or
            paths): the manifest must then be signed by one of them (``manifest.sig``), and
            since it pins every file's sha256, every byte is authenticated.

    Raises:
        BundleError: not a bundle, unreadable or invalid manifest, a missing file, a file
            that is a symlink or leaves the bundle, a size or hash mismatch; with ``trust``,
            an unsigned bundle, another signer, or a changed manifest.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle {str(root)!r} is not a directory; expected NAME.edgetl/ written by `edgetl export`")
    mpath = root / "manifest.json"
    if not mpath.is_file() or mpath.is_symlink():
        raise BundleError(f"bundle {str(root)!r} has no manifest.json (or it is a symlink)")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest.json is {mpath.stat().st_size} bytes; at most {MAX_MANIFEST_BYTES} are allowed")
    raw = mpath.read_bytes()
    signer = None
    if trust is not None:  # the exact bytes that are then parsed: no window to swap the file
        signer = verify_manifest_signature(raw, read_signature(root), trust, where=f"bundle {str(root)!r}")
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"manifest.json of {str(root)!r} is not valid JSON: {exc}") from None
    manifest = Manifest.from_json(parsed)
    real_root = root.resolve()
    for a in manifest.artifacts:
        f = root / a.file
        if f.is_symlink() or f.resolve().parent != real_root:
            raise BundleError(f"artifact {a.file!r} is a symlink or lies outside the bundle; refused")
        if not f.is_file():
            raise BundleError(f"artifact {a.file!r} listed in the manifest is missing from {str(root)!r}")
        size = f.stat().st_size
        if size != a.size:
            raise BundleError(f"artifact {a.file!r} is {size} bytes, the manifest says {a.size}: truncated or replaced")
        if verify_hashes and sha256_file(f) != a.sha256:
            raise BundleError(f"artifact {a.file!r} fails its sha256 check: the file was modified or corrupted")
    return Bundle(root, manifest, signer, raw)


def check_signature(bundle: Bundle, trusted: Any) -> str:
    """The key id of the trusted key that signed ``bundle``: its signature is checked on the
    manifest bytes ``read_bundle`` parsed (``bundle.manifest_bytes``), not on the file as it
    is now, so swapping ``manifest.json`` after the bundle was read cannot pass.

    Raises:
        BundleError: unsigned, signed by an untrusted key, or the signature does not match.
    """
    if not bundle.manifest_bytes:
        raise BundleError(
            f"bundle {str(bundle.path)!r} was not opened with read_bundle; its signature cannot be checked"
        )
    where = f"bundle {str(bundle.path)!r}"
    return verify_manifest_signature(bundle.manifest_bytes, read_signature(bundle.path), trusted, where=where)


def sign_bundle(bundle_dir: str | os.PathLike[str], private_key: Any) -> str:
    """Sign a bundle: write ``manifest.sig`` next to ``manifest.json`` (atomically).

    The bundle is verified first (schema, every artifact's size and sha256), and the very
    bytes that were verified are signed, so a vendor never signs a manifest whose files do
    not match it. Any later change of ``manifest.json``, even of one byte, invalidates the
    signature: sign last.

    Args:
        bundle_dir: the bundle directory.
        private_key: an ``Ed25519PrivateKey`` or the path of an unencrypted PEM private key
            (load an encrypted one with :func:`edgetl.bundle.load_private_key` first).

    Returns:
        The signer's key id.

    Raises:
        BundleError: the bundle is invalid or ``manifest.sig`` cannot be written.
        InputError: the key is not a usable Ed25519 private key.
    """
    bundle = read_bundle(bundle_dir)
    kid, document = sign_manifest(bundle.manifest_bytes, private_key)
    try:
        replace_file(bundle.path / SIGNATURE_FILE, document)
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise BundleError(f"cannot write {SIGNATURE_FILE} into {str(bundle.path)!r}: {reason}") from exc
    return kid


def write_bundle(
    out: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    files: Mapping[str, str | os.PathLike[str] | bytes],
    *,
    overwrite: bool = False,
) -> Bundle:
    """Write a bundle atomically (:func:`edgetl._atomic.atomic_directory`): files and
    manifest go into a temporary sibling, are fsynced, then renamed to ``out``.

    Args:
        out: bundle directory to create.
        manifest: manifest fields as JSON; each ``artifacts`` entry needs ``file``, ``role``,
            ``format`` and ``precision`` (``sha256`` and ``size`` are filled in here).
        files: file name -> bytes or a path to copy.
        overwrite: replace an existing ``out``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"output {str(out)!r} already exists; choose another --out or pass --overwrite")
    with atomic_directory(out) as tmp:
        for name, content in files.items():
            target = tmp / safe_file_name(name, "write_bundle")
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
        m = json.loads(json.dumps(dict(manifest)))  # deep copy, JSON types only
        m["schema_version"] = SCHEMA_VERSION
        for a in m["artifacts"]:
            f = tmp / a["file"]
            a["sha256"] = sha256_file(f)
            a["size"] = f.stat().st_size
        parsed = Manifest.from_json(m)
        (tmp / "manifest.json").write_text(json.dumps(parsed.to_json(), indent=2))
    return Bundle(out, parsed)


MAX_UNPACKED_BYTES = 4 << 30  # refuse archives that would unpack to more than 4 GiB
MAX_ENTRIES = 128


def pack_bundle(
    bundle: Bundle | str | os.PathLike[str], archive: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Pack a verified bundle into one ``.zip`` file for shipping (flat: the manifest and
    the files it lists, nothing else)."""

    b = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    archive = Path(archive)
    if archive.exists() and not overwrite:
        raise BundleError(f"archive {str(archive)!r} already exists; choose another name or pass overwrite=True")
    tmp = archive.with_name(f".{archive.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(b.path / "manifest.json", "manifest.json")
        if (b.path / "manifest.sig").is_file():  # a signed bundle stays signed when shipped
            z.write(b.path / "manifest.sig", "manifest.sig")
        for a in b.manifest.artifacts:
            z.write(b.path / a.file, a.file)
    replace_file(archive, tmp.read_bytes())
    tmp.unlink()
    return archive


def unpack_bundle(archive: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False) -> Bundle:
    """Unpack an archive made by :func:`pack_bundle` into ``out`` and verify it.

    Every entry must be a plain file name (no directories, ``..``, absolute paths or
    symlinks: nothing can land outside ``out``); the total unpacked size is bounded. The
    files go into a temporary sibling that is verified as a bundle before it is renamed to
    ``out``, so a bad archive leaves nothing behind.
    """

    archive, out = Path(archive), Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"output {str(out)!r} already exists; choose another or pass overwrite=True")
    try:
        z = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as exc:
        raise BundleError(f"{str(archive)!r} is not a bundle archive: {exc}") from None
    with z:
        infos = z.infolist()
        if not infos or len(infos) > MAX_ENTRIES:
            raise BundleError(f"archive has {len(infos)} entries; a bundle has 2..{MAX_ENTRIES}")
        total = 0
        for info in infos:
            safe_file_name(info.filename, f"archive entry {info.filename!r}")
            if stat.S_ISLNK(info.external_attr >> 16) or info.is_dir():
                raise BundleError(f"archive entry {info.filename!r} is a link or directory; refused")
            total += info.file_size
        if total > MAX_UNPACKED_BYTES:
            raise BundleError(f"archive would unpack to {total} bytes; at most {MAX_UNPACKED_BYTES} are allowed")
        if "manifest.json" not in {i.filename for i in infos}:
            raise BundleError("archive has no manifest.json")
        with atomic_directory(out) as tmp:
            written = 0
            for info in infos:
                try:
                    with z.open(info) as src, open(tmp / info.filename, "wb") as dst:
                        # Count what is really decompressed: the sizes in the header can lie.
                        for chunk in iter(lambda: src.read(1 << 20), b""):
                            written += len(chunk)
                            if written > MAX_UNPACKED_BYTES:
                                raise BundleError(f"archive unpacks to more than {MAX_UNPACKED_BYTES} bytes; refused")
                            dst.write(chunk)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as exc:
                    # Found by tools/fuzz_bundle.py: CRC and inflate errors surface while reading.
                    raise BundleError(f"archive entry {info.filename!r} is corrupt: {exc}") from None
            read_bundle(tmp)  # schema, names, sizes and hashes, before the rename
    return read_bundle(out)


# Bundle arrays are heads and replay sets: far below this (4096 classes x 65536 dims is 2**28).
MAX_ARRAY_ELEMENTS = 1 << 28


def _check_npz_member(z: Any, key: str, name: str) -> None:
    """Refuse a member that is missing, not a numeric array, or too large, from its header."""

    member = f"{key}.npy"
    if member not in z.namelist():
        found = sorted(n[:-4] for n in z.namelist() if n.endswith(".npy"))
        raise BundleError(f"{name} lacks array {key!r}; found {found}")
    with z.open(member) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise BundleError(
            f"{name}: array {key!r} has dtype {dtype}; allowed: numeric (bool, int, float) arrays (edgetl never "
            "unpickles bundle data)"
        )
    size = int(np.prod(shape, dtype=object))
    if size > MAX_ARRAY_ELEMENTS:
        raise BundleError(
            f"{name}: array {key!r} declares shape {shape} ({size} elements, at most {MAX_ARRAY_ELEMENTS})"
        )
