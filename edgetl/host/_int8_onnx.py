"""int8 ONNX: onnxruntime's static QDQ quantization of the float ONNX graph, per device target,
with a remedy ladder when the result misses its gate.

Why the float ONNX and not the int8 TFLite file: tf2onnx's conversion of the int8 TFLite
keeps NHWC<->NCHW ``Transpose`` nodes, float convolutions and unfused Q/DQ pairs (the
issue 23 profile: 1.22x the fp32 time on a VNNI host). QDQ on the float graph, after
``quant_pre_process``, is what onnxruntime fuses into ``QLinearConv``/``QLinearMatMul``
kernels that stay int8 between layers (``tools/ort_int8_profile.py`` shows what is left).

The ladder, cheapest first; every rung is measured by the same gate and recorded:

    a1  MinMax calibration on the configured samples
    a2  MinMax on more samples (up to 4x, from the training split)
    a3  Percentile calibration (99.999th percentile of |x|), more samples
    a4  Entropy calibration (KL), more samples
    b   selective float fallback: the activation tensors whose quantization costs the
        model's output the most are kept float (``nodes_to_exclude`` for every node that
        touches them), worst first, 1, 2, 4, ... tensors until the gate passes

Every rung is judged by the export's gate (:func:`agreement_gate`: the paired evidence of
``edgetl.device._evidence_gate``), which the export builds on its selection split and the
calibration inputs: the ladder chooses on examples the export does not report on
(``edgetl.host._selection``); verification then judges the file shipped on the reporting data.

    >>> result = quantize_onnx_int8(fp32_onnx, calibration, gate, recipe=RECIPES["x86-vnni"])
    >>> result.record["rung"], result.record["float_share"]
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from edgetl._quiet import native_output_silenced
from edgetl.device._bench import timings
from edgetl.device._evidence_gate import gate_outcome
from edgetl.device._guard import paired
from edgetl.device._runtimes import OnnxModel, run_batched
from edgetl.device._verify import MAX_ACCURACY_DROP, MIN_COSINE, MIN_TOP1_AGREEMENT
from edgetl.errors import InputError, describe

# --------------------------------------------------------------------------- device targets


@dataclass(frozen=True)
class OnnxInt8Recipe:
    """How the int8 ONNX is quantized for one device class (``edgetl export --target``)."""

    target: str
    activations: str  # "uint8" | "int8"
    reduce_range: bool
    why: str
    weights: str = "int8 per-channel (symmetric)"
    format: str = "QDQ"

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "format": self.format,
            "activations": f"{self.activations} per-tensor",
            "weights": self.weights + (", 7-bit range (reduce_range)" if self.reduce_range else ""),
            "reduce_range": self.reduce_range,
            "why": self.why,
        }


# What each class gets and why (onnxruntime's quantize_static guidance, and what was measured
# here: tools/ort_int8_profile.py, issue 23 closing note).
RECIPES = {
    "any": OnnxInt8Recipe(
        "any",
        "uint8",
        True,
        "runs correctly on every CPU: x86 without VNNI (AVX2 vpmaddubsw) saturates u8*s8 pair sums in int16 "
        "unless weights use 7 bits, and an export host with VNNI or ARM cannot see that saturation in its own "
        "gate; costs a little accuracy, no speed (VNNI host, MobileNetV2 224 int8/fp32: 0.577 vs x86-vnni's 0.573)",
    ),
    "x86-avx2": OnnxInt8Recipe(
        "x86-avx2",
        "uint8",
        True,
        "AVX2 without VNNI: 7-bit weights keep MLAS's u8*s8 int16 pair sums (vpmaddubsw) from saturating "
        "(issue 9, AMD EPYC Zen 1: top-1 agreement with fp32 on MobileNetV2 0.71 -> 0.86, same latency)",
    ),
    "x86-vnni": OnnxInt8Recipe(
        "x86-vnni",
        "uint8",
        False,
        "AVX-512 VNNI / AVX-VNNI accumulate u8*s8 products in int32 without saturation: full 8-bit weights; "
        "uint8 activations because int8 (S8S8) ones run slower on x86 (MobileNetV2 224 on a VNNI host: 0.885 of "
        "fp32 against 0.517, tools/ort_int8_profile.py --requantize arm64)",
    ),
    "arm64": OnnxInt8Recipe(
        "arm64",
        "int8",
        False,
        "ARM dot-product kernels do not saturate; symmetric int8 activations are what onnxruntime's ARM kernels "
        "prefer (quantize_static guidance); not measured on ARM here",
    ),
}
CPU_TARGETS = tuple(RECIPES)
DEFAULT_TARGET = "any"


def recipe_for(targets: Sequence[str]) -> OnnxInt8Recipe:
    """The ONNX int8 recipe for the export's targets: at most one CPU class (default ``any``)."""
    cpu = [t for t in targets if t in RECIPES]
    if len(cpu) > 1:
        raise InputError(f"choose one CPU target of {CPU_TARGETS}, received {describe(list(targets))}")
    return RECIPES[cpu[0] if cpu else DEFAULT_TARGET]


