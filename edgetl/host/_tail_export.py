"""Export of the trainable tail: split the backbone, write the tail's files, verify them.

Eligible: the backbone's embedding (before the seam standardization) is the output of a
``Dense`` layer, or the global average of a 1x1 ``Conv2D``'s map (MobileNetV2's ``Conv_1`` ->
``Conv_1_bn`` -> ``out_relu`` -> pooling; the BatchNormalization is folded into the layer),
with a linear, ReLU or ReLU6 activation, inside nested models (preprocessing layers before a
nested application stay in the trunk). The split is checked numerically: ``tail(trunk(x))``
must reproduce the exported backbone's embeddings on the parity inputs, or the bundle stays
head-only and the manifest says why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetl.bundle import _contract as C
from edgetl.bundle import _tail as T
from edgetl.bundle._head import OPTIMIZERS
from edgetl.device._tail import TailRuntime
from edgetl.device._verify import (
    FLOOR_FACTOR,
    TAIL_CHECK_RATES,
    TAIL_CHECK_STEPS,
    tail_reference,
    weights_difference,
)
from edgetl.errors import BundleError, TailLeftOut
from edgetl.host._convert import keras_to_onnx, to_tflite
from edgetl.host._tail_graphs import tail_infer_onnx, tail_tflite, tail_train_loop_onnx
from edgetl.host._tf import keras

SPLIT_TOLERANCE = 1e-3  # max |tail(trunk(x)) - backbone(x)| on standardized embeddings (float32 reorderings)
# The trunk files against Keras, relative to the largest activation: float32 in another summation
# order (XNNPACK, onnxruntime) through a deep network. 1e-4 refused a random-weight MobileNetV2-0.35
# trunk once in several builds (4.5e-4, over 1e-4 x max|a|); a wrong conversion differs by O(1).
TRUNK_TOLERANCE = 1e-3
RUNTIME_TOLERANCE = 1e-5  # SGD: onnxruntime vs LiteRT after the same steps (issue 24's target)
INFER_TOLERANCE = 1e-5  # max |p - p_ref| of the tail's inference graphs
# Every check against the float64 reference also allows FLOOR_FACTOR x the precision floor
# (why: edgetl.device._verify, which verify shares with this check).


@dataclass
class TailSplit:
    trunk: Any  # Keras model: raw input -> trunk activations [N, P, F]
    layer: str
    activation: str
    init: dict[str, np.ndarray]  # W1, b1, mean, inv_std (float32)
    positions: int = 1  # P of trunk[N, P, F]


def _output_layer(model: Any) -> Any:
    return model.output._keras_history.layer


def _inbound_layer(layer: Any) -> Any | None:
    nodes = layer._inbound_nodes
    inbound = nodes[0].inbound_layers if nodes else None
    if isinstance(inbound, (list, tuple)):
        return inbound[0] if len(inbound) == 1 else None
    return inbound


@dataclass
class _Walk:
    """What lies between the backbone's output and its last embedding layer."""

    owners: list  # the backbone and the nested models the walk entered, outermost first
    norms: list  # seam Normalization layers, last applied first
    pooled: bool = False
    activation: str = "linear"  # an activation layer after the layer (ReLU / Activation)
    batchnorm: Any = None


def _walk(backbone: Any) -> tuple[_Walk, Any]:
    """Back from the output: nested models, the seam standardization(s), global average
    pooling, an activation layer and a BatchNormalization; returns them and the layer reached."""
    k = keras()
    walk, layer = _Walk([backbone], []), _output_layer(backbone)
    while isinstance(layer, (k.Model, k.layers.Normalization)):
        if isinstance(layer, k.Model):
            walk.owners.append(layer)
            layer = _output_layer(layer)
        else:
            walk.norms.append(layer)
            layer = _inbound_layer(layer)
    if isinstance(layer, k.layers.GlobalAveragePooling2D) and not layer.keepdims:
        walk.pooled, layer = True, _inbound_layer(layer)
    if isinstance(layer, (k.layers.ReLU, k.layers.Activation)):
        walk.activation = _activation_of(layer)
        layer = _inbound_layer(layer)
    if isinstance(layer, k.layers.BatchNormalization) and walk.pooled:
        walk.batchnorm, layer = layer, _inbound_layer(layer)
    return walk, layer


