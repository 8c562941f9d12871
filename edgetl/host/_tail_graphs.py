"""The tail's graphs: inference and many-step training, in ONNX and TFLite, builtin ops only.

The math is :mod:`edgetl.bundle._tail` (its float64 reference is what export checks both
runtimes against). The arrangement follows the head's loop graphs
(:mod:`edgetl.host._head_loop_graphs`): the whole step plan goes in, the runtime loops (ONNX
``Scan``, TFLite ``WHILE``) and the trunk activations are gathered per step inside the loop,
so memory stays O(N F) whatever the epochs. Unlike ``head.tflite``, ``tail.tflite`` is
**stateless**: weights and optimizer state go in and come out as tensors, as in ONNX, so
both runtimes have one interface (and no resource variables to reset between users).

Not folded like the head's ``[W; b]^T``: the tail has two layers and a nonlinearity between
them; four separate tensors keep the graph readable, and the step is dominated by the
``a^T gpre`` product (F x D), not by node count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgetl._quiet import native_output_silenced
from edgetl.bundle import _contract as C
from edgetl.bundle._head import ADAM_BETA1, ADAM_BETA2, ADAM_EPS, MASK_NEG, OPTIMIZERS
from edgetl.bundle._tail import (
    ACTIVATIONS,
    ANCHORS,
    INFER_INPUTS,
    LOOP_INPUTS,
    STATE,
    TFLITE_SIGNATURES,
    WEIGHTS,
)
from edgetl.host._head_loop_graphs import IR_VERSION, OPSET, _one_minus_pow
from edgetl.host._tf import tf


class _Graph:
    """A tiny ONNX node builder: ``g.op("MatMul", a, b)`` returns a fresh output name."""

    def __init__(self, prefix: str) -> None:
        from onnx import helper

        self.h, self.nodes, self.prefix, self.count = helper, [], prefix, 0

    def op(self, kind: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        self.count += 1
        name = out or f"{self.prefix}{kind.lower()}{self.count}"
        self.nodes.append(self.h.make_node(kind, list(inputs), [name], **attrs))
        return name


def _shapes(f: int, d: int, c: int, positions: int = 1) -> dict[str, list[Any]]:
    weights = {C.TAIL_W: [f, d], C.TAIL_B: [d], C.WEIGHTS: [d, c], C.BIAS: [c]}
    shapes: dict[str, list[Any]] = {
        C.TRUNK: ["N", positions, f],
        C.LABELS: ["N", c],
        C.ORDER: ["S", "B"],
        C.ROW_WEIGHT: ["S", "B"],
    }
    shapes.update(mask=[c], mean=[d], inv_std=[d], W0=[d, c], W1_0=[f, d], lr=[], l2=[], momentum=[], t=[])
    shapes.update(weights)
    for w, shape in weights.items():
        for prefix in ("vel_", "m_", "v_"):
            shapes[prefix + w] = shape
    return shapes


def _consts(h: Any) -> list[Any]:
    from onnx import TensorProto

    f, i64, f64 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.DOUBLE
    return [
        h.make_tensor("one", f, [], [1.0]),
        h.make_tensor("zero", f, [], [0.0]),
        h.make_tensor("six", f, [], [6.0]),
        h.make_tensor("ax01", i64, [2], [0, 1]),
        h.make_tensor("half", f, [], [0.5]),
        h.make_tensor("neg_big", f, [], [MASK_NEG]),
        h.make_tensor("tiny", f, [], [1e-12]),
        h.make_tensor("ax0", i64, [1], [0]),
        h.make_tensor("ax1", i64, [1], [1]),
        h.make_tensor("ax2", i64, [1], [2]),
        h.make_tensor("beta1", f, [], [ADAM_BETA1]),
        h.make_tensor("beta2", f, [], [ADAM_BETA2]),
        h.make_tensor("omb1", f, [], [1.0 - ADAM_BETA1]),
        h.make_tensor("omb2", f, [], [1.0 - ADAM_BETA2]),
        h.make_tensor("eps", f, [], [ADAM_EPS]),
        h.make_tensor("one_d", f64, [], [1.0]),
        h.make_tensor("beta1_d", f64, [], [ADAM_BETA1]),
        h.make_tensor("beta2_d", f64, [], [ADAM_BETA2]),
    ]


def _act(g: _Graph, pre: str, activation: str) -> str:
    if activation == "relu":
        return g.op("Relu", pre)
    return g.op("Clip", pre, "zero", "six") if activation == "relu6" else pre


def _forward(g: _Graph, a: str, w1: str, b1: str, w: str, b: str, activation: str) -> tuple[str, str, str]:
    """pre ``[B, P, D]``, z and the masked logits of rows ``a[B, P, F]``; ``mask_bias`` must exist."""
    pre = g.op("Add", g.op("MatMul", a, w1), b1)
    pooled = g.op("ReduceMean", _act(g, pre, activation), axes=[1], keepdims=0)
    z = g.op("Mul", g.op("Sub", pooled, C.SEAM_MEAN), C.SEAM_INV_STD)
    logits = g.op("Add", g.op("Add", g.op("MatMul", z, w), b), "mask_bias")
    return pre, z, logits


def tail_infer_onnx(
    trunk_size: int, embedding_size: int, max_classes: int, activation: str, positions: int = 1
) -> bytes:
    """``probabilities[N, C]`` from ``trunk[N, P, F]`` and the tail's tensors (:data:`INFER_INPUTS`)."""
    import onnx

    _check(trunk_size, embedding_size, max_classes, activation)
    g = _Graph("i_")
    h = g.h
    g.op("Mul", g.op("Sub", "one", C.MASK), "neg_big", out="mask_bias")
    _, _, logits = _forward(g, C.TRUNK, C.TAIL_W, C.TAIL_B, C.WEIGHTS, C.BIAS, activation)
    g.op("Softmax", logits, axis=-1, out=C.PROBABILITIES)
    shapes = _shapes(trunk_size, embedding_size, max_classes, positions)
    f = onnx.TensorProto.FLOAT
    graph = h.make_graph(
        g.nodes,
        "edgetl_tail_infer",
        [h.make_tensor_value_info(x, f, shapes[x]) for x in INFER_INPUTS],
        [h.make_tensor_value_info(C.PROBABILITIES, f, ["N", max_classes])],
        initializer=_consts(h),
    )
    return _finish(graph)


