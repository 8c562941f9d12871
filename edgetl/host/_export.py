"""Quantize and export a trained run to a verified bundle (TFLite + ONNX).

For each precision the bundle gets the **fused** model (raw input -> probabilities) and the
**backbone** (raw input -> embedding, the seam where the trainable head starts). The head is
exported as ``head_init.npz`` (host-trained weights padded to ``max_classes`` with an
active-class mask), as ``head.tflite`` with ``infer``/``train_steps``/``get_weights``/
``set_weights`` signatures for LiteRT, and as an ONNX inference graph and loop training
graphs (SGD with momentum and Adam; a whole step plan per call) for plain onnxruntime. What to
export travels as one :class:`ExportOptions`.

    >>> options = ExportOptions(quantize=("none", "int8"), calibration=data)
    >>> result = export_bundle("runs/digits", "digits.edgetl", options)
    >>> # on the device, without TensorFlow:
    >>> import onnxruntime as ort
    >>> ort.InferenceSession("digits.edgetl/model.int8.onnx").run(None, {...})
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from edgetl import __version__
from edgetl._options import comma_list, option
from edgetl._quiet import progress
from edgetl.bundle import Bundle, format_checks, load_private_key, sign_bundle, write_bundle
from edgetl.bundle import _contract as C
from edgetl.bundle._contract import (
    BACKBONE_OUTPUT,
    FUSED_OUTPUT,
    HEAD_INIT_BIN_FILE,
    HEAD_INIT_MEMBERS,
    HEAD_INIT_NPZ_FILE,
    MODEL_INPUT,
    PARITY_EMBEDDINGS,
    PARITY_PROBABILITIES,
    PARITY_X,
    REPLAY_MEMBERS,
)
from edgetl.bundle._head import OPTIMIZERS, SHUFFLE, TFLITE_SIGNATURES, TRAINING_DEFAULTS
from edgetl.data import Dataset, image_size_arg, load_for_spec
from edgetl.device._runtimes import load_model, run_batched
from edgetl.device._verify import Report, verify_bundle
from edgetl.errors import BundleError, DependencyError, InputError, QuantizedModelLeftOut, describe
from edgetl.host._convert import keras_to_onnx, tflite_to_onnx, to_tflite
from edgetl.host._export_mcu import McuConfig, mcu_export, replay_draw
from edgetl.host._head_graphs import head_infer_onnx
from edgetl.host._head_loop_graphs import head_tflite_loop, head_train_loop_onnx
from edgetl.host._int8_onnx import CPU_TARGETS, RECIPES, agreement_gate, quantize_onnx_int8, recipe_for
from edgetl.host._int8_tflite import ladder_for
from edgetl.host._io_names import rename_onnx_io, rename_tflite_io
from edgetl.host._onnx_metadata import edgetl_onnx_props, write_onnx_metadata
from edgetl.host._onnx_quantized import dynamic_onnx, float16_onnx
from edgetl.host._qat import float_twin, train_qat
from edgetl.host._run import Run, load_run
from edgetl.host._selection import assign_roles, file_record
from edgetl.host._tail_export import tail_step
from edgetl.host._tf import keras, tf
from edgetl.host._tflite_metadata import TFLiteModelInfo, write_tflite_metadata

FORMATS = ("tflite", "onnx")
# Replay examples per class in a bundle: the device trains on a few and judges forgetting on
# the rest, and its guard's exact tests see a loss of a few points only with hundreds of
# held-out examples (issue 19: 10 per class made a 3-point margin decide by chance). Capped
# so the buffer stays small next to the models (REPLAY_BYTES).
REPLAY_PER_CLASS = 100
REPLAY_MIN_PER_CLASS = 20
REPLAY_BYTES = 4 << 20


def replay_per_class(classes: int, width: int, parts: int = 1) -> int:
    """Replay examples per class and part (training rows; guard rows when there are
    ``parts=2``) for ``classes`` classes of ``width``-d float32 embeddings."""
    fit = REPLAY_BYTES // max(1, parts * classes * width * 4)
    return int(min(REPLAY_PER_CLASS, max(REPLAY_MIN_PER_CLASS, fit)))


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

    mode: Literal["none", "dynamic", "float16", "int8", "qat"] = "none"  # --quantize (ExportOptions.quantize)
    calibration_samples: int = option(200)
    qat_epochs: int = option(2)
    qat_learning_rate: float = option(1e-4)
    io_dtype: Literal["float32", "int8", "uint8"] = option(
        "float32",
        choices=("float32", "int8", "uint8"),
        help="input/output type of int8/qat TFLite models; int8 or uint8 makes them full-integer (no float at the "
        "edges: NPUs, Edge TPU, microcontrollers; scale and zero point in the manifest). ONNX stays float32",
    )
    # int8 TFLite: when post-training int8 misses its gate or 1 point of fp32, keep the
    # layers the QuantizationDebugger finds noisiest in float (edgetl.host._int8_tflite).
    float_fallback: bool = option(
        True,
        flag="--no-float-fallback",
        help="int8 TFLite: do not keep the noisiest layers in float when post-training int8 misses its gate",
    )

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
            raise InputError(
                f"integer io_dtype={self.io_dtype!r} needs mode 'int8' or 'qat', received mode={self.mode!r}"
            )
        if not 0 < self.qat_learning_rate < 1:
            raise InputError(f"qat_learning_rate must be in (0, 1), received {self.qat_learning_rate}")

    @property
    def precision(self) -> str:
        return PRECISION_OF[self.mode]

    def describe(self) -> dict[str, Any]:
        """What the manifest records about how an artifact was quantized."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode in ("int8", "qat"):
            out.update(
                calibration_samples=self.calibration_samples,
                io_dtype=self.io_dtype,
                weights="int8 per-channel",
                activations="int8 per-tensor",
            )
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


def quantize_configs(modes: Sequence[str], **settings: Any) -> list[QuantizeConfig]:
    """One :class:`QuantizeConfig` per mode, sharing ``settings`` (what ``edgetl export
    --quantize int8,qat --qat-epochs 3`` means); an integer ``io_dtype`` applies to the
    int8 and qat models only (the others keep float32 inputs)."""
    out = []
    for mode in modes:
        integer_io = mode in ("int8", "qat")
        out.append(QuantizeConfig(mode=mode, **{**settings, **({} if integer_io else {"io_dtype": "float32"})}))
    return out


# Device targets (export --target): "mcu" adds files, manifest fields and checks of its own;
# the CPU classes choose the int8 ONNX recipe (at most one; default "any", see _int8_onnx.RECIPES).
TARGETS = ("mcu", *CPU_TARGETS)


