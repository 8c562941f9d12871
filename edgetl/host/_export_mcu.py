"""Export target ``mcu``: what a microcontroller running TensorFlow Lite Micro (TFLM) needs.

``edgetl export RUN --target mcu`` adds to the bundle (all hashed in the manifest):

- ``mcu_backbone.int8.tflite``: the backbone (raw input -> embedding), full-integer int8 with
  int8 input and output, checked to contain only ops TFLM runs;
- ``edgetl_model.c``/``.h``: that model as a 16-byte aligned ``const`` array, the labels, the
  input and embedding quantization, the input quantization function (the rest of the
  preprocessing is inside the model), the arena size, the factory head (``W``, ``b``,
  ``mask``: float, the anchor of the L2 pull) and replay embeddings of the factory classes
  (int8, as the MCU backbone computes them), and the training defaults;
- ``edgetl_head.c``/``.h``: the dependency-free C99 head trainer (:mod:`edgetl.mcu`).

The model is verified in TFLM's own interpreter (the ``tflite-micro`` package) against
LiteRT running the same file (top-1 of the factory head on the dequantized embeddings), its
accuracy is measured, and its arena is the smallest with which TFLM allocates and invokes
it. A model TFLM cannot run, or one over the flash or arena limits, is refused, naming the
op or the number.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

import edgetl.mcu
from edgetl import __version__
from edgetl._options import option
from edgetl.bundle import Check
from edgetl.bundle._head import masked_softmax
from edgetl.device._runtimes import litert_interpreter
from edgetl.device._verify import MAX_ACCURACY_DROP
from edgetl.errors import DependencyError, InputError, describe

MCU_MODEL = "mcu_backbone.int8.tflite"
# TFLM and LiteRT run the same int8 file with reference-like kernels; anything below this is a
# runtime problem, not quantization.
MIN_TFLM_AGREEMENT = 0.99
# Held-out examples TFLM runs one by one at export: its Python interpreter has reference
# kernels only (digits CNN: ~0.1 ms per example; a MobileNet-size backbone takes far longer).
EVALUATION_LIMIT = 500
# The measured arena is TFLM's on this 64-bit host with its reference kernels. A 32-bit MCU
# needs less for the tensor structs, optimized kernels (CMSIS-NN, ESP-NN) may ask for scratch
# buffers the reference kernels do not: the suggested arena adds this share and rounds up.
ARENA_MARGIN = 0.25
ARENA_ROUND = 1024


@dataclass(frozen=True)
class McuConfig:
    """Limits of the target microcontroller and what goes into flash.

    ``flash_limit``: bytes of flash for the model, the factory head and the replay
    embeddings (not code); ``arena_limit``: bytes of RAM for TFLM's tensor arena (the
    suggested size, with its margin); ``replay_per_class``: factory-class examples whose
    int8 embeddings ship in flash for training against forgetting (0: none).
    """

    # `edgetl export` takes the limits in KB (--mcu-flash-limit, --mcu-arena-limit).
    flash_limit: int = option(
        1 << 20,
        flag="--mcu-flash-limit",
        cli_default=1024,
        type=int,
        metavar="KB",
        to_config=lambda kb: kb << 10,
        help="mcu: flash budget (default 1024)",
    )
    arena_limit: int = option(
        256 << 10,
        flag="--mcu-arena-limit",
        cli_default=256,
        type=int,
        metavar="KB",
        to_config=lambda kb: kb << 10,
        help="mcu: tensor arena budget (default 256)",
    )
    replay_per_class: int = 10

    def __post_init__(self) -> None:
        for name, low in (("flash_limit", 1), ("arena_limit", 1), ("replay_per_class", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise InputError(f"McuConfig.{name} must be an integer >= {low}, received {describe(v)}")


@dataclass
class McuExport:
    """The MCU files, the manifest's ``mcu`` section and the checks of the verification."""

    files: dict[str, tuple[bytes, str, str]]  # name -> (content, role, precision)
    section: dict[str, Any]
    checks: list[Any] = field(default_factory=list)


