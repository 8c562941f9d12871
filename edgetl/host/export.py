"""Quantize and export a trained run to a verified bundle (TFLite + ONNX).

For each precision the bundle gets the **fused** model (raw input -> probabilities) and the
**backbone** (raw input -> embedding, the seam where the trainable head starts). The head is
exported as ``head_init.npz`` (host-trained weights padded to ``max_classes`` with an
active-class mask), as ``head.tflite`` with ``infer``/``train``/``get_weights``/
``set_weights`` signatures for LiteRT, and as ONNX inference and train-step graphs (SGD
with momentum and Adam) that run on plain onnxruntime.

    >>> bundle = export_bundle("runs/digits", "digits.edgetl", quantize=["none", "int8"], calibration=data)
    >>> # on the device, without TensorFlow:
    >>> import onnxruntime as ort
    >>> ort.InferenceSession("digits.edgetl/model.int8.onnx").run(None, {...})
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from edgetl import __version__
from edgetl.bundle import Bundle, write_bundle
from edgetl.bundle.io import update_manifest
from edgetl.errors import BundleError, InputError, describe
from edgetl.host._tf import keras, tf
from edgetl.host.data import Dataset, stratified_split

FORMATS = ("tflite", "onnx")
REPLAY_PER_CLASS = 20


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize; each preset string equals ``QuantizeConfig(mode=preset)``.

    ``"none"`` (fp32), ``"dynamic"`` (int8 weights, float activations), ``"float16"`` (fp16
    weights), ``"int8"`` (full-integer weights and activations, calibrated on
    ``calibration_samples`` training examples), ``"qat"`` (quantization-aware training with
    tfmot for ``qat_epochs`` at ``qat_learning_rate`` on the calibration data's train split,
    then full-integer conversion). ``io_dtype`` chooses the input/output type of the int8
    and QAT TFLite models: ``"float32"`` (default; the model quantizes internally) or
    ``"int8"``/``"uint8"`` (fully integer models for integer-only accelerators; the
    manifest records the scale and zero point, and ``edgetl.device`` applies them). ONNX
    artifacts keep float32 inputs and outputs.
    """

    mode: Literal["none", "dynamic", "float16", "int8", "qat"] = "none"
    calibration_samples: int = 200
    qat_epochs: int = 2
    qat_learning_rate: float = 1e-4
    io_dtype: Literal["float32", "int8", "uint8"] = "float32"

    def __post_init__(self) -> None:
        if self.mode not in PRECISION_OF:
            raise InputError(f"quantize mode must be one of {tuple(PRECISION_OF)}, received {self.mode!r}")
        for name in ("calibration_samples", "qat_epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name} must be a positive integer, received {describe(v)}")
        if self.io_dtype not in ("float32", "int8", "uint8"):
            raise InputError(f"io_dtype must be float32, int8 or uint8, received {self.io_dtype!r}")
        if self.io_dtype != "float32" and self.mode not in ("int8", "qat"):
            raise InputError(f"integer io_dtype={self.io_dtype!r} needs mode 'int8' or 'qat', received mode={self.mode!r}")
        if not 0 < self.qat_learning_rate < 1:
            raise InputError(f"qat_learning_rate must be in (0, 1), received {self.qat_learning_rate}")

    @property
    def precision(self) -> str:
        return PRECISION_OF[self.mode]

    def describe(self) -> dict[str, Any]:
        """What the manifest records about how an artifact was quantized."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode in ("int8", "qat"):
            out.update(calibration_samples=self.calibration_samples, io_dtype=self.io_dtype, weights="int8 per-channel", activations="int8 per-tensor")
        if self.mode == "qat":
            out.update(qat_epochs=self.qat_epochs, qat_learning_rate=self.qat_learning_rate)
        if self.mode == "dynamic":
            out.update(weights="int8", activations="float32")
        if self.mode == "float16":
            out.update(weights="float16", activations="float32")
        return out

    @classmethod
    def preset(cls, value: "str | QuantizeConfig") -> "QuantizeConfig":
        return value if isinstance(value, QuantizeConfig) else cls(mode=value)  # type: ignore[arg-type]


PRECISION_OF = {"none": "fp32", "dynamic": "dynamic", "float16": "float16", "int8": "int8", "qat": "qat"}


def _servable(model: Any, output_name: str) -> tuple[Any, Any]:
    """A plain ``tf.Module`` holding the model's variables and one serving function.

    Why not ``TFLiteConverter.from_keras_model``: it first saves a Keras SavedModel, and
    tf_keras's SavedModel serialization traces every layer's call functions for Keras
    metadata the converter never reads (cProfile: ~75% of a 14 s MobileNetV2-0.35
    conversion). Converting this module's concrete function gives the same flatbuffer
    outputs (max diff 1.7e-16) in ~3 s.
    """
    t = tf()
    module = t.Module()
    module.model_variables = list(model.variables)
    spec = t.TensorSpec((None, *model.input_shape[1:]), t.float32, name="input")
    module.serve = t.function(lambda x: {output_name: model(x, training=False)}, input_signature=[spec])
    return module, module.serve.get_concrete_function()


def to_tflite(model: Any, q: QuantizeConfig, calibration: np.ndarray | None = None, *, output_name: str = "output") -> bytes:
    """Convert a Keras model with ``tf.lite.TFLiteConverter`` (signature ``serving_default``)."""
    t = tf()
    module, fn = _servable(model, output_name)
    conv = t.lite.TFLiteConverter.from_concrete_functions([fn], module)
    if q.mode == "dynamic":
        conv.optimizations = [t.lite.Optimize.DEFAULT]
    elif q.mode == "float16":
        conv.optimizations = [t.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [t.float16]
    elif q.mode in ("int8", "qat"):
        if calibration is None or not len(calibration):
            raise InputError(f"{q.mode} quantization needs calibration data (--calibration D)")
        samples = calibration.astype(np.float32)

        def representative() -> Any:
            for i in range(len(samples)):
                yield [samples[i : i + 1]]

        conv.optimizations = [t.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io = {"float32": t.float32, "int8": t.int8, "uint8": t.uint8}[q.io_dtype]
        conv.inference_input_type = io
        conv.inference_output_type = io
    with warnings.catch_warnings():
        # TensorFlow's own int8 calibrator runs the deprecated tf.lite.Interpreter internally;
        # edgetl itself runs models only with ai_edge_litert. Not actionable for users.
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        warnings.filterwarnings("ignore", message=".*Statistics for quantized inputs were expected.*")
        return conv.convert()


def keras_to_onnx(model: Any, opset: int) -> bytes:
    import tf2onnx

    t = tf()
    spec = [t.TensorSpec((None, *model.input_shape[1:]), t.float32, name="input")]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    return proto.SerializeToString()


def tflite_to_onnx(tflite: bytes, opset: int) -> bytes:
    """Quantized ONNX converted from the quantized TFLite (the same int8 graph in both formats)."""
    import tf2onnx

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.tflite")
        Path(path).write_bytes(tflite)
        with warnings.catch_warnings():
            # tf2onnx reads the .tflite with TensorFlow's deprecated tf.lite.Interpreter;
            # not something edgetl users run or can change.
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
            proto, _ = tf2onnx.convert.from_tflite(path, opset=opset)
    return proto.SerializeToString()


def onnx_static_qdq(fp32_onnx: bytes, calibration: np.ndarray) -> bytes:
    """onnxruntime's own static quantization (QDQ) of the fp32 ONNX with the same samples.

    Settings follow onnxruntime's CPU guidance (``quantize_static`` docstring): QUInt8
    activations, QInt8 weights, no reduce_range on VNNI CPUs; per-channel weights like
    TFLite's int8. The graph is first run through ``quant_pre_process`` (onnxruntime's
    recommended step; symbolic shape inference skipped, it needs sympy): measured on
    MobileNetV2-0.35, 0.389 -> 0.325 ms per inference.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self._items = iter([{name: calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self) -> dict | None:
            return next(self._items, None)

    import onnx

    model = onnx.load_from_string(fp32_onnx)
    with tempfile.TemporaryDirectory() as d:
        src, pre, dst = (os.path.join(d, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        Path(src).write_bytes(fp32_onnx)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(pre, dst, Reader(model.graph.input[0].name), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return Path(dst).read_bytes()


def choose_int8_onnx(candidates: dict[str, bytes], x: np.ndarray | None, y: np.ndarray | None, sample: np.ndarray) -> tuple[str, dict[str, dict[str, float]]]:
    """Pick the int8 ONNX candidate by measured accuracy, then by measured speed.

    Why measure instead of fixing one: it depends on the model. On MobileNetV2-0.35
    (``python tools/measure_export.py``), ORT's QDQ was 1.1 points more accurate than
    tf2onnx-from-TFLite, and tf2onnx's graph ran 3x slower in onnxruntime: it keeps 109
    DequantizeLinear, 46 QuantizeLinear and 31 Transpose nodes and 25 float convolutions,
    where QDQ turns all 52 convolutions into QLinearConv (0.97 vs 0.33 ms, fp32 0.40 ms).
    On the demo's digits CNN the two tie on accuracy. Candidates within half a point of
    the best accuracy (or all, without held-out data) compete on batch-1 latency.
    """
    from edgetl.device.runtimes import OnnxModel

    stats: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        for name, content in candidates.items():
            path = Path(d) / f"{name}.onnx"
            path.write_bytes(content)
            model = OnnxModel(path, threads=1)
            one = sample[:1].astype(np.float32)
            for _ in range(3):
                model(one)
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                model(one)
                times.append(time.perf_counter() - t0)
            stats[name] = {"latency_ms": float(np.median(times) * 1e3)}
            if x is not None and y is not None and len(y):
                stats[name]["accuracy"] = float(np.mean(model(x.astype(np.float32)).argmax(1) == y))
    best_acc = max((s.get("accuracy", 0.0) for s in stats.values()), default=0.0)
    contenders = [n for n, s in stats.items() if s.get("accuracy", best_acc) >= best_acc - 0.005]
    return min(contenders, key=lambda n: stats[n]["latency_ms"]), stats


def _check_matches(data: Dataset, shape: tuple[int, ...], class_names: Sequence[str], what: str) -> None:
    if data.input_shape != shape:
        raise InputError(f"{what} data has input shape {data.input_shape}, the model takes {shape}")
    if tuple(data.class_names) != tuple(class_names):
        raise InputError(f"{what} data classes {list(data.class_names)} differ from the run's {list(class_names)}")


def split_model(model: Any) -> tuple[Any, Any]:
    """(raw input -> embedding at the seam, the trainable classifier Dense layer).

    The seam is the classifier's input: a hidden head layer, if any, goes with the backbone,
    so the device trains exactly one linear layer.
    """
    k = keras()
    names = {layer.name for layer in model.layers}
    if "head" not in names or not names & {"features", "backbone"}:
        raise InputError(f"model {model.name!r} is not an edgetl transfer or pretrain model (needs layers 'features' or 'backbone', and 'head'); its layers are {sorted(names)}")
    # `edgetl train` models call it "features" (backbone + fusion); `edgetl pretrain` "backbone".
    features = model.get_layer("features" if "features" in names else "backbone")
    head = model.get_layer("head")
    x = features(model.input)
    for layer in head.layers[1:-1]:
        x = layer(x)
    classifier = head.layers[-1]
    if not isinstance(classifier, k.layers.Dense):
        raise InputError(f"the head must end in a Dense classifier, found {classifier.__class__.__name__}")
    return k.Model(model.input, x, name="backbone_export"), classifier


def _io(content: bytes, fmt: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input/output names and shapes of an artifact, read back from the file itself."""
    if fmt == "onnx":
        import onnx

        m = onnx.load_from_string(content)
        init = {i.name for i in m.graph.initializer}

        def desc(v: Any) -> dict[str, Any]:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            return {"name": v.name, "shape": dims}

        return [desc(v) for v in m.graph.input if v.name not in init], [desc(v) for v in m.graph.output]
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=content)

    def desc_t(d: dict[str, Any]) -> dict[str, Any]:
        q = d.get("quantization_parameters", {})
        out = {"name": d["name"], "shape": [None] + [int(v) for v in d["shape"][1:]], "dtype": np.dtype(d["dtype"]).name}
        if len(q.get("scales", [])):
            out["quantization"] = {"scale": [float(s) for s in q["scales"]], "zero_point": [int(z) for z in q["zero_points"]]}
        return out

    return [desc_t(d) for d in it.get_input_details()], [desc_t(d) for d in it.get_output_details()]


def export_bundle(
    run: str | os.PathLike[str] | Any,
    out: str | os.PathLike[str],
    *,
    quantize: Sequence[str | QuantizeConfig] = ("none",),
    formats: Sequence[str] = FORMATS,
    calibration: Dataset | None = None,
    evaluation: Dataset | None = None,
    opset: int = 17,
    max_classes: int | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> tuple[Bundle, dict[str, Any]]:
    """Export ``run`` (a run directory or :class:`edgetl.host.run.Run`) to a verified bundle.

    Args:
        quantize: one or more presets/configs; fp32 is always included as the reference.
        formats: subset of ``("tflite", "onnx")``.
        calibration: labelled data like the training data; its train split (by the run's
            seed and fractions) calibrates int8 and fine-tunes QAT, its test split measures
            accuracy unless ``evaluation`` is given.
        evaluation: labelled held-out data to measure every artifact's accuracy on.
        opset: ONNX opset (>= 13).
        max_classes: head capacity for classes added on the device (default: 2x labels).

    Returns:
        The written :class:`Bundle` and the verification report (also in the manifest).

    Raises:
        InputError: bad options or data; BundleError: ``out`` exists (without overwrite).
    """
    from edgetl.device.verify import verify_bundle
    from edgetl.host.head_graphs import head_infer_onnx, head_tflite, head_train_onnx
    from edgetl.host.run import Run, load_run

    started = time.perf_counter()
    r: Run = run if isinstance(run, Run) else load_run(run)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError(f"formats must be a non-empty subset of {FORMATS}, received {list(formats)}")
    if not 13 <= opset <= 21:
        raise InputError(f"opset must be in 13..21, received {opset}")
    configs = [QuantizeConfig.preset(q) for q in quantize]
    if not any(c.mode == "none" for c in configs):
        configs.insert(0, QuantizeConfig("none"))
    n_labels = len(r.class_names)
    cap = max_classes or 2 * n_labels
    if cap < n_labels:
        raise InputError(f"max_classes must be at least the {n_labels} trained classes, received {cap}")
    if Path(out).exists() and not overwrite:
        raise BundleError(f"output {str(out)!r} already exists; choose another --out or pass --overwrite")

    shape = tuple(r.input_spec["shape"])
    calib_x = test_x = test_y = None
    train_xy: tuple[np.ndarray, np.ndarray] | None = None
    if calibration is not None:
        _check_matches(calibration, shape, r.class_names, "calibration")
        splits = stratified_split(calibration, val_fraction=r.config.val_fraction, test_fraction=r.config.test_fraction, seed=r.config.seed)
        rng = np.random.default_rng(0)
        n_cal = max(c.calibration_samples for c in configs)
        calib_x = splits.train.x[rng.permutation(len(splits.train))[:n_cal]].astype(np.float32)
        train_xy = (splits.train.x, splits.train.y)
        test_x, test_y = (splits.test.x, splits.test.y) if len(splits.test) else (splits.val.x, splits.val.y)
    elif any(c.mode in ("int8", "qat") for c in configs):
        raise InputError("int8 and qat quantization need labelled calibration data: pass calibration=Dataset (--calibration D)")
    if evaluation is not None:
        _check_matches(evaluation, shape, r.class_names, "evaluation")
        test_x, test_y = evaluation.x, evaluation.y

    backbone, classifier = split_model(r.model)
    W, b = (w.astype(np.float32) for w in classifier.get_weights())
    emb_size = W.shape[0]
    Wp = np.zeros((emb_size, cap), np.float32)
    Wp[:, :n_labels] = W
    bp = np.zeros(cap, np.float32)
    bp[:n_labels] = b
    mask = np.zeros(cap, np.float32)
    mask[:n_labels] = 1.0

    # Parity inputs: held-out examples when given, else values spread over the input range.
    if test_x is not None:
        parity_x = test_x[:32].astype(np.float32)
    else:
        hi = 255.0 if r.input_spec.get("value_range") else 1.0
        parity_x = np.random.default_rng(0).uniform(0, hi, size=(32, *shape)).astype(np.float32)
    probs = r.model.predict(parity_x, verbose=0)
    embs = backbone.predict(parity_x, verbose=0)

    files: dict[str, bytes] = {}
    artifacts: list[dict[str, Any]] = []

    def add(fname: str, content: bytes, role: str, fmt: str, precision: str, **extra: Any) -> None:
        files[fname] = content
        entry = {"file": fname, "role": role, "format": fmt, "precision": precision, **extra}
        if fmt in FORMATS and role != "head":  # the head's tensors are per signature (see head_tflite)
            entry["inputs"], entry["outputs"] = _io(content, fmt)
        artifacts.append(entry)

    timings: dict[str, float] = {}
    fp32_onnx: dict[str, bytes] = {}
    int8_choice: tuple[str, dict[str, dict[str, float]]] = ("onnxruntime_qdq", {})
    for c in configs:
        p = c.precision
        fused, seam = r.model, backbone
        if c.mode == "qat":
            from edgetl.host.qat import train_qat

            t0 = time.perf_counter()
            fused = train_qat(r.model, *train_xy, num_classes=n_labels, epochs=c.qat_epochs, learning_rate=c.qat_learning_rate, seed=r.config.seed)
            # The QAT model is flat; its seam is the input of the (wrapped) classifier.
            seam = keras().Model(fused.input, fused.layers[-1].input, name="backbone_qat")
            timings["qat_training"] = round(time.perf_counter() - t0, 3)
        for role, model, output in (("fused", fused, "probabilities"), ("backbone", seam, "embedding")):
            stem = "model" if role == "fused" else "backbone"
            t0 = time.perf_counter()
            calib = calib_x[: c.calibration_samples] if calib_x is not None else None
            tfl = to_tflite(model, c, calib, output_name=output)
            if "tflite" in formats:
                add(f"{stem}.{p}.tflite", tfl, role, "tflite", p, quantization=c.describe())
            if c.io_dtype != "float32" and "onnx" in formats:  # ONNX keeps float I/O
                tfl = to_tflite(model, replace(c, io_dtype="float32"), calib, output_name=output)
            if "onnx" in formats:
                if p == "fp32":
                    fp32_onnx[role] = keras_to_onnx(model, opset)
                    add(f"{stem}.{p}.onnx", fp32_onnx[role], role, "onnx", p)
                elif p == "int8":
                    candidates = {"tf2onnx_from_tflite": tflite_to_onnx(tfl, opset), "onnxruntime_qdq": onnx_static_qdq(fp32_onnx[role], calib_x[: c.calibration_samples])}
                    # The backbone follows the fused model's choice (no labels for embeddings).
                    if role == "fused":
                        int8_choice = choose_int8_onnx(candidates, test_x, test_y, calib_x)
                    add(f"{stem}.{p}.onnx", candidates[int8_choice[0]], role, "onnx", p, quantization=replace(c, io_dtype="float32").describe(), int8_method=int8_choice[0], int8_candidates=int8_choice[1])
                else:
                    add(f"{stem}.{p}.onnx", tflite_to_onnx(tfl, opset), role, "onnx", p, quantization=replace(c, io_dtype="float32").describe())
            timings[f"{stem}.{p}"] = round(time.perf_counter() - t0, 3)

    import io

    buf = io.BytesIO()
    np.savez(buf, W=Wp, b=bp, mask=mask)
    add("head_init.npz", buf.getvalue(), "head_init", "npz", "fp32")
    if "tflite" in formats:
        add("head.tflite", head_tflite(Wp, bp, mask), "head", "tflite", "fp32", signatures=["infer", "train", "get_weights", "set_weights"], optimizers=["sgd", "adam"])
    if "onnx" in formats:
        add("head_infer.onnx", head_infer_onnx(emb_size, cap), "head_infer", "onnx", "fp32")
        for opt in ("sgd", "adam"):
            add(f"head_train_{opt}.onnx", head_train_onnx(emb_size, cap, opt), "head_train", "onnx", "fp32", optimizer=opt)
    if train_xy is not None:
        # Replay buffer for the device: class-balanced embeddings of training examples, so
        # personalization can check (and train against) forgetting of the factory classes.
        rng = np.random.default_rng(1)
        keep = np.concatenate([rng.permutation(np.flatnonzero(train_xy[1] == c))[:REPLAY_PER_CLASS] for c in range(n_labels)])
        buf = io.BytesIO()
        np.savez(buf, embeddings=backbone.predict(train_xy[0][keep].astype(np.float32), verbose=0).astype(np.float32), labels=train_xy[1][keep].astype(np.int64))
        add("replay.npz", buf.getvalue(), "replay", "npz", "fp32", per_class=REPLAY_PER_CLASS)
    buf = io.BytesIO()
    np.savez(buf, x=parity_x, probabilities=probs.astype(np.float32), embeddings=embs.astype(np.float32))
    add("parity.npz", buf.getvalue(), "parity", "npz", "fp32")

    tf_version = tf().__version__
    import onnx as _onnx
    import tf2onnx as _tf2onnx

    manifest = {
        "name": name or Path(out).name.removesuffix(".edgetl"),
        "labels": list(r.class_names),
        "input_spec": {**r.input_spec, "dtype": "float32", "shape": list(shape)},
        "embedding_size": int(emb_size),
        "head": {"kind": "linear_softmax", "max_classes": cap, "active_classes": n_labels, "optimizers": ["sgd", "adam"], "loss": "softmax cross-entropy + l2/2 ||W - W_init||^2"},
        "artifacts": artifacts,
        "metrics": {"host_test_accuracy": r.metrics.get("test_accuracy")},
        "producer": {"edgetl": __version__, "tensorflow": tf_version, "tf2onnx": _tf2onnx.__version__, "onnx": _onnx.__version__, "onnx_opset": opset, "run": str(r.path)},
    }
    bundle = write_bundle(out, manifest, files, overwrite=overwrite)
    report = verify_bundle(bundle, test_x, test_y)
    report["export_seconds"] = round(time.perf_counter() - started, 2)
    report["conversion_seconds"] = timings
    bundle = update_manifest(bundle, parity=report)
    return bundle, report