def _finish(graph: Any) -> bytes:
    """The model, with only the constants its nodes (and the loop body's) use."""
    import onnx
    from onnx import helper

    used = {i for n in graph.node for i in n.input}
    for n in graph.node:
        for attr in n.attribute:
            if attr.g.node:
                used |= {i for m in attr.g.node for i in m.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgetl")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _check(f: int, d: int, c: int, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, received {activation!r}")
    if min(f, d, c) < 1:
        raise ValueError(f"sizes must be >= 1, received F={f}, D={d}, C={c}")


def _sgd_rates(g: _Graph, activation: str) -> None:
    """``lr_head`` and ``lr_tail``: the user's rate over each layer's normaliser (:mod:`edgetl.bundle._tail`)."""
    _, z0, _ = _forward(g, C.TRUNK, C.TAIL_W, C.TAIL_B, C.WEIGHTS, C.BIAS, activation)
    z_sq = g.op("ReduceMean", g.op("ReduceSumSquare", z0, axes=[1], keepdims=0), keepdims=0)
    pooled = g.op("ReduceMean", C.TRUNK, axes=[1], keepdims=0)
    a_sq = g.op("ReduceMean", g.op("ReduceSumSquare", pooled, axes=[1], keepdims=0), keepdims=0)
    w_scaled = g.op("Mul", g.op("Mul", C.WEIGHTS, g.op("Unsqueeze", C.SEAM_INV_STD, "ax1")), C.MASK)
    active = g.op("Max", g.op("ReduceSum", C.MASK, keepdims=0), "one")
    w_sq = g.op("Add", g.op("Div", g.op("ReduceSumSquare", w_scaled, keepdims=0), active), "one")
    g.op("Div", C.LEARNING_RATE, g.op("Add", z_sq, "one"), out="lr_head")
    g.op("Div", C.LEARNING_RATE, g.op("Mul", g.op("Add", a_sq, "one"), w_sq), out="lr_tail")