def tflm_runtime() -> Any:
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError as exc:
        raise DependencyError(
            "export --target mcu runs the model in TensorFlow Lite Micro's interpreter, which is not installed "
            f'({exc}); pip install tflite-micro (or "edgetl[host]")'
        ) from exc
    return runtime


@contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """What native code writes to file descriptor 2 meanwhile, as lines (TFLM reports why it
    cannot run a model only there: "Didn't find op for builtin opcode 'X'")."""

    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines += tmp.read().decode("utf-8", "replace").splitlines()


def model_ops(model: bytes) -> list[str]:
    """The builtin op names of a TFLite model, read through TFLM's generated schema."""
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model, 0))
    ops = []
    for code in m.operatorCodes or []:
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        ops.append(code.customCode.decode() if builtin == schema.BuiltinOperator.CUSTOM else names.get(builtin, "?"))
    return sorted(set(ops))


def tflm_interpreter(model: bytes, arena: int) -> Any:
    """A TFLM interpreter with ``arena`` bytes, or an :class:`InputError` quoting TFLM's reason."""
    runtime = tflm_runtime()
    with native_stderr_captured() as said:
        try:
            return runtime.Interpreter.from_bytes(model, arena_size=arena)
        except (RuntimeError, ValueError) as exc:
            error = exc
    reasons = [line.strip() for line in said if line.strip()] or [str(error)]
    missing = sorted({m for r in reasons for m in re.findall(r"find op for builtin opcode '([A-Z0-9_]+)'", r)})
    if missing:
        raise InputError(
            f"TensorFlow Lite Micro cannot run the model: it has no kernel for op {', '.join(missing)} (the model's "
            f"ops: {', '.join(model_ops(model))}); cut the backbone before that op or replace it"
        )
    raise InputError(f"TensorFlow Lite Micro cannot run the model: {'; '.join(reasons[:3])}")


def check_tflm_runs(model: bytes, probe: np.ndarray) -> None:
    """Refuse a model TFLM cannot load or invoke (an op it lacks, a non-integer tensor in the
    interface), with a generous arena so only the model can be at fault."""
    tflm = tflm_interpreter(model, max(64 << 20, 10 * len(model)))
    for what, details in (("input", tflm.get_input_details(0)), ("output", tflm.get_output_details(0))):
        if np.dtype(details["dtype"]) != np.int8:
            raise InputError(
                f"the MCU model's {what} is {np.dtype(details['dtype']).name}; a full-integer model needs int8"
            )
    tflm.set_input(probe, 0)
    with native_stderr_captured() as said:
        try:
            tflm.invoke()
        except RuntimeError as exc:
            raise InputError(f"TensorFlow Lite Micro failed to invoke the model: {'; '.join(said) or exc}") from None


def minimal_arena(model: bytes, probe: np.ndarray) -> int:
    """The smallest arena (to 16 bytes) with which TFLM allocates and invokes ``model``.

    tflite-micro's Python interpreter has no arena-used query (its RecordingMicroAllocator
    only prints), so this searches: construction fails when the arena is too small.
    """
    runtime = tflm_runtime()

    def fits(size: int) -> bool:
        try:
            it = runtime.Interpreter.from_bytes(model, arena_size=size)
            it.set_input(probe, 0)
            it.invoke()
            return True
        except (RuntimeError, ValueError):
            return False

    lo, hi = 0, max(64 << 20, 10 * len(model))
    with native_stderr_captured():  # every failed try prints TFLM's allocation error
        while hi - lo > 16:
            mid = (lo + hi) // 2 // 16 * 16
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def suggested_arena(measured: int) -> int:
    return int(-(-(measured * (1 + ARENA_MARGIN)) // ARENA_ROUND) * ARENA_ROUND)


def quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """float -> int8 as TFLite's QUANTIZE and the generated C do: round half away from zero."""
    v = np.asarray(x, np.float64) / scale
    return np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5) + zero_point, -128, 127).astype(np.int8)


