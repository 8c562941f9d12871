"""Reading ONNX graphs in tests: how many layout ``Transpose`` nodes sit inside a network
(issue 23: the quantized ONNX files keep the float graph's layout)."""

from __future__ import annotations

# Ops that compute a layer: a Transpose downstream of one is inside the network.
_LAYER_OPS = {"Conv", "ConvInteger", "QLinearConv", "MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"}


def layout_transposes(content: bytes) -> int:
    """``Transpose`` nodes inside the network: downstream of a convolution or matmul. The
    graph's one NHWC->NCHW on its input (also after the input's quantization) is its edge."""
    import onnx

    inner: set[str] = set()
    count = 0
    for node in onnx.load_from_string(content).graph.node:  # ONNX graphs are topologically sorted
        after_layer = bool(set(node.input) & inner)
        count += node.op_type == "Transpose" and after_layer
        if after_layer or node.op_type in _LAYER_OPS:
            inner.update(node.output)
    return count
