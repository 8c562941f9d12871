"""The int8 TFLite remedy ladder: selective float fallback when post-training int8 misses (issue 23, 1b).

Post-training int8 (``to_tflite``) is rung ``ptq``. When it misses its gate or the quality
target (accuracy at most :data:`TARGET_DROP` below fp32 on the selection split, not on the
split the export reports: ``edgetl.host._selection``), TensorFlow's
``tf.lite.experimental.QuantizationDebugger`` measures every quantized layer on the
calibration data: its own quantization noise against its own signal
(``noise_to_signal = mean((float - dequantized)^2) / var(float)``, the layer's float output
and its int8 output given the same inputs). The noisiest layers are deny-listed
(``QuantizationDebugOptions(denylisted_nodes=...)``, then ``get_nondebug_quantized_model``)
1, 2, 4, ... at a time until the model meets the gate and the target: rung
``float-fallback``. Why this metric and not the debugger tutorial's ``rmse/scale``: a
layer whose activation range is huge (a few outliers) rounds its ordinary values to zero,
yet its error is still about a third of its (huge) step; against its signal it is ~1.

Each rung tried is recorded (accuracy, agreement, float layers, size, latency); the
manifest entry of the kept file carries the rung that passed, the share of the compute ops
kept float, and the size and speed cost against plain post-training int8.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from edgetl._quiet import native_output_silenced
from edgetl.device._evidence_gate import MAX_ACCURACY_DROP, MIN_TOP1_AGREEMENT, gate_outcome
from edgetl.device._guard import paired
from edgetl.device._runtimes import TFLiteModel, run_batched
from edgetl.host._convert import tflite_converter
from edgetl.host._int8_onnx import TARGET_ACCURACY_DROP, meets_quality_target
from edgetl.host._tf import tf

# The quality target the ladder climbs for (issue 23: int8 within 1 point of fp32), the ONNX
# ladder's; the gate itself (device/_evidence_gate.py) only refuses broken files.
TARGET_DROP = TARGET_ACCURACY_DROP
FALLBACK_STEPS = (1, 2, 4, 8, 16)
# A rung that would leave more than this share of the compute ops float is not an int8 model: the
# ladder stops before it (a user's 3-convolution CNN climbed to 16 deny-listed layers and shipped
# a file named int8 with every convolution float). The ONNX ladder's cap is MAX_FLOAT_TENSORS.
MAX_FLOAT_SHARE = 0.5
RANK_SAMPLES = 32  # calibration inputs the per-layer statistics run on
COMPUTE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL")


@dataclass
class Rung:
    """One model the ladder measured."""

    rung: str
    content: bytes = field(repr=False)
    float_layers: list[str]
    outcome: str  # the evidence gate's: pass, fail, thin
    accuracy_drop: float | None  # on the judge's labelled (selection) examples, against fp32; None without labels
    agreement: float

    @property
    def meets_target(self) -> bool:
        """Passes the gate and, with labels, is within :data:`TARGET_DROP` of fp32; without (a
        backbone), its top-1 agreement reaches the gate's minimum as measured (see
        the ONNX ladder's :func:`~edgetl.host._int8_onnx.meets_quality_target`, which decides)."""
        measures = {"accuracy_drop": self.accuracy_drop, "top1_agreement": self.agreement}
        measures["min_agreement"] = MIN_TOP1_AGREEMENT["int8"]
        return self.outcome == "pass" and meets_quality_target(measures, TARGET_DROP)

    def to_json(self) -> dict[str, Any]:
        drop = None if self.accuracy_drop is None else round(self.accuracy_drop, 4)
        return {
            "rung": self.rung,
            "float_layers": len(self.float_layers),
            "outcome": self.outcome,
            "accuracy_drop": drop,
            "top1_agreement": round(self.agreement, 4),
            "bytes": len(self.content),
        }


class Judge:
    """Scores a TFLite model like the export gate does: paired against the Keras fp32
    predictions on the labelled examples (the export's selection split) and the calibration inputs."""

    def __init__(self, xs: np.ndarray, reference: np.ndarray, y: np.ndarray | None, to_probs: Callable) -> None:
        self.xs, self.reference, self.y, self.to_probs = xs, reference.argmax(1), y, to_probs

    def __call__(self, name: str, content: bytes, float_layers: list[str]) -> Rung:

        pred = np.asarray(self.to_probs(_run_tflite(TFLiteModel, content, self.xs))).argmax(1)
        agree = pred == self.reference
        tol = 1 - MIN_TOP1_AGREEMENT["int8"]
        tests = [(paired("fidelity", np.ones(len(agree), bool), agree, tol), tol)]
        drop = None
        if self.y is not None and len(self.y):
            n, tol = len(self.y), MAX_ACCURACY_DROP["int8"]
            before, after = self.reference[:n] == self.y, pred[:n] == self.y
            tests.append((paired("accuracy", before, after, tol), tol))
            drop = float(before.mean() - after.mean())
        return Rung(name, content, float_layers, gate_outcome(tests)[0], drop, float(agree.mean()))


