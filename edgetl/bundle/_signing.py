"""Signed bundles: authenticity on top of the manifest's per-file sha256 (Ed25519).

``read_bundle`` proves *integrity*: every artifact matches the sha256 and size pinned in
``manifest.json``. Anyone who can change an artifact can also re-hash it into the manifest,
so integrity alone says nothing about *who* made the bundle. A vendor therefore signs the
exact bytes of ``manifest.json`` with an Ed25519 private key; the signature lives next to it
in ``manifest.sig``::

    {"format": "edgetl-signature", "version": 1, "algorithm": "ed25519",
     "key_id": "3f0c9a1b2d4e5f60", "signature": "<base64 of 64 bytes>"}

A device holding the vendor's public key verifies the signature over the manifest bytes,
then ``read_bundle`` checks every artifact against the (now authentic) hashes: every byte of
the bundle is covered. ``key_id`` is only a hint that picks the trusted key to try and names
keys in messages; it is not trusted itself (the signature must verify with that key).

The signature is a plain Ed25519 signature over the file's bytes, so OpenSSL can check it
too (``openssl pkeyutl -verify -pubin -inkey vendor.pub -rawin -in manifest.json -sigfile
sig.bin`` with the base64-decoded signature). Use a key dedicated to signing bundles: the
signed message carries no context string, so a signature made with the same key for
something else must never be a valid manifest.

Keys are standard PEM: PKCS#8 private keys (optionally passphrase-encrypted) and
SubjectPublicKeyInfo public keys, as written by :func:`generate_keypair` or by
``openssl genpkey -algorithm ed25519`` / ``openssl pkey -pubout``.

Key rotation: install the new vendor public key on devices *alongside* the old one (trust
both), and only then ship bundles signed by the new key; drop the old key once no bundle
signed by it is in use.

``cryptography`` is imported lazily, inside the functions, so importing this module costs
nothing on devices that do not check signatures.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Sequence

from edgetl import _atomic
from edgetl.bundle._contract import SIGNATURE_FILE
from edgetl.bundle._manifest import MAX_MANIFEST_BYTES
from edgetl.errors import BundleError, DependencyError, InputError, describe

SIGNATURE_FORMAT = "edgetl-signature"
SIGNATURE_VERSION = 1
ALGORITHM = "ed25519"
# A real manifest.sig is ~200 bytes; anything far larger is not one, and reading it whole
# would let a hostile bundle make the device allocate at will.
MAX_SIGNATURE_FILE_BYTES = 4096
# The largest sensible PEM key file (an RSA-16384 private key is ~12 KiB); bounded for the
# same reason, and so that a wrong path (a model file) is refused quickly.
MAX_KEY_FILE_BYTES = 64 * 1024
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_SIG_KEYS = {"format", "version", "algorithm", "key_id", "signature"}

# What callers may pass as a key: a cryptography key object, PEM bytes, PEM text or a path.
# (Any, because the key classes live in cryptography, which is imported lazily.)
KeySource = Any


def _crypto() -> Any:
    """The pieces of ``cryptography`` used here, or a DependencyError saying how to install it."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise DependencyError(
            f"bundle signatures need the 'cryptography' package ({exc}); "
            'install it with: pip install "edgetl[device]"'
        ) from None

    class _C:  # a namespace, so callers write c.ed25519, c.serialization, ...
        pass

    c = _C()
    c.InvalidSignature, c.serialization, c.ed25519 = InvalidSignature, serialization, ed25519
    return c


