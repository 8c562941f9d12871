"""The bundle contract in one place: file names, tensor names, signatures, manifest fields.

Everything a client of a bundle (edgetl's device half, a Kotlin, Swift, JavaScript or C++
app) relies on by name is defined here, and only here: the rest of edgetl imports these
constants (tests/test_codebase.py refuses a contract tensor name spelled as a literal
outside ``edgetl/bundle/``), and tests check ``manifest.schema.json`` and the tables of
docs/integration.md against this module. What the head computes with these tensors, and
the training rule, are in :mod:`edgetl.bundle._head`.

Shapes use ``N`` (examples fed), ``D`` (embedding size), ``C`` (head capacity,
``head.max_classes``), ``S`` (steps of a call) and ``B`` (slots per step).
"""

from __future__ import annotations

# --- files ------------------------------------------------------------------------------

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"  # Ed25519 over the exact bytes of manifest.json
FUSED_FILE = "model.{precision}.{format}"  # raw input -> class probabilities
BACKBONE_FILE = "backbone.{precision}.{format}"  # raw input -> embedding
HEAD_TFLITE_FILE = "head.tflite"
HEAD_INFER_FILE = "head_infer.onnx"
HEAD_TRAIN_LOOP_FILE = "head_train_loop_{optimizer}.onnx"
HEAD_INIT_NPZ_FILE = "head_init.npz"
HEAD_INIT_BIN_FILE = "head_init.{member}.bin"  # raw little-endian float32, shape in the manifest
REPLAY_FILE = "replay.npz"
PARITY_FILE = "parity.npz"
#: Files of bundles before schema 3, still read (and never run): the one-step ONNX graphs.
LEGACY_HEAD_TRAIN_FILE = "head_train_{optimizer}.onnx"

# --- tensor names -----------------------------------------------------------------------

# Fused models and backbones, every precision and format.
MODEL_INPUT = "input"
FUSED_OUTPUT = "probabilities"
BACKBONE_OUTPUT = "embedding"

# The head's graphs.
EMBEDDING = "embedding"
LABELS = "labels"
ORDER = "order"
ROW_WEIGHT = "row_weight"
MASK = "mask"
WEIGHTS = "W"
BIAS = "b"
ANCHOR_ONNX = "W0"  # the L2 anchor as the ONNX graphs name it
ANCHOR = "anchor"  # ... and as head.tflite's signatures name it
LEARNING_RATE = "lr"
L2 = "l2"
MOMENTUM = "momentum"
OPTIMIZER = "optimizer"  # head.tflite: 0 = SGD, 1 = Adam
UNUSED = "unused"
PROBABILITIES = "probabilities"
LOSSES = "losses"
OK = "ok"
VEL_W, VEL_B = "vel_W", "vel_b"
M_W, M_B, V_W, V_B, STEP_COUNT = "m_W", "m_b", "v_W", "v_b", "t"

OPTIMIZERS = ("sgd", "adam")
# head_infer.onnx
INFER_INPUTS = (EMBEDDING, WEIGHTS, BIAS, MASK)
INFER_OUTPUT = PROBABILITIES
# What one step of either optimizer reads; the loop graphs add the step plan after LABELS.
TRAIN_INPUTS = (EMBEDDING, LABELS, MASK, WEIGHTS, BIAS, ANCHOR_ONNX, LEARNING_RATE, L2)
STATE = {"sgd": (WEIGHTS, BIAS, VEL_W, VEL_B), "adam": (WEIGHTS, BIAS, M_W, M_B, V_W, V_B, STEP_COUNT)}
HYPERPARAMETERS = {"sgd": (MOMENTUM,), "adam": ()}


def state_output(name: str) -> str:
    """The graph output that carries the updated ``name`` (``W`` -> ``W_out``)."""
    return f"{name}_out"


# head_train_loop_{sgd,adam}.onnx: inputs and outputs, in graph order.
LOOP_STATE = {opt: STATE[opt][2:] for opt in OPTIMIZERS}
LOOP_INPUTS = {
    opt: TRAIN_INPUTS[:2] + (ORDER, ROW_WEIGHT) + TRAIN_INPUTS[2:] + HYPERPARAMETERS[opt] + LOOP_STATE[opt]
    for opt in OPTIMIZERS
}
LOOP_OUTPUTS = {opt: tuple(state_output(s) for s in STATE[opt]) + (LOSSES,) for opt in OPTIMIZERS}

