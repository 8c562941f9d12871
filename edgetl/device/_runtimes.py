"""Thin wrappers that run one model file in onnxruntime or the LiteRT interpreter.

Both take and return numpy arrays and import their runtime lazily, so importing this
module costs nothing and never touches TensorFlow.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._quiet import native_output_silenced
from edgetl.bundle._contract import UNUSED
from edgetl.errors import BundleError, DependencyError

# A device needs one runtime, not both: each has its own extra (`device` installs both).
RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "litert": "ai_edge_litert"}
RUNTIME_EXTRAS = {"onnxruntime": "device-onnxruntime", "litert": "device-litert"}
FORMAT_BACKENDS = {"onnx": "onnxruntime", "tflite": "litert"}
BACKEND_FORMATS = {backend: fmt for fmt, backend in FORMAT_BACKENDS.items()}  # the model format each runs


def installed_backends() -> tuple[str, ...]:
    """The runtimes importable here, in preference order (onnxruntime first)."""

    return tuple(b for b, module in RUNTIME_MODULES.items() if importlib.util.find_spec(module) is not None)


def install_hint(backend: str | None = None) -> str:
    """How to install one runtime (``None``: either)."""
    if backend is None:
        return 'pip install "edgetl[device-onnxruntime]" or "edgetl[device-litert]" (both: "edgetl[device]")'
    return f'pip install "edgetl[{RUNTIME_EXTRAS[backend]}]" (both runtimes: "edgetl[device]")'


def onnx_session(model: str | Path | bytes, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session (from a path or the model's bytes) with warnings silenced
    and an optional intra-op thread count (then one inter-op thread: edgetl's graphs are
    sequential)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover
        raise DependencyError(f"onnxruntime is not installed ({exc}); {install_hint('onnxruntime')}") from exc
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/InvalidArgument types
        what = "an ONNX model given as bytes" if isinstance(model, bytes) else Path(model).name
        raise BundleError(f"{what} cannot be loaded by onnxruntime: {str(exc).strip()[:300]}") from None


class OnnxModel:
    """A single-input, single-output ONNX model in onnxruntime (CPU), from a path or the model's bytes."""

    def __init__(self, path: str | Path | bytes, *, threads: int | None = None) -> None:
        self.session = onnx_session(path, threads=threads)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        name = "an ONNX model given as bytes" if isinstance(path, bytes) else Path(path).name
        self.io = _io_signature(name, [i.shape for i in inputs], [o.shape for o in outputs])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._outputs = [self.output_name]
        # InferenceSession.run re-validates the feed's names and ownership on every call in
        # Python (measured: 6 us of a 70 us call on the digits CNN); callers here pass one
        # checked float32 batch, so call the native session it wraps. The public API is the
        # fallback if a future onnxruntime renames it.
        native = getattr(self.session, "_sess", None)
        self._run = (
            (lambda feed: native.run(self._outputs, feed, None))
            if native is not None
            else (lambda feed: self.session.run(self._outputs, feed))
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._run({self.input_name: x})[0]


def litert_interpreter(path: str | Path | bytes, *, threads: int | None = None, allocate: bool = True) -> Any:
    """A LiteRT interpreter (from a path or the model's bytes), its tensors allocated unless
    ``allocate`` is false (LiteRT's own "Created TensorFlow Lite XNNPACK delegate" line,
    printed from C++, silenced)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:  # pragma: no cover
        raise DependencyError(f"ai-edge-litert is not installed ({exc}); {install_hint('litert')}") from exc

    source = {"model_content": path} if isinstance(path, bytes) else {"model_path": str(path)}
    try:
        with native_output_silenced():
            interpreter = Interpreter(**source, num_threads=threads)
            if allocate:
                interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:  # "not a valid Flatbuffer buffer", failed allocation
        what = "a TFLite model given as bytes" if isinstance(path, bytes) else Path(path).name
        raise BundleError(f"{what} cannot be loaded by LiteRT: {str(exc).strip()[:300]}") from None
    return interpreter


# True only to reproduce ai_edge_litert's SignatureRunner (resize every input on every call):
# tools/aarch64_check.py sets it in its expected-failure run to prove the fix below matters.
RESIZE_UNCHANGED_INPUTS = False


class LiteRTSignature:
    """One signature of a LiteRT interpreter, called like ``SignatureRunner`` (keyword inputs
    in, ``{output name: array}`` out) but resizing an input only when its shape changes.

    Why not ``SignatureRunner`` itself: its ``__call__`` resizes every input on every call, and
    on aarch64 builds of ai-edge-litert ``ResizeInputTensor`` on a 0-d input segfaults (issue
    21: 1.4.0 to 2.3.0, four qemu CPU models, with or without XNNPACK; tools/aarch64_check.py
    reproduces it in CI with 2.3.0 on a Cortex-A72 by turning the skip off). The head's
    ``train`` and ``train_steps`` signatures take lr, l2, momentum and the optimizer choice as
    0-d scalars.
    Resizing a tensor to the shape it already has is a no-op on every build, so skipping it
    changes nothing on x86 and needs no change to the head contract (making the scalars
    shape [1] would have changed every bundle and the host graph builders). This drives the
    same native wrapper calls ``SignatureRunner.__call__`` makes (the same private attributes
    in ai-edge-litert 1.2 to 2.3); a release that renames them is refused here, by name.
    """

    def __init__(self, interpreter: Any, name: str) -> None:
        runner = interpreter.get_signature_runner(name)
        try:
            self._native = runner._interpreter_wrapper
            self._subgraph = runner._subgraph_index
            self._inputs: dict[str, int] = dict(runner._inputs)
            self._outputs: list[tuple[str, int]] = list(runner._outputs)
        except AttributeError as exc:
            raise DependencyError(
                f"this ai-edge-litert's SignatureRunner has no {exc.name!r}; edgetl runs LiteRT signatures through it "
                'and supports ai-edge-litert 1.2 to 2.3: pip install "ai-edge-litert>=1.2,<2.4"'
            ) from None
        self.name = name
        self._shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in runner.get_input_details().items()}

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        if set(inputs) != set(self._inputs):
            raise ValueError(f"signature {self.name!r} takes {sorted(self._inputs)}; got {sorted(inputs)}")
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
        for key, value in arrays.items():
            if value.shape != self._shapes[key] or RESIZE_UNCHANGED_INPUTS:
                self._native.ResizeInputTensor(
                    self._inputs[key], np.array(value.shape, np.int32), False, self._subgraph
                )
                self._shapes[key] = value.shape
        self._native.AllocateTensors(self._subgraph)  # a no-op unless a shape changed
        for key, value in arrays.items():
            self._native.SetTensor(self._inputs[key], value, self._subgraph)
        self._native.Invoke(self._subgraph)
        return {out: self._native.GetTensor(index, self._subgraph) for out, index in self._outputs}


class TFLiteModel:
    """A single-input, single-output TFLite model in ``ai_edge_litert``'s interpreter.

    Takes and returns float values: integer-I/O models are quantized and dequantized with
    the scale and zero point stored in the model. The interpreter is not thread-safe, so
    calls are serialised with a lock; the input is resized when the batch size changes.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        self.interpreter = litert_interpreter(path, threads=threads)
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        self.io = _io_signature(Path(path).name, [i["shape"] for i in inputs], [o["shape"] for o in outputs])
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        # Looked up once, not per call: the hot path is set_tensor, invoke, get_tensor.
        self._in_index, self._out_index = int(self._in["index"]), int(self._out["index"])
        self._int_in = np.dtype(self._in["dtype"]).kind in "iu"
        self._int_out = np.dtype(self._out["dtype"]).kind in "iu"
        self._batch = int(self._in["shape"][0])
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            if x.shape[0] != self._batch:
                self.interpreter.resize_tensor_input(self._in_index, list(x.shape))
                self.interpreter.allocate_tensors()
                self._batch = x.shape[0]
            self.interpreter.set_tensor(
                self._in_index, _quantize(x, self._in) if self._int_in else x.astype(np.float32, copy=False)
            )
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self._out_index)  # a copy: safe after the next call
            return _dequantize(y, self._out) if self._int_out else y


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Raw float values -> the tensor's dtype (integer tensors: round(x / scale) + zero_point)."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind not in "iu":
        return x.astype(dtype, copy=False)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind not in "iu":
        return y  # get_tensor already returned a copy
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def _io_signature(name: str, inputs: list[Any], outputs: list[Any]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(input shape, output shape) without the batch axis, unknown sizes as None; refuses a
    model that is not one input to one output (every edgetl inference model is)."""
    if len(inputs) != 1 or len(outputs) != 1:
        raise BundleError(f"{name} has {len(inputs)} inputs and {len(outputs)} outputs; expected one of each")

    def dims(shape: Any) -> tuple[Any, ...]:
        return tuple(int(d) if isinstance(d, (int, np.integer)) and int(d) > 0 else None for d in list(shape)[1:])

    return dims(inputs[0]), dims(outputs[0])


def check_io(model: Any, name: str, input_shape: tuple[int, ...], outputs: int, what: str) -> None:
    """Refuse a model whose declared input or output does not fit its role in the bundle
    (e.g. a head in the backbone's place): a clear BundleError now, not an IndexError later."""
    got_in, got_out = model.io
    fits_in = len(got_in) == len(input_shape) and all(g in (None, e) for g, e in zip(got_in, input_shape))
    fits_out = len(got_out) == 1 and got_out[0] in (None, outputs)
    if not (fits_in and fits_out):
        raise BundleError(
            f"{name} takes {got_in} and returns {got_out} per example; as the {what} it must take {input_shape} and "
            f"return ({outputs},)"
        )


def check_graph_inputs(session: Any, what: str, required: set[str] | tuple[str, ...], *, exact: bool = False) -> None:
    """Refuse an onnxruntime session whose inputs are not the head contract's for ``what``
    (edgetl/bundle/_head.py), e.g. a training graph in the inference graph's place."""
    have = {i.name for i in session.get_inputs()}
    required = set(required)
    if (have != required) if exact else not required <= have:
        raise BundleError(
            f"{what} has inputs {sorted(have)}; the head contract needs {'exactly ' if exact else ''}{sorted(required)}"
        )


def check_signatures(signatures: dict[str, Any], what: str, required: dict[str, tuple[str, ...]]) -> None:
    """Refuse a TFLite head whose signatures lack one the device runs, or one of its inputs."""
    for name, inputs in required.items():
        have = set(signatures.get(name, {}).get("inputs", [])) if name in signatures else None
        needed = set(inputs) - {UNUSED}  # get_weights' placeholder came with schema 2
        if have is None or not needed <= have:
            raise BundleError(
                f"{what}: signature {name!r} has inputs {sorted(have) if have is not None else 'none (missing)'}; "
                f"the head contract needs {sorted(needed)}"
            )


def load_model(path: str | Path, fmt: str, *, threads: int | None = None) -> Any:
    """Open ``path`` in the runtime for ``fmt`` (``"onnx"`` or ``"tflite"``)."""
    return OnnxModel(path, threads=threads) if fmt == "onnx" else TFLiteModel(path, threads=threads)


# Models judged on many examples (verify, the export's gates) see at most this many per call:
# a runtime's memory for one call grows with the batch, and the process keeps what it took.
# Measured, EfficientNetB0 at 128x128, 379 examples in one call: verifying its 12 files grew
# the export to 12.7 GB (19.7 GB at its peak); at 224x224 and a few thousand examples, out of memory.
EVALUATION_BATCH = 32


def run_batched(model: Any, x: np.ndarray, batch: int = EVALUATION_BATCH) -> np.ndarray:
    """``model(x)`` computed ``batch`` examples at a time, concatenated."""
    if len(x) <= batch:
        return np.asarray(model(x))
    return np.concatenate([np.asarray(model(x[i : i + batch])) for i in range(0, len(x), batch)])