def io_quantization(model: bytes) -> tuple[tuple[float, int], tuple[float, int]]:
    """((input scale, zero point), (output scale, zero point)) of a single-input, single-output model."""

    it = litert_interpreter(model, allocate=False)
    out = []
    for d in (it.get_input_details()[0], it.get_output_details()[0]):
        scale, zero = d["quantization"]
        out.append((float(scale), int(zero)))
    return out[0], out[1]


def run_int8(model: bytes, x_int8: np.ndarray, runtime: str) -> np.ndarray:
    """int8 outputs of ``model`` on each int8 input, one invoke per example (batch 1, as on an MCU)."""
    if runtime == "tflm":
        it = tflm_interpreter(model, max(64 << 20, 10 * len(model)))
        outs = []
        for row in x_int8:
            it.set_input(row[None], 0)
            it.invoke()
            outs.append(np.array(it.get_output(0)).reshape(-1))
        return np.stack(outs)

    it = litert_interpreter(model, threads=1)
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    outs = []
    for row in x_int8:
        it.set_tensor(i, row[None])
        it.invoke()
        outs.append(it.get_tensor(o).reshape(-1).copy())
    return np.stack(outs)


def verify_mcu(
    model: bytes,
    test: tuple[np.ndarray, np.ndarray] | None,
    head: tuple[np.ndarray, np.ndarray, np.ndarray],
    keras_accuracy: float | None,
) -> tuple[Any, dict[str, Any]]:
    """TFLM against LiteRT on the same file: top-1 of the factory head on the dequantized
    embeddings (the gate), identical embeddings, and accuracy on labelled held-out data."""

    (in_scale, in_zero), (out_scale, out_zero) = io_quantization(model)
    x, y = test if test is not None else (None, None)
    if x is None or not len(x):
        raise InputError(
            "export --target mcu verifies the model on held-out examples; pass --calibration or --evaluation data"
        )
    x, y = x[:EVALUATION_LIMIT], y[:EVALUATION_LIMIT]
    q = quantize(x.astype(np.float32), in_scale, in_zero)
    tflm, litert = run_int8(model, q, "tflm"), run_int8(model, q, "litert")
    W, b, mask = head

    def predict(e: np.ndarray) -> np.ndarray:
        return masked_softmax(out_scale * (e.astype(np.float64) - out_zero) @ W + b, mask).argmax(1)

    agreement = float(np.mean(predict(tflm) == predict(litert)))
    extra: dict[str, Any] = {
        "compared_with": "LiteRT on the same file",
        "examples": int(len(q)),
        "embedding_max_abs_diff_int8": int(np.max(np.abs(tflm.astype(np.int32) - litert.astype(np.int32)))),
        "accuracy": float(np.mean(predict(tflm) == y)),
    }
    ok = agreement >= MIN_TFLM_AGREEMENT
    if keras_accuracy is not None:
        extra.update(
            fp32_accuracy=keras_accuracy,
            accuracy_drop=keras_accuracy - extra["accuracy"],
            max_accuracy_drop=MAX_ACCURACY_DROP["int8"],
        )
        ok = ok and extra["accuracy_drop"] <= MAX_ACCURACY_DROP["int8"]
    check = Check(
        MCU_MODEL, "mcu_backbone", "tflite", "int8", ok, "top1_agreement", agreement, MIN_TFLM_AGREEMENT, extra
    )
    return check, extra


def c_float(v: float) -> str:
    """A C float literal that reads back as the same float32 (9 significant digits)."""
    s = f"{float(np.float32(v)):.9g}"
    return (s if any(ch in s for ch in ".e") else s + ".0") + "f"