def _activation_of(layer: Any) -> str:
    """``relu``, ``relu6``, ``linear``, or a description of what the tail does not train."""
    k = keras()
    if isinstance(layer, k.layers.ReLU):
        plain = float(layer.negative_slope) == 0.0 and float(layer.threshold) == 0.0
        cap = None if layer.max_value is None else float(layer.max_value)
        if plain and cap in (None, 6.0):
            return "relu" if cap is None else "relu6"
        return (
            f"ReLU(max_value={cap}, negative_slope={float(layer.negative_slope)}, threshold={float(layer.threshold)})"
        )
    fn = getattr(layer, "activation", None)
    return getattr(fn, "__name__", str(fn))


def _layer_weights(walk: _Walk, layer: Any) -> tuple[dict[str, np.ndarray], str] | str:
    """``W1 [F, D]``, ``b1`` (BatchNorm folded in) and the activation of an eligible layer, or why not."""
    k = keras()
    own = getattr(layer.activation, "__name__", str(layer.activation)) if hasattr(layer, "activation") else "linear"
    if walk.pooled:
        if not isinstance(layer, k.layers.Conv2D) or isinstance(layer, k.layers.Conv2DTranspose):
            return f"the pooled map comes from {layer.__class__.__name__} {layer.name!r}, not a 1x1 Conv2D"
        shape = (tuple(layer.kernel_size), tuple(layer.strides), layer.groups, layer.data_format)
        if shape != ((1, 1), (1, 1), 1, "channels_last"):
            return f"the convolution {layer.name!r} is not a 1x1, stride-1, ungrouped, channels-last Conv2D"
    elif not isinstance(layer, k.layers.Dense):
        return f"the embedding comes from {layer.__class__.__name__} {getattr(layer, 'name', '?')!r}, not a Dense layer"
    if own != "linear" and (walk.activation != "linear" or walk.batchnorm is not None):
        return f"the layer {layer.name!r} has activation {own!r} before further layers; the tail trains one activation"
    activation = own if own != "linear" else walk.activation
    if activation not in T.ACTIVATIONS:
        return f"the last layer {layer.name!r} has activation {activation!r}; the tail trains {T.ACTIVATIONS}"
    weights = layer.get_weights()
    W1 = np.asarray(weights[0], np.float64).reshape(-1, weights[0].shape[-1])  # a 1x1 kernel [1, 1, F, D]
    b1 = np.asarray(weights[1], np.float64) if layer.use_bias else np.zeros(W1.shape[1])
    if walk.batchnorm is not None:  # folded: gamma (x W + b - mu) / sqrt(var + eps) + beta
        bn = walk.batchnorm
        if list(bn.axis) != [3]:
            return f"the BatchNormalization {bn.name!r} normalizes axis {bn.axis}, not the channels"
        gamma, beta, mu, var = (np.asarray(v, np.float64) for v in _bn_parts(bn))
        scale = gamma / np.sqrt(var + bn.epsilon)
        W1, b1 = W1 * scale, (b1 - mu) * scale + beta
    return {C.TAIL_W: W1.astype(np.float32), C.TAIL_B: b1.astype(np.float32)}, activation


def _bn_parts(bn: Any) -> tuple[np.ndarray, ...]:
    size = int(bn.moving_mean.shape[0])
    gamma = bn.gamma.numpy() if bn.scale else np.ones(size)
    beta = bn.beta.numpy() if bn.center else np.zeros(size)
    return gamma, beta, bn.moving_mean.numpy(), bn.moving_variance.numpy()