@dataclass(frozen=True)
class ExportOptions:
    """Everything :func:`export` takes besides the run, as one object (onnxruntime's
    ``quantize(model_input, model_output, quant_config)`` style): ``plan_export``,
    ``export``, ``export_bundle`` and ``edgetl export`` (whose flags come from these
    fields) share it. Keyword arguments of those functions set the same fields.

        >>> options = ExportOptions(quantize=("none", "int8"), calibration="photos/")
        >>> export_bundle("runs/photos", "photos.edgetl", options)

    Attributes:
        quantize: presets or :class:`QuantizeConfig` objects; fp32 is always included as
            the reference.
        formats: subset of ``("tflite", "onnx")``.
        calibration: labelled data like the training data (a :class:`Dataset`, or a path
            read at the run's input size): its train split (by the run's seed and
            fractions) calibrates int8 and fine-tunes QAT, its validation split chooses
            between int8 candidates (remedy ladders, QAT or PTQ) and its test split measures
            accuracy unless ``evaluation`` is given. Default: the run's own training data, when
            it is still where the run recorded it and unchanged (sha256).
        evaluation: labelled held-out data (a Dataset or a path) to measure every
            artifact's accuracy on. Without a validation split, a stratified half of the
            held-out data chooses and the other half measures (``edgetl.host._selection``).
        image_size: resize calibration/evaluation images read from a path to this
            (default: the model's input size).
        label_column: the CSV column holding the class, for data read from a path.
        opset: ONNX opset (13..21).
        max_classes: head capacity for classes added on the device (default: 2x labels).
        name: the bundle's name in its manifest (``export_bundle``: ``out``'s name).
        strict: any failed check is fatal; by default a quantized format/precision that
            fails its gate is left out of the bundle (reported in ``omitted``).
        version: the bundle's version, written into the manifest and every model file's
            metadata.
        targets: device targets, from :data:`TARGETS`: ``"mcu"`` adds the files a
            microcontroller running TensorFlow Lite Micro needs (``edgetl.host._export_mcu``;
            int8 is added to ``quantize`` for its calibration); at most one CPU class
            (``"any"``, the default, ``"arm64"``, ``"x86-avx2"``, ``"x86-vnni"``) chooses the
            int8 ONNX recipe (``edgetl.host._int8_onnx.RECIPES``), recorded as the manifest's
            ``target`` and in each int8 ONNX file's ``quantization``.
        mcu: an ``McuConfig`` (flash and arena limits, replay examples) for ``"mcu"``.
        int8_ladder: when the int8 ONNX misses its gate, climb the remedy ladder (more and
            other calibration, then selective float fallback; ``edgetl.host._int8_onnx``);
            ``False`` quantizes once and lets the gate decide (faster on large models).
    """

    quantize: Sequence[str | QuantizeConfig] = option(
        ("none",),
        cli_default="none",
        to_config=comma_list,
        help="comma-separated: none,dynamic,float16,int8,qat (fp32 is always included; int8 and qat need labelled "
        "data: --calibration or the run's own)",
    )
    formats: Sequence[str] = option(
        FORMATS, flag="--format", cli_default="tflite,onnx", to_config=comma_list, help="comma-separated: tflite,onnx"
    )
    calibration: Dataset | str | os.PathLike[str] | None = option(
        None,
        help="labelled data like the training data (calibrates int8/qat; its validation split chooses between int8 "
        "candidates, its test split measures accuracy); default: the run's own training data when it is unchanged",
    )
    evaluation: Dataset | str | os.PathLike[str] | None = option(
        None,
        help="labelled held-out data to measure every exported model's accuracy on (default: the calibration data's "
        "test split; without a validation split, half of it chooses between int8 candidates and half measures)",
    )
    image_size: tuple[int, int] | int | None = option(
        None,
        type=int,
        nargs="+",
        metavar="N",
        to_config=image_size_arg,
        help="resize calibration images (default: the model's input size)",
    )
    label_column: str = option("label")
    opset: int = option(17)
    max_classes: int | None = option(
        None, type=int, help="head capacity for classes added on the device (default: 2x labels)"
    )
    name: str | None = None
    strict: bool = option(
        False,
        help="any failed check is fatal; by default a quantized format/precision that fails its gate is left out of "
        "the bundle",
    )
    version: str = option(
        "1", flag="--bundle-version", help="version string written into the manifest and every model's metadata"
    )
    targets: Sequence[str] = option(
        (),
        flag="--target",
        cli_default="",
        to_config=comma_list,
        help="comma-separated device targets: one CPU class for the int8 ONNX recipe, any (default: correct on "
        "every CPU, 7-bit weights), x86-avx2 (7-bit weights), x86-vnni or arm64 (8-bit weights); and/or mcu (a "
        "full-integer TensorFlow Lite Micro backbone, C sources and the C99 head trainer in the bundle; adds int8; "
        "needs the tflite-micro package)",
    )
    mcu: McuConfig | None = None
    int8_ladder: bool = option(
        True,
        flag="--no-int8-ladder",
        help="quantize int8 ONNX once and let its gate decide, instead of climbing the remedy ladder (more and other "
        "calibration, then keeping the most damaged layers float) when it misses the gate; faster on large models",
    )

    def __post_init__(self) -> None:
        """Cheap checks first, before any data is read or model converted."""
        for name in ("quantize", "formats", "targets"):
            value = getattr(self, name)
            if isinstance(value, (str, QuantizeConfig)):  # one preset for a list of them
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise InputError(f"formats must be a non-empty subset of {FORMATS}, received {list(self.formats)}")
        if not isinstance(self.opset, int) or not 13 <= self.opset <= 21:
            raise InputError(f"opset must be in 13..21, received {self.opset}")
        if [t for t in self.targets if t not in TARGETS]:
            raise InputError(f"targets must be a list of {TARGETS}, received {describe(list(self.targets))}")
        recipe_for(self.targets)  # at most one CPU class
        object.__setattr__(self, "quantize", tuple(QuantizeConfig.preset(q) for q in self.quantize))
        object.__setattr__(self, "version", str(self.version))

    @classmethod
    def of(cls, options: "ExportOptions | None" = None, **changes: Any) -> "ExportOptions":
        """``options`` (default: the defaults) with keyword arguments applied, as the
        functions taking both do; an unknown keyword is an InputError naming the fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InputError(f"unknown export option(s) {unknown}; ExportOptions has {sorted(known)}")
        if options is not None and not isinstance(options, ExportOptions):
            raise InputError(f"options must be an ExportOptions, received {describe(options)}")
        return replace(options, **changes) if options is not None else cls(**changes)


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
        raise InputError(
            f"model {model.name!r} is not an edgetl transfer or pretrain model (needs layers 'features' or 'backbone', "
            f"and 'head'); its layers are {sorted(names)}"
        )
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
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            return {
                "name": v.name,
                "shape": dims,
                "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name,
            }

        return [desc(v) for v in m.graph.input if v.name not in init], [desc(v) for v in m.graph.output]
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=content)

    def desc_t(d: dict[str, Any]) -> dict[str, Any]:
        q = d.get("quantization_parameters", {})
        out = {
            "name": d["name"],
            "shape": [None] + [int(v) for v in d["shape"][1:]],
            "dtype": np.dtype(d["dtype"]).name,
        }
        if len(q.get("scales", [])):
            out["quantization"] = {
                "scale": [float(s) for s in q["scales"]],
                "zero_point": [int(z) for z in q["zero_points"]],
            }
        return out

    return [desc_t(d) for d in it.get_input_details()], [desc_t(d) for d in it.get_output_details()]


# ----------------------------------------------------------------------------- the pipeline
#
#   plan_export      options, the run, and the data (given, or the run's own training data)
#   reference_outputs  Keras outputs the exported files are compared with
#   convert_models   fused + backbone models, per precision and format
#   head_artifacts   the trainable head (npz, TFLite with signatures, ONNX graphs)
#   data_artifacts   replay buffer and parity references
#   build_manifest   the manifest, from the artifacts
#   verify           staged in a temporary bundle, run in onnxruntime and LiteRT; quantized
#                    artifacts that fail their gate are left out (unless strict)
#   ExportResult.save  the final bundle, written atomically


@dataclass(frozen=True)
class Artifact:
    """One file of the bundle, in memory, with what the manifest says about it."""

    file: str
    content: bytes = field(repr=False)
    role: str
    format: str
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)

    def entry(self) -> dict[str, Any]:
        out = {"file": self.file, "role": self.role, "format": self.format, "precision": self.precision, **self.extra}
        if self.format in FORMATS and self.role not in (
            "head",
            "tail",
        ):  # the head's and tail's tensors are per signature (see head_tflite_loop, tail_tflite)
            out["inputs"], out["outputs"] = _io(self.content, self.format)
        return out


@dataclass
class ExportData:
    """The labelled data export uses: calibration inputs, the training split (QAT, replay)
    and held-out examples (accuracy of every artifact, parity inputs). ``select`` is the
    labelled data the int8 ladders and the QAT-or-PTQ choice decide on and ``test`` the data
    export reports on, disjoint (:mod:`edgetl.host._selection`; ``source["selection"]`` says which).

    For streamed data (a :class:`edgetl.data.LazyArray`), ``train`` stays streamed (QAT
    reads it through ``tf.data``, replay indexes a few rows) and ``test`` is a random sample
    of at most :data:`STREAMED_EVALUATION_LIMIT` held-out examples decoded into memory
    (every artifact runs on it). ``embeddings`` are the backbone's raw embeddings of the
    run's data from the run's on-disk cache (memory-mapped), ``train_rows``/``test_rows``
    the row of each ``train``/``test`` example in it: :meth:`embeddings_of` gives the seam's
    (standardized) embeddings of those examples without running the backbone.
    """

    calibration_x: np.ndarray | None = None
    calibration_y: np.ndarray | None = None  # their labels: the calibration examples also choose (select)
    train: tuple[Any, np.ndarray] | None = None
    guard: tuple[Any, np.ndarray] | None = None  # the run's guard split, when the run vouches for it
    test: tuple[np.ndarray, np.ndarray] | None = None
    select: tuple[np.ndarray, np.ndarray] | None = None  # chooses between quantized candidates (never reports)
    source: dict[str, Any] = field(default_factory=lambda: {"calibration": "none"})
    embeddings: np.ndarray | None = None
    train_rows: np.ndarray | None = None
    test_rows: np.ndarray | None = None
    seam: tuple[np.ndarray, np.ndarray] | None = None  # the standardization's (mean, variance)

    def embeddings_of(self, which: str, index: np.ndarray | Sequence[int]) -> np.ndarray | None:
        """Seam embeddings of ``train``/``test`` examples ``index`` from the cache, or ``None``
        when there is no cache for them (compute them with the backbone then)."""
        rows = {"train": self.train_rows, "test": self.test_rows}.get(which)
        if self.embeddings is None or rows is None:
            return None
        raw = np.asarray(self.embeddings[rows[np.asarray(index, np.int64)]], np.float32)
        if self.seam is None:
            return raw
        mean, var = self.seam  # what the exported backbone's Normalization layer computes
        return ((raw - mean) / np.maximum(np.sqrt(var), keras().backend.epsilon())).astype(np.float32)


@dataclass
class ExportPlan:
    run: Any
    configs: list[QuantizeConfig]
    formats: tuple[str, ...]
    opset: int
    capacity: int
    name: str
    strict: bool
    data: ExportData
    version: str = "1"
    target: str = "any"  # the CPU class the int8 ONNX recipe is for (edgetl.host._int8_onnx.RECIPES)
    int8_ladder: bool = True  # climb the int8 ONNX remedy ladder when rung a1 misses its gate

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.run.input_spec["shape"])


def plan_export(run: Any, options: ExportOptions | None = None, **kwargs: Any) -> ExportPlan:
    """Check the options (cheap things first) and gather the data; nothing is converted yet.

    ``options`` (an :class:`ExportOptions`) or its fields as keyword arguments.
    """

    o = ExportOptions.of(options, **kwargs)
    configs = list(o.quantize)
    if not any(c.mode == "none" for c in configs):
        configs.insert(0, QuantizeConfig("none"))
    r: Run = run if isinstance(run, Run) else load_run(run)
    n_labels = len(r.class_names)
    cap = o.max_classes or 2 * n_labels
    if cap < n_labels:
        raise InputError(f"max_classes must be at least the {n_labels} trained classes, received {cap}")
    calibration, evaluation = (_dataset(d, r, o) for d in (o.calibration, o.evaluation))
    data = resolve_data(
        r,
        calibration,
        evaluation,
        need_labels=any(c.mode in ("int8", "qat") for c in configs),
        samples=max(c.calibration_samples for c in configs),
    )
    return ExportPlan(r, configs, o.formats, o.opset, cap, o.name or "model", o.strict, data, o.version)


def _dataset(data: Dataset | str | os.PathLike[str] | None, run: Any, o: ExportOptions) -> Dataset | None:
    """A Dataset as given, or read from a path at the run's input size."""
    if data is None or isinstance(data, Dataset):
        return data
    return load_for_spec(data, run.input_spec, o.label_column, image_size_arg(o.image_size))