def c_string(text: str) -> str:
    """A C string literal of ``text``'s UTF-8 bytes (octal escapes for anything not plain ASCII)."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        out.append(ch if 32 <= byte < 127 and ch not in '"\\?' else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def c_array(values: Any, per_line: int, fmt: Any) -> str:
    items = [fmt(v) for v in values]
    return ",\n".join("    " + ", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line))


@dataclass(frozen=True)
class McuSources:
    """What the generated C files hold (everything :func:`model_header` and :func:`model_source` write)."""

    model: bytes
    input_quantization: tuple[float, int]
    embedding_quantization: tuple[float, int]
    input_shape: tuple[int, ...]
    is_image: bool
    labels: tuple[str, ...]
    head: tuple[np.ndarray, np.ndarray, np.ndarray]  # W [D, C], b, mask
    replay: tuple[np.ndarray, np.ndarray]  # int8 embeddings [N, D], int32 columns
    arena: tuple[int, int]  # (suggested, measured)
    banner: str
    ops: tuple[str, ...] = ()


def resolver_method(op: str) -> str:
    """TFLM's ``MicroMutableOpResolver`` method for a builtin op: CONV_2D -> AddConv2D."""
    return "Add" + "".join(p if p[:1].isdigit() else p[:1] + p[1:].lower() for p in op.split("_"))


def model_header(s: McuSources) -> str:
    W = s.head[0]
    size = int(np.prod(s.input_shape))
    shape = ", ".join(map(str, s.input_shape))
    lines = [
        f"/* {s.banner} */",
        "#ifndef EDGETL_MODEL_H",
        "#define EDGETL_MODEL_H",
        "",
        "#include <stdint.h>",
        "",
        f"#define EDGETL_INPUT_SIZE {size} /* int8 values per example: shape [{shape}] */",
        f"#define EDGETL_EMBEDDING_SIZE {W.shape[0]}",
        f"#define EDGETL_MAX_CLASSES {W.shape[1]}",
        f"#define EDGETL_ACTIVE_CLASSES {len(s.labels)}",
        f"#define EDGETL_REPLAY_EXAMPLES {len(s.replay[1])}",
        f"/* TFLM tensor arena: measured minimum {s.arena[1]} bytes (64-bit host, reference kernels), plus a "
        f"margin for 32-bit targets' optimized kernels */",
        f"#define EDGETL_ARENA_BYTES {s.arena[0]}",
        "",
        "/* The backbone (raw input -> embedding) for TFLM: 16-byte aligned, as TFLM requires. */",
        "extern const unsigned char edgetl_model_tflite[];",
        "extern const unsigned int edgetl_model_tflite_len;",
        "/* int8 input = round(raw / scale) + zero_point; embedding = scale * (int8 output - zero_point) */",
        "extern const float edgetl_input_scale;",
        "extern const int32_t edgetl_input_zero_point;",
        "extern const float edgetl_embedding_scale;",
        "extern const int32_t edgetl_embedding_zero_point;",
        "extern const char *const edgetl_labels[EDGETL_ACTIVE_CLASSES]; /* column i's class */",
        "/* The factory head: the starting weights and the anchor of the L2 pull (see edgetl_head.h). */",
        "extern const float edgetl_head_W[EDGETL_EMBEDDING_SIZE * EDGETL_MAX_CLASSES];",
        "extern const float edgetl_head_b[EDGETL_MAX_CLASSES];",
        "extern const float edgetl_head_mask[EDGETL_MAX_CLASSES];",
        "#if EDGETL_REPLAY_EXAMPLES > 0",
        "/* Factory-class examples as the MCU backbone embeds them: train on them too, against forgetting. */",
        "extern const int8_t edgetl_replay_embeddings[EDGETL_REPLAY_EXAMPLES * EDGETL_EMBEDDING_SIZE];",
        "extern const int32_t edgetl_replay_labels[EDGETL_REPLAY_EXAMPLES];",
        "#endif",
        "",
        "/* Raw input values (as edgetl's input_spec says) -> the model's int8 input tensor. */",
        "void edgetl_quantize_input(const float *raw, int8_t *input);",
    ]
    if s.is_image:
        lines.append("/* 8-bit pixels (0..255, the layout above) -> the model's int8 input tensor. */")
        lines.append("void edgetl_quantize_pixels(const uint8_t *pixels, int8_t *input);")
    if s.ops:
        lines += [
            "",
            "/* The ops the model uses, for TFLM's op resolver (C++):",
            " *   tflite::MicroMutableOpResolver<EDGETL_OP_COUNT> resolver; EDGETL_ADD_OPS(resolver); */",
            f"#define EDGETL_OP_COUNT {len(s.ops)}",
            "#define EDGETL_ADD_OPS(resolver) \\",
            "    do { \\",
            *[f"        (resolver).{resolver_method(op)}(); \\" for op in s.ops],
            "    } while (0)",
        ]
    return "\n".join([*lines, "", "#endif /* EDGETL_MODEL_H */", ""])