def _seam(norms: list, width: int) -> tuple[np.ndarray, np.ndarray] | str:
    """The seam standardization as one ``(mean, inv_std)``: the Normalization layers between
    the layer and the embedding (``edgetl train``'s and a source task's), composed."""
    k = keras()
    mean, inv_std = np.zeros(width), np.ones(width)
    for norm in reversed(norms):  # in the order they are applied
        if getattr(norm, "invert", False):
            return f"the Normalization {norm.name!r} inverts; the seam standardizes"
        m = np.asarray(norm.mean, np.float64).reshape(-1)
        s = 1.0 / np.maximum(np.sqrt(np.asarray(norm.variance, np.float64).reshape(-1)), k.backend.epsilon())
        mean, inv_std = mean + m / inv_std, inv_std * s  # ((h - mean) inv_std - m) s
    return mean.astype(np.float32), inv_std.astype(np.float32)


def _truncated(owners: list, layer: Any) -> Any:
    """The backbone cut at ``layer``'s input: each nested model is replaced by its part up to
    there, called on the tensor its parent fed it (preprocessing layers before a nested
    application stay in the trunk)."""
    k = keras()
    owner = next(m for m in reversed(owners) if layer in m.layers)
    chain = owners[: owners.index(owner) + 1]
    model = k.Model(owner.inputs, layer.input, name="trunk_inner")
    for parent, child in reversed(list(zip(chain[:-1], chain[1:]))):
        fed = [
            n.input_tensors
            for i, n in enumerate(child._inbound_nodes)
            if f"{child.name}_ib-{i}" in getattr(parent, "_network_nodes", ())
        ]
        if len(fed) != 1 or isinstance(fed[0], (list, tuple)) and len(fed[0]) != 1:
            raise ValueError(f"the nested model {child.name!r} is not called once on one input")
        tensor = fed[0][0] if isinstance(fed[0], (list, tuple)) else fed[0]
        model = k.Model(parent.inputs, model(tensor), name=f"trunk_{parent.name}")
    return model


def find_tail(backbone: Any, x: np.ndarray) -> TailSplit | str:
    """The trunk/tail split of an exported ``backbone``, or the reason there is none.

    Eligible: the embedding (before the seam's Normalization layers) is a ``Dense`` layer's
    output, or the global average of a 1x1 ``Conv2D``'s map (a BatchNormalization after it is
    folded into ``W1``, ``b1``), with a linear, ReLU or ReLU6 activation. The split is checked
    numerically (:func:`check_split`).
    """
    k = keras()
    walk, layer = _walk(backbone)
    found = _layer_weights(walk, layer)
    if isinstance(found, str):
        return found
    weights, activation = found
    seam = _seam(walk.norms, weights[C.TAIL_W].shape[1])
    if isinstance(seam, str):
        return seam
    try:
        inner = _truncated(walk.owners, layer)
    except (ValueError, StopIteration) as exc:
        return f"the backbone cannot be cut at {layer.name!r}: {exc}"
    shape = [int(d) for d in layer.input.shape[1:]]
    positions, width = int(np.prod(shape[:-1])) if walk.pooled else 1, shape[-1]
    # trunk[N, P, F]: a pooled convolution's H x W positions, or P = 1 for a Dense layer.
    trunk = k.Model(backbone.inputs, k.layers.Reshape((positions, width))(inner.output), name=C.TRUNK)
    init = {**weights, C.SEAM_MEAN: seam[0], C.SEAM_INV_STD: seam[1]}
    split = TailSplit(trunk, layer.name, activation, init, positions)
    why = check_split(split, backbone, x)
    return why or split


def check_split(split: TailSplit, backbone: Any, x: np.ndarray) -> str | None:
    """``None`` when ``tail(trunk(x))`` reproduces the backbone's embeddings of ``x`` within
    :data:`SPLIT_TOLERANCE` (relative to the largest embedding), else what differs."""
    a = split.trunk.predict(x, verbose=0)
    d = split.init[C.TAIL_W].shape[1]
    dummy_head = {C.WEIGHTS: np.zeros((d, 1)), C.BIAS: np.zeros(1), C.MASK: np.ones(1)}
    z = T.forward({**split.init, **dummy_head}, a, split.activation)["z"]
    want = backbone.predict(x, verbose=0)
    if z.shape != want.shape:
        return f"the split at {split.layer!r} gives embeddings of shape {z.shape[1:]}, the backbone {want.shape[1:]}"
    diff = float(np.abs(z - want).max())
    if not diff <= SPLIT_TOLERANCE * max(1.0, float(np.abs(want).max())):
        return f"the split at {split.layer!r} does not reproduce the backbone (max difference {diff:.3g})"
    return None