# --------------------------------------------------------------------------- the ladder

Gate = Callable[[bytes], dict[str, Any]]  # int8 model bytes -> {"ok": bool, "score": float, ...}
# Percentile kept by rung a3: clips the rare outliers MinMax stretches the range for.
PERCENTILE = 99.999
# Histogram bins the entropy rung searches: 2048 (TensorRT's) took 78 s of pure-Python KL search on
# MobileNetV2-0.35 (64 samples) against 1.4 s for MinMax; 512 bins search 192 windows.
ENTROPY_BINS = 512
MORE_SAMPLES_FACTOR = 4
MORE_SAMPLES_CAP = 1000
# The quality target (issue 23: int8 at most 1 point below fp32; the export measures it on its
# selection split, so the figure it reports is not the one the climb stopped on). The
# gate's tolerance (MAX_ACCURACY_DROP, 2 points) is wider, against broken files: a candidate
# it passes that measures more than this below fp32 climbs on; if none meets it, the first
# candidate the gate passed ships, and the record says the target was missed.
TARGET_ACCURACY_DROP = 0.01
# A backbone has no labels to measure a drop on: its target is the factory head's top-1
# agreement with fp32 reaching the gate's minimum as measured (``min_agreement``), where the gate
# only asks that it be not significantly below. MobileNetV2-0.35's backbone passed its gate on
# the selection data at 0.896, stopped at rung a1, and the test split refused it (50 of 379 top-1
# differ, 37 tolerated), leaving out the fused int8 ONNX with it (-0.56 points on test).
# Rung b ranks at most this many tensors (one re-quantization each: about 1.3 s per tensor on
# MobileNetV2-0.35 at 96x96 on a loaded 2-core host; EfficientNetB0 has about 4x its tensors).
MAX_RANKED_TENSORS = 64
# Rung b stops at this many float tensors: a model that needs more is not an int8 model.
MAX_FLOAT_TENSORS = 8
SENSITIVITY_SAMPLES = 32
# Examples per onnxruntime run when a gate or the sensitivity pass scores a candidate (what it always was).
GATE_BATCH = 64


@dataclass
class Int8OnnxResult:
    """The int8 model the ladder ended with (passing, or the best it found) and its record."""

    content: bytes
    record: dict[str, Any]
    passed: bool


@dataclass
class _Prepared:
    """The float graph after ``quant_pre_process``, in a work directory, with its calibration pools."""

    work: Path
    model_path: Path
    input_name: str
    base: np.ndarray
    more_source: np.ndarray | Callable[[int], np.ndarray] | None
    caches: dict[str, Path] = field(default_factory=dict)
    _more: list[np.ndarray | None] = field(default_factory=list)

    @property
    def more(self) -> np.ndarray | None:
        """The larger calibration pool, made on first use (decoding streamed data costs)."""
        if not self._more:
            want = min(MORE_SAMPLES_CAP, MORE_SAMPLES_FACTOR * len(self.base))
            src = self.more_source(want) if callable(self.more_source) else self.more_source
            src = None if src is None else np.asarray(src[:want], np.float32)
            self._more.append(src if src is not None and len(src) > len(self.base) else None)
        return self._more[0]


