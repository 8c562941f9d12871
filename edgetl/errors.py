"""The one error hierarchy of edgetl.

Every error edgetl raises on purpose is an :class:`EdgeTLError`. The subclasses say which
half of the contract was broken, so callers can catch narrowly. ``InputError`` is also a
``ValueError`` so code written against plain Python conventions keeps working.
"""

from __future__ import annotations

__all__ = [
    "EdgeTLError",
    "InputError",
    "DataError",
    "BackboneError",
    "BundleError",
    "StoreError",
    "DependencyError",
    "EdgeTLWarning",
    "QuantizedModelLeftOut",
    "TailLeftOut",
    "describe",
]


class EdgeTLError(Exception):
    """Base class of every error edgetl raises deliberately."""


class InputError(EdgeTLError, ValueError):
    """An argument, file or dataset given by the caller is not acceptable.

    The message says what was received and what is allowed.
    """


class DataError(InputError):
    """A dataset cannot be used: unreadable, empty, a single class, wrong columns."""


class BackboneError(InputError):
    """A backbone cannot be created or cut as asked (unknown name, bad shape, bad file)."""


class BundleError(EdgeTLError):
    """A bundle is malformed, tampered with, or cannot be written where asked."""


class StoreError(EdgeTLError):
    """The head store cannot be read or written (read-only, full disk, corrupt, foreign)."""


class DependencyError(EdgeTLError, ImportError):
    """An optional dependency (TensorFlow, onnxruntime, ...) is not installed."""


class EdgeTLWarning(UserWarning):
    """Base class of the warnings edgetl gives: something was done differently than asked."""


class TailLeftOut(EdgeTLWarning):
    """An export left the trainable tail out (its files failed their checks): the bundle
    personalizes head-only, and its manifest's ``tail.reason`` says why."""


class QuantizedModelLeftOut(EdgeTLWarning):
    """An export left a quantized model out of the bundle (its gate failed or its evidence was
    too thin); ``ExportResult.omitted`` has the files and the measured reason."""


def describe(value: object, limit: int = 80) -> str:
    """Short repr of a received value for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