def _key_kind(key: Any) -> str:
    """Human name of a key's algorithm, for 'received an RSA key' messages."""
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519

    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "an RSA key"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"an EC key (curve {key.curve.name})"
    if isinstance(key, (dsa.DSAPrivateKey, dsa.DSAPublicKey)):
        return "a DSA key"
    if isinstance(key, (ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
        return "an Ed448 key"
    if isinstance(key, (x25519.X25519PrivateKey, x25519.X25519PublicKey, x448.X448PrivateKey, x448.X448PublicKey)):
        return "an X25519/X448 key-agreement key"
    return f"a {type(key).__name__}"


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{what} file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise InputError(f"{what} file {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {str(path)!r} is not a regular file; expected a PEM key file")
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise InputError(
            f"{what} file {str(path)!r} is {st.st_size} bytes; a PEM key file is at most {MAX_KEY_FILE_BYTES}"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{what} file {str(path)!r} cannot be read ({exc.strerror or exc})") from None


def _require_pem(data: bytes, where: str, what: str) -> None:
    if b"-----BEGIN " not in data[:4096]:
        hint = ""
        if b"OPENSSH" in data[:100]:
            hint = " (it looks like an OpenSSH key: convert it with `ssh-keygen -p -m PKCS8 -f FILE`)"
        raise InputError(
            f"{where} is not a PEM {what}: no '-----BEGIN ...-----' line{hint}; expected a "
            "PKCS#8/SubjectPublicKeyInfo PEM file as written by generate_keypair or `openssl genpkey -algorithm "
            "ed25519`"
        )


def _passphrase_bytes(passphrase: str | bytes | None) -> bytes | None:
    if passphrase is None:
        return None
    if isinstance(passphrase, str):
        passphrase = passphrase.encode("utf-8")
    if not isinstance(passphrase, bytes) or not passphrase:
        raise InputError(f"passphrase must be a non-empty str or bytes, received {describe(passphrase)}")
    return passphrase


# ----------------------------------------------------------------------------- keys


def generate_keypair(
    private_path: str | os.PathLike[str],
    public_path: str | os.PathLike[str],
    *,
    passphrase: str | bytes | None = None,
    overwrite: bool = False,
) -> str:
    """Create a new Ed25519 signing key pair as two PEM files.

    The private key is PKCS#8 (encrypted with ``passphrase`` if given, with the best
    encryption ``cryptography`` offers), written with mode 0600; the public key is a
    SubjectPublicKeyInfo PEM (mode 0644) to install on devices. Both are written to a
    temporary file, fsynced and renamed, so a crash never leaves half a key.

    Args:
        private_path: where to write the private key (keep it off devices).
        public_path: where to write the public key.
        passphrase: optional passphrase protecting the private key file.
        overwrite: replace existing files; without it an existing file is refused.

    Returns:
        The key id of the new key (see :func:`key_id`).

    Raises:
        InputError: a file exists and ``overwrite`` is false, the two paths are the same,
            or the passphrase is empty.
        DependencyError: ``cryptography`` is not installed.
    """
    c = _crypto()
    priv, pub = Path(private_path), Path(public_path)
    if priv.resolve() == pub.resolve():
        raise InputError(f"private and public key paths must differ, both are {str(priv)!r}")
    if not overwrite:
        # Checked for both before writing either, so a refusal leaves nothing half-made.
        for p, what in ((priv, "private key"), (pub, "public key")):
            if p.exists() or p.is_symlink():
                raise InputError(
                    f"{what} file {str(p)!r} already exists; refusing to overwrite a key (a lost private key "
                    "cannot be recovered). Choose another path or pass overwrite=True (--overwrite)"
                )
    pw = _passphrase_bytes(passphrase)
    key = c.ed25519.Ed25519PrivateKey.generate()
    encryption = c.serialization.BestAvailableEncryption(pw) if pw else c.serialization.NoEncryption()
    private_pem = key.private_bytes(c.serialization.Encoding.PEM, c.serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(
        c.serialization.Encoding.PEM, c.serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        for p in (priv, pub):
            p.parent.mkdir(parents=True, exist_ok=True)
        _atomic.replace_file(priv, private_pem, mode=0o600)  # never readable by others
        _atomic.replace_file(pub, public_pem)
    except OSError as exc:
        raise InputError(f"cannot write the key pair to {str(priv)!r} / {str(pub)!r}: {exc.strerror or exc}") from exc
    return key_id(key.public_key())


def load_private_key(path: str | os.PathLike[str], passphrase: str | bytes | None = None) -> Any:
    """Load an Ed25519 private key from a PEM file (PKCS#8, plain or encrypted).

    Args:
        path: the PEM file (from :func:`generate_keypair` or ``openssl genpkey -algorithm ed25519``).
        passphrase: the passphrase if the file is encrypted.

    Returns:
        A ``cryptography`` ``Ed25519PrivateKey``.

    Raises:
        InputError: missing or unreadable file, not PEM, a public key, a key of another
            algorithm, an encrypted key without (or with a wrong) passphrase.
        DependencyError: ``cryptography`` is not installed.
    """
    c = _crypto()
    p = Path(path)
    where = f"private key file {str(p)!r}"
    data = _read_key_file(p, "private key")
    _require_pem(data, where, "private key")
    if b"-----BEGIN PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise InputError(f"{where} holds a public key; signing needs the private key (the public key goes on devices)")
    try:
        key = c.serialization.load_pem_private_key(data, password=_passphrase_bytes(passphrase))
    except TypeError as exc:  # cryptography's way of saying "encrypted" / "not encrypted"
        if passphrase is None:
            raise InputError(f"{where} is encrypted; give its passphrase") from None
        raise InputError(f"{where} is not encrypted, but a passphrase was given ({exc}); pass no passphrase") from None
    except ValueError as exc:
        # A wrong passphrase usually fails the decryption's padding check ("password" in the
        # message); about 1 in 400 times the padding happens to pass and the garbage fails to
        # parse as ASN.1 instead (measured: 400 keys, one wrong passphrase each). Either way an
        # encrypted key that a given passphrase does not open has the wrong passphrase, or is damaged.
        encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
        if passphrase is not None and ("password" in str(exc).lower() or encrypted):
            raise InputError(
                f"{where}: wrong passphrase, or a damaged key file (the key could not be decrypted)"
            ) from None
        raise InputError(f"{where} is not a readable PEM private key ({exc})") from None
    except Exception as exc:  # UnsupportedAlgorithm and other library refusals
        raise InputError(
            f"{where} cannot be loaded ({type(exc).__name__}: {exc}); edgetl signs with Ed25519 PKCS#8 keys"
        ) from None
    if not isinstance(key, c.ed25519.Ed25519PrivateKey):
        raise InputError(
            f"{where}: received {_key_kind(key)}; edgetl signs with Ed25519 (make one with generate_keypair or "
            "`openssl genpkey -algorithm ed25519`)"
        )
    return key


def load_public_key(path_or_pem: KeySource) -> Any:
    """Load an Ed25519 public key.

    Args:
        path_or_pem: an ``Ed25519PublicKey`` (returned as is), PEM bytes, PEM text (a str
            starting with ``-----BEGIN``) or the path of a SubjectPublicKeyInfo PEM file.

    Returns:
        A ``cryptography`` ``Ed25519PublicKey``.

    Raises:
        InputError: missing file, not PEM, a private key (devices must only hold public
            keys), a key of another algorithm.
        DependencyError: ``cryptography`` is not installed.
    """
    c = _crypto()
    if isinstance(path_or_pem, c.ed25519.Ed25519PublicKey):
        return path_or_pem
    if isinstance(path_or_pem, bytes):
        data, where = path_or_pem, "public key PEM"
        if len(data) > MAX_KEY_FILE_BYTES:
            raise InputError(f"{where} is {len(data)} bytes; a PEM key is at most {MAX_KEY_FILE_BYTES}")
    elif isinstance(path_or_pem, str) and path_or_pem.lstrip().startswith("-----BEGIN"):
        data, where = path_or_pem.encode("utf-8"), "public key PEM"
    elif isinstance(path_or_pem, (str, os.PathLike)):
        p = Path(path_or_pem)
        data, where = _read_key_file(p, "public key"), f"public key file {str(p)!r}"
    else:
        # A key object of another type (RSA, an Ed25519 *private* key, ...) or junk.
        if isinstance(path_or_pem, c.ed25519.Ed25519PrivateKey):
            raise InputError(
                "received an Ed25519 private key where a public key is expected; pass key.public_key() (devices "
                "must only hold public keys)"
            )
        if type(path_or_pem).__module__.startswith("cryptography"):
            raise InputError(f"received {_key_kind(path_or_pem)}; edgetl signs with Ed25519")
        raise InputError(
            f"a public key must be an Ed25519 public key object, PEM bytes or a path, received {describe(path_or_pem)}"
        )
    _require_pem(data, where, "public key")
    if b"PRIVATE KEY-----" in data:
        raise InputError(
            f"{where} holds a private key; a device must be given only the public key (openssl pkey -in KEY -pubout)"
        )
    try:
        key = c.serialization.load_pem_public_key(data)
    except Exception as exc:  # ValueError, UnsupportedAlgorithm
        raise InputError(f"{where} is not a readable PEM public key ({exc})") from None
    if not isinstance(key, c.ed25519.Ed25519PublicKey):
        raise InputError(f"{where}: received {_key_kind(key)}; edgetl signs with Ed25519")
    return key


def key_id(public_key: KeySource) -> str:
    """Short stable fingerprint of a key: the first 16 hex digits of the sha256 of its DER
    SubjectPublicKeyInfo (the same for a key however it was stored or generated).

    Args:
        public_key: anything :func:`load_public_key` accepts, or an Ed25519 private key
            (its public half is used).
    """
    c = _crypto()
    if isinstance(public_key, c.ed25519.Ed25519PrivateKey):
        public_key = public_key.public_key()
    key = load_public_key(public_key)
    der = key.public_bytes(c.serialization.Encoding.DER, c.serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


# ----------------------------------------------------------------------------- signing


def sign_manifest(manifest_bytes: bytes, private_key: Any) -> tuple[str, bytes]:
    """Sign the exact bytes of a ``manifest.json``; return the key id and the ``manifest.sig`` document.

    :func:`edgetl.bundle.sign_bundle` signs a bundle with it (the bytes it verified and parsed).

    Args:
        manifest_bytes: the bytes of ``manifest.json``.
        private_key: an ``Ed25519PrivateKey`` or the path of an unencrypted PEM private key
            (load an encrypted one with :func:`load_private_key` first).

    Raises:
        InputError: the key is not a usable Ed25519 private key.
    """
    c = _crypto()
    if isinstance(private_key, (str, os.PathLike)):
        private_key = load_private_key(private_key)
    if not isinstance(private_key, c.ed25519.Ed25519PrivateKey):
        if type(private_key).__module__.startswith("cryptography"):
            raise InputError(f"received {_key_kind(private_key)}; edgetl signs with Ed25519")
        raise InputError(
            f"private_key must be an Ed25519 private key or a PEM file path, received {describe(private_key)}"
        )
    kid = key_id(private_key)
    doc = {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_VERSION,
        "algorithm": ALGORITHM,
        "key_id": kid,
        "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii"),
    }
    return kid, (json.dumps(doc, indent=1) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------- verifying


def _read_bounded(path: Path, limit: int, name: str) -> bytes:
    """Read a bundle file of at most ``limit`` bytes; refuse symlinks and non-files."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise BundleError(f"{name} of bundle {str(path.parent)!r} cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{name} of bundle {str(path.parent)!r} is a symlink or not a regular file; refused")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # never more than limit + 1, whatever the file claims
    except OSError as exc:
        raise BundleError(f"{name} of bundle {str(path.parent)!r} cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise BundleError(f"{name} of bundle {str(path.parent)!r} is larger than {limit} bytes; refused")
    return data


def _trusted_keys(trusted: KeySource | Sequence[KeySource]) -> list[tuple[str, Any]]:
    """(key id, key) for each trusted key; one key or a list of keys is accepted."""
    if isinstance(trusted, (list, tuple)):
        items = list(trusted)
    else:
        items = [trusted]
    if not items:
        raise InputError(
            "the trusted key list is empty: no bundle could ever be accepted; give the vendor's public key(s)"
        )
    out = []
    for item in items:
        key = load_public_key(item)
        out.append((key_id(key), key))
    return out


def _parse_signature(sig_bytes: bytes, where: str) -> tuple[str, bytes]:
    """Validate a manifest.sig document; return (key id, raw signature)."""
    try:
        doc = json.loads(sig_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{where} is malformed: not JSON ({exc}); re-sign the bundle") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{where} is malformed: expected a JSON object, received {describe(doc)}")
    if set(doc) != _SIG_KEYS:
        raise BundleError(
            f"{where} is malformed: fields must be exactly {sorted(_SIG_KEYS)}, received {sorted(map(str, doc))}"
        )
    if doc["format"] != SIGNATURE_FORMAT:
        raise BundleError(
            f"{where} is malformed: format must be {SIGNATURE_FORMAT!r}, received {describe(doc['format'])}"
        )
    if doc["version"] != SIGNATURE_VERSION or isinstance(doc["version"], bool):
        raise BundleError(
            f"{where}: signature version {describe(doc['version'])} is not supported; this edgetl reads version "
            f"{SIGNATURE_VERSION}"
        )
    if doc["algorithm"] != ALGORITHM:
        raise BundleError(
            f"{where}: algorithm {describe(doc['algorithm'])} is not supported; edgetl accepts only {ALGORITHM!r}"
        )
    kid = doc["key_id"]
    if not isinstance(kid, str) or not _KEY_ID.match(kid):
        raise BundleError(f"{where} is malformed: key_id must be 16 lowercase hex digits, received {describe(kid)}")
    sig_text = doc["signature"]
    if not isinstance(sig_text, str):
        raise BundleError(f"{where} is malformed: signature must be a base64 string, received {describe(sig_text)}")
    try:
        sig = base64.b64decode(sig_text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise BundleError(f"{where} is malformed: signature is not valid base64 ({exc})") from None
    if len(sig) != 64:
        raise BundleError(f"{where} is malformed: an Ed25519 signature is 64 bytes, received {len(sig)}")
    return kid, sig


def verify_manifest_signature(
    manifest_bytes: bytes,
    sig_bytes: bytes | None,
    trusted: KeySource | Sequence[KeySource],
    *,
    where: str = "bundle",
) -> str:
    """Check a signature over exact manifest bytes (the core of :func:`verify_bundle_signature`).

    For callers that read ``manifest.json`` once, verify it, then parse those same bytes
    (no window in which the file could change between the check and the use).

    Args:
        manifest_bytes: the exact bytes of ``manifest.json``.
        sig_bytes: the bytes of ``manifest.sig``, or None if the bundle has none.
        trusted: one trusted public key or a list of them (key objects, PEM bytes or paths).
        where: how to name the bundle in messages.

    Returns:
        The key id of the trusted key that signed the manifest.

    Raises:
        BundleError: unsigned, signed by an untrusted key, invalid signature, malformed
            signature file.
        InputError: a trusted key cannot be loaded, or the list is empty.
    """
    c = _crypto()
    keys = _trusted_keys(trusted)
    trusted_ids = sorted({k for k, _ in keys})
    if sig_bytes is None:
        raise BundleError(
            f"{where} is not signed (no {SIGNATURE_FILE}), but this device only accepts bundles signed by a "
            f"trusted key {trusted_ids}; sign it with the vendor's private key (sign_bundle) after export"
        )
    if len(sig_bytes) > MAX_SIGNATURE_FILE_BYTES:
        raise BundleError(
            f"{where}: {SIGNATURE_FILE} is {len(sig_bytes)} bytes, at most {MAX_SIGNATURE_FILE_BYTES} are allowed; "
            "refused"
        )
    kid, sig = _parse_signature(sig_bytes, f"{SIGNATURE_FILE} of {where}")
    candidates = [key for k, key in keys if k == kid]
    if not candidates:
        raise BundleError(
            f"{where} is signed by key {kid}, which this device does not trust (trusted: {', '.join(trusted_ids)}). "
            f"If the vendor rotated its signing key: install the new vendor public key alongside the old one "
            f"(trust both) "
            f"on every device before shipping bundles signed by the new key"
        )
    for key in candidates:  # more than one only if two trusted keys share a 64-bit id
        try:
            key.verify(sig, manifest_bytes)
            return kid
        except c.InvalidSignature:
            continue
    raise BundleError(
        f"{where}: the signature by key {kid} does not match manifest.json: the manifest was changed after signing "
        f"(or {SIGNATURE_FILE} belongs to another manifest); refused"
    )


def verify_bundle_signature(bundle_dir: str | os.PathLike[str], trusted: KeySource | Sequence[KeySource]) -> str:
    """Check that a bundle's ``manifest.json`` was signed by a trusted key.

    This covers the manifest only; together with :func:`edgetl.bundle.read_bundle`'s sha256
    and size check of every artifact against that manifest, every byte of the bundle is
    authenticated. Call it before ``read_bundle`` (or use :func:`verify_manifest_signature`
    on the bytes you parse).

    Args:
        bundle_dir: the bundle directory.
        trusted: one trusted public key or a list of them (key objects, PEM bytes, PEM text
            or paths). During a key rotation, list the old and the new key.

    Returns:
        The key id of the trusted key that signed the bundle.

    Raises:
        BundleError: not a bundle, unsigned, signed by an untrusted key, signature invalid
            (manifest changed after signing), malformed or oversize ``manifest.sig``.
        InputError: a trusted key cannot be loaded, or the list is empty.
        DependencyError: ``cryptography`` is not installed.
    """
    _crypto()  # a device without cryptography is told so before anything else
    root = Path(bundle_dir)
    where = f"bundle {str(root)!r}"
    if not root.is_dir():
        raise BundleError(f"{where} is not a directory; expected NAME.edgetl/ written by `edgetl export`")
    try:
        manifest_bytes = _read_bounded(root / "manifest.json", MAX_MANIFEST_BYTES, "manifest.json")
    except FileNotFoundError:
        raise BundleError(f"{where} has no manifest.json") from None
    return verify_manifest_signature(manifest_bytes, read_signature(root), trusted, where=where)


def read_signature(bundle_dir: Path) -> bytes | None:
    """The bytes of a bundle's ``manifest.sig`` (bounded, never through a symlink), ``None`` when unsigned."""
    try:
        return _read_bounded(bundle_dir / SIGNATURE_FILE, MAX_SIGNATURE_FILE_BYTES, SIGNATURE_FILE)
    except FileNotFoundError:
        return None


__all__ = [
    "SIGNATURE_FILE",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "key_id",
    "sign_manifest",
    "read_signature",
    "verify_bundle_signature",
    "verify_manifest_signature",
]
