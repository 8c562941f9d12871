"""The trainable head as graphs the device runtimes execute (host side: onnx, TensorFlow).

What the head computes, its tensor names and the float64 reference step are the head
contract, :mod:`edgetl.bundle._head`; this module builds exactly that as ONNX graphs
(``head_infer.onnx``, ``head_train_{sgd,adam}.onnx``, one optimizer step per call: weights
and optimizer state are inputs and outputs; no onnxruntime-training, which is deprecated,
imports torch and rejects IR version > 10). Hyperparameters are inputs too, so one graph
serves every learning rate. The graphs that train many steps per call, and the TFLite
head with its signatures, are in :mod:`edgetl.host._head_loop_graphs`.
"""

from __future__ import annotations

from typing import Any

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
    """One optimizer step; inputs are :func:`edgetl.bundle._head.train_graph_inputs`, outputs the
    updated weights and state named by :func:`edgetl.bundle._head.state_output`."""
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