def quantize_onnx_int8(
    fp32_onnx: bytes,
    calibration: np.ndarray,
    gate: Gate,
    *,
    recipe: OnnxInt8Recipe = RECIPES[DEFAULT_TARGET],
    more_calibration: np.ndarray | Callable[[int], np.ndarray] | None = None,
    keep_float: Sequence[str] = (),
    ladder: bool = True,
    target_drop: float | None = TARGET_ACCURACY_DROP,
) -> Int8OnnxResult:
    """Quantize ``fp32_onnx`` and climb the ladder until a candidate passes ``gate`` and meets
    the accuracy target.

    Args:
        fp32_onnx: the float model (edgetl's tf2onnx export).
        calibration: the configured calibration inputs (rung a1).
        gate: judges an int8 candidate (see :func:`agreement_gate`).
        recipe: the device class's settings (:data:`RECIPES`).
        more_calibration: a larger pool for rungs a2-a4 (the training split), or a function
            giving that many examples (called only when a1 fails); without it those rungs use
            ``calibration``.
        keep_float: node-name substrings always kept float (the seam standardization).
        ladder: ``False`` stops after rung a1 (one quantization; the gate still judges it).
        target_drop: a candidate the gate passes but whose measured accuracy drop (the gate's
            ``accuracy_drop``, when it has labels) is above this still climbs on; ``None``: the
            gate alone decides.

    Returns:
        The first candidate that passes and meets the target; else the first that passes;
        else the best-scoring one (``passed`` False).
    """
    picked = _Picked(target_drop)
    with tempfile.TemporaryDirectory() as d:
        prep = _prepare(Path(d), fp32_onnx, calibration, more_calibration)
        seam = _nodes_matching(prep.model_path, keep_float)
        finish = lambda *fallback: _finish(prep, fp32_onnx, picked, seam, *fallback)  # noqa: E731
        for rung, method, samples in _calibration_rungs(prep):
            if picked.add(*_attempt(prep, recipe, rung, method, samples, seam, gate)) or not ladder:
                return finish()
        sensitivity: dict[str, Any] = {}
        base_content, base = picked.best_scoring
        for content, attempt in _float_fallback(prep, recipe, base, base_content, seam, gate, sensitivity):
            if picked.add(content, attempt):
                break
        return finish(sensitivity, base_content)


def meets_quality_target(judged: dict[str, Any], target_drop: float) -> bool:
    """The climb's target on a gate's measures: with labels, at most ``target_drop`` below fp32;
    without (a backbone), top-1 agreement at least the gate's ``min_agreement`` as measured."""
    drop = judged.get("accuracy_drop")
    if drop is not None:
        return drop <= target_drop + 1e-9
    return judged.get("top1_agreement", 1.0) >= judged.get("min_agreement", 0.0) - 1e-9


@dataclass
class _Picked:
    """The ladder's candidates so far and which one it ships: the first that passes the gate
    and meets the accuracy target, else the first that passes, else the best score."""

    target_drop: float | None
    tried: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)

    def add(self, content: bytes, attempt: dict[str, Any]) -> bool:
        """Record a candidate; ``True`` when it passes and meets the target (climb no further)."""
        within = self.target_drop is None or meets_quality_target(attempt["gate"], self.target_drop)
        attempt["meets_target"] = bool(attempt["gate"]["ok"] and within)
        self.tried.append((content, attempt))
        return attempt["meets_target"]

    @property
    def best_scoring(self) -> tuple[bytes, dict[str, Any]]:
        return max(self.tried, key=lambda t: t[1]["gate"]["score"])

    @property
    def choice(self) -> tuple[bytes, dict[str, Any]]:
        passing = [t for t in self.tried if t[1]["gate"]["ok"]]
        meeting = [t for t in passing if t[1]["meets_target"]]
        return (meeting or passing or [self.best_scoring])[0]


