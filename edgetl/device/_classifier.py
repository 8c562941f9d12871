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
from typing import Any

import numpy as np

from edgetl.bundle import Bundle, read_bundle
from edgetl.bundle import _contract as C
from edgetl.bundle._tail import layer
from edgetl.device._advisor import advise
from edgetl.device._head import HeadState
from edgetl.device._head_loop import make_trainer
from edgetl.device._runtimes import BACKEND_FORMATS, check_io, install_hint, installed_backends, load_model
from edgetl.device._store import HeadStore
from edgetl.device._tail import TailRuntime
from edgetl.errors import BundleError, DependencyError, InputError, describe

BACKENDS = ("onnxruntime", "litert")


def default_backend() -> str:
    """onnxruntime if installed, else LiteRT."""
    backends = installed_backends()
    if not backends:
        raise DependencyError(f"no runtime installed (onnxruntime or ai-edge-litert): {install_hint()}")
    return backends[0]


_FLOAT32 = np.dtype(np.float32)


class Prediction:
    """Predictions for a batch: probabilities over the active labels, and derived views.

    ``labels`` and ``top_k`` are computed when first read (a partial sort, not a full one),
    so a caller that needs only the probabilities or the top label pays for nothing else.
    """

    __slots__ = ("probabilities", "classes", "head_version", "_k", "_labels", "_top_k")

    def __init__(self, probabilities: np.ndarray, classes: tuple[str, ...], k: int, head_version: int) -> None:
        self.probabilities = probabilities  # (n, number of active labels), columns in `classes` order
        self.classes = classes
        self.head_version = head_version
        self._k = k
        self._labels: list[str] | None = None
        self._top_k: list[list[tuple[str, float]]] | None = None

    @property
    def labels(self) -> list[str]:
        """The most probable label of each example."""
        if self._labels is None:
            self._labels = [self.classes[j] for j in self.probabilities.argmax(axis=1)]
        return self._labels

    @property
    def top_k(self) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable (label, probability) pairs of each example, best first."""
        if self._top_k is None:
            p, k = self.probabilities, self._k
            part = (
                np.argpartition(-p, k - 1, axis=1)[:, :k]
                if k < p.shape[1]
                else np.broadcast_to(np.arange(p.shape[1]), p.shape)
            )
            rows = np.arange(len(p))[:, None]
            order = np.take_along_axis(part, np.argsort(-p[rows, part], axis=1, kind="stable"), axis=1)
            self._top_k = [[(self.classes[j], float(p[i, j])) for j in row] for i, row in enumerate(order)]
        return self._top_k

    def __repr__(self) -> str:
        return f"Prediction(labels={self.labels!r}, head_version={self.head_version})"


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
        fmt = BACKEND_FORMATS[backend]
        available = bundle.precisions("backbone", fmt)
        if precision not in available:
            raise InputError(
                f"bundle {bundle.path.name!r} has no {precision} {fmt} backbone; available precisions: {available}"
            )
        self.bundle, self.backend, self.precision = bundle, backend, precision
        self.advice: Any = None  # the advisor's measurement when opened with "auto"
        spec = bundle.input_spec
        self.input_shape = tuple(spec.shape)
        backbone_path, fused_path = (
            bundle.artifact("backbone", fmt, precision),
            bundle.artifact("fused", fmt, precision),
        )
        self._backbone = load_model(backbone_path, fmt, threads=threads)
        self._fused = load_model(fused_path, fmt, threads=threads)
        emb = bundle.manifest.embedding_size
        check_io(self._backbone, backbone_path.name, self.input_shape, emb, "backbone")
        check_io(self._fused, fused_path.name, self.input_shape, len(bundle.labels), "fused model")
        self.head_runtime = make_trainer(bundle, backend, threads)
        self.factory = HeadState.factory(bundle)
        self._tail: Any = None  # (TailRuntime, constants), loaded for a head with a tail
        self._head: tuple[int, HeadState, np.ndarray, tuple[str, ...]] = (0, self.factory, np.empty(0), ())
        self.set_head(self.factory, 0)

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
        new_store: bool = False,
    ) -> "Classifier":
        """Open and verify a bundle; with ``store``, load its active head (checksum-verified).

        Args:
            path: the bundle directory.
            backend: ``"onnxruntime"``, ``"litert"`` or ``"auto"`` (default: onnxruntime if
                installed).
            precision: which exported precision to run (``bundle.precisions()``), or
                ``"auto"``: with ``"auto"`` either way, the configuration comes from
                :func:`edgetl.device.advise` (measured on this machine once, then cached).
            store: a head store directory: start from its active (personalized) head. A
                directory that does not exist is refused (a typo would otherwise run the
                factory head without a word), unless ``new_store``.
            threads: runtime threads (default: the runtime's choice).
            trust: trusted Ed25519 public key(s): refuse a bundle not signed by one of them.
            new_store: ``store`` may not exist yet (a first run): the factory head is active,
                and a :class:`Personalizer` on that directory creates the store at its first
                commit. Opening writes nothing either way.

        Raises:
            InputError: ``store`` does not exist and ``new_store`` is false.

        Example (what a device runs; no TensorFlow)::

            clf = Classifier.open("digits.edgetl", backend="litert", precision="int8")
            clf.predict(np.zeros((8, 8, 1), np.uint8)).labels
        """
        if store is not None and not new_store and not os.path.exists(store):
            raise InputError(
                f"store {os.fspath(store)!r} does not exist; a Personalizer creates it at its first commit. Pass "
                "new_store=True to start there from the factory head, or omit store for the factory head alone"
            )
        bundle = read_bundle(path, trust=trust)
        advice = None
        if backend == "auto" or precision == "auto":
            advice = advise(bundle, threads=threads)
            backend, precision = advice.choose(backend, precision)
        clf = cls(bundle, backend=backend, precision=precision, threads=threads)
        clf.advice = advice
        if store is not None:
            active = HeadStore(store, clf.bundle).active()
            clf.set_head(active.head, active.number)
        return clf

    @property
    def head(self) -> HeadState:
        return self._head[1]  # (version, head, active columns, labels)

    @property
    def head_version(self) -> int:
        return self._head[0]

    def set_head(self, head: HeadState, version: int) -> None:
        if head.W.shape != self.factory.W.shape:
            raise InputError(f"head shape {head.W.shape} does not match the bundle's {self.factory.W.shape}")
        if head.tail is not None:
            section = self.bundle.manifest.extra.get("tail") or {}
            if not section.get("available"):  # a store's tail version, opened with a bundle that has none
                why = section.get("reason", "exported before tails existed")
                raise BundleError(
                    f"head version {version} trained the backbone's last layer (a tail), and bundle "
                    f"{self.bundle.name!r} has no trainable tail ({why}): `edgetl store migrate --store STORE "
                    "BUNDLE` rebuilds a head-only version for it"
                )
            self._tail_parts()  # a head with a tail needs the bundle's tail files: refused here, not on predict
        # One reference assignment: readers see old or new, never a mix. The active columns
        # and labels are computed here, once per head, not on every prediction.
        self._head = (version, head, np.flatnonzero(head.mask > 0), tuple(head.labels))

    def check_inputs(self, x: Any) -> np.ndarray:
        """Validate raw inputs; return a float32 batch (the caller's array is never modified).

        The hot path of every prediction: cheap checks first, no copy of a float32 batch
        (nothing downstream writes to it), the finiteness scan only for float inputs
        (integer pixels are finite by type).
        """
        if type(x) is not np.ndarray:
            try:
                x = np.asarray(x)
            except (ValueError, TypeError) as exc:
                raise InputError(f"inputs must be a numeric array, received {describe(x)} ({exc})") from None
        kind = x.dtype.kind
        if kind not in "uif":
            raise InputError(f"inputs must be numeric (uint8, int or float), received dtype {x.dtype}")
        if x.shape == self.input_shape:
            x = x[None]
        if x.shape[1:] != self.input_shape or x.ndim != len(self.input_shape) + 1:
            raise InputError(
                f"inputs must have shape {self.input_shape} (one example) or (n, "
                f"{', '.join(map(str, self.input_shape))}), received {x.shape}"
            )
        if x.shape[0] == 0:
            raise InputError("received an empty batch; pass at least one example")
        if kind != "f":
            return x.astype(np.float32)
        if x.dtype is not _FLOAT32:
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            bad = int(np.argmin(np.isfinite(x).reshape(len(x), -1).all(axis=1)))
            raise InputError(
                f"inputs contain NaN or infinite values (first at example {bad}); expected raw values, e.g. pixels in "
                "[0, 255]"
            )
        return x

    def embed(self, x: Any) -> np.ndarray:
        """Backbone embeddings of raw inputs (through the active head's trained tail layer, if it has one)."""
        batch = self.check_inputs(x)
        if self._head[1].tail is not None:
            return self.tail_embed(self._tail_parts()[0].trunk(batch), self._head[1])
        return self._backbone(batch).astype(np.float32, copy=False)

    def _tail_parts(self) -> tuple[Any, dict[str, np.ndarray], str]:
        """The bundle's trunk runtime, tail constants and activation (loaded on first use)."""
        if self._tail is None:
            init = self.bundle.arrays("tail_init", (C.SEAM_MEAN, C.SEAM_INV_STD))
            self._tail = (TailRuntime.from_bundle(self.bundle, self.backend), init)
        runtime, init = self._tail
        return runtime, init, runtime.activation

    def tail_embed(self, trunk: np.ndarray, head: HeadState) -> np.ndarray:
        """Embeddings from trunk activations through ``head``'s tail layer and the seam
        standardization (numpy: one matrix product, as :mod:`edgetl.bundle._tail` defines it)."""

        _, init, activation = self._tail_parts()
        pooled = layer(np.asarray(trunk, np.float32), head.tail[C.TAIL_W], head.tail[C.TAIL_B], activation).mean(axis=1)
        return ((pooled - init[C.SEAM_MEAN]) * init[C.SEAM_INV_STD]).astype(np.float32)

    def predict(self, x: Any, *, top_k: int = 3) -> Prediction:
        """Labels and probabilities of raw inputs (one example or a batch)."""
        batch = self.check_inputs(x)
        version, head, active, classes = self._head  # one snapshot for the whole batch
        # Thread safety: onnxruntime sessions may run concurrently; the LiteRT wrapper
        # (edgetl.device._runtimes.TFLiteModel) serialises its interpreter itself.
        if version == 0:
            probs = self._fused(batch)
        else:
            emb = (
                self._backbone(batch)
                if head.tail is None
                else self.tail_embed(self._tail_parts()[0].trunk(batch), head)
            )
            probs = self.head_runtime.probabilities(head, emb)[:, active]
        return Prediction(probs, classes, max(1, min(int(top_k), len(classes))), version)