def _adam_schedule(g: _Graph) -> None:
    """Per-step bias corrections ``bc1_steps``, ``bc2_steps`` [S], in float64 (``1 - 0.999^t``
    loses digits to cancellation in float32), and ``t_out``."""
    from onnx import TensorProto

    f64, f = TensorProto.DOUBLE, TensorProto.FLOAT
    steps = g.op("Squeeze", g.op("Cast", g.op("Gather", g.op("Shape", C.ORDER), "ax0", axis=0), to=f64), "ax0")
    t_d = g.op("Cast", C.STEP_COUNT, to=f64)
    first = g.op("Add", t_d, "one_d")
    limit = g.op("Add", g.op("Add", t_d, steps), "one_d")
    t_steps = g.op("Range", first, limit, "one_d")
    g.op("Cast", g.op("Sub", "one_d", g.op("Pow", "beta1_d", t_steps)), to=f, out="bc1_steps")
    g.op("Cast", g.op("Sub", "one_d", g.op("Pow", "beta2_d", t_steps)), to=f, out="bc2_steps")
    g.op("Add", C.STEP_COUNT, g.op("Cast", steps, to=f), out=C.state_output(C.STEP_COUNT))


def _step_body(g: _Graph, optimizer: str, activation: str) -> None:
    """One step inside the Scan: reads the loop variables, writes ``X_new`` and ``loss_s``."""
    a = g.op("Gather", C.TRUNK, "order_s", axis=0)
    y = g.op("Gather", C.LABELS, "order_s", axis=0)
    rw = g.op("Unsqueeze", "rw_s", "ax1")  # [B, 1]
    pre, z, logits = _forward(g, a, C.TAIL_W, C.TAIL_B, C.WEIGHTS, C.BIAS, activation)
    p = g.op("Softmax", logits, axis=-1)
    y_rw = g.op("Mul", y, rw)
    grad_logits = g.op("Sub", g.op("Mul", p, rw), y_rw)
    d_w, d_w1 = g.op("Sub", C.WEIGHTS, C.ANCHOR_ONNX), g.op("Sub", C.TAIL_W, C.TAIL_ANCHOR)
    g_z = g.op("Mul", g.op("MatMul", grad_logits, g.op("Transpose", C.WEIGHTS, perm=[1, 0])), "inv_std_p")
    g_h = g.op("Unsqueeze", g_z, "ax1")  # [B, 1, D]: the same gradient at every pooled position
    if activation == "linear":
        g_pre = g.op("Expand", g_h, g.op("Shape", pre))
    else:
        passes = g.op("Greater", pre, "zero")
        if activation == "relu6":
            passes = g.op("And", passes, g.op("Less", pre, "six"))
        g_pre = g.op("Mul", g_h, g.op("Cast", passes, to=1))
    a_rows, g_rows = g.op("Reshape", a, "rows_f"), g.op("Reshape", g_pre, "rows_d")  # [B P, F], [B P, D]
    grads = {
        C.WEIGHTS: g.op("Add", g.op("MatMul", g.op("Transpose", z, perm=[1, 0]), grad_logits), g.op("Mul", C.L2, d_w)),
        C.BIAS: g.op("ReduceSum", grad_logits, "ax0", keepdims=0),
        C.TAIL_W: g.op("Add", g.op("MatMul", g.op("Transpose", a_rows, perm=[1, 0]), g_rows), g.op("Mul", C.L2, d_w1)),
        C.TAIL_B: g.op("ReduceSum", g_rows, "ax0", keepdims=0),
    }
    nll = g.op("Neg", g.op("ReduceSum", g.op("Mul", y_rw, g.op("Log", g.op("Clip", p, "tiny", "one"))), keepdims=0))
    offsets = g.op("Add", g.op("ReduceSumSquare", d_w, keepdims=0), g.op("ReduceSumSquare", d_w1, keepdims=0))
    g.op("Add", nll, g.op("Mul", g.op("Mul", "half", C.L2), offsets), out="loss_s")
    for w in WEIGHTS:
        if optimizer == "sgd":
            vel = g.op("Add", g.op("Mul", C.MOMENTUM, f"vel_{w}"), grads[w], out=f"vel_{w}_new")
            rate = "lr_head" if w in (C.WEIGHTS, C.BIAS) else "lr_tail"
            g.op("Sub", w, g.op("Mul", rate, vel), out=f"{w}_new")
        else:
            m = g.op("Add", g.op("Mul", "beta1", f"m_{w}"), g.op("Mul", "omb1", grads[w]), out=f"m_{w}_new")
            sq = g.op("Mul", grads[w], grads[w])
            v = g.op("Add", g.op("Mul", "beta2", f"v_{w}"), g.op("Mul", "omb2", sq), out=f"v_{w}_new")
            denom = g.op("Add", g.op("Sqrt", g.op("Div", v, "bc2_s")), "eps")
            g.op("Sub", w, g.op("Div", g.op("Mul", C.LEARNING_RATE, g.op("Div", m, "bc1_s")), denom), out=f"{w}_new")


