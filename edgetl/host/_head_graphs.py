"""The trainable head as graphs the device runtimes execute (host side: onnx, TensorFlow).

What the head computes, its tensor names and the float64 reference step are the head
contract, :mod:`edgetl.bundle._head`; this module builds exactly that as ONNX graphs
(``head_infer.onnx``, ``head_train_{sgd,adam}.onnx``: weights and optimizer state are
inputs and outputs, no onnxruntime-training, which is deprecated, imports torch and
rejects IR version > 10) and as one TFLite model with signatures (``head.tflite``).
Hyperparameters are inputs too, so one graph serves every learning rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgetl.bundle._head import (
    ADAM_BETA1,
    ADAM_BETA2,
    ADAM_EPS,
    HYPERPARAMETERS,
    MASK_NEG,
    STATE,
    TRAIN_INPUTS,
    state_output,
)

OPSET = 17


def _masked_softmax_nodes(h: Any, logits: str, mask: str, out: str) -> list[Any]:
    return [
        h.make_node("Sub", ["one", mask], ["inactive"]),
        h.make_node("Mul", ["inactive", "neg_big"], ["mask_bias"]),
        h.make_node("Add", [logits, "mask_bias"], ["masked_logits"]),
        h.make_node("Softmax", ["masked_logits"], [out], axis=-1),
    ]


def _consts(h: Any, onnx: Any) -> list[Any]:
    f = onnx.TensorProto.FLOAT
    return [
        h.make_tensor("one", f, [], [1.0]),
        h.make_tensor("neg_big", f, [], [MASK_NEG]),
    ]


def head_infer_onnx(embedding_size: int, max_classes: int) -> bytes:
    """``(embedding, W, b, mask) -> probabilities``."""
    import onnx
    from onnx import helper as h

    f = onnx.TensorProto.FLOAT
    d, c = embedding_size, max_classes
    nodes = [h.make_node("MatMul", ["embedding", "W"], ["xw"]), h.make_node("Add", ["xw", "b"], ["logits"])]
    nodes += _masked_softmax_nodes(h, "logits", "mask", "probabilities")
    graph = h.make_graph(
        nodes,
        "edgetl_head_infer",
        [
            h.make_tensor_value_info("embedding", f, ["batch", d]),
            h.make_tensor_value_info("W", f, [d, c]),
            h.make_tensor_value_info("b", f, [c]),
            h.make_tensor_value_info("mask", f, [c]),
        ],
        [h.make_tensor_value_info("probabilities", f, ["batch", c])],
        initializer=_consts(h, onnx),
    )
    return _finish(h, onnx, graph)


def head_train_onnx(embedding_size: int, max_classes: int, optimizer: str) -> bytes:
    """One optimizer step; inputs/outputs are listed in :func:`train_io_names`."""
    import onnx
    from onnx import helper as h

    f = onnx.TensorProto.FLOAT
    d, c = embedding_size, max_classes
    n = []
    n += [h.make_node("MatMul", ["embedding", "W"], ["xw"]), h.make_node("Add", ["xw", "b"], ["logits"])]
    n += _masked_softmax_nodes(h, "logits", "mask", "probs")
    # loss = mean(-sum(y * log p)) + l2/2 ||W - W0||^2
    n += [
        h.make_node("Clip", ["probs", "tiny", "one"], ["p_clip"]),
        h.make_node("Log", ["p_clip"], ["logp"]),
        h.make_node("Mul", ["labels", "logp"], ["ylogp"]),
        h.make_node("ReduceSum", ["ylogp", "axis1"], ["row_ll"], keepdims=0),
        h.make_node("ReduceMean", ["row_ll"], ["mean_ll"], keepdims=0),
        h.make_node("Neg", ["mean_ll"], ["ce"]),
        h.make_node("Sub", ["W", "W0"], ["dW0"]),
        h.make_node("Mul", ["dW0", "dW0"], ["dW0sq"]),
        h.make_node("ReduceSum", ["dW0sq"], ["l2sum"], keepdims=0),
        h.make_node("Mul", ["l2sum", "l2"], ["l2term2"]),
        h.make_node("Mul", ["l2term2", "half"], ["l2term"]),
        h.make_node("Add", ["ce", "l2term"], ["loss"]),
    ]
    # gradients
    n += [
        h.make_node("Shape", ["embedding"], ["eshape"]),
        h.make_node("Gather", ["eshape", "zero_i"], ["batch_i"], axis=0),
        h.make_node("Cast", ["batch_i"], ["batch_f"], to=f),
        h.make_node("Sub", ["probs", "labels"], ["pmy"]),
        h.make_node("Div", ["pmy", "batch_f"], ["g_logits"]),
        h.make_node("Transpose", ["embedding"], ["eT"], perm=[1, 0]),
        h.make_node("MatMul", ["eT", "g_logits"], ["gW_ce"]),
        h.make_node("Mul", ["dW0", "l2"], ["gW_l2"]),
        h.make_node("Add", ["gW_ce", "gW_l2"], ["gW"]),
        h.make_node("ReduceSum", ["g_logits", "axis0"], ["gb"], keepdims=0),
    ]
    inputs = list(TRAIN_INPUTS)
    outputs = [state_output("W"), state_output("b")]
    shapes = {
        "embedding": ["batch", d],
        "labels": ["batch", c],
        "mask": [c],
        "W": [d, c],
        "b": [c],
        "W0": [d, c],
        "lr": [],
        "l2": [],
    }
    if optimizer == "sgd":
        for w in ("W", "b"):
            n += [
                h.make_node("Mul", [f"vel_{w}", "momentum"], [f"mv_{w}"]),
                h.make_node("Add", [f"mv_{w}", f"g{w}"], [f"vel_{w}_out"]),
                h.make_node("Mul", [f"vel_{w}_out", "lr"], [f"step_{w}"]),
                h.make_node("Sub", [w, f"step_{w}"], [f"{w}_out"]),
            ]
        inputs += [*STATE["sgd"][2:], *HYPERPARAMETERS["sgd"]]
        outputs += [state_output(n) for n in STATE["sgd"][2:]]
        shapes.update({"vel_W": [d, c], "vel_b": [c], "momentum": []})
    elif optimizer == "adam":
        n += [
            h.make_node("Add", ["t", "one"], ["t_out"]),
            h.make_node("Pow", ["beta1", "t_out"], ["b1t"]),
            h.make_node("Pow", ["beta2", "t_out"], ["b2t"]),
            h.make_node("Sub", ["one", "b1t"], ["bc1"]),
            h.make_node("Sub", ["one", "b2t"], ["bc2"]),
            h.make_node("Sub", ["one", "beta1"], ["omb1"]),
            h.make_node("Sub", ["one", "beta2"], ["omb2"]),
        ]
        for w in ("W", "b"):
            n += [
                h.make_node("Mul", [f"m_{w}", "beta1"], [f"m1_{w}"]),
                h.make_node("Mul", [f"g{w}", "omb1"], [f"m2_{w}"]),
                h.make_node("Add", [f"m1_{w}", f"m2_{w}"], [f"m_{w}_out"]),
                h.make_node("Mul", [f"g{w}", f"g{w}"], [f"gsq_{w}"]),
                h.make_node("Mul", [f"v_{w}", "beta2"], [f"v1_{w}"]),
                h.make_node("Mul", [f"gsq_{w}", "omb2"], [f"v2_{w}"]),
                h.make_node("Add", [f"v1_{w}", f"v2_{w}"], [f"v_{w}_out"]),
                h.make_node("Div", [f"m_{w}_out", "bc1"], [f"mhat_{w}"]),
                h.make_node("Div", [f"v_{w}_out", "bc2"], [f"vhat_{w}"]),
                h.make_node("Sqrt", [f"vhat_{w}"], [f"sq_{w}"]),
                h.make_node("Add", [f"sq_{w}", "eps"], [f"den_{w}"]),
                h.make_node("Div", [f"mhat_{w}", f"den_{w}"], [f"upd_{w}"]),
                h.make_node("Mul", [f"upd_{w}", "lr"], [f"step_{w}"]),
                h.make_node("Sub", [w, f"step_{w}"], [f"{w}_out"]),
            ]
        inputs += list(STATE["adam"][2:])
        outputs += [state_output(n) for n in STATE["adam"][2:]]
        shapes.update({"m_W": [d, c], "m_b": [c], "v_W": [d, c], "v_b": [c], "t": []})
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', received {optimizer!r}")
    outputs += ["loss"]
    init = _consts(h, onnx) + [
        h.make_tensor("tiny", f, [], [1e-12]),
        h.make_tensor("half", f, [], [0.5]),
        h.make_tensor("axis0", onnx.TensorProto.INT64, [1], [0]),
        h.make_tensor("axis1", onnx.TensorProto.INT64, [1], [1]),
        h.make_tensor("zero_i", onnx.TensorProto.INT64, [], [0]),
    ]
    if optimizer == "adam":
        init += [
            h.make_tensor("beta1", f, [], [ADAM_BETA1]),
            h.make_tensor("beta2", f, [], [ADAM_BETA2]),
            h.make_tensor("eps", f, [], [ADAM_EPS]),
        ]
    out_shapes = {o: shapes.get(o[: -len("_out")], []) for o in outputs if o != "loss"}
    graph = h.make_graph(
        n,
        f"edgetl_head_train_{optimizer}",
        [h.make_tensor_value_info(i, f, shapes[i]) for i in inputs],
        [h.make_tensor_value_info(o, f, out_shapes.get(o, [])) for o in outputs],
        initializer=init,
    )
    return _finish(h, onnx, graph)


def _finish(h: Any, onnx: Any, graph: Any) -> bytes:
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="edgetl")
    model.ir_version = 8  # readable by older onnxruntime builds on devices
    onnx.checker.check_model(model)
    return model.SerializeToString()


def head_tflite(W: np.ndarray, b: np.ndarray, mask: np.ndarray) -> bytes:
    """The same head as a TFLite model with signatures, built from builtin ops only.

    Signatures (all tensors float32):
        infer(embedding[B,D]) -> probabilities[B,C]
        train(embedding[B,D], labels[B,C] one-hot, lr, l2, momentum, optimizer) -> loss
            ``optimizer`` 0 = SGD with momentum, 1 = Adam; one step, state kept inside.
        get_weights() -> W, b, mask, anchor
        set_weights(W, b, mask, anchor) -> ok   (also resets the optimizer state)

    ``anchor`` is the W the L2 term pulls toward (the factory head). ai-edge-litert has no
    Flex delegate, so there is no autodiff and no tf.cond: the gradient is written by hand
    and the optimizer is chosen by blending both updates with ``optimizer`` in {0, 1}.
    """
    from edgetl.host._tf import tf

    t = tf()
    d, c = W.shape

    class Head(t.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = t.Variable(W, dtype=t.float32)
            self.b = t.Variable(b, dtype=t.float32)
            self.mask = t.Variable(mask, dtype=t.float32)
            self.anchor = t.Variable(W, dtype=t.float32)
            zeros_w, zeros_b = np.zeros_like(W), np.zeros_like(b)
            self.vel_W, self.vel_b = t.Variable(zeros_w), t.Variable(zeros_b)
            self.m_W, self.m_b = t.Variable(zeros_w), t.Variable(zeros_b)
            self.v_W, self.v_b = t.Variable(zeros_w), t.Variable(zeros_b)
            self.t = t.Variable(0.0)

        def _probs(self, e: Any) -> Any:
            logits = t.matmul(e, self.W) + self.b + (1.0 - self.mask) * MASK_NEG
            return t.nn.softmax(logits)

        @t.function(input_signature=[t.TensorSpec([None, d], t.float32, name="embedding")])
        def infer(self, embedding: Any) -> Any:
            return {"probabilities": self._probs(embedding)}

        @t.function(
            input_signature=[
                t.TensorSpec([None, d], t.float32, name="embedding"),
                t.TensorSpec([None, c], t.float32, name="labels"),
                t.TensorSpec([], t.float32, name="lr"),
                t.TensorSpec([], t.float32, name="l2"),
                t.TensorSpec([], t.float32, name="momentum"),
                t.TensorSpec([], t.float32, name="optimizer"),
            ]
        )
        def train(self, embedding: Any, labels: Any, lr: Any, l2: Any, momentum: Any, optimizer: Any) -> Any:
            p = self._probs(embedding)
            batch = t.cast(t.shape(embedding)[0], t.float32)
            d_anchor = self.W - self.anchor
            loss = -t.reduce_mean(
                t.reduce_sum(labels * t.math.log(t.clip_by_value(p, 1e-12, 1.0)), axis=1)
            ) + 0.5 * l2 * t.reduce_sum(d_anchor * d_anchor)
            g_logits = (p - labels) / batch
            grads = {
                "W": t.matmul(embedding, g_logits, transpose_a=True) + l2 * d_anchor,
                "b": t.reduce_sum(g_logits, axis=0),
            }
            adam, sgd = optimizer, 1.0 - optimizer
            step_t = self.t + adam  # Adam's step counter advances only on Adam steps
            bc1 = 1.0 - t.pow(ADAM_BETA1, t.maximum(step_t, 1.0))
            bc2 = 1.0 - t.pow(ADAM_BETA2, t.maximum(step_t, 1.0))
            for name in ("W", "b"):
                w, g = getattr(self, name), grads[name]
                vel, m, v = getattr(self, f"vel_{name}"), getattr(self, f"m_{name}"), getattr(self, f"v_{name}")
                vel_new = momentum * vel + g
                m_new = ADAM_BETA1 * m + (1.0 - ADAM_BETA1) * g
                v_new = ADAM_BETA2 * v + (1.0 - ADAM_BETA2) * g * g
                adam_step = lr * (m_new / bc1) / (t.sqrt(v_new / bc2) + ADAM_EPS)
                w.assign(w - sgd * lr * vel_new - adam * adam_step)
                vel.assign(sgd * vel_new + adam * vel)
                m.assign(adam * m_new + sgd * m)
                v.assign(adam * v_new + sgd * v)
            self.t.assign(step_t)
            return {"loss": loss}

        @t.function(input_signature=[])
        def get_weights(self) -> Any:
            return {
                "W": t.identity(self.W),
                "b": t.identity(self.b),
                "mask": t.identity(self.mask),
                "anchor": t.identity(self.anchor),
            }

        @t.function(
            input_signature=[
                t.TensorSpec([d, c], t.float32, name="W"),
                t.TensorSpec([c], t.float32, name="b"),
                t.TensorSpec([c], t.float32, name="mask"),
                t.TensorSpec([d, c], t.float32, name="anchor"),
            ]
        )
        def set_weights(self, W: Any, b: Any, mask: Any, anchor: Any) -> Any:
            for var, value in ((self.W, W), (self.b, b), (self.mask, mask), (self.anchor, anchor)):
                var.assign(value)
            for var in (self.vel_W, self.vel_b, self.m_W, self.m_b, self.v_W, self.v_b):
                var.assign(t.zeros_like(var))
            self.t.assign(0.0)
            return {"ok": t.constant(1.0)}

    head = Head()
    fns = [
        head.infer.get_concrete_function(),
        head.train.get_concrete_function(),
        head.get_weights.get_concrete_function(),
        head.set_weights.get_concrete_function(),
    ]
    conv = t.lite.TFLiteConverter.from_concrete_functions(fns, head)
    conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS]
    conv.experimental_enable_resource_variables = True
    from edgetl._quiet import native_output_silenced

    with native_output_silenced():  # the converter prints from C++
        return conv.convert()