def resolve_data(
    run: Any, calibration: Dataset | None, evaluation: Dataset | None, *, need_labels: bool, samples: int
) -> ExportData:
    """Calibration and evaluation data: as given, else the run's own training data when it is
    still where the run recorded it and unchanged (same sha256), split exactly as training
    split it (the train split calibrates, the test split evaluates)."""
    shape, names = tuple(run.input_spec["shape"]), run.class_names
    source: dict[str, Any] = {"calibration": "given" if calibration is not None else "none"}
    if calibration is None:
        calibration, note = run.training_data()
        source = {"calibration": note}
        if calibration is None and need_labels:
            raise InputError(
                "int8 and qat quantization need labelled calibration data, and the run's own data cannot be used "
                f"({note}): pass calibration=Dataset (--calibration D)"
            )
        if calibration is None:
            warnings.warn(
                f"exporting without data ({note}): parity uses random inputs and no accuracy is measured; pass "
                "--calibration D",
                stacklevel=3,
            )
    out = ExportData(source=source)
    held_out_split, val = None, None
    if calibration is not None:
        _check_matches(calibration, shape, names, "calibration")
        splits = run.config.split(calibration)  # exactly the split training made
        # Quantization calibrates on the training split as it was before the guard split (train and
        # guard in their order): activation ranges are not a fit of the head, and the same run gets the
        # same calibration examples whatever its guard fraction.
        pool = splits.train if splits.guard is None else _without_guard(run, calibration).train
        rows = np.random.default_rng(0).permutation(len(pool))[:samples]
        out.calibration_x, out.calibration_y = pool.x[rows].astype(np.float32), np.asarray(pool.y)[rows]
        out.train = (splits.train.x, splits.train.y)
        out.guard, out.source["guard"] = _guard_split(run, splits)
        held_out_split = "test" if len(splits.test) else "val" if len(splits.val) else None
        held_out = {"test": splits.test, "val": splits.val}.get(held_out_split)
        out.test = _in_memory(held_out, out.source) if held_out is not None else None
        val = splits.val if len(splits.val) else None
        if source["calibration"].startswith("the run's training data"):
            _cached_embeddings(run, calibration, splits, out)
    if evaluation is not None:
        _check_matches(evaluation, shape, names, "evaluation")
        out.test, held_out_split = _in_memory(evaluation, out.source), "evaluation"
        out.test_rows = None
        out.source["evaluation"] = "given"
    _assign_roles(out, held_out_split, val if held_out_split != "val" else None)  # val reports: halve it
    return out


def _without_guard(run: Any, data: Dataset) -> Any:
    """``data`` split by the run's config with no guard split (its train = train + guard)."""
    return replace(run.config, guard_fraction=0.0).split(data)


def _guard_split(run: Any, splits: Any) -> tuple[tuple[Any, np.ndarray] | None, str]:
    """The guard split export ships as replay.npz's held-out rows, and what ``source`` says
    about it: only when the run recorded a guard split with exactly these examples (its
    sha256), since a row the head was fitted on would make the device's guard judge on
    memorized examples again (tools/guard_memorized.py)."""
    recorded = getattr(run, "metrics", {}) or {}
    if splits.guard is None or not len(splits.guard) or not recorded.get("guard_sha256"):
        return None, "none: the run held out no guard split (the device judges forgetting on training examples)"
    if splits.guard.fingerprint() != recorded["guard_sha256"]:
        return None, (
            "none: the data's guard split is not the one the run held out (other data than training's), so the "
            "device judges forgetting on training examples"
        )
    return (splits.guard.x, splits.guard.y), f"the run's guard split ({len(splits.guard)} examples, never trained on)"


def _assign_roles(out: ExportData, held_out_split: str | None, val: Dataset | None) -> None:
    """Split ``out``'s labelled data into what chooses between quantized candidates
    (``out.select``) and what reports (``out.test``): :func:`edgetl.host._selection.assign_roles`."""
    sampled: dict[str, Any] = {}  # a streamed validation split is sampled like the held-out one
    calibration = (out.calibration_x, out.calibration_y) if out.calibration_x is not None else None
    roles = assign_roles(out.test, held_out_split, _in_memory(val, sampled) if val is not None else None, calibration)
    out.select, out.test = roles.select, roles.report
    if roles.report_index is not None and out.test_rows is not None:
        out.test_rows = out.test_rows[roles.report_index]
    out.source["selection"] = roles.record
    if sampled:
        out.source["selection"]["sampled"] = sampled["evaluation_sample"].replace("held-out", "validation")