def _prepare(work: Path, fp32_onnx: bytes, base: np.ndarray, more: Any) -> _Prepared:
    """``quant_pre_process``: onnxruntime's recommended step (shape inference, constant folding,
    MatMul+Add -> Gemm). Symbolic shape inference is skipped: it needs sympy, and edgetl's
    graphs have static shapes apart from the batch."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre = work / "fp32.onnx", work / "pre.onnx"
    src.write_bytes(fp32_onnx)
    with native_output_silenced():
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    return _Prepared(work, pre, name, base.astype(np.float32), more)


def _calibration_rungs(prep: _Prepared) -> Iterator[tuple[str, str, np.ndarray]]:
    """Rungs a1-a4, lazily: the larger pool is made only when a1 failed."""
    yield "a1-minmax", "MinMax", prep.base
    more = prep.more if prep.more is not None else prep.base
    if prep.more is not None:
        yield "a2-minmax-more-samples", "MinMax", more
    yield "a3-percentile", "Percentile", more
    yield "a4-entropy", "Entropy", more[: entropy_sample_count(prep.model_path, len(more))]


# The entropy rung collects in one pass (see _entropy_ranges), holding every input's activations:
# it gets as many inputs as fit this budget, never fewer than ENTROPY_MIN_SAMPLES. Measured with
# activation_bytes (python tools/activation_bytes.py, weights=None): MobileNetV2-0.35 at 96x96 4.4 MB per input
# (all 800 fit: 3.5 GB), EfficientNetB0 at 128x128 29.2 MB (147 fit; its 800 would hold 23 GB,
# and the export was killed at 22 GB before the rungs were capped).
ENTROPY_MEMORY_BUDGET = 4 << 30
ENTROPY_MIN_SAMPLES = 32


def activation_bytes(model_path: Path) -> int:
    """Bytes of one input's float node outputs (batch 1), from the shapes ``quant_pre_process``
    inferred: what a histogram calibrator holds per input."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    total = 0
    for info in [*graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if tensor.elem_type != onnx.TensorProto.FLOAT:
            continue
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in tensor.shape.dim]  # unknown (the batch): 1
        total += 4 * int(np.prod(dims))
    return total


def entropy_sample_count(model_path: Path, available: int) -> int:
    """How many of ``available`` calibration inputs the entropy rung uses (:data:`ENTROPY_MEMORY_BUDGET`)."""
    fit = ENTROPY_MEMORY_BUDGET // max(activation_bytes(model_path), 1)
    return int(min(available, max(ENTROPY_MIN_SAMPLES, fit)))


# The calibrator sees at most this many inputs per pass. onnxruntime's histogram calibrators
# (Percentile, Entropy) keep every intermediate tensor of every input of a pass until it ends:
# with rung a3's 800 inputs, EfficientNetB0 at 128x128 grew to 22 GB and the export was killed
# by the kernel (out of memory). Passes of a few inputs merge their histograms (min/max ranges
# for MinMax) as one pass would, in memory that does not grow with the number of inputs.
CALIBRATION_CHUNK = 16


def calibration_stride(n: int) -> int:
    """The largest number of inputs per calibrator pass, at most :data:`CALIBRATION_CHUNK`, that
    divides ``n`` (onnxruntime's ``CalibStridedMinMax`` requires a divisor)."""
    return max(d for d in range(1, min(n, CALIBRATION_CHUNK) + 1) if n % d == 0)