def model_source(s: McuSources) -> str:
    (in_scale, in_zero), (out_scale, out_zero) = s.input_quantization, s.embedding_quantization
    W, b, mask = s.head
    parts = [
        f"/* {s.banner} */",
        '#include "edgetl_model.h"',
        "",
        "#if defined(__GNUC__) || defined(__clang__)",
        "#define EDGETL_ALIGNED __attribute__((aligned(16)))",
        "#elif defined(_MSC_VER)",
        "#define EDGETL_ALIGNED __declspec(align(16))",
        "#else",
        "#define EDGETL_ALIGNED",
        "#endif",
        "",
        f"const unsigned int edgetl_model_tflite_len = {len(s.model)}u;",
        "EDGETL_ALIGNED const unsigned char edgetl_model_tflite[] = {",
        c_array(s.model, 16, lambda v: f"0x{v:02x}"),
        "};",
        f"const float edgetl_input_scale = {c_float(in_scale)};",
        f"const int32_t edgetl_input_zero_point = {in_zero};",
        f"const float edgetl_embedding_scale = {c_float(out_scale)};",
        f"const int32_t edgetl_embedding_zero_point = {out_zero};",
        "const char *const edgetl_labels[EDGETL_ACTIVE_CLASSES] = {" + ", ".join(map(c_string, s.labels)) + "};",
        "const float edgetl_head_W[EDGETL_EMBEDDING_SIZE * EDGETL_MAX_CLASSES] = {",
        c_array(W.reshape(-1), 8, c_float),
        "};",
        "const float edgetl_head_b[EDGETL_MAX_CLASSES] = {" + ", ".join(map(c_float, b)) + "};",
        "const float edgetl_head_mask[EDGETL_MAX_CLASSES] = {" + ", ".join(map(c_float, mask)) + "};",
    ]
    if len(s.replay[1]):
        parts += [
            "const int8_t edgetl_replay_embeddings[EDGETL_REPLAY_EXAMPLES * EDGETL_EMBEDDING_SIZE] = {",
            c_array(s.replay[0].reshape(-1), 24, str),
            "};",
            "const int32_t edgetl_replay_labels[EDGETL_REPLAY_EXAMPLES] = {" + ", ".join(map(str, s.replay[1])) + "};",
        ]
    return "\n".join([*parts, "", quantize_functions(s), ""])