# Streamed held-out data is evaluated on a random sample this large: every exported file
# runs on it, and 2,000 examples resolve an accuracy drop to about half a point.
STREAMED_EVALUATION_LIMIT = 2000


def _in_memory(ds: Dataset, source: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of ``ds``; streamed data decoded into memory, sampled when large (noted in ``source``)."""
    if not ds.streamed:
        return ds.x, ds.y
    index = np.arange(len(ds))
    if len(ds) > STREAMED_EVALUATION_LIMIT:
        index = np.sort(np.random.default_rng(0).permutation(len(ds))[:STREAMED_EVALUATION_LIMIT])
        source["evaluation_sample"] = f"{len(index)} of {len(ds)} held-out examples (random, seed 0; data streamed)"
    return np.asarray(ds.x.take(index)), ds.y[index]


def _cached_embeddings(run: Any, data: Dataset, splits: Any, out: ExportData) -> None:
    """Attach the run's cached embeddings of its (verified, unchanged) data to ``out``."""
    found = run.embeddings() if hasattr(run, "embeddings") else None
    if found is None or not data.streamed or found[0].shape[0] != len(data):
        return
    if run.config.head_hidden_units or run.config.fusion != "none":  # the exported seam is not the embedding
        return
    out.embeddings = found[0]
    out.train_rows = splits.train.x.rows
    held_out = splits.test if len(splits.test) else splits.val
    rows = held_out.x.rows
    if len(rows) > STREAMED_EVALUATION_LIMIT:  # the rows _in_memory sampled
        rows = rows[np.sort(np.random.default_rng(0).permutation(len(rows))[:STREAMED_EVALUATION_LIMIT])]
    out.test_rows = rows
    try:
        norm = run.model.get_layer("features").get_layer("embedding_standardize")
        out.seam = (np.asarray(norm.mean).reshape(-1), np.asarray(norm.variance).reshape(-1))
    except ValueError:  # embeddings not standardized
        out.seam = None
    out.source["embeddings"] = f"the run's embedding cache ({found[1].get('key', '?')[:12]})"


@dataclass
class References:
    """Keras outputs on the parity inputs: what every exported file must reproduce."""

    x: np.ndarray
    probabilities: np.ndarray
    embeddings: np.ndarray


def reference_outputs(plan: ExportPlan, backbone: Any) -> References:
    """Parity inputs (held-out examples when there are some, else values spread over the
    input range) and the Keras model's outputs on them."""
    if plan.data.test is not None and len(plan.data.test[0]):
        x = plan.data.test[0][:32].astype(np.float32)
    else:
        hi = 255.0 if plan.run.input_spec.get("value_range") else 1.0
        x = np.random.default_rng(0).uniform(0, hi, size=(32, *plan.shape)).astype(np.float32)
    return References(x, plan.run.model.predict(x, verbose=0), backbone.predict(x, verbose=0))


def convert_models(plan: ExportPlan, backbone: Any) -> tuple[list[Artifact], dict[str, float]]:
    """The fused and backbone models in every requested precision and format."""
    artifacts: list[Artifact] = []
    timings: dict[str, float] = {}
    fp32_onnx: dict[str, bytes] = {}

    for c in progress(plan.configs, desc="export: precisions"):
        fused, seam = plan.run.model, backbone
        twins: dict[str, Any] = {}  # role -> the float model the QAT ONNX is quantized from (or why none)
        if c.mode == "qat":
            t0 = time.perf_counter()
            fused = train_qat(
                plan.run.model,
                *plan.data.train,
                num_classes=len(plan.run.class_names),
                epochs=c.qat_epochs,
                learning_rate=c.qat_learning_rate,
                seed=plan.run.config.seed,
            )
            seam = keras().Model(fused.input, fused.layers[-1].input, name="backbone_qat")  # the QAT model is flat
            timings["qat_training"] = round(time.perf_counter() - t0, 3)
            twin = float_twin(plan.run.model, fused)
            twins = {"fused": twin, "backbone": twin if isinstance(twin, str) else split_model(twin)[0]}
        for role, model, output in (("fused", fused, FUSED_OUTPUT), ("backbone", seam, BACKBONE_OUTPUT)):
            t0 = time.perf_counter()
            new = _convert_one(plan, c, role, model, output, fp32_onnx, twins.get(role))
            artifacts += new
            timings[f"{'model' if role == 'fused' else 'backbone'}.{c.precision}"] = round(time.perf_counter() - t0, 3)
    return artifacts, timings


def _convert_one(
    plan: ExportPlan,
    c: QuantizeConfig,
    role: str,
    model: Any,
    output: str,
    fp32_onnx: dict[str, bytes],
    qat_twin: Any = None,
) -> list[Artifact]:
    """One model (fused or backbone) in one precision, in every requested format (``qat_twin``:
    :func:`edgetl.host._qat.float_twin`'s model for the QAT ONNX, or why there is none)."""
    stem, p = ("model" if role == "fused" else "backbone"), c.precision
    calib = plan.data.calibration_x[: c.calibration_samples] if plan.data.calibration_x is not None else None
    out = []
    tfl = to_tflite(model, c, calib, output_name=output)
    if "tflite" in plan.formats:
        climbed, extra = (
            ladder_for(plan, c, role, model, output, calib, tfl),
            {"quantization": c.describe()},
        )
        if climbed is not None:  # the int8 remedy ladder (selective float fallback)
            tfl, extra["ladder"] = climbed["content"], climbed["ladder"]
        out.append(Artifact(f"{stem}.{p}.tflite", tfl, role, "tflite", p, extra))
    if "onnx" not in plan.formats:
        return out
    if c.io_dtype != "float32":  # ONNX keeps float I/O
        tfl = to_tflite(model, replace(c, io_dtype="float32"), calib, output_name=output)
    float_io = replace(c, io_dtype="float32").describe()
    if p == "fp32":
        fp32_onnx[role] = keras_to_onnx(model, plan.opset)
        out.append(Artifact(f"{stem}.{p}.onnx", fp32_onnx[role], role, "onnx", p))
    elif p == "int8" or (p == "qat" and qat_twin is not None and not isinstance(qat_twin, str)):
        # int8: the float graph; QAT: the float graph with QAT's weights (qat_twin), quantized alike
        source = fp32_onnx[role] if p == "int8" else keras_to_onnx(qat_twin, plan.opset)
        method = "onnxruntime_qdq" if p == "int8" else QAT_ONNX_METHOD
        content, record = onnx_int8(plan, role, source, calib)
        recipe = RECIPES[plan.target].describe()  # ONNX activations and weights differ from TFLite's
        extra = {"quantization": {**float_io, **recipe}, "int8_method": method, "int8_ladder": record}
        out.append(Artifact(f"{stem}.{p}.onnx", content, role, "onnx", p, extra))
    elif p in ("dynamic", "float16"):  # from the float graph: no layout Transposes
        content, how = onnx_from_float(plan, p, fp32_onnx[role])
        out.append(Artifact(f"{stem}.{p}.onnx", content, role, "onnx", p, {"quantization": {**float_io, **how}}))
    else:
        how = {"int8_method": "tf2onnx of the QAT TFLite file", "int8_method_reason": qat_twin} if p == "qat" else {}
        out.append(
            Artifact(
                f"{stem}.{p}.onnx", tflite_to_onnx(tfl, plan.opset), role, "onnx", p, {"quantization": float_io, **how}
            )
        )
    return out


def onnx_from_float(plan: ExportPlan, precision: str, fp32_onnx: bytes) -> tuple[bytes, dict[str, Any]]:
    """The dynamic or float16 ONNX made from the float ONNX graph (``edgetl.host._onnx_quantized``),
    and how, for the manifest: dynamic weights use 7 bits where the target's int8 recipe does."""
    if precision == "float16":
        return float16_onnx(fp32_onnx), {"onnx_method": "float16 weights of the float ONNX, float32 compute"}
    reduce_range = RECIPES[plan.target].reduce_range
    how = {"onnx_method": "onnxruntime quantize_dynamic of the float ONNX", "reduce_range": reduce_range}
    return dynamic_onnx(fp32_onnx, reduce_range=reduce_range), how


# The QAT ONNX: the float graph with QAT's trained weights (edgetl.host._qat.float_twin), quantized
# by onnxruntime QDQ with calibrated ranges and the int8 ladder, as the int8 ONNX is. The ranges
# QAT learned are not carried over (mapping Keras layer outputs to tf2onnx's tensor names is not
# stable); QAT starts its ranges from the same min/max calibration (calibrate_ranges) and moves
# them for a few epochs only.
QAT_ONNX_METHOD = "onnxruntime_qdq of the float graph with the QAT-trained weights"

# The int8 ONNX ladder's gate judges on at most this many selection examples (each candidate runs on all).
INT8_GATE_EXAMPLES = 1000


def int8_onnx_gate(
    plan: ExportPlan, role: str, fp32_onnx: bytes, calibration: np.ndarray
) -> Callable[[bytes], dict[str, Any]]:
    """The gate :func:`onnx_int8` judges each int8 candidate with: on the selection data
    (``plan.data.select``, at most :data:`INT8_GATE_EXAMPLES`; the calibration inputs, unlabelled,
    when there is none). Also what tools/int8_targets.py's experiments choose with."""
    select = plan.data.select  # holds the calibration examples, labelled
    if select is not None and len(select[0]):
        x, y, inputs = select[0][:INT8_GATE_EXAMPLES], select[1][:INT8_GATE_EXAMPLES], None
    else:
        x, y, inputs = calibration[:0], None, np.asarray(calibration, np.float32)
    if role == "fused":
        return agreement_gate(fp32_onnx, np.asarray(x, np.float32), y=y, inputs=inputs)
    W, b = plan.run.model.get_layer("head").layers[-1].get_weights()  # the classifier (see split_model)
    return agreement_gate(fp32_onnx, np.asarray(x, np.float32), inputs=inputs, head=(W, b))


def onnx_int8(plan: ExportPlan, role: str, fp32_onnx: bytes, calibration: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    """The int8 ONNX of one model: onnxruntime QDQ of the float ONNX for ``plan.target``, up the
    remedy ladder (``edgetl.host._int8_onnx``) until the gate ``verify`` applies passes.

    Judged by the export's gate (``edgetl.device._evidence_gate``): paired tests against fp32
    on the selection data (``plan.data.select``: the validation split and the labelled calibration
    examples, never the data the export reports on, see :mod:`edgetl.host._selection`); the fused model's accuracy there
    (which also decides the 1-point target climb), the backbone's embeddings by cosine and the
    factory head's top-1. Verification then judges the file shipped on the reporting data. The seam
    standardization (Sub, Mul by 1/std) always stays float: QDQ would quantize the 1/std
    vector as one uint8 tensor, and with raw-pixel embeddings it spans orders of magnitude,
    so most factors round to 0 (issue 9: agreement 0.50 -> 0.98).
    """

    gate = int8_onnx_gate(plan, role, fp32_onnx, calibration)

    def more(n: int) -> np.ndarray | None:
        if plan.data.train is None:
            return None
        pool = plan.data.train[0]
        index = np.sort(np.random.default_rng(0).permutation(len(pool))[:n])
        return np.asarray(pool[index] if isinstance(pool, np.ndarray) else pool.take(index), np.float32)

    result = quantize_onnx_int8(
        fp32_onnx,
        calibration,
        gate,
        recipe=RECIPES[plan.target],
        more_calibration=more,
        keep_float=("embedding_standardize",),
        ladder=plan.int8_ladder,
    )
    return result.content, result.record


def with_contract_names(artifacts: list[Artifact]) -> list[Artifact]:
    """Every fused model and backbone renamed to the contract's I/O names (``input`` ->
    ``probabilities`` or ``embedding``), whatever converter made it (see :mod:`edgetl.host._io_names`)."""

    rename = {"onnx": rename_onnx_io, "tflite": rename_tflite_io}
    outputs = {"fused": FUSED_OUTPUT, "backbone": BACKBONE_OUTPUT}
    return [
        replace(a, content=rename[a.format](a.content, MODEL_INPUT, outputs[a.role])) if a.role in outputs else a
        for a in artifacts
    ]


def with_metadata(plan: ExportPlan, artifacts: list[Artifact]) -> list[Artifact]:
    """Make every fused and backbone file describe itself, so runtimes other than edgetl
    can use it as-is: TFLite Model Metadata (what MediaPipe Tasks' ImageClassifier and
    ImageEmbedder require: labels as an associated labels.txt, input normalization) and
    ONNX ``metadata_props`` (labels, input spec, producer; read back by onnxruntime's
    ``get_modelmeta``). Only metadata changes: outputs are bit-identical
    (tests/host/test_model_metadata.py); the manifest hashes the final files."""
    out = []
    for a in artifacts:
        if a.role not in ("fused", "backbone"):
            out.append(a)
            continue
        content, note = _tflite_with_metadata(plan, a) if a.format == "tflite" else _onnx_with_metadata(plan, a)
        out.append(replace(a, content=content, extra={**a.extra, "metadata": note}))
    return out


def _input_spec(plan: ExportPlan) -> dict[str, Any]:
    return {**plan.run.input_spec, "dtype": "float32", "shape": list(plan.shape)}


def _tflite_with_metadata(plan: ExportPlan, a: Artifact) -> tuple[bytes, str]:

    spec = _input_spec(plan)
    if spec.get("kind") != "image" or len(plan.shape) != 3:
        return a.content, "none: TFLite Model Metadata describes image models"
    if a.extra.get("quantization", {}).get("io_dtype", "float32") != "float32":
        # MediaPipe would feed raw pixels into the integer input, whose scale and zero point
        # come from calibration, not the pixel range: the file would load and answer wrongly.
        return a.content, "none: integer-input model (MediaPipe Tasks need float32 inputs or uint8 pixels)"
    fused = a.role == "fused"
    what = f"raw pixels -> probabilities of {len(plan.run.class_names)} classes" if fused else "raw pixels -> embedding"
    info = TFLiteModelInfo(
        name=plan.name,
        description=f"edgetl {a.role} model ({a.precision}): {what}. Preprocessing is inside the model.",
        version=plan.version,
        kind="classifier" if fused else "embedder",
        width=int(plan.shape[1]),
        height=int(plan.shape[0]),
        channels=int(plan.shape[2]),
        color_space="RGB" if plan.shape[2] == 3 else "GRAYSCALE",
        labels=tuple(plan.run.class_names) if fused else (),
    )
    return write_tflite_metadata(a.content, info), "tflite_model_metadata"


def _onnx_with_metadata(plan: ExportPlan, a: Artifact) -> tuple[bytes, str]:
    import onnx

    fused = a.role == "fused"
    graph = onnx.load_from_string(a.content).graph
    props = edgetl_onnx_props(
        bundle_name=plan.name,
        bundle_version=plan.version,
        input_spec=_input_spec(plan),
        labels=list(plan.run.class_names) if fused else None,
    )
    output = (
        "class probabilities, one column per label (edgetl.labels)"
        if fused
        else "the standardized embedding the trainable head takes"
    )
    content = write_onnx_metadata(
        a.content,
        props,
        doc_string=f"edgetl {a.role} model ({a.precision}) of bundle {plan.name}",
        input_docs={
            graph.input[0].name: "raw inputs as edgetl.input_spec says (pixels in [0, 255]); preprocessing is inside"
        },
        output_docs={graph.output[0].name: output},
    )
    return content, "onnx_metadata_props"


def padded_head(plan: ExportPlan, classifier: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The host-trained head's ``W``, ``b`` padded to the capacity, and its active-class mask."""
    W, b = (w.astype(np.float32) for w in classifier.get_weights())
    n, cap, d = len(plan.run.class_names), plan.capacity, W.shape[0]
    Wp, bp, mask = np.zeros((d, cap), np.float32), np.zeros(cap, np.float32), np.zeros(cap, np.float32)
    Wp[:, :n], bp[:n], mask[:n] = W, b, 1.0
    return Wp, bp, mask


def head_artifacts(plan: ExportPlan, classifier: Any) -> list[Artifact]:
    """The host-trained head padded to the capacity, and its trainable forms for the device."""

    Wp, bp, mask = padded_head(plan, classifier)
    d, cap = Wp.shape
    arrays = dict(zip(HEAD_INIT_MEMBERS, (Wp, bp, mask)))
    out = [Artifact(HEAD_INIT_NPZ_FILE, _npz(**arrays), "head_init", "npz", "fp32")]
    for member, array in arrays.items():  # readable with fread / an ArrayBuffer alone
        raw = {"member": member, "shape": list(array.shape), "dtype": "float32", "byte_order": "little"}
        data = np.ascontiguousarray(array, "<f4").tobytes()
        out.append(Artifact(HEAD_INIT_BIN_FILE.format(member=member), data, "head_init", "bin", "fp32", raw))
    if "tflite" in plan.formats:
        signatures = {"signatures": list(TFLITE_SIGNATURES), "optimizers": list(OPTIMIZERS)}
        out.append(Artifact("head.tflite", head_tflite_loop(Wp, bp, mask), "head", "tflite", "fp32", signatures))
    if "onnx" in plan.formats:
        out.append(Artifact("head_infer.onnx", head_infer_onnx(d, cap), "head_infer", "onnx", "fp32"))
        for opt in OPTIMIZERS:  # a whole step plan per call; S = 1 is one step
            loop = head_train_loop_onnx(d, cap, opt)
            out.append(
                Artifact(f"head_train_loop_{opt}.onnx", loop, "head_train_loop", "onnx", "fp32", {"optimizer": opt})
            )
    return out


def data_artifacts(plan: ExportPlan, backbone: Any, references: References, trunk: Any = None) -> list[Artifact]:
    """``replay.npz`` (class-balanced embeddings of factory-class examples, so personalization
    can train against and detect forgetting of the factory classes; with a ``trunk`` model,
    also their trunk activations, for the tail) and ``parity.npz``.

    With the run's guard split (:func:`_guard_split`), replay.npz holds training examples to
    train on and guard examples to judge on, flagged by its ``guard`` member; without one,
    training examples only (the device then judges on every other one)."""
    out = []
    if plan.data.train is not None:
        classes, width = len(plan.run.class_names), int(backbone.output_shape[-1])
        parts = [plan.data.train] + ([plan.data.guard] if plan.data.guard is not None else [])
        per_class = replay_per_class(classes, width, len(parts))
        xs, ys = [], []
        for x, y in parts:
            keep = np.concatenate(replay_draw(np.asarray(y), classes, per_class))
            xs.append(np.asarray(x[keep], np.float32))
            ys.append(np.asarray(y)[keep].astype(np.int64))
        x_all = np.concatenate(xs)
        emb = backbone.predict(x_all, verbose=0).astype(np.float32)
        arrays = dict(zip(REPLAY_MEMBERS, (emb, np.concatenate(ys))))
        fields: dict[str, Any] = {"per_class": per_class}
        if len(parts) == 2:
            arrays[C.REPLAY_GUARD] = np.repeat([False, True], [len(ys[0]), len(ys[1])])
            fields["guard_examples"] = int(len(ys[1]))
        if trunk is not None:
            arrays[C.TRUNK] = trunk.predict(x_all, verbose=0).astype(np.float32)
        out.append(Artifact("replay.npz", _npz(**arrays), "replay", "npz", "fp32", fields))
    parity = _npz(
        **{
            PARITY_X: references.x,
            PARITY_PROBABILITIES: references.probabilities.astype(np.float32),
            PARITY_EMBEDDINGS: references.embeddings.astype(np.float32),
        }
    )
    out.append(Artifact("parity.npz", parity, "parity", "npz", "fp32"))
    return out


def _npz(**arrays: np.ndarray) -> bytes:

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def backbone_id(backbone: Any, plan: ExportPlan) -> str:
    """What identifies the backbone (raw input -> standardized embedding) across bundles:
    sha256 of its weights and input spec. File hashes cannot: every model file carries its
    bundle's name and version in its metadata. A device migrating its store to a new bundle
    with the same backbone id keeps its personalized head as it is."""

    h = hashlib.sha256(json.dumps(_input_spec(plan), sort_keys=True, default=str).encode())
    for w in backbone.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def head_training_defaults() -> dict[str, Any]:
    """The manifest's head training fields: edgetl's defaults and the batch order's name."""

    return {**asdict(TRAINING_DEFAULTS), "shuffle": SHUFFLE}


def build_manifest(
    plan: ExportPlan, artifacts: Sequence[Artifact], embedding_size: int, backbone_sha: str = ""
) -> dict[str, Any]:
    import onnx
    import tf2onnx

    r = plan.run
    return {
        "name": plan.name,
        "version": plan.version,
        "labels": list(r.class_names),
        "input_spec": _input_spec(plan),
        "embedding_size": int(embedding_size),
        "backbone_id": backbone_sha,
        "head": {
            "kind": "linear_softmax",
            "max_classes": plan.capacity,
            "active_classes": len(r.class_names),
            "optimizers": ["sgd", "adam"],
            "loss": "softmax cross-entropy + l2/2 ||W - W_init||^2",
            **head_training_defaults(),
        },
        "artifacts": [a.entry() for a in artifacts],
        "metrics": {"host_test_accuracy": r.metrics.get("test_accuracy")},
        "data": plan.data.source,
        "producer": {
            "edgetl": __version__,
            "tensorflow": tf().__version__,
            "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__,
            "onnx_opset": plan.opset,
            "run": str(r.path),
        },
    }


@dataclass
class ExportResult:
    """What :func:`export` produced and verified; :meth:`save` writes the bundle.

    ``report`` holds the checks of every artifact kept; ``omitted`` lists quantized
    configurations left out because they failed their gate (files and the measured
    reason); ``left_out`` keeps those files' manifest entries and bytes (for inspection
    and benchmarks, never for a bundle a device trusts); ``fatal`` lists failures that
    forbid writing any bundle (fp32 models or head graphs, or anything with ``strict=True``).
    """

    manifest: dict[str, Any]
    artifacts: list[Artifact]
    report: Any  # edgetl.device._verify.Report
    omitted: list[dict[str, Any]]
    fatal: list[dict[str, Any]]
    timings: dict[str, Any]
    bundle: Bundle | None = None
    left_out: dict[str, tuple[dict[str, Any], bytes]] = field(default_factory=dict)
    signer: str | None = None  # key id of the key export_bundle signed the bundle with

    @property
    def ok(self) -> bool:
        return not self.fatal

    def save(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> Bundle:
        """Write the bundle atomically; refused when a fatal check failed.

        Raises:
            BundleError: ``out`` exists (without ``overwrite``), or verification failed.
        """
        if not self.ok:
            raise BundleError(
                f"not writing a bundle that failed verification: {'; '.join(c['message'] for c in self.fatal)}"
            )
        self.bundle = write_bundle(out, self.manifest, {a.file: a.content for a in self.artifacts}, overwrite=overwrite)
        return self.bundle

    def describe(self) -> str:

        lines = [format_checks(self.report.checks)]
        entries = [*self.manifest["artifacts"], *(entry for entry, _ in self.left_out.values())]
        lines += [_ladder_line(e) for e in entries if "int8_ladder" in e]
        lines += [f"left out {', '.join(o['files'])}: {o['reason']}" for o in self.omitted]
        lines += [f"FAILED: {c['message']}" for c in self.fatal]
        return "\n".join(lines)


def _ladder_line(entry: dict[str, Any]) -> str:
    """One line on how an int8 ONNX file was made: the ladder's rung, its gate on the selection
    split (not the reported one), what stayed float."""
    ladder = entry["int8_ladder"]
    gate = ladder["gate"]
    measured = ", ".join(f"{k} {v:.3f}" for k, v in gate.items() if k in ("top1_agreement", "accuracy_drop", "cosine"))
    chosen_on = (entry.get("selection") or {}).get("chosen_on") or {"split": "calibration inputs"}
    return (
        f"{entry['file']}: int8 for target {entry['quantization'].get('target')}, ladder rung {ladder['rung']} "
        f"({'passed' if ladder['passed'] else 'best found, failed'} on {gate['examples']} examples of "
        f"{chosen_on['split']}: {measured}; "
        f"{len(ladder['tried'])} rung(s) tried), float share {ladder['float_share_macs']:.1%}"
        + ("" if ladder.get("meets_target", True) else f"; above the {ladder['target_accuracy_drop']:.0%} target drop")
    )


def export(run: str | os.PathLike[str] | Any, options: ExportOptions | None = None, **kwargs: Any) -> ExportResult:
    """Convert, verify and return (without writing) the bundle for ``run``.

    Args:
        run: a run directory or :class:`edgetl.host.Run`.
        options: an :class:`ExportOptions` (what to export and with which data).
        **kwargs: :class:`ExportOptions` fields, applied on top of ``options``
            (``export(run, quantize=["int8"], calibration=data)``).

    Returns:
        An :class:`ExportResult`; ``result.save(out)`` writes the bundle.
    """
    started = time.perf_counter()
    o = ExportOptions.of(options, **kwargs)
    o = replace(o, quantize=_quantize_for_targets(o.quantize, o.targets))
    plan = plan_export(run, o)
    plan.target, plan.int8_ladder = recipe_for(o.targets).target, o.int8_ladder
    backbone, classifier = split_model(plan.run.model)
    references = reference_outputs(plan, backbone)
    artifacts, timings = convert_models(plan, backbone)
    artifacts = with_metadata(plan, with_contract_names(artifacts))
    artifacts += head_artifacts(plan, classifier)
    tail, tail_section, trunk = tail_step(plan, backbone, padded_head(plan, classifier), references)
    artifacts += [Artifact(name, content, role, fmt, "fp32", more) for name, (content, role, fmt, more) in tail.items()]
    artifacts += data_artifacts(plan, backbone, references, trunk)
    extra = target_outputs(plan, o.targets, backbone, classifier, o.mcu)
    artifacts += extra.artifacts
    manifest = build_manifest(plan, artifacts, classifier.get_weights()[0].shape[0], backbone_id(backbone, plan))
    manifest.update(extra.manifest, tail=tail_section, target=plan.target)
    result = verify_staged(plan, manifest, artifacts)
    extra.add_checks(result)
    result.timings = {"export_seconds": round(time.perf_counter() - started, 2), "conversion_seconds": timings}
    result.manifest["parity"] = {**result.report.to_json(), "omitted": result.omitted, **result.timings}
    return result


def _quantize_for_targets(
    quantize: Sequence[str | QuantizeConfig], targets: tuple[str, ...]
) -> list[str | QuantizeConfig]:
    """The MCU model is calibrated like int8: int8 joins the precisions (and so the data checks)."""
    configs = list(quantize)
    if "mcu" in targets and not any(QuantizeConfig.preset(q).mode in ("int8", "qat") for q in configs):
        configs.append("int8")
    return configs


@dataclass
class TargetOutput:
    """What the device targets add to a bundle: files, manifest fields, verification checks."""

    artifacts: list[Artifact] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    checks: list[Any] = field(default_factory=list)

    def add_checks(self, result: ExportResult) -> None:
        """The targets' checks join the report; a failed one, or a target file the int8 gate
        left out, forbids the bundle (the target was asked for)."""
        result.report.checks += self.checks
        result.fatal += [{**c.to_json(), "message": f"{c.file}: {failure_reason(c)}"} for c in self.checks if not c.ok]
        kept = {a.file for a in result.artifacts}
        result.fatal += [
            {"file": a.file, "ok": False, "message": f"{a.file}: left out with its precision's failed gate"}
            for a in self.artifacts
            if a.file not in kept
        ]


def int8_embedding_tflite(backbone: Any, calibration: np.ndarray) -> bytes:
    """The full-integer TFLite of a backbone with int8 input and output (what TFLM runs),
    calibrated like the int8 bundle models; the MCU target's converter."""
    q = QuantizeConfig("int8", io_dtype="int8")
    return to_tflite(backbone, q, calibration[: q.calibration_samples], output_name=BACKBONE_OUTPUT)


def target_outputs(plan: ExportPlan, targets: Sequence[str], backbone: Any, classifier: Any, mcu: Any) -> TargetOutput:
    out = TargetOutput()
    if "mcu" in targets:
        made = mcu_export(
            plan,
            backbone,
            padded_head(plan, classifier),
            mcu or McuConfig(),
            to_int8=int8_embedding_tflite,
            replay_pool=REPLAY_PER_CLASS,
        )
        for name, (content, role, precision) in made.files.items():
            fmt = "tflite" if name.endswith(".tflite") else "c"
            out.artifacts.append(Artifact(name, content, role, fmt, precision))
        out.manifest["mcu"] = made.section
        out.checks += made.checks
    return out


def verify_staged(plan: ExportPlan, manifest: dict[str, Any], artifacts: list[Artifact]) -> ExportResult:
    """Write the bundle to a temporary directory, verify it in the runtimes, and decide:
    a quantized (format, precision) whose fused or backbone check failed is left out
    (both files: a device needs the pair); any other failure is fatal, as is everything
    with ``plan.strict``."""

    test = plan.data.test or (None, None)
    with tempfile.TemporaryDirectory() as d:
        staged = write_bundle(Path(d) / "staged.edgetl", manifest, {a.file: a.content for a in artifacts})
        # Gates judge on every example the export reports on: the reporting split (never the one
        # that chose between candidates, edgetl.host._selection) and the calibration inputs.
        report = verify_bundle(staged, test[0], test[1], inputs=plan.data.calibration_x)
        if report.not_checked:  # a device may run one runtime; an export must verify every file it writes
            raise DependencyError("export verifies every file in both runtimes; " + "; ".join(report.not_checked))
        drops = split_accuracy_drops(plan, staged)  # runs every file: after the runtimes are known to be there
    manifest = with_selection_records(plan, manifest, drops)
    fatal, dropped = [], set()
    for c in report.failed():
        if c.precision != "fp32" and c.role in ("fused", "backbone") and not plan.strict:
            dropped.add((c.format, c.precision))
        else:
            fatal.append({**c.to_json(), "message": f"{c.file}: {failure_reason(c)}"})
    omitted = []
    for fmt, precision in sorted(dropped):
        files = [a.file for a in artifacts if a.format == fmt and a.precision == precision]
        reasons = "; ".join(
            f"{c.file}: {failure_reason(c)}" for c in report.failed() if (c.format, c.precision) == (fmt, precision)
        )
        outcomes = {
            c.extra.get("outcome", "fail") for c in report.failed() if (c.format, c.precision) == (fmt, precision)
        }
        outcome = "thin" if outcomes == {"thin"} else "fail"
        omitted.append(
            {
                "format": fmt,
                "precision": precision,
                "files": files,
                "outcome": outcome,
                "reason": reasons + _int8_hint(plan),
            }
        )
    choice = _qat_choice(plan, manifest, drops, dropped)
    for fmt, why in choice.items():
        if why.startswith("ptq") and (fmt, "qat") not in dropped:
            dropped.add((fmt, "qat"))
            files = [a.file for a in artifacts if a.format == fmt and a.precision == "qat"]
            omitted.append(
                {"format": fmt, "precision": "qat", "files": files, "outcome": "worse-than-ptq", "reason": why}
            )
    keep = [a for a in artifacts if (a.format, a.precision) not in dropped]
    kept_files = {a.file for a in keep}
    report = Report([c for c in report.checks if c.file in kept_files])
    entries = {e["file"]: e for e in manifest["artifacts"]}
    left_out = {a.file: (entries[a.file], a.content) for a in artifacts if a.file not in kept_files}
    manifest = {**manifest, "artifacts": [e for e in manifest["artifacts"] if e["file"] in kept_files]}
    if choice:
        manifest["qat_choice"] = choice
    return ExportResult(manifest, keep, report, omitted, fatal, {}, left_out=left_out)


def _qat_choice(
    plan: ExportPlan, manifest: dict[str, Any], drops: dict[str, Any], dropped: set[tuple[str, str]]
) -> dict[str, str]:
    """:func:`qat_versus_ptq` on the selection split's accuracy of the fused models not left out."""
    kept = {(e["format"], e["precision"]) for e in manifest["artifacts"] if e["role"] == "fused"} - dropped
    chooses = (plan.data.source.get("selection") or {}).get("chooses") or {}
    accuracy = {k: v for k, v in drops["select_accuracy"].items() if k in kept}
    return qat_versus_ptq(accuracy, chooses.get("split", "selection"))


def qat_versus_ptq(accuracy: dict[tuple[str, str], float], split: str = "selection") -> dict[str, str]:
    """Per format with both a QAT and a post-training int8 fused model measured (and not left
    out by their gates): which one the bundle keeps, in words. ``accuracy`` maps ``(format,
    precision)`` to the fused model's accuracy on the selection ``split``, never on the data
    the export reports (edgetl.host._selection). QAT is the remedy ladder's last step and costs
    training; it stays only when it is not worse than PTQ there
    (issue 23: QAT trailed PTQ by 3-9 points on MobileNetV2 and 1.6 on the demo's CNN)."""
    out = {}
    for fmt in sorted({f for f, p in accuracy if p == "qat"}):
        if (fmt, "int8") not in accuracy:
            continue
        qat, ptq = accuracy[(fmt, "qat")], accuracy[(fmt, "int8")]
        if qat >= ptq:
            out[fmt] = f"qat kept: accuracy on {split} {qat:.4f} >= post-training int8 {ptq:.4f}"
        else:
            out[fmt] = f"ptq kept, qat left out: accuracy on {split} {qat:.4f} < post-training int8 {ptq:.4f}"
    return out


def split_accuracy_drops(plan: ExportPlan, staged: Bundle) -> dict[str, dict[Any, float]]:
    """Each quantized fused model's and backbone's accuracy drop against fp32 of its format and
    role, on the selection split (``select``) and the reporting split (``report``), by file,
    and the fused models' selection accuracy by ``(format, precision)`` (``select_accuracy``).
    A backbone is scored through the factory head, as its gate sees it."""
    models = [a for a in staged.artifacts() if a.role.value in ("fused", "backbone") and a.format.value in FORMATS]
    out: dict[str, dict[Any, float]] = {"select": {}, "report": {}, "select_accuracy": {}}
    if all(a.precision.value == "fp32" for a in models):
        return out
    W, b = plan.run.model.get_layer("head").layers[-1].get_weights()  # the classifier (see split_model)
    for split, data in (("select", plan.data.select), ("report", plan.data.test)):
        if data is None or not len(data[1]):
            continue
        x, y = np.asarray(data[0], np.float32), np.asarray(data[1])
        accuracy = {}  # file -> (format, role, precision, accuracy)
        for a in models:
            scores = run_batched(load_model(staged.path / a.file, a.format.value), x)
            if a.role.value == "backbone":  # the exported backbone ends at the classifier's input
                scores = scores @ W + b
            accuracy[a.file] = (a.format.value, a.role.value, a.precision.value, float(np.mean(scores.argmax(1) == y)))
        fp32 = {(f, r): v for f, r, p, v in accuracy.values() if p == "fp32"}
        for file, (f, r, p, v) in accuracy.items():
            if p != "fp32" and (f, r) in fp32:
                out[split][file] = fp32[(f, r)] - v
            if split == "select" and r == "fused":
                out["select_accuracy"][(f, p)] = v
    return out


def with_selection_records(plan: ExportPlan, manifest: dict[str, Any], drops: dict[str, Any]) -> dict[str, Any]:
    """The manifest with each quantized model's ``selection`` entry: the split that chose it (name,
    size) and its accuracy drop there, the split it is reported on and its drop there."""
    roles = plan.data.source.get("selection") or {}
    entries = []
    for e in manifest["artifacts"]:
        if e["role"] in ("fused", "backbone") and e["precision"] != "fp32" and e["format"] in FORMATS:
            record = file_record(roles, drops["select"].get(e["file"]), drops["report"].get(e["file"]))
            e = {**e, "selection": record}
        entries.append(e)
    return {**manifest, "artifacts": entries}


def _int8_hint(plan: ExportPlan) -> str:
    """What a user can do when a quantized model of a model file they brought is left out."""
    config = getattr(plan.run, "config", None)
    backbone = str(getattr(config, "backbone", ""))
    if config is None or config.input_preprocessing is not None or not backbone.endswith((".h5", ".keras")):
        return ""
    # Measured (tools/user_models.py all-conv .h5, 64x64 gray crops): raw pixels, int8 left
    # out in both runtimes (backbone cosine 0.69 / 0.72); declared -1-1, agreement 1.000.
    return (
        " (the backbone was given raw inputs: if it expects normalized ones, declare them with "
        "--input-preprocessing, e.g. -1-1 or 0-1, and train again; quantization works on the range the model knows)"
    )


def failure_reason(check: Any) -> str:
    """What a failed check measured against what it needed, in words."""
    outcome = check.extra.get("outcome")  # set by the evidence gates (edgetl.device._evidence_gate)
    if outcome in ("fail", "thin"):
        return check.extra["gate"]
    if outcome == "pass":  # the paired tests passed; the backbone's cosine did not
        return f"{check.describe()} ({check.extra['gate']})"
    drop, limit = check.extra.get("accuracy_drop"), check.extra.get("max_accuracy_drop")
    if drop is not None and limit is not None and drop > limit:
        return (
            f"accuracy {check.extra['accuracy']:.4f} is {drop * 100:.2f} points below fp32 (at most {limit * 100:g} "
            "allowed)"
        )
    extra = (
        f", factory-head top-1 agreement {check.extra['head_top1_agreement']:.3f} (needs >= "
        f"{check.extra['min_agreement']})"
        if "head_top1_agreement" in check.extra
        else ""
    )
    return f"{check.describe()}{extra}"


def export_bundle(
    run: str | os.PathLike[str] | Any,
    out: str | os.PathLike[str],
    options: ExportOptions | None = None,
    *,
    overwrite: bool = False,
    sign: Any = None,
    **kwargs: Any,
) -> ExportResult:
    """:func:`export` then :meth:`ExportResult.save` to ``out`` when verification passed.

    ``out`` (and the signing key) are checked first, before any conversion. The bundle's
    name defaults to ``out``'s name without ``.edgetl``. A failed (fatal) verification
    writes nothing and returns the result with ``ok == False`` and ``bundle is None``.

    Args:
        run: a run directory or :class:`edgetl.host.Run`.
        out: the bundle directory to create.
        options: an :class:`ExportOptions`; ``**kwargs`` set its fields too.
        overwrite: replace an existing ``out``.
        sign: an Ed25519 private key (or the path of an unencrypted PEM one): the written
            bundle is signed with it (``result.signer`` holds its key id).

        >>> result = export_bundle("runs/digits", "digits.edgetl", ExportOptions(quantize=("none", "int8")))
        >>> result = export_bundle("runs/digits", "digits.edgetl", quantize=["none", "int8"], overwrite=True)
        >>> # on the device, without TensorFlow:
        >>> import onnxruntime as ort
        >>> ort.InferenceSession("digits.edgetl/model.int8.onnx").run(None, {"input": x})
    """
    if Path(out).exists() and not overwrite:
        raise BundleError(f"output {str(out)!r} already exists; choose another --out or pass --overwrite")
    if isinstance(sign, (str, os.PathLike)):
        sign = load_private_key(sign)
    o = ExportOptions.of(options, **kwargs)
    result = export(run, replace(o, name=o.name or Path(out).name.removesuffix(".edgetl")))
    for left in result.omitted:  # never silent: the CLI prints these, the Python API warns
        warnings.warn(f"left out {', '.join(left['files'])}: {left['reason']}", QuantizedModelLeftOut, stacklevel=2)
    if result.ok:
        result.save(out, overwrite=overwrite)
        if sign is not None:
            result.signer = sign_bundle(result.bundle.path, sign)
    return result