def _quantize(
    prep: _Prepared, recipe: OnnxInt8Recipe, method: str, samples: np.ndarray, exclude: Sequence[str]
) -> bytes:
    """One ``quantize_static`` run (QDQ); calibration ranges are cached per (method, samples)
    so the float-fallback rungs do not calibrate again."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # in passes of calibration_stride(n) inputs (set_range)
        def __init__(self) -> None:
            self._items = iter(range(len(samples)))

        def __len__(self) -> int:
            return len(samples)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._items = iter(range(start_index, min(end_index, len(samples))))

        def get_next(self) -> dict | None:
            i = next(self._items, None)
            return None if i is None else {prep.input_name: samples[i : i + 1]}

    cache = prep.caches.setdefault(f"{method}-{len(samples)}", prep.work / f"calib-{method}-{len(samples)}.json")
    out = prep.work / "int8.onnx"
    extra: dict[str, Any] = {"CalibPercentile": PERCENTILE} if method == "Percentile" else {}
    extra["CalibStridedMinMax"] = calibration_stride(len(samples))  # any method, despite the name
    # onnxruntime's calibrators print progress with print(): silenced with the native output.
    with native_output_silenced(), contextlib.redirect_stdout(io.StringIO()):
        if method == "Entropy" and not cache.exists():
            _entropy_ranges(prep.model_path, Reader(), cache, prep.work)
        quantize_static(
            str(prep.model_path),
            str(out),
            None if cache.exists() else Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8 if recipe.activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method),
            nodes_to_exclude=list(exclude),
            reduce_range=recipe.reduce_range,
            extra_options=extra,
            calibration_cache_path=str(cache),
        )
    return out.read_bytes()


def _entropy_ranges(model_path: Path, reader: Any, cache: Path, work: Path) -> None:
    """Entropy (KL) ranges written to ``cache`` for ``quantize_static`` to read.

    Why not ``quantize_static(calibrate_method=Entropy)``: it cannot pass the histogram's bin
    counts, and with onnxruntime's defaults (128 bins, 128 quantized bins) the KL search has a
    single candidate, the whole range, so "entropy" was MinMax (byte-identical models on
    MobileNetV2-0.35: the a2 and a4 rungs measured the same). Instead, TensorRT's method:
    :data:`ENTROPY_BINS` bins searched for the 128-bin window that loses the least.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calibrator = create_calibrator(
        model_path,
        sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),  # what quantize_static calibrates by default
        augmented_model_path=str(work / "entropy-augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128},
    )
    # One pass (all inputs' activations held at once, unlike the strided quantize_static rungs):
    # collecting in passes of 16 made the outlier test minutes slower (each pass merges and
    # re-bins every histogram). The rung's inputs are capped instead (entropy_sample_count).
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)


def _attempt(
    prep: _Prepared,
    recipe: OnnxInt8Recipe,
    rung: str,
    method: str,
    samples: np.ndarray,
    exclude: Sequence[str],
    gate: Gate,
    **extra: Any,
) -> tuple[bytes, dict[str, Any]]:
    t0 = time.perf_counter()
    content = _quantize(prep, recipe, method, samples, exclude)
    judged = gate(content)
    attempt = {
        "rung": rung,
        "calibration": method,
        "calibration_samples": int(len(samples)),
        "gate": judged,
        "seconds": round(time.perf_counter() - t0, 2),
        **extra,
    }
    return content, attempt


def _float_fallback(
    prep: _Prepared,
    recipe: OnnxInt8Recipe,
    base: dict[str, Any],
    base_content: bytes,
    seam: Sequence[str],
    gate: Gate,
    info: dict[str, Any],
) -> Any:
    """Rung b: keep float the tensors whose quantization costs the model's output most, 1, 2,
    4, ... of them, on the best calibration so far (:func:`output_sensitivity` ranks them).

    Only tensors whose float fallback lowers the output error are candidates; when none does,
    the ladder says so (``info``) instead of trying.
    """
    t0 = time.perf_counter()
    samples = prep.more if base["calibration_samples"] > len(prep.base) and prep.more is not None else prep.base
    x = prep.base[:SENSITIVITY_SAMPLES]
    quantize = lambda exclude: _quantize(prep, recipe, base["calibration"], samples, [*seam, *exclude])  # noqa: E731
    all_int8_error, ranked = output_sensitivity(prep.model_path, base_content, x, quantize)
    candidates = [t for t in ranked if t["output_error"] < all_int8_error]
    info.update(
        seconds=round(time.perf_counter() - t0, 2),
        tensors_ranked=len(ranked),
        max_ranked=MAX_RANKED_TENSORS,
        output_error_all_int8=all_int8_error,
        worst=[{k: t[k] for k in ("tensor", "damage", "output_error")} for t in ranked[:3]],
        candidates=len(candidates),
    )
    most = min(MAX_FLOAT_TENSORS, len(candidates))
    for count in sorted({min(2**i, most) for i in range(most.bit_length() + 1)} - {0}):
        worst = candidates[:count]
        nodes = sorted({n for t in worst for n in t["nodes"]})
        yield _attempt(
            prep,
            recipe,
            "b-float-fallback",
            base["calibration"],
            samples,
            [*seam, *nodes],
            gate,
            float_tensors=[{k: t[k] for k in ("tensor", "damage", "output_error")} for t in worst],
            float_nodes=nodes,
        )


