"""Thin wrappers that run one model file in onnxruntime or the LiteRT interpreter.

Both take and return numpy arrays and import their runtime lazily, so importing this
module costs nothing and never touches TensorFlow.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import DependencyError


def onnx_session(path: str | Path, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with warnings silenced and an optional thread count."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover
        raise DependencyError(f'onnxruntime is not installed ({exc}); pip install "edgetl[device]"') from exc
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxModel:
    """A single-input, single-output ONNX model in onnxruntime (CPU)."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        self.session = onnx_session(path, threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]


def litert_interpreter(path: str | Path, *, threads: int | None = None) -> Any:
    """A LiteRT interpreter with its tensors allocated (LiteRT's own "Created TensorFlow
    Lite XNNPACK delegate" line, printed from C++ while allocating, silenced)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:  # pragma: no cover
        raise DependencyError(f'ai-edge-litert is not installed ({exc}); pip install "edgetl[device]"') from exc
    from edgetl._quiet import native_output_silenced

    with native_output_silenced():
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
    return interpreter


class TFLiteModel:
    """A single-input, single-output TFLite model in ``ai_edge_litert``'s interpreter.

    Takes and returns float values: integer-I/O models are quantized and dequantized with
    the scale and zero point stored in the model. The interpreter is not thread-safe, so
    calls are serialised with a lock; the input is resized when the batch size changes.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        self.interpreter = litert_interpreter(path, threads=threads)
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        self._batch = int(self._in["shape"][0])
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            if x.shape[0] != self._batch:
                self.interpreter.resize_tensor_input(self._in["index"], list(x.shape))
                self.interpreter.allocate_tensors()
                self._batch = x.shape[0]
            self.interpreter.set_tensor(self._in["index"], _quantize(x, self._in))
            self.interpreter.invoke()
            return _dequantize(self.interpreter.get_tensor(self._out["index"]), self._out)


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
        return y.copy()
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def load_model(path: str | Path, fmt: str, *, threads: int | None = None) -> Any:
    """Open ``path`` in the runtime for ``fmt`` (``"onnx"`` or ``"tflite"``)."""
    return OnnxModel(path, threads=threads) if fmt == "onnx" else TFLiteModel(path, threads=threads)