def tail_train_loop_onnx(
    trunk_size: int, embedding_size: int, max_classes: int, optimizer: str, activation: str, positions: int = 1
) -> bytes:
    """All steps of a step plan in one run: an ONNX ``Scan`` over the steps.

    Inputs: :data:`edgetl.bundle._tail.LOOP_INPUTS` (``order`` int64, the rest float32);
    outputs: the state with ``_out`` names (Adam's ``t_out = t + S``) and ``losses[S]``, each
    step's loss at its pre-step weights. Opset 17, IR version 8, plain onnxruntime.

    Raises:
        ValueError: unknown optimizer or activation, or a size < 1.
    """
    import onnx

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, received {optimizer!r}")
    _check(trunk_size, embedding_size, max_classes, activation)
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    shapes = _shapes(trunk_size, embedding_size, max_classes, positions)
    g = _Graph("o_")
    h = g.h
    g.op("Mul", g.op("Sub", "one", C.MASK), "neg_big", out="mask_bias")
    g.op("Mul", C.SEAM_INV_STD, "inv_p", out="inv_std_p")  # the pooling's 1/P, folded once
    if optimizer == "sgd":
        _sgd_rates(g, activation)
    else:
        _adam_schedule(g)
    loop_vars = [s for s in STATE[optimizer] if s != C.STEP_COUNT]
    scans = [("order_s", C.ORDER, i64, ["B"]), ("rw_s", C.ROW_WEIGHT, f32, ["B"])]
    if optimizer == "adam":
        scans += [("bc1_s", "bc1_steps", f32, []), ("bc2_s", "bc2_steps", f32, [])]
    body = _Graph("b_")
    _step_body(body, optimizer, activation)
    body_graph = h.make_graph(
        body.nodes,
        "step",
        [h.make_tensor_value_info(v, f32, shapes[v]) for v in loop_vars]
        + [h.make_tensor_value_info(name, dtype, shape) for name, _, dtype, shape in scans],
        [h.make_tensor_value_info(f"{v}_new", f32, shapes[v]) for v in loop_vars]
        + [h.make_tensor_value_info("loss_s", f32, [])],
    )
    g.nodes.append(
        h.make_node(
            "Scan",
            loop_vars + [src for _, src, _, _ in scans],
            [f"{v}_out" for v in loop_vars] + [C.LOSSES],
            body=body_graph,
            num_scan_inputs=len(scans),
        )
    )
    graph = h.make_graph(
        g.nodes,
        f"edgetl_tail_train_loop_{optimizer}",
        [h.make_tensor_value_info(x, i64 if x == C.ORDER else f32, shapes[x]) for x in LOOP_INPUTS[optimizer]],
        [h.make_tensor_value_info(f"{s}_out", f32, shapes[s]) for s in STATE[optimizer]]
        + [h.make_tensor_value_info(C.LOSSES, f32, ["S"])],
        initializer=_consts(h)
        + [
            h.make_tensor("inv_p", f32, [], [1.0 / positions]),
            h.make_tensor("rows_f", i64, [2], [-1, trunk_size]),
            h.make_tensor("rows_d", i64, [2], [-1, embedding_size]),
        ],
    )
    return _finish(graph)


# ----------------------------------------------------------------------------- TFLite


