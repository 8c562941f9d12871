"""The head's ONNX inference graph (host side: onnx).

What the head computes, its tensor names and the float64 reference step are the head
contract, :mod:`edgetl.bundle._head`; this module builds ``head_infer.onnx`` (weights are
inputs, so one graph serves every head). The training graphs (ONNX loop graphs that run a
whole step plan per call, S = 1 being one step) and the TFLite head with its signatures are
in :mod:`edgetl.host._head_loop_graphs`; no onnxruntime-training, which is deprecated,
imports torch and rejects IR version > 10.
"""

from __future__ import annotations

from typing import Any

from edgetl.bundle._contract import BIAS, EMBEDDING, INFER_OUTPUT, MASK, WEIGHTS
from edgetl.bundle._head import MASK_NEG

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
    nodes = [h.make_node("MatMul", [EMBEDDING, WEIGHTS], ["xw"]), h.make_node("Add", ["xw", BIAS], ["logits"])]
    nodes += _masked_softmax_nodes(h, "logits", MASK, INFER_OUTPUT)
    graph = h.make_graph(
        nodes,
        "edgetl_head_infer",
        [
            h.make_tensor_value_info(EMBEDDING, f, ["batch", d]),
            h.make_tensor_value_info(WEIGHTS, f, [d, c]),
            h.make_tensor_value_info(BIAS, f, [c]),
            h.make_tensor_value_info(MASK, f, [c]),
        ],
        [h.make_tensor_value_info(INFER_OUTPUT, f, ["batch", c])],
        initializer=_consts(h, onnx),
    )
    return _finish(h, onnx, graph)


def _finish(h: Any, onnx: Any, graph: Any) -> bytes:
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="edgetl")
    model.ir_version = 8  # readable by older onnxruntime builds on devices
    onnx.checker.check_model(model)
    return model.SerializeToString()