def output_sensitivity(
    float_path: Path, int8: bytes, x: np.ndarray, quantize: Callable[[Sequence[str]], bytes]
) -> tuple[float, list[dict[str, Any]]]:
    """The output error of ``int8`` and every quantized activation tensor ranked by the output
    error left when that tensor alone stays float (``quantize(nodes)`` re-quantizes with those
    nodes float, calibration from the cache), best fallback first.

    Why the output and not the tensor's own error (:func:`tensor_sensitivity`, recorded as
    ``damage``): a tensor's error matters by what the layers after it make of it. On a
    pretrained MobileNetV2-0.35 at 96x96 every tensor's own error was within 2.3x of the
    median (no outlier, so an outlier rule kept nothing float), while keeping the input
    scaling and the first convolution float removed the most output error
    (tools/int8_onnx_probe.py, where the three early tensors kept float were ranked at or below
    the median by their own error). Costs one quantization and one run on ``x`` per tensor, so
    at most :data:`MAX_RANKED_TENSORS` are ranked, the first in the graph: an error made early
    passes through every later layer (and the MobileNetV2-0.35 winners were all early).
    """
    ref = run_batched(OnnxModel(float_path.read_bytes()), x, GATE_BATCH)
    error = lambda content: round(_relative_error(run_batched(OnnxModel(content), x, GATE_BATCH), ref), 6)  # noqa: E731
    local = sorted(tensor_sensitivity(float_path, int8, x), key=lambda t: t["depth"])[:MAX_RANKED_TENSORS]
    ranked = [{**t, "output_error": error(quantize(t["nodes"]))} for t in local]
    return error(int8), sorted(ranked, key=lambda t: t["output_error"])


def _relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum((out - ref) ** 2) / max(float(np.sum(ref**2)), 1e-30))


def _finish(
    prep: _Prepared,
    fp32_onnx: bytes,
    picked: _Picked,
    seam: Sequence[str],
    sensitivity: dict[str, Any] | None = None,
    all_int8: bytes | None = None,
) -> Int8OnnxResult:
    """The manifest's record: the rung shipped (or the best one), every rung tried, how much
    of the model stayed float, and what that float part costs in speed and size."""
    content, attempt = picked.choice
    passed = bool(attempt["gate"]["ok"])
    tried = [t for _, t in picked.tried]
    census = op_census(content)
    macs = _macs(prep.model_path)
    float_nodes = set(attempt.get("float_nodes", []))
    total = sum(macs.values()) or 1
    record: dict[str, Any] = {
        "rung": attempt["rung"],
        "passed": passed,
        "meets_target": attempt["meets_target"],
        "target_accuracy_drop": picked.target_drop,
        "calibration": attempt["calibration"],
        "calibration_samples": attempt["calibration_samples"],
        "gate": attempt["gate"],
        "seam_kept_float": list(seam),
        "float_nodes": sorted(float_nodes),
        "float_tensors": attempt.get("float_tensors", []),
        "float_share_macs": round(sum(m for n, m in macs.items() if n in float_nodes) / total, 4),
        "ops": census,
        "tried": [{k: v for k, v in t.items() if k not in ("float_nodes",)} for t in tried],
        "size_bytes": {"fp32": len(fp32_onnx), "int8": len(content)},
    }
    if sensitivity:
        record["sensitivity"] = sensitivity
    if float_nodes and all_int8 is not None:
        x = prep.base[:1]
        record["size_bytes"]["all_int8"] = len(all_int8)
        record["latency_ms"] = {
            k: _latency_ms(v, x) for k, v in (("fp32", fp32_onnx), ("int8", content), ("all_int8", all_int8))
        }
    return Int8OnnxResult(content, record, passed)


def op_census(int8: bytes) -> dict[str, dict[str, int]]:
    """Conv/MatMul/Gemm nodes of a QDQ model, quantized (weights from a DequantizeLinear) or float."""
    import onnx

    graph = onnx.load_from_string(int8).graph
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    out: dict[str, dict[str, int]] = {"quantized": {}, "float": {}}
    for n in graph.node:
        if n.op_type in ("Conv", "MatMul", "Gemm"):
            kind = "quantized" if len(n.input) > 1 and n.input[1] in dq_outputs else "float"
            out[kind][n.op_type] = out[kind].get(n.op_type, 0) + 1
    return out