def tail_files(split: TailSplit, head: tuple[np.ndarray, np.ndarray, np.ndarray], opset: int) -> dict[str, Any]:
    """``{file: (content, role, format, extra)}``: the trunk models and the tail's graphs."""

    f, d = split.init[C.TAIL_W].shape
    cap, act, p = head[0].shape[1], split.activation, split.positions
    buf = __import__("io").BytesIO()
    np.savez(buf, **split.init)
    files = {
        "trunk.fp32.tflite": (to_tflite(split.trunk, output_name=C.TRUNK), C.TRUNK, "tflite", {}),
        "trunk.fp32.onnx": (keras_to_onnx(split.trunk, opset), C.TRUNK, "onnx", {}),
        T.INIT_FILE: (buf.getvalue(), "tail_init", "npz", {}),
        T.INFER_FILE: (tail_infer_onnx(f, d, cap, act, p), "tail_infer", "onnx", {}),
        T.TFLITE_FILE: (tail_tflite(f, d, cap, act, p), "tail", "tflite", {"signatures": list(T.TFLITE_SIGNATURES)}),
    }
    for opt in OPTIMIZERS:
        graph = tail_train_loop_onnx(f, d, cap, opt, act, p)
        files[T.TRAIN_FILE.format(optimizer=opt)] = (graph, "tail_train_loop", "onnx", {C.OPTIMIZER: opt})
    return files