def _run_tflite(model_class: Any, content: bytes, xs: np.ndarray) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.tflite")
        with open(path, "wb") as f:
            f.write(content)
        return run_batched(model_class(path), xs)


def climb(converter_factory: Callable[[], Any], calibration: np.ndarray, ptq: bytes, judge: Judge) -> dict[str, Any]:
    """The ladder from post-training int8 ``ptq``: returns ``{"content", "ladder"}`` with
    the model kept and what the manifest records about how it got there.

    ``converter_factory()`` makes a ``TFLiteConverter`` set up for int8 with float I/O
    (``optimizations``, ``representative_dataset`` over ``calibration``)."""
    tried, note = [judge("ptq", ptq, [])], ""
    if not tried[0].meets_target:
        try:
            debugger = _debugger(converter_factory)
            ranked = rank_layers(debugger, calibration[:RANK_SAMPLES])
        except (ValueError, RuntimeError) as exc:  # e.g. constant calibration data: nothing to instrument
            ranked, note = [], f"no per-layer analysis: {str(exc)[:200]}"
        for k in FALLBACK_STEPS:
            if k > len(ranked):
                break
            names = [r["tensor_name"] for r in ranked[:k]]
            content = _denylisted(debugger, names)
            if (share := float_share(content)) > MAX_FLOAT_SHARE:
                note = (
                    f"stopped before keeping {k} layer(s) float: {share:.0%} of the compute ops would run float "
                    f"(more than {MAX_FLOAT_SHARE:.0%} is not an int8 model)"
                )
                break
            tried.append(judge("float-fallback", content, names))
            if tried[-1].meets_target:
                break
    kept = _choose(tried)
    ladder = {
        "rung": kept.rung,
        "meets_target": kept.meets_target,
        "target_drop": TARGET_DROP,
        "float_layers": kept.float_layers,
        "float_share": float_share(kept.content),
        "size_ratio_to_ptq": round(len(kept.content) / len(ptq), 4),
        "latency_ratio_to_ptq": round(_latency(kept.content) / _latency(ptq), 3) if kept.content is not ptq else 1.0,
        "tried": [r.to_json() for r in tried],
    }
    if note:
        ladder["note"] = note
    return {"content": kept.content, "ladder": ladder}


def _choose(tried: list[Rung]) -> Rung:
    """The first rung that meets the target; else the most accurate one the gate passes
    (fewest float layers on ties); else plain PTQ (verification then decides)."""
    for r in tried:
        if r.meets_target:
            return r
    passing = [r for r in tried if r.outcome == "pass"]
    if not passing:
        return tried[0]
    return min(passing, key=lambda r: (r.accuracy_drop or 0.0, -r.agreement, len(r.float_layers)))


def _noise_to_signal(f: np.ndarray, q: np.ndarray, scale: float, zero_point: int) -> float:
    """Mean over channels (last axis) of the layer's int8 noise power over its float signal
    power. Per channel, because activations are quantized per tensor: a channel whose
    range is small next to the tensor's rounds to a few levels (the MobileNet depthwise
    failure), and a tensor-wide ratio would hide it behind the large channels. A signal
    below one quantization step counts as one step: rounding what upstream layers already
    flattened is not this layer's fault (unfloored, such a layer ranked first at 5e11)."""
    f = np.asarray(f, np.float64)
    noise = (f - (np.asarray(q, np.float64) - zero_point) * scale) ** 2
    if f.ndim <= 2:  # a vector per example: its elements are the samples
        f, noise = f.reshape(-1, 1), noise.reshape(-1, 1)
    else:
        f, noise = f.reshape(-1, f.shape[-1]), noise.reshape(-1, f.shape[-1])
    signal = np.maximum(f.var(axis=0), float(scale) ** 2)
    return float(np.mean(noise.mean(axis=0) / signal))