def quantize_functions(s: McuSources) -> str:
    """The input side of the preprocessing in C (rescaling and normalization are inside the
    model): round half away from zero, like TFLite's QUANTIZE."""
    out = """static int8_t edgetl_to_int8(float v) {
    int32_t q = (v >= 0.0f ? (int32_t)(v + 0.5f) : -(int32_t)(-v + 0.5f)) + edgetl_input_zero_point;
    return (int8_t)(q < -128 ? -128 : q > 127 ? 127 : q);
}

void edgetl_quantize_input(const float *raw, int8_t *input) {
    int32_t i;
    for (i = 0; i < EDGETL_INPUT_SIZE; ++i) {
        input[i] = edgetl_to_int8(raw[i] / edgetl_input_scale);
    }
}
"""
    if s.is_image:
        out += """
void edgetl_quantize_pixels(const uint8_t *pixels, int8_t *input) {
    int32_t i;
    for (i = 0; i < EDGETL_INPUT_SIZE; ++i) {
        input[i] = edgetl_to_int8((float)pixels[i] / edgetl_input_scale);
    }
}
"""
    return out


def replay_draw(y: np.ndarray, classes: int, per_class: int) -> list[np.ndarray]:
    """Per class, the indices of up to ``per_class`` examples of ``y``: a seeded permutation,
    class by class. replay.npz is drawn this way (edgetl.host._export.data_artifacts), and the
    MCU's replay takes from the same draw the rows the device trains on."""
    rng = np.random.default_rng(1)
    return [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(classes)]