def verify_tail(
    split: TailSplit,
    files: dict[str, Any],
    head: tuple[np.ndarray, np.ndarray, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
) -> dict[str, Any]:
    """Run every tail file in onnxruntime and LiteRT against Keras and the float64 reference.

    ``x`` are parity inputs, ``y`` their class indices (the factory head's predictions). The
    training check runs 2 epochs of batch 8 per optimizer from the factory weights, with a
    learning rate that moves the weights (SGD 0.1, Adam 0.01), and compares the trained
    tensors. Each comparison with the reference allows :data:`FLOOR_FACTOR` x its precision
    floor (recorded as ``*_float32_floor``). Returns the measured differences, with ``passed``
    and ``failures``.
    """

    a_ref = split.trunk.predict(x, verbose=0).astype(np.float32)
    out: dict[str, Any] = {"failures": []}
    for fmt in ("onnx", "tflite"):
        got = TailRuntime.trunk_outputs(files[f"trunk.fp32.{fmt}"][0], fmt, x)
        out[f"trunk_{fmt}_max_abs_diff"] = diff = float(np.abs(got - a_ref).max())
        if not diff <= TRUNK_TOLERANCE * max(1.0, float(np.abs(a_ref).max())):
            out["failures"].append(f"trunk.fp32.{fmt} differs from Keras by {diff:.3g}")
    weights = {**split.init, C.WEIGHTS: head[0], C.BIAS: head[1], C.MASK: head[2]}
    onehot = np.eye(head[0].shape[1], dtype=np.float32)[y]
    runtimes = {fmt: TailRuntime.from_files(files, fmt, split.activation) for fmt in ("onnx", "tflite")}
    for opt, lr in TAIL_CHECK_RATES.items():  # the steps edgetl verify repeats on the written bundle
        _train_checks(out, runtimes, weights, a_ref, onehot, opt, lr)
    want = T.forward(weights, a_ref, split.activation)["p"]
    floor = float(np.abs(T.forward(weights, a_ref, split.activation, np.float32)["p"] - want).max())
    out["infer_float32_floor"] = floor
    tolerance = INFER_TOLERANCE + FLOOR_FACTOR * floor
    for fmt, rt in runtimes.items():
        p = rt.probabilities(weights, a_ref)
        out[f"infer_{fmt}_max_abs_diff"] = diff = float(np.abs(p - want).max())
        if not diff <= tolerance:
            out["failures"].append(
                f"tail inference in {fmt} differs from the reference by {diff:.3g} (> {tolerance:.3g})"
            )
    out["passed"] = not out["failures"]
    return out


def tail_step(
    plan: Any,
    backbone: Any,
    head: tuple[np.ndarray, np.ndarray, np.ndarray],
    references: Any,
) -> tuple[dict[str, Any], dict, Any]:
    """Export's tail step: ``(files, manifest section, trunk model or None)``; ``files`` as
    :func:`tail_files` gives them, all fp32.

    A backbone without an eligible last layer gives no files and a section that says why
    (``{"available": false, "reason": ...}``). A tail whose files fail their checks is left out
    the same way, with a :class:`~edgetl.errors.TailLeftOut` warning (nobody asked for the tail:
    the export must not fail for it), or is an export error with ``plan.strict``.
    """
    if getattr(plan.run.config, "fusion", "none") != "none" or getattr(plan.run.config, "head_hidden_units", 0):
        return (
            {},
            {"available": False, "reason": "the seam is not the backbone's embedding (fusion or hidden head layer)"},
            None,
        )
    split = find_tail(backbone, references.x)
    if isinstance(split, str):
        return {}, {"available": False, "reason": split}, None
    files = tail_files(split, head, plan.opset)
    labels = np.argmax(references.probabilities, axis=1)
    checks = verify_tail(split, files, head, references.x, labels)
    if not checks["passed"]:
        reason = "the trainable tail failed its checks: " + "; ".join(checks["failures"])
        if plan.strict:
            raise BundleError(reason)
        warnings.warn(f"{reason}; the bundle personalizes head-only", TailLeftOut, stacklevel=2)
        return {}, {"available": False, "reason": reason, "checks": _measures(checks)}, None
    f, d = split.init[C.TAIL_W].shape
    section = {
        "available": True,
        "layer": split.layer,
        "activation": split.activation,
        "trunk_size": int(f),
        "positions": split.positions,
        "embedding_size": int(d),
        "optimizers": list(OPTIMIZERS),
        "loss": "softmax cross-entropy + l2/2 (||W - W0||^2 + ||W1 - W1_0||^2)",
        "replay": f"replay.npz key {T.REPLAY_KEY!r}",
        "checks": _measures(checks),
    }
    return files, section, split.trunk


def _measures(checks: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in checks.items() if k not in ("passed", "failures")}


def _train_checks(
    out: dict[str, Any], runtimes: dict[str, Any], weights: dict, a: np.ndarray, onehot: np.ndarray, opt: str, lr: float
) -> None:
    """Each runtime against the float64 reference, with the head's rule (edgetl.device._verify:
    ``HEAD_STEP_ATOL + HEAD_STEP_RTOL * how far the weights moved``; for Adam the 99th
    percentile, as its update carries float32's relative error of each gradient) plus
    :data:`FLOOR_FACTOR` x the precision floor, and the runtimes against each other (SGD: within
    :data:`RUNTIME_TOLERANCE`)."""

    trained = {fmt: rt.train_plan(weights, a, onehot, opt, lr=lr, **TAIL_CHECK_STEPS) for fmt, rt in runtimes.items()}
    ref, out[f"{opt}_float32_floor"], tolerance = tail_reference(runtimes["onnx"], weights, a, onehot, opt, lr)

    def diff(x: dict, y: dict) -> float:
        return weights_difference(x, y, opt)

    for fmt, state in trained.items():
        out[f"{opt}_{fmt}_vs_reference"] = d = diff(state, ref)
        if not d <= tolerance:
            out["failures"].append(
                f"tail {opt} in {fmt} differs from the float64 reference by {d:.3g} (> {tolerance:.3g})"
            )
    out[f"{opt}_onnx_vs_tflite"] = d = diff(trained["onnx"], trained["tflite"])
    limit = RUNTIME_TOLERANCE if opt == "sgd" else tolerance
    if not d <= limit:
        out["failures"].append(f"tail {opt}: onnxruntime and LiteRT differ by {d:.3g} (> {limit:.3g})")
    out[f"{opt}_tolerance"] = tolerance