def _macs(path: Path) -> dict[str, int]:
    """Multiply-accumulates per Conv/MatMul/Gemm node (batch 1), from the inferred shapes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    weights = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    shapes = {
        v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
        for v in (*model.graph.value_info, *model.graph.output)
    }
    out = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2 or n.input[1] not in weights:
            continue
        w, y = weights[n.input[1]], shapes.get(n.output[0])
        per_output = int(np.prod(w[1:])) if n.op_type == "Conv" else int(w[0])
        transposed = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
        if n.op_type == "Gemm" and transposed:
            per_output = int(w[1])
        out[n.name] = per_output * (int(np.prod(y[1:])) if y else int(np.prod(w)) // max(per_output, 1))
    return out


def _latency_ms(content: bytes, x: np.ndarray, runs: int = 20) -> float:
    """Median batch-1 latency on one thread (what the record's speed cost compares)."""

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        path.write_bytes(content)
        model = OnnxModel(path, threads=1)
        return round(float(np.median(timings(lambda: model(x), 3, runs))) * 1e3, 4)


# --------------------------------------------------------------------------- gates


def agreement_gate(
    fp32_onnx: bytes,
    x: np.ndarray,
    *,
    y: np.ndarray | None = None,
    inputs: np.ndarray | None = None,
    head: tuple[np.ndarray, np.ndarray] | None = None,
    min_agreement: float | None = None,
    max_accuracy_drop: float | None = None,
    min_cosine: float | None = None,
) -> Gate:
    """The gate the export ships an int8 file on (``edgetl.device._evidence_gate``), against
    the fp32 ONNX model on ``x`` (labelled by ``y``, if given) and the unlabelled ``inputs``.

    Paired tests, as the device guard's: fidelity (top-1 disagreements with fp32 beyond
    ``1 - min_agreement`` tolerated) on every example, and with labels the accuracy test
    (examples lost against gained beyond ``max_accuracy_drop``). Backbones (``head`` = the
    factory head's ``(W, b)``) are judged by that head's top-1, and their embeddings' mean
    cosine must reach ``min_cosine``. ``ok`` is the outcome ``pass``: ``thin`` evidence is not
    (the export leaves such a file out). Limits default to ``edgetl.device._verify``'s.
    ``score`` orders failing candidates (agreement, less any excess accuracy drop).
    """

    min_agreement = MIN_TOP1_AGREEMENT["int8"] if min_agreement is None else min_agreement
    max_drop = MAX_ACCURACY_DROP["int8"] if max_accuracy_drop is None else max_accuracy_drop
    min_cos = MIN_COSINE["int8"] if min_cosine is None and head is not None else min_cosine
    xs = np.concatenate([np.asarray(a, np.float32) for a in (x, inputs) if a is not None and len(a)])
    labelled = len(x) if y is not None and head is None else 0
    ref = run_batched(OnnxModel(fp32_onnx), xs, GATE_BATCH)
    classes = (lambda e: (e @ head[0] + head[1]).argmax(1)) if head is not None else (lambda p: p.argmax(1))
    ref_top = classes(ref)

    def gate(int8: bytes) -> dict[str, Any]:
        out = run_batched(OnnxModel(int8), xs, GATE_BATCH)
        top = classes(out)
        agree = top == ref_top
        tests = [(paired("fidelity", np.ones(len(xs), bool), agree, 1 - min_agreement), 1 - min_agreement)]
        measures: dict[str, Any] = {"examples": len(xs), "top1_agreement": float(agree.mean())}
        measures["min_agreement"], score = min_agreement, float(agree.mean())
        if labelled:
            right_fp32, right_int8 = ref_top[:labelled] == y, top[:labelled] == y
            drop = float(right_fp32.mean() - right_int8.mean())
            tests.append((paired("accuracy", right_fp32, right_int8, max_drop), max_drop))
            measures.update(labelled=labelled, accuracy_drop=drop, max_accuracy_drop=max_drop)
            score -= max(0.0, drop - max_drop)
        outcome, words = gate_outcome(tests)
        ok = outcome == "pass"
        if min_cos is not None:
            norms = np.maximum(np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
            cosine = float(np.mean(np.sum(out * ref, axis=1) / norms))
            measures.update(cosine=cosine, min_cosine=min_cos)
            ok, score = ok and cosine >= min_cos, score - max(0.0, min_cos - cosine)
        return {"ok": bool(ok), "score": round(score, 6), "outcome": outcome, "evidence": words, **measures}

    return gate


# --------------------------------------------------------------------------- sensitivity

# Elementwise activations the QDQ quantizer folds into the op before them: a tensor they
# produce is quantized on behalf of that op too, so keeping it float excludes both.
_FOLDED_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh"}


def tensor_sensitivity(float_path: Path, int8: bytes, x: np.ndarray) -> list[dict[str, Any]]:
    """Activation tensors ranked by what int8 does to them, worst first.

    Cheaper than excluding one node at a time (one quantization and one gate run per node):
    the float model runs once with every quantized activation tensor as an output, and each
    tensor is fake-quantized with the scale and zero point the int8 model chose for it.
    ``damage`` is the median over channels of ||q(x_c) - x_c|| / ||x_c||: it is near 1 when
    the tensor's range is so wide that most channels fall inside one quantization step
    (a huge activation range in one layer), and a few percent for a healthy tensor.
    ``nodes`` are the nodes to keep float for that tensor to stay float: its producer
    (through a folded activation) and its consumers.
    """
    import onnx
    import onnxruntime as ort

    qmodel = onnx.load_from_string(int8)
    params = _activation_qparams(qmodel)
    model = onnx.load(str(float_path))
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    names = [t for t in params if t in producer]
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names if t not in known)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    values = dict(zip(names, session.run(names, {session.get_inputs()[0].name: x.astype(np.float32)})))
    ranked = []
    for t in names:
        scale, zero, lo, hi = params[t]
        v = values[t]
        q = (np.clip(np.round(v / scale) + zero, lo, hi) - zero) * scale
        ranked.append(
            {
                "tensor": t,
                "damage": round(_channel_damage(v, q), 4),
                "nodes": _touching(t, producer, consumers),
                "depth": len(ranked),  # position in the graph (its nodes are topologically sorted)
            }
        )
    return sorted(ranked, key=lambda r: -r["damage"])


def _channel_damage(v: np.ndarray, q: np.ndarray) -> float:
    axis = 1 if v.ndim == 4 else v.ndim - 1  # NCHW after tf2onnx's input transpose; features last otherwise
    move = lambda a: np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)  # noqa: E731
    v_c, err_c = move(v), move(q - v)
    norms = np.linalg.norm(v_c, axis=1)
    live = norms > 1e-12 * max(float(norms.max(initial=0.0)), 1e-30)
    if not live.any():
        return 0.0
    return float(np.median(np.linalg.norm(err_c[live], axis=1) / norms[live]))