def _debugger(converter_factory: Callable[[], Any]) -> Any:
    """A QuantizationDebugger calibrated by the converter's own representative data."""
    t = tf()
    with warnings.catch_warnings(), native_output_silenced():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        return t.lite.experimental.QuantizationDebugger(converter=converter_factory(), debug_dataset=lambda: iter(()))


def rank_layers(debugger: Any, samples: np.ndarray) -> list[dict]:
    """The debugger's quantized layers, noisiest first (``noise_to_signal`` on ``samples``).

    Measured on the debugger's instrumented model, opened again by content: only that way
    does TensorFlow keep every intermediate tensor (``experimental_preserve_all_tensors``);
    the converter-built debugger reads reused buffers (a layer with zero error measured 5e11).
    """
    t = tf()
    samples = samples.astype(np.float32)

    def dataset() -> Any:
        for i in range(len(samples)):
            yield [samples[i : i + 1]]

    options = t.lite.experimental.QuantizationDebugOptions(
        layer_direct_compare_metrics={"noise_to_signal": _noise_to_signal}
    )
    with warnings.catch_warnings(), native_output_silenced():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        measured = t.lite.experimental.QuantizationDebugger(
            quant_debug_model_content=debugger.get_debug_quantized_model(), debug_dataset=dataset, debug_options=options
        )
        measured.run()
    buf = io.StringIO()
    measured.layer_statistics_dump(buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    for r in rows:
        r["noise_to_signal"] = float(r["noise_to_signal"])
    rows = [r for r in rows if np.isfinite(r["noise_to_signal"])]
    return sorted(rows, key=lambda r: -r["noise_to_signal"])


def _denylisted(debugger: Any, names: list[str]) -> bytes:
    """The model with ``names`` (output tensors) kept float, from the debugger's calibration."""
    t = tf()
    with warnings.catch_warnings(), native_output_silenced():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        try:
            debugger.options = t.lite.experimental.QuantizationDebugOptions(denylisted_nodes=names)
        except ValueError:
            # The setter stores the options, then rebuilds its *instrumented* model and
            # raises when nothing quantized is left to instrument; the plain model we need
            # is made from the stored options.
            pass
        return debugger.get_nondebug_quantized_model()


def float_share(content: bytes) -> float:
    """Share of the compute ops (convolutions, fully connected) that run in float."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=content)
    tensors = {d["index"]: d for d in it.get_tensor_details()}
    ops = [op for op in it._get_ops_details() if op["op_name"] in COMPUTE_OPS]
    floats = [op for op in ops if tensors[op["outputs"][0]]["dtype"] == np.float32]
    return round(len(floats) / len(ops), 4) if ops else 0.0


def _latency(content: bytes, runs: int = 20) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=content, num_threads=1)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        it.invoke()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def ladder_for(
    plan: Any,
    q: Any,
    role: str,
    model: Any,
    output: str,
    calibration: Any,
    ptq: bytes,
) -> dict | None:
    """Climb the ladder for one int8 TFLite file of an export (``None`` where it does not
    apply: other precisions, integer I/O, ``float_fallback`` off, no calibration data)."""

    if q.mode != "int8" or q.io_dtype != "float32" or not q.float_fallback or calibration is None:
        return None

    def factory() -> Any:
        conv = tflite_converter(model, replace(q, io_dtype="float32"), calibration, output_name=output)
        conv.target_spec.supported_ops = [tf().lite.OpsSet.TFLITE_BUILTINS]  # float layers allowed
        return conv

    return climb(factory, calibration, ptq, _judge(plan, role, calibration))


def _judge(plan: Any, role: str, calibration: np.ndarray) -> Judge:
    """The selection examples (``plan.data.select``: the validation split and the labelled
    calibration examples, never the data the export reports on, see ``edgetl.host._selection``),
    else the calibration inputs unlabelled, scored against the Keras fp32 model."""
    select = plan.data.select
    if select is not None and len(select[1]):
        xs, y = np.asarray(select[0], np.float32), np.asarray(select[1])
    else:
        xs, y = calibration.astype(np.float32), None
    reference = plan.run.model.predict(xs, verbose=0)
    to_probs: Callable = lambda out: out  # noqa: E731
    if role == "backbone":  # the factory head's view of the embeddings
        W, b = plan.run.model.get_layer("head").layers[-1].get_weights()
        to_probs = lambda e: np.asarray(e, np.float64) @ W + b  # noqa: E731
    return Judge(xs, reference, y, to_probs)
