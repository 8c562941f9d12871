"""Tail personalization on the device: the last embedding layer trains with the head.

:class:`TailRuntime` runs a bundle's tail files (:mod:`edgetl.bundle._tail`) in onnxruntime
or LiteRT: the trunk model (input -> trunk activations), the stateless inference graph and
the loop training graphs. :class:`TailPersonalizer` extends a :class:`Personalizer`: the
user's examples (kept as inputs until commit) go through the trunk once, the replay buffer
brings its trunk activations (``replay.npz`` key ``trunk``: recomputing them would need the
factory inputs, which a bundle does not ship), and the candidate tail is judged by the same
guard as a head (:mod:`edgetl.device._guard`), on the same held-out examples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgetl.bundle import _tail as T
from edgetl.device._guard import generalizes, paired
from edgetl.device._guard import decide as decide_guard
from edgetl.device._head import TrainSettings
from edgetl.errors import BundleError, InputError

ADAPT = ("head", "tail", "auto")


def _plan(n: int, epochs: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The head's step plan (same shuffle), so a tail and a head see the same batches."""
    from edgetl.device._head_loop import plan_steps

    return plan_steps(n, TrainSettings(epochs=epochs, batch_size=batch, seed=seed))


class TailRuntime:
    """The tail's files in one runtime (``fmt``: ``"onnx"`` or ``"tflite"``).

    Args:
        models: ``{role: bytes or path}`` with ``trunk``, ``infer`` and ``train_sgd``/``train_adam``
            (ONNX) or ``tail`` (the TFLite file with all signatures).
        activation: the tail layer's activation (the manifest's ``tail.activation``).
    """

    def __init__(self, models: Mapping[str, Any], fmt: str, activation: str, threads: int | None = None) -> None:
        from edgetl.device._runtimes import litert_interpreter, onnx_session

        if fmt not in ("onnx", "tflite") or activation not in T.ACTIVATIONS:
            raise InputError(f"format must be onnx or tflite and activation one of {T.ACTIVATIONS}, received {fmt!r}, {activation!r}")
        self.fmt, self.activation = fmt, activation
        if fmt == "onnx":
            self._trunk = onnx_session(models["trunk"], threads=threads)
            self._infer = onnx_session(models["infer"], threads=threads)
            self._train = {opt: onnx_session(models[f"train_{opt}"], threads=threads) for opt in ("sgd", "adam")}
        else:
            self._trunk = litert_interpreter(models["trunk"], threads=threads, allocate=False)
            self._tail = litert_interpreter(models["tail"], threads=threads, allocate=False)

    @classmethod
    def from_files(cls, files: Mapping[str, Any], fmt: str, activation: str) -> "TailRuntime":
        """From export's in-memory ``{file: (content, ...)}``."""
        if fmt == "onnx":
            models = {"trunk": files["trunk.fp32.onnx"][0], "infer": files[T.INFER_FILE][0]}
            models.update({f"train_{o}": files[T.TRAIN_FILE.format(optimizer=o)][0] for o in ("sgd", "adam")})
        else:
            models = {"trunk": files["trunk.fp32.tflite"][0], "tail": files[T.TFLITE_FILE][0]}
        return cls(models, fmt, activation)

    @classmethod
    def from_bundle(cls, bundle: Any, backend: str, threads: int | None = None) -> "TailRuntime":
        """The bundle's tail for ``backend`` (``onnxruntime`` or ``litert``)."""
        section = bundle.manifest.extra.get("tail") or {}
        if not section.get("available"):
            raise BundleError(f"this bundle has no trainable tail: {section.get('reason', 'exported before tails existed')}")
        fmt = "onnx" if backend == "onnxruntime" else "tflite"
        path = Path(bundle.path)
        if fmt == "onnx":
            models = {"trunk": path / "trunk.fp32.onnx", "infer": path / T.INFER_FILE}
            models.update({f"train_{o}": path / T.TRAIN_FILE.format(optimizer=o) for o in ("sgd", "adam")})
        else:
            models = {"trunk": path / "trunk.fp32.tflite", "tail": path / T.TFLITE_FILE}
        return cls(models, fmt, section["activation"], threads)

    @staticmethod
    def trunk_outputs(model: Any, fmt: str, x: np.ndarray) -> np.ndarray:
        """Run a trunk model once (export's check)."""
        from edgetl.device._runtimes import litert_interpreter, onnx_session

        if fmt == "onnx":
            return onnx_session(model).run(None, {"input": np.asarray(x, np.float32)})[0]
        return _run_signature(litert_interpreter(model, allocate=False), None, input=np.asarray(x, np.float32))

    def trunk(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if self.fmt == "onnx":
            return self._trunk.run(None, {"input": x})[0]
        return _run_signature(self._trunk, None, input=x)

    def probabilities(self, weights: Mapping[str, np.ndarray], trunk: np.ndarray) -> np.ndarray:
        feed = {k: np.asarray(weights[k], np.float32) for k in T.INFER_INPUTS if k != "trunk"}
        feed["trunk"] = np.asarray(trunk, np.float32)
        if self.fmt == "onnx":
            return self._infer.run(None, feed)[0]
        return _run_signature(self._tail, "infer", **feed)["probabilities"]

    def train_plan(
        self,
        weights: Mapping[str, np.ndarray],
        trunk: np.ndarray,
        onehot: np.ndarray,
        optimizer: str,
        *,
        lr: float,
        l2: float,
        epochs: int,
        batch: int,
        momentum: float = 0.9,
        seed: int = 0,
    ) -> dict[str, np.ndarray]:
        """Train from ``weights`` (anchors: the starting W1 and W) with a zero optimizer state;
        returns the trained state (:data:`edgetl.bundle._tail.STATE` keys) and ``losses``."""
        order, row_weight = _plan(len(trunk), epochs, min(batch, len(trunk)), seed)
        feed = self._feed(weights, trunk, onehot, optimizer, order, row_weight, lr, l2, momentum)
        if self.fmt == "onnx":
            session = self._train[optimizer]
            out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        else:
            out = _run_signature(self._tail, f"train_steps_{optimizer}", **feed)
        return {**{s: np.array(out[f"{s}_out"]) for s in T.STATE[optimizer]}, "losses": np.array(out["losses"])}

    @staticmethod
    def _feed(weights, trunk, onehot, optimizer, order, row_weight, lr, l2, momentum) -> dict[str, np.ndarray]:  # noqa: ANN001
        f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
        feed = {"trunk": f32(trunk), "labels": f32(onehot), "order": order, "row_weight": row_weight}
        feed.update({k: f32(weights[k]) for k in T.CONSTANTS})
        feed.update({anchor: f32(weights[w]) for w, anchor in T.ANCHORS.items()})
        feed.update(lr=f32(lr), l2=f32(l2))
        if optimizer == "sgd":
            feed["momentum"] = f32(momentum)
        feed.update(T.initial_state(weights, optimizer))
        return feed

    def reference(self, weights, trunk, onehot, optimizer, *, lr, l2, epochs, batch, momentum=0.9, seed=0) -> dict:  # noqa: ANN001
        """The float64 reference of :meth:`train_plan` (same plan)."""
        order, row_weight = _plan(len(trunk), epochs, min(batch, len(trunk)), seed)
        fixed = {k: weights[k] for k in T.CONSTANTS}
        fixed.update({anchor: weights[w] for w, anchor in T.ANCHORS.items()})
        state, _ = T.reference_train(
            T.initial_state(weights, optimizer), fixed, trunk, onehot, order, row_weight,
            optimizer=optimizer, activation=self.activation, lr=lr, l2=l2, momentum=momentum,
        )
        return state


def _run_signature(interpreter: Any, name: str | None, **inputs: np.ndarray) -> Any:
    """A LiteRT signature call (``name`` None: the trunk's only signature, its one output)."""
    from edgetl.device._runtimes import LiteRTSignature

    key = name or next(iter(interpreter.get_signature_list()))
    out = LiteRTSignature(interpreter, key)(**inputs)
    return next(iter(out.values())).copy() if name is None else {k: np.array(v) for k, v in out.items()}