# head.tflite: signature -> inputs, and -> outputs. ``get_weights`` takes one ignored scalar,
# ``unused``: LiteRT's Java/Kotlin ``Interpreter.runSignature`` refuses an empty input map.
TFLITE_SIGNATURES = {
    "infer": (EMBEDDING,),
    "get_weights": (UNUSED,),
    "set_weights": (WEIGHTS, BIAS, MASK, ANCHOR),
    "train_steps": (EMBEDDING, LABELS, ORDER, ROW_WEIGHT, LEARNING_RATE, L2, MOMENTUM, OPTIMIZER),
}
TFLITE_SIGNATURE_OUTPUTS = {
    "infer": (PROBABILITIES,),
    "get_weights": (WEIGHTS, BIAS, MASK, ANCHOR),
    "set_weights": (OK,),
    "train_steps": (LOSSES,),
}
#: Signatures of head.tflite in bundles before schema 3, never run now.
LEGACY_TFLITE_SIGNATURES = ("train",)

#: dtype and shape of every head tensor (outputs ``X_out`` are shaped as ``X``).
HEAD_TENSORS = {
    EMBEDDING: ("float32", "[N, D]"),
    LABELS: ("float32", "[N, C]"),
    ORDER: ("int64", "[S, B]"),
    ROW_WEIGHT: ("float32", "[S, B]"),
    MASK: ("float32", "[C]"),
    WEIGHTS: ("float32", "[D, C]"),
    BIAS: ("float32", "[C]"),
    ANCHOR_ONNX: ("float32", "[D, C]"),
    ANCHOR: ("float32", "[D, C]"),
    LEARNING_RATE: ("float32", "[]"),
    L2: ("float32", "[]"),
    MOMENTUM: ("float32", "[]"),
    OPTIMIZER: ("float32", "[]"),
    UNUSED: ("float32", "[]"),
    VEL_W: ("float32", "[D, C]"),
    VEL_B: ("float32", "[C]"),
    M_W: ("float32", "[D, C]"),
    M_B: ("float32", "[C]"),
    V_W: ("float32", "[D, C]"),
    V_B: ("float32", "[C]"),
    STEP_COUNT: ("float32", "[]"),
    PROBABILITIES: ("float32", "[N, C]"),
    LOSSES: ("float32", "[S]"),
    OK: ("float32", "[]"),
}

# --- the trainable tail (issue 24; the math: edgetl/bundle/_tail.py) ------------------------
# Shapes add ``F`` (trunk width: the last layer's input channels), ``P`` (positions pooled:
# 1 for a Dense layer, H x W for a pooled 1x1 convolution) and ``D`` (the layer's outputs, the
# embedding size).

TRUNK_FILE = "trunk.{precision}.{format}"  # raw input -> trunk activations (fp32 only)
TAIL_TFLITE_FILE = "tail.tflite"  # stateless: every tensor goes in and comes out
TAIL_INFER_FILE = "tail_infer.onnx"
TAIL_TRAIN_LOOP_FILE = "tail_train_loop_{optimizer}.onnx"
TAIL_INIT_FILE = "tail_init.npz"

TRUNK = "trunk"  # the trunk models' output and the tail graphs' input
TAIL_W, TAIL_B, TAIL_ANCHOR = "W1", "b1", "W1_0"  # the last layer (BatchNorm folded in) and its L2 anchor
SEAM_MEAN, SEAM_INV_STD = "mean", "inv_std"  # the frozen seam standardization
TAIL_WEIGHTS = (TAIL_W, TAIL_B, WEIGHTS, BIAS)
TAIL_ANCHORS = {TAIL_W: TAIL_ANCHOR, WEIGHTS: ANCHOR_ONNX}
TAIL_CONSTANTS = (MASK, SEAM_MEAN, SEAM_INV_STD)
TAIL_STATE = {
    "sgd": TAIL_WEIGHTS + tuple(f"vel_{w}" for w in TAIL_WEIGHTS),
    "adam": TAIL_WEIGHTS
    + tuple(f"m_{w}" for w in TAIL_WEIGHTS)
    + tuple(f"v_{w}" for w in TAIL_WEIGHTS)
    + (STEP_COUNT,),
}
TAIL_HYPERPARAMETERS = {"sgd": (LEARNING_RATE, L2, MOMENTUM), "adam": (LEARNING_RATE, L2)}
TAIL_INFER_INPUTS = (TRUNK,) + TAIL_WEIGHTS + TAIL_CONSTANTS
TAIL_LOOP_INPUTS = {
    opt: (TRUNK, LABELS, ORDER, ROW_WEIGHT)
    + TAIL_CONSTANTS
    + tuple(TAIL_ANCHORS.values())
    + TAIL_HYPERPARAMETERS[opt]
    + TAIL_STATE[opt]
    for opt in OPTIMIZERS
}
TAIL_LOOP_OUTPUTS = {opt: tuple(state_output(s) for s in TAIL_STATE[opt]) + (LOSSES,) for opt in OPTIMIZERS}
# tail.tflite: the ONNX graphs' inputs and outputs, as signatures.
TAIL_TFLITE_SIGNATURES = {"infer": TAIL_INFER_INPUTS, **{f"train_steps_{o}": TAIL_LOOP_INPUTS[o] for o in OPTIMIZERS}}
TAIL_TFLITE_SIGNATURE_OUTPUTS = {
    "infer": (PROBABILITIES,),
    **{f"train_steps_{o}": TAIL_LOOP_OUTPUTS[o] for o in OPTIMIZERS},
}
#: dtype and shape of every tail tensor the head's table does not have (outputs ``X_out`` shaped as ``X``).
TAIL_TENSORS = {
    TRUNK: ("float32", "[N, P, F]"),
    TAIL_W: ("float32", "[F, D]"),
    TAIL_B: ("float32", "[D]"),
    TAIL_ANCHOR: ("float32", "[F, D]"),
    SEAM_MEAN: ("float32", "[D]"),
    SEAM_INV_STD: ("float32", "[D]"),
    **{
        f"{p}_{w}": ("float32", "[F, D]" if w == TAIL_W else "[D]") for p in ("vel", "m", "v") for w in (TAIL_W, TAIL_B)
    },
}
TAIL_INIT_MEMBERS = (TAIL_W, TAIL_B, SEAM_MEAN, SEAM_INV_STD)  # float32 [F, D], [D], [D], [D]
REPLAY_TRUNK = TRUNK  # replay.npz: float32 [R, P, F], the trunk activations of the replay examples

