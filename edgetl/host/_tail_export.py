"""Export of the trainable tail: split the backbone, write the tail's files, verify them.

Eligible: the backbone's embedding (before the seam standardization) is the output of a
``Dense`` layer with a ``relu`` or linear activation, reachable through nested models that
are each applied directly to their parent's input (how ``edgetl train`` builds its models).
The split is checked numerically: ``tail(trunk(x))`` must reproduce the exported backbone's
embeddings on the parity inputs, or the bundle stays head-only and the manifest says why.
A 1x1 convolution followed by pooling is not split yet (see the issue 24 report).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgetl.bundle import _contract as C
from edgetl.bundle import _tail as T
from edgetl.bundle._head import OPTIMIZERS
from edgetl.device._tail import TailRuntime
from edgetl.device._verify import HEAD_STEP_ATOL, HEAD_STEP_RTOL
from edgetl.errors import BundleError
from edgetl.host._tail_graphs import tail_infer_onnx, tail_tflite, tail_train_loop_onnx
from edgetl.host._tf import keras

SPLIT_TOLERANCE = 1e-3  # max |tail(trunk(x)) - backbone(x)| on standardized embeddings (float32 reorderings)
RUNTIME_TOLERANCE = 1e-5  # SGD: onnxruntime vs LiteRT after the same steps (issue 24's target)


@dataclass
class TailSplit:
    trunk: Any  # Keras model: raw input -> trunk activations [N, F]
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


def find_tail(backbone: Any, x: np.ndarray) -> TailSplit | str:
    """The trunk/tail split of an exported ``backbone``, or the reason there is none."""
    k = keras()
    owners, layer, norm = [backbone], _output_layer(backbone), None
    while True:
        if isinstance(layer, k.Model):
            owners.append(layer)
            layer = _output_layer(layer)
        elif isinstance(layer, k.layers.Normalization) and norm is None and layer.name == "embedding_standardize":
            norm, layer = layer, _inbound_layer(layer)
        else:
            break
    if not isinstance(layer, k.layers.Dense):
        return f"the embedding comes from {layer.__class__.__name__} {getattr(layer, 'name', '?')!r}, not a Dense layer"
    activation = getattr(layer.activation, "__name__", str(layer.activation))
    if activation not in T.ACTIVATIONS:
        return f"the last Dense layer {layer.name!r} has activation {activation!r}; the tail trains {T.ACTIVATIONS}"
    owner = next(m for m in reversed(owners) if layer in m.layers)
    inner = k.Model(owner.inputs, layer.input, name="trunk_inner")
    width = int(layer.input.shape[-1])
    # [N, P, F] with P = 1: the contract's positions axis (a pooled 1x1 convolution has P > 1).
    trunk = k.Model(backbone.inputs, k.layers.Reshape((1, width))(inner(backbone.inputs[0])), name="trunk")
    W1, b1 = (w.astype(np.float32) for w in layer.get_weights())
    mean, inv_std = np.zeros(W1.shape[1], np.float32), np.ones(W1.shape[1], np.float32)
    if norm is not None:
        mean = np.asarray(norm.mean, np.float32).reshape(-1)
        inv_std = (1.0 / np.maximum(np.sqrt(np.asarray(norm.variance).reshape(-1)), k.backend.epsilon())).astype(
            np.float32
        )
    split = TailSplit(trunk, layer.name, activation, {"W1": W1, "b1": b1, "mean": mean, "inv_std": inv_std})
    a = trunk.predict(x, verbose=0)
    z = T.forward(
        {**split.init, C.WEIGHTS: np.zeros((W1.shape[1], 1)), C.BIAS: np.zeros(1), C.MASK: np.ones(1)}, a, activation
    )["z"]
    diff = float(np.abs(z - backbone.predict(x, verbose=0)).max())
    if not diff <= SPLIT_TOLERANCE * max(1.0, float(np.abs(z).max())):
        return f"the split at {layer.name!r} does not reproduce the backbone (max difference {diff:.3g})"
    return split


def tail_files(
    split: TailSplit, head: tuple[np.ndarray, np.ndarray, np.ndarray], opset: int, convert: TrunkConverters
) -> dict[str, Any]:
    """``{file: (content, role, format, extra)}``: the trunk models and the tail's graphs."""

    f, d = split.init["W1"].shape
    cap, act, p = head[0].shape[1], split.activation, split.positions
    buf = __import__("io").BytesIO()
    np.savez(buf, **split.init)
    files = {
        "trunk.fp32.tflite": (convert.tflite(split.trunk), "trunk", "tflite", {}),
        "trunk.fp32.onnx": (convert.onnx(split.trunk, opset), "trunk", "onnx", {}),
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
    tensors. Returns the measured differences, with ``ok`` and ``failures``.
    """

    a_ref = split.trunk.predict(x, verbose=0).astype(np.float32)
    out: dict[str, Any] = {"failures": []}
    for fmt in ("onnx", "tflite"):
        got = TailRuntime.trunk_outputs(files[f"trunk.fp32.{fmt}"][0], fmt, x)
        out[f"trunk_{fmt}_max_abs_diff"] = diff = float(np.abs(got - a_ref).max())
        if not diff <= 1e-4 * max(1.0, float(np.abs(a_ref).max())):
            out["failures"].append(f"trunk.fp32.{fmt} differs from Keras by {diff:.3g}")
    weights = {**split.init, C.WEIGHTS: head[0], C.BIAS: head[1], C.MASK: head[2]}
    onehot = np.eye(head[0].shape[1], dtype=np.float32)[y]
    runtimes = {fmt: TailRuntime.from_files(files, fmt, split.activation) for fmt in ("onnx", "tflite")}
    for opt, lr in (("sgd", 0.1), ("adam", 0.01)):
        _train_checks(out, runtimes, weights, a_ref, onehot, opt, lr)
    for fmt, rt in runtimes.items():
        p = rt.probabilities(weights, a_ref)
        want = T.forward({k: v.astype(np.float64) for k, v in weights.items()}, a_ref, split.activation)["p"]
        out[f"infer_{fmt}_max_abs_diff"] = diff = float(np.abs(p - want).max())
        if not diff <= 1e-5:
            out["failures"].append(f"tail inference in {fmt} differs from the reference by {diff:.3g}")
    out["passed"] = not out["failures"]
    return out


@dataclass(frozen=True)
class TrunkConverters:
    """The export's converters and artifact type, handed in by ``host._export`` (which imports
    this module: importing them back would make an import cycle)."""

    tflite: Callable[[Any], bytes]  # fp32 Keras model -> .tflite bytes
    onnx: Callable[[Any, int], bytes]  # (Keras model, opset) -> .onnx bytes
    artifact: Callable[..., Any]  # host._export.Artifact


def tail_step(
    plan: Any,
    backbone: Any,
    head: tuple[np.ndarray, np.ndarray, np.ndarray],
    references: Any,
    convert: TrunkConverters,
) -> tuple[list, dict, Any]:
    """Export's tail step: ``(artifacts, manifest section, trunk model or None)``.

    A backbone without an eligible last layer gives no files and a section that says why
    (``{"available": false, "reason": ...}``); a tail whose files fail their checks is an
    export error (the files were asked for by an eligible backbone, and a device must be
    able to trust them).
    """
    if getattr(plan.run.config, "fusion", "none") != "none" or getattr(plan.run.config, "head_hidden_units", 0):
        return (
            [],
            {"available": False, "reason": "the seam is not the backbone's embedding (fusion or hidden head layer)"},
            None,
        )
    split = find_tail(backbone, references.x)
    if isinstance(split, str):
        return [], {"available": False, "reason": split}, None
    files = tail_files(split, head, plan.opset, convert)
    labels = np.argmax(references.probabilities, axis=1)
    checks = verify_tail(split, files, head, references.x, labels)
    if not checks["passed"]:
        raise BundleError("the trainable tail failed its checks: " + "; ".join(checks["failures"]))
    artifacts = [
        convert.artifact(name, content, role, fmt, "fp32", extra) for name, (content, role, fmt, extra) in files.items()
    ]
    f, d = split.init["W1"].shape
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
        "checks": {k: v for k, v in checks.items() if k not in ("passed", "failures")},
    }
    return artifacts, section, split.trunk


def _train_checks(
    out: dict[str, Any], runtimes: dict[str, Any], weights: dict, a: np.ndarray, onehot: np.ndarray, opt: str, lr: float
) -> None:
    """Each runtime against the float64 reference, with the head's rule (edgetl.device._verify:
    ``HEAD_STEP_ATOL + HEAD_STEP_RTOL * how far the weights moved``; for Adam the 99th
    percentile, as its update carries float32's relative error of each gradient), and the
    runtimes against each other (SGD: within :data:`RUNTIME_TOLERANCE`)."""

    steps = dict(lr=lr, l2=1e-3, epochs=2, batch=8)
    trained = {fmt: rt.train_plan(weights, a, onehot, opt, **steps) for fmt, rt in runtimes.items()}
    ref = runtimes["onnx"].reference(weights, a, onehot, opt, **steps)
    moved = max(float(np.abs(ref[w] - weights[w]).max()) for w in T.WEIGHTS)
    tolerance = HEAD_STEP_ATOL + HEAD_STEP_RTOL * moved

    def diff(x: dict, y: dict) -> float:
        d = np.concatenate([np.abs(np.asarray(x[w], np.float64) - y[w]).ravel() for w in T.WEIGHTS])
        return float(d.max() if opt == "sgd" else np.percentile(d, 99))

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