def replay_examples(plan: Any, per_class: int, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw inputs and class indices of replay examples, up to ``per_class`` of each class: the
    ones the device Personalizer trains on. With a guard split (replay.npz's ``guard`` rows
    judge), the first training rows of replay.npz's draw; without one, every other example of
    its draw of ``pool`` per class (the other half judges)."""
    if plan.data.train is None or per_class == 0:
        return np.zeros((0, *plan.shape), np.float32), np.zeros(0, np.int32)
    x, y = plan.data.train
    per = replay_draw(np.asarray(y), len(plan.run.class_names), pool)
    step = 1 if plan.data.guard is not None else 2
    keep = np.concatenate([p[0::step][:per_class] for p in per])
    return np.asarray(x[keep], np.float32), np.asarray(y[keep], np.int32)


def flash_bytes(s: McuSources) -> dict[str, int]:
    """Bytes of const data the generated sources put in flash (code not included)."""
    W, b, mask = s.head
    out = {
        "model": len(s.model),
        "head": 4 * (W.size + b.size + mask.size),
        "replay": s.replay[0].size + 4 * s.replay[1].size,
        "labels": sum(len(label.encode()) + 1 for label in s.labels),
    }
    return {**out, "total": sum(out.values())}


def head_ram_bytes(dim: int, capacity: int, batch: int = 16) -> dict[str, int]:
    """RAM of the C trainer for one head: weights, optimizer state and a batch's scratch
    (the examples' embeddings, 4 x dim bytes each, come on top)."""
    weights = 4 * (dim + 1) * capacity
    scratch = 4 * batch * capacity
    return {"sgd": 2 * weights + scratch, "adam": 3 * weights + scratch}


def check_limits(flash: dict[str, int], arena: int, config: McuConfig) -> None:
    if flash["total"] > config.flash_limit:
        parts = ", ".join(f"{k} {v:,}" for k, v in flash.items() if k != "total")
        raise InputError(
            f"the MCU export needs {flash['total']:,} bytes of flash ({parts}), over the limit of "
            f"{config.flash_limit:,} (--mcu-flash-limit): use a smaller backbone or input, or fewer replay examples"
        )
    if arena > config.arena_limit:
        raise InputError(
            f"the MCU model needs a tensor arena of {arena:,} bytes, over the limit of {config.arena_limit:,} "
            "(--mcu-arena-limit): use a smaller input or fewer channels in the early layers"
        )


def mcu_export(
    plan: Any,
    backbone: Any,
    head: tuple[np.ndarray, np.ndarray, np.ndarray],
    config: McuConfig,
    *,
    to_int8: Callable[[Any, np.ndarray], bytes],
    replay_pool: int,
) -> McuExport:
    """Convert, check, measure and verify the MCU model, and generate its C sources.

    The exporter (:mod:`edgetl.host._export`, which dispatches to this module) passes its
    converter: ``to_int8(model, calibration)`` gives the full-integer TFLite (int8 input and
    output) of ``model``; ``replay_pool`` is how many examples per class replay.npz draws
    from, so the MCU's replay examples are the ones the device Personalizer trains on.

    Raises:
        InputError: no calibration or held-out data, an op or tensor type TFLM cannot run,
            or flash or arena over ``config``'s limits.
    """
    tflm_runtime()  # missing package: say so before converting anything
    if plan.data.calibration_x is None:
        raise InputError("export --target mcu needs calibration data for its int8 model: pass --calibration D")
    try:
        model = to_int8(backbone, plan.data.calibration_x)
    except InputError:
        raise
    except Exception as exc:  # TensorFlow's ConverterError (a private class) names the ops without int8 kernels
        detail = " ".join(str(exc).split())[:500]
        raise InputError(f"the backbone cannot be converted to a full-integer int8 model for TFLM: {detail}") from None
    probe = np.zeros((1, *plan.shape), np.int8)
    check_tflm_runs(model, probe)
    measured = minimal_arena(model, probe)
    inq, outq = io_quantization(model)
    rx, ry = replay_examples(plan, config.replay_per_class, replay_pool)
    replay = run_int8(model, quantize(rx, *inq), "litert") if len(rx) else np.zeros((0, head[0].shape[0]), np.int8)
    sources = McuSources(
        model, inq, outq, tuple(plan.shape), plan.run.input_spec.get("kind", "image") == "image",
        tuple(plan.run.class_names), head, (replay.astype(np.int8), ry), (suggested_arena(measured), measured),
        f"Generated by edgetl {__version__} for bundle {plan.name} version {plan.version}; do not edit.",
        tuple(model_ops(model)),
    )  # fmt: skip
    flash = flash_bytes(sources)
    check_limits(flash, sources.arena[0], config)
    check, measures = verify_mcu(model, plan.data.test, head, _keras_accuracy(plan))
    section = {
        "runtime": f"tflite-micro {_tflm_version()}",
        "model": MCU_MODEL,
        "ops": model_ops(model),
        "input_quantization": {"scale": inq[0], "zero_point": inq[1]},
        "embedding_quantization": {"scale": outq[0], "zero_point": outq[1]},
        "arena_bytes": sources.arena[0],
        "arena_bytes_measured": measured,
        "arena_measured_on": "this 64-bit host, TFLM's reference kernels (smallest arena that allocates and invokes)",
        "flash_bytes": flash,
        "head_ram_bytes": head_ram_bytes(*head[0].shape),
        "limits": {"flash": config.flash_limit, "arena": config.arena_limit},
        "replay_examples": int(len(ry)),
        "tflm_top1_agreement": check.value,
        **{k: v for k, v in measures.items() if k in ("accuracy", "fp32_accuracy", "examples")},
    }
    files = {
        MCU_MODEL: (model, "mcu_backbone", "int8"),
        "edgetl_model.h": (model_header(sources).encode(), "mcu_source", "int8"),
        "edgetl_model.c": (model_source(sources).encode(), "mcu_source", "int8"),
        **{name: (edgetl.mcu.source(name), "mcu_source", "fp32") for name in edgetl.mcu.HEAD_SOURCES},
    }
    return McuExport(files, section, [check])


def _tflm_version() -> str:
    import tflite_micro

    return str(getattr(tflite_micro, "__version__", "?"))


def _keras_accuracy(plan: Any) -> float | None:
    """The fp32 Keras model's accuracy on the examples :func:`verify_mcu` measures."""
    if plan.data.test is None or not len(plan.data.test[0]):
        return None
    x, y = plan.data.test[0][:EVALUATION_LIMIT], plan.data.test[1][:EVALUATION_LIMIT]
    return float(np.mean(plan.run.model.predict(x.astype(np.float32), verbose=0).argmax(1) == y))