# --- npz / bin members ------------------------------------------------------------------

HEAD_INIT_MEMBERS = (WEIGHTS, BIAS, MASK)  # shapes [D, C], [C], [C]
REPLAY_MEMBERS = ("embeddings", "labels")  # float32 [R, D], int64 [R] (label indices)
# replay.npz, optional: bool [R], true for rows of the run's guard split (never trained on:
# the device judges forgetting on them and trains on the others). Absent (bundles before it,
# runs without a guard split): the device trains on every other row and judges on the rest.
REPLAY_GUARD = "guard"
PARITY_X, PARITY_PROBABILITIES, PARITY_EMBEDDINGS = "x", "probabilities", "embeddings"
PARITY_MEMBERS = (PARITY_X, PARITY_PROBABILITIES, PARITY_EMBEDDINGS)  # Keras inputs and outputs

# --- manifest fields --------------------------------------------------------------------

MANIFEST_FIELDS = (
    "schema_version",
    "name",
    "version",
    "labels",
    "input_spec",
    "embedding_size",
    "backbone_id",
    "head",
    "artifacts",
    "metrics",
    "producer",
    "data",
    "parity",
    "mcu",
    "tail",  # issue 24: the trainable tail, or why there is none (edgetl/bundle/_tail.py)
    "target",  # issue 23: the device class the int8 ONNX recipe is for (edgetl/host/_int8_onnx.py)
    "qat_choice",  # issue 23: QAT against PTQ on the selection split (host/_selection.py), and which one shipped
)
#: Sections read by the modules of their feature (kept in ``Manifest.extra``, not typed).
FEATURE_SECTIONS = ("mcu", "tail", "target", "qat_choice")
INPUT_SPEC_FIELDS = ("shape", "dtype", "kind", "layout", "value_range", "preprocessing")
#: The head section: what it is, and the training defaults a client needs (schema 3).
HEAD_FIELDS = ("kind", "max_classes", "active_classes", "optimizers", "loss")
HEAD_TRAINING_FIELDS = ("optimizer", "learning_rate", "l2", "momentum", "epochs", "batch_size", "seed", "shuffle")
ARTIFACT_FIELDS = (
    "file",
    "role",
    "format",
    "precision",
    "sha256",
    "size",
    "inputs",
    "outputs",
    "optimizer",
    "signatures",
    "metadata",
    "quantization",
    "member",
    "shape",
    "dtype",
    "byte_order",
    "ladder",  # int8 TFLite: the remedy ladder's rung and what stayed float (edgetl/host/_int8_tflite.py)
    "selection",  # quantized models: the split that chose the file and the one it is reported on (host/_selection.py)
    "per_class",  # replay: examples drawn per class (and per part, with guard rows)
    "guard_examples",  # replay: rows of the run's guard split, flagged by REPLAY_GUARD
)
TENSOR_FIELDS = ("name", "shape", "dtype", "quantization")


def contract_tensor_names() -> frozenset[str]:
    """Every tensor name a client feeds or reads, in any graph, signature or model."""
    names = {MODEL_INPUT, FUSED_OUTPUT, BACKBONE_OUTPUT, *HEAD_TENSORS, *TAIL_TENSORS}
    names |= {state_output(s) for states in (STATE, TAIL_STATE) for opt in OPTIMIZERS for s in states[opt]}
    signatures = (TFLITE_SIGNATURES, TFLITE_SIGNATURE_OUTPUTS, TAIL_TFLITE_SIGNATURES, TAIL_TFLITE_SIGNATURE_OUTPUTS)
    names |= {n for ios in signatures for v in ios.values() for n in v}
    return frozenset(names)
