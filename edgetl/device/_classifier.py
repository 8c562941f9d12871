"""On-device inference from a bundle, with onnxruntime or LiteRT (never TensorFlow).

    >>> clf = Classifier.open("digits.edgetl", backend="litert", precision="int8", store="heads/")
    >>> clf.predict(image).labels        # one example or a batch of raw inputs
    ['7']

The bundle's schema and every file hash are checked before any file reaches a runtime.
While the active head is the factory one, the fused model answers in one call; once a
personalized head is active, the backbone embeds and the runtime runs the current head.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetl.bundle import Bundle, read_bundle
from edgetl.device._head import HeadState, make_trainer
from edgetl.device._runtimes import load_model
from edgetl.errors import DependencyError, InputError, describe

BACKENDS = ("onnxruntime", "litert")
_FORMAT = {"onnxruntime": "onnx", "litert": "tflite"}


def default_backend() -> str:
    """onnxruntime if installed, else LiteRT."""
    import importlib.util

    for backend, module in (("onnxruntime", "onnxruntime"), ("litert", "ai_edge_litert")):
        if importlib.util.find_spec(module) is not None:
            return backend
    raise DependencyError('no runtime installed: pip install "edgetl[device]" (onnxruntime or ai-edge-litert)')


@dataclass(frozen=True)
class Prediction:
    """Predictions for a batch: one label per example, probabilities over the active labels."""

    labels: list[str]
    probabilities: np.ndarray  # (n, number of active labels), columns in `classes` order
    classes: tuple[str, ...]
    top_k: list[list[tuple[str, float]]]
    head_version: int


class Classifier:
    """Raw inputs in, labels out. Thread-safe: the head is swapped as one immutable object.

    Use :meth:`open`; ``store`` makes it start from the store's active head.
    """

    def __init__(
        self, bundle: Bundle, *, backend: str | None = None, precision: str = "fp32", threads: int | None = None
    ) -> None:
        backend = backend or default_backend()
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {BACKENDS}, received {backend!r}")
        fmt = _FORMAT[backend]
        available = bundle.precisions("backbone", fmt)
        if precision not in available:
            raise InputError(
                f"bundle {bundle.path.name!r} has no {precision} {fmt} backbone; available precisions: {available}"
            )
        self.bundle, self.backend, self.precision = bundle, backend, precision
        self.advice: Any = None  # the advisor's measurement when opened with "auto"
        spec = bundle.input_spec
        self.input_shape = tuple(spec.shape)
        self._backbone = load_model(bundle.artifact("backbone", fmt, precision), fmt, threads=threads)
        self._fused = load_model(bundle.artifact("fused", fmt, precision), fmt, threads=threads)
        self.head_runtime = make_trainer(bundle, backend, threads)
        self.factory = HeadState.factory(bundle)
        self._head = (0, self.factory)  # (version, state), replaced atomically
        self._lock = threading.Lock()  # serialises the backbone runtime call (LiteRT is not thread-safe)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        backend: str | None = None,
        precision: str = "fp32",
        store: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        trust: Any = None,
    ) -> "Classifier":
        """Open and verify a bundle; with ``store``, load its active head (checksum-verified).

        Args:
            path: the bundle directory.
            backend: ``"onnxruntime"``, ``"litert"`` or ``"auto"`` (default: onnxruntime if
                installed).
            precision: which exported precision to run (``bundle.precisions()``), or
                ``"auto"``: with ``"auto"`` either way, the configuration comes from
                :func:`edgetl.device.advise` (measured on this machine once, then cached).
            store: a head store directory: start from its active (personalized) head.
            threads: runtime threads (default: the runtime's choice).
            trust: trusted Ed25519 public key(s): refuse a bundle not signed by one of them.

        Example (what a device runs; no TensorFlow)::

            clf = Classifier.open("digits.edgetl", backend="litert", precision="int8")
            clf.predict(np.zeros((8, 8, 1), np.uint8)).labels
        """
        bundle = read_bundle(path, trust=trust)
        advice = None
        if backend == "auto" or precision == "auto":
            from edgetl.device._advisor import advise

            advice = advise(bundle, threads=threads)
            backend, precision = advice.choose(backend, precision)
        clf = cls(bundle, backend=backend, precision=precision, threads=threads)
        clf.advice = advice
        if store is not None:
            from edgetl.device._store import HeadStore

            active = HeadStore(store, clf.bundle).active()
            clf.set_head(active.head, active.number)
        return clf

    @property
    def head(self) -> HeadState:
        return self._head[1]

    @property
    def head_version(self) -> int:
        return self._head[0]

    def set_head(self, head: HeadState, version: int) -> None:
        if head.W.shape != self.factory.W.shape:
            raise InputError(f"head shape {head.W.shape} does not match the bundle's {self.factory.W.shape}")
        self._head = (version, head)  # one reference assignment: readers see old or new, never a mix

    def check_inputs(self, x: Any) -> np.ndarray:
        """Validate raw inputs; return a float32 batch (the caller's array is never modified)."""
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except (ValueError, TypeError) as exc:
                raise InputError(f"inputs must be a numeric array, received {describe(x)} ({exc})") from None
        if x.dtype.kind not in "uif":
            raise InputError(f"inputs must be numeric (uint8, int or float), received dtype {x.dtype}")
        if x.shape == self.input_shape:
            x = x[None]
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(
                f"inputs must have shape {self.input_shape} (one example) or (n, "
                f"{', '.join(map(str, self.input_shape))}), received {x.shape}"
            )
        if len(x) == 0:
            raise InputError("received an empty batch; pass at least one example")
        # No copy when the batch is already float32 (a 224x224 batch copy is measurable SDK
        # overhead); nothing downstream writes to it, so the caller's array stays untouched.
        x = np.asarray(x, dtype=np.float32)
        if not np.all(np.isfinite(x)):
            bad = int(np.argwhere(~np.isfinite(x).reshape(len(x), -1).all(axis=1))[0][0]) if x.ndim > 1 else 0
            raise InputError(
                f"inputs contain NaN or infinite values (first at example {bad}); expected raw values, e.g. pixels in "
                "[0, 255]"
            )
        return x

    def embed(self, x: Any) -> np.ndarray:
        """Backbone embeddings of raw inputs."""
        batch = self.check_inputs(x)
        with self._lock:
            return self._backbone(batch).astype(np.float32)

    def predict(self, x: Any, *, top_k: int = 3) -> Prediction:
        batch = self.check_inputs(x)
        version, head = self._head  # one snapshot for the whole batch
        active = np.flatnonzero(head.mask > 0)
        if version == 0:
            with self._lock:
                probs = self._fused(batch)
        else:
            with self._lock:
                emb = self._backbone(batch).astype(np.float32)
            probs = self.head_runtime.probabilities(head, emb)[:, active]
        classes = tuple(head.labels)
        k = max(1, min(int(top_k), len(classes)))
        order = np.argsort(-probs, axis=1)[:, :k]
        tops = [[(classes[j], float(probs[i, j])) for j in row] for i, row in enumerate(order)]
        return Prediction([classes[j] for j in order[:, 0]], probs, classes, tops, version)