def _touching(tensor: str, producer: dict[str, Any], consumers: dict[str, list[Any]]) -> list[str]:
    """Every node that would quantize ``tensor``: its producer and consumers, walking through
    folded activations both ways (a Conv -> Relu pair shares one quantized tensor)."""
    nodes, node = set(), producer.get(tensor)
    while node is not None:
        nodes.add(node.name)
        if node.op_type not in _FOLDED_ACTIVATIONS or not node.input:
            break
        node = producer.get(node.input[0])
    todo = list(consumers.get(tensor, []))
    while todo:
        node = todo.pop()
        if node.name not in nodes:
            nodes.add(node.name)
            if node.op_type in _FOLDED_ACTIVATIONS:
                todo += consumers.get(node.output[0], [])
    return sorted(nodes)


def _activation_qparams(model: Any) -> dict[str, tuple[float, int, int, int]]:
    """Per-tensor (scale, zero point, qmin, qmax) of every QuantizeLinear on an activation."""
    from onnx import numpy_helper

    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in init or len(n.input) < 3:
            continue
        scale, zero = init.get(n.input[1]), init.get(n.input[2])
        if scale is None or zero is None or scale.size != 1:
            continue
        info = np.iinfo(zero.dtype)
        out[n.input[0]] = (float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]), int(info.min), int(info.max))
    return out


def _nodes_matching(path: Path, parts: Sequence[str]) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if any(p in n.name for p in parts)]