def tail_tflite(trunk_size: int, embedding_size: int, max_classes: int, activation: str, positions: int = 1) -> bytes:
    """``tail.tflite``: signatures ``infer``, ``train_steps_sgd``, ``train_steps_adam``.

    Stateless (inputs and outputs as the ONNX graphs, :data:`edgetl.bundle._tail.TFLITE_SIGNATURES`),
    converted with ``TFLITE_BUILTINS`` only (runs on ai-edge-litert, which has no Flex delegate).
    """
    _check(trunk_size, embedding_size, max_classes, activation)
    t = tf()
    shapes = _shapes(trunk_size, embedding_size, max_classes, positions)
    shapes.update(
        trunk=[None, positions, trunk_size], labels=[None, max_classes], order=[None, None], row_weight=[None, None]
    )
    module = t.Module()
    fns = []
    for name, inputs in TFLITE_SIGNATURES.items():
        body = _tflite_infer if name == "infer" else _tflite_train(name.removeprefix("train_steps_"))
        spec = [t.TensorSpec(shapes[x], t.int64 if x == C.ORDER else t.float32, name=x) for x in inputs]
        fn = t.function(_bind(body, name, inputs, activation), input_signature=spec)
        setattr(module, name, fn)
        fns.append(fn.get_concrete_function())
    conv = t.lite.TFLiteConverter.from_concrete_functions(fns, module)
    conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS]
    with native_output_silenced():
        return conv.convert()


def _bind(body: Any, signature: str, names: tuple[str, ...], activation: str) -> Any:
    """A function of positional tensors (the signature's order) that calls ``body(dict, activation)``;
    named ``signature``: the converter takes the signature key from the function's name."""

    def fn(*args: Any) -> Any:
        return body(dict(zip(names, args)), activation)

    fn.__name__ = fn.__qualname__ = signature
    return fn


def _tf_act(t: Any, pre: Any, activation: str) -> Any:
    if activation == "relu":
        return t.nn.relu(pre)
    return t.clip_by_value(pre, 0.0, 6.0) if activation == "relu6" else pre


def _tf_forward(t: Any, x: dict[str, Any], a: Any, w: dict[str, Any], activation: str) -> tuple[Any, Any, Any]:
    """pre ``[B, P, D]`` (as ``[B P, D]`` rows through FULLY_CONNECTED), z, probabilities."""
    f, d = w[C.TAIL_W].shape
    positions = a.shape[1]
    pre = t.reshape(t.matmul(t.reshape(a, [-1, f]), w[C.TAIL_W]) + w[C.TAIL_B], [-1, positions, d])
    z = (t.reduce_mean(_tf_act(t, pre, activation), axis=1) - x[C.SEAM_MEAN]) * x[C.SEAM_INV_STD]
    logits = t.matmul(z, w[C.WEIGHTS]) + w[C.BIAS] + (1.0 - x[C.MASK]) * MASK_NEG
    return pre, z, t.nn.softmax(logits)


def _tflite_infer(x: dict[str, Any], activation: str) -> Any:
    return {C.PROBABILITIES: _tf_forward(tf(), x, x[C.TRUNK], x, activation)[2]}


def _tflite_train(optimizer: str) -> Any:
    def body(x: dict[str, Any], activation: str) -> Any:
        return _tf_train(x, optimizer, activation)

    return body


def _tf_grads(t: Any, x: dict[str, Any], w: dict[str, Any], i: Any, activation: str) -> tuple[dict[str, Any], Any]:
    idx = t.gather(x[C.ORDER], i)
    a, rw = t.gather(x[C.TRUNK], idx), t.expand_dims(t.gather(x[C.ROW_WEIGHT], i), -1)
    y_rw = t.gather(x[C.LABELS], idx) * rw
    pre, z, p = _tf_forward(t, x, a, w, activation)
    g = p * rw - y_rw
    f, d = w[C.TAIL_W].shape
    g_h = t.expand_dims(t.matmul(g, w[C.WEIGHTS], transpose_b=True) * x[C.SEAM_INV_STD] / float(a.shape[1]), 1)
    if activation == "linear":
        g_pre = g_h + t.zeros_like(pre)
    else:
        passes = pre > 0.0
        if activation == "relu6":
            passes = t.logical_and(passes, pre < 6.0)
        g_pre = g_h * t.cast(passes, t.float32)
    a_rows, g_rows = t.reshape(a, [-1, f]), t.reshape(g_pre, [-1, d])
    d_w, d_w1 = w[C.WEIGHTS] - x[C.ANCHOR_ONNX], w[C.TAIL_W] - x[C.TAIL_ANCHOR]
    grads = {
        C.WEIGHTS: t.matmul(z, g, transpose_a=True) + x[C.L2] * d_w,
        C.BIAS: t.reduce_sum(g, axis=0),
        C.TAIL_W: t.matmul(a_rows, g_rows, transpose_a=True) + x[C.L2] * d_w1,
        C.TAIL_B: t.reduce_sum(g_rows, axis=0),
    }
    nll = -t.reduce_sum(y_rw * t.math.log(t.clip_by_value(p, 1e-12, 1.0)))
    loss = nll + 0.5 * x[C.L2] * (t.reduce_sum(d_w * d_w) + t.reduce_sum(d_w1 * d_w1))
    return grads, loss


def _tf_sgd_rates(t: Any, x: dict[str, Any], activation: str) -> dict[str, Any]:
    _, z0, _ = _tf_forward(t, x, x[C.TRUNK], x, activation)
    z_sq = t.reduce_mean(t.reduce_sum(z0 * z0, axis=1))
    pooled = t.reduce_mean(x[C.TRUNK], axis=1)
    a_sq = t.reduce_mean(t.reduce_sum(pooled * pooled, axis=1))
    w_scaled = x[C.WEIGHTS] * t.expand_dims(x[C.SEAM_INV_STD], 1) * x[C.MASK]
    w_sq = t.reduce_sum(w_scaled * w_scaled) / t.maximum(t.reduce_sum(x[C.MASK]), 1.0) + 1.0
    head, tail = x[C.LEARNING_RATE] / (z_sq + 1.0), x[C.LEARNING_RATE] / ((a_sq + 1.0) * w_sq)
    return {C.WEIGHTS: head, C.BIAS: head, C.TAIL_W: tail, C.TAIL_B: tail}


def _tf_train(x: dict[str, Any], optimizer: str, activation: str) -> Any:
    t = tf()
    steps = t.shape(x[C.ORDER], out_type=t.int32)[0]
    step_ids = t.range(steps)  # outside the body: RANGE's output shape is dynamic
    names = [s for s in STATE[optimizer] if s != C.STEP_COUNT]
    if optimizer == "sgd":
        rates = _tf_sgd_rates(t, x, activation)
    else:
        step_t = x[C.STEP_COUNT] + 1.0 + t.cast(step_ids, t.float32)
        bc1, bc2 = _one_minus_pow(t, ADAM_BETA1, step_t), _one_minus_pow(t, ADAM_BETA2, step_t)

    def body(i: Any, losses: Any, *values: Any) -> Any:
        s = dict(zip(names, values))
        grads, loss = _tf_grads(t, x, s, i, activation)
        for w in WEIGHTS:
            if optimizer == "sgd":
                s[f"vel_{w}"] = x[C.MOMENTUM] * s[f"vel_{w}"] + grads[w]
                s[w] = s[w] - rates[w] * s[f"vel_{w}"]
            else:
                s[f"m_{w}"] = ADAM_BETA1 * s[f"m_{w}"] + (1.0 - ADAM_BETA1) * grads[w]
                s[f"v_{w}"] = ADAM_BETA2 * s[f"v_{w}"] + (1.0 - ADAM_BETA2) * grads[w] * grads[w]
                m_hat = s[f"m_{w}"] / t.gather(bc1, i)
                s[w] = s[w] - x[C.LEARNING_RATE] * m_hat / (t.sqrt(s[f"v_{w}"] / t.gather(bc2, i)) + ADAM_EPS)
        return (i + 1, t.where(step_ids == i, loss, losses), *[s[n] for n in names])

    start = (t.constant(0), t.zeros([steps], t.float32), *[x[n] for n in names])
    _, losses, *final = t.while_loop(lambda i, *_: i < steps, body, start)
    out = {f"{n}_out": v for n, v in zip(names, final)}
    if optimizer == "adam":
        out[C.state_output(C.STEP_COUNT)] = x[C.STEP_COUNT] + t.cast(steps, t.float32)
    out[C.LOSSES] = losses
    return out


def anchors_of(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The L2 anchors a fresh training call starts from: the weights it starts with."""
    return {anchor: np.asarray(weights[w], np.float32) for w, anchor in ANCHORS.items()}
