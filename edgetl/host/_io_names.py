"""The contract's input and output names, given to a converted model whatever converter made it.

Converters name a model's interface after their own internals: tf2onnx's ``from_keras`` after
the Keras layers (``head``, ``features``), ``from_tflite`` and the TFLite converter after the
SavedModel signature (``serving_default_input:0``, ``StatefulPartitionedCall:0``). Every fused
model and backbone of a bundle, in every precision and format, is renamed here after
conversion to :data:`edgetl.bundle._contract.MODEL_INPUT` and ``FUSED_OUTPUT`` or
``BACKBONE_OUTPUT``, so a client can hard-code them (or read them from the manifest).

Only names change: the computation and the weights are untouched (tests/host/test_io_names.py
runs both files and compares outputs bit for bit). TFLite files are rewritten through the
TFLite schema's generated object API (``ModelT``), as the metadata writer does.
"""

from __future__ import annotations

from typing import Any

from edgetl.errors import DependencyError, InputError

TFLITE_IDENTIFIER = b"TFL3"


def _schema() -> Any:
    """The TFLite schema's generated Python code (object API): ai-edge-litert's, else TensorFlow's."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        try:
            from tensorflow.lite.python import schema_py_generated  # type: ignore[no-redef]
        except ImportError as exc:
            raise DependencyError(
                f'renaming a TFLite model needs ai-edge-litert or tensorflow ({exc}): pip install "edgetl[host]"'
            ) from exc
    return schema_py_generated


def rename_onnx_io(model: bytes, input_name: str, output_name: str) -> bytes:
    """``model`` with its one graph input and one graph output renamed (every use follows)."""
    import onnx

    proto = onnx.load_from_string(model)
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise InputError(
            f"expected a model with one input and one output, received inputs {[i.name for i in inputs]} and "
            f"outputs {[o.name for o in graph.output]}"
        )
    renames = {inputs[0].name: input_name, graph.output[0].name: output_name}
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | initializers
    clash = (taken - set(renames)) & set(renames.values())
    if clash:
        raise InputError(f"cannot rename the model's interface: {sorted(clash)} already name other tensors")
    _rename_in_graph(graph, renames)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _rename_in_graph(graph: Any, renames: dict[str, str]) -> None:
    """Rename tensors in ``graph`` and in the subgraphs of its nodes (outer names are visible there)."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                _rename_in_graph(sub, renames)


def rename_tflite_io(model: bytes, input_name: str, output_name: str) -> bytes:
    """``model`` with its one input and one output renamed: the tensors of the main subgraph and
    the keys of every signature (what LiteRT's ``get_signature_runner`` takes and returns)."""
    import flatbuffers

    data = bytes(model)
    if data[4:8] != TFLITE_IDENTIFIER:
        raise InputError(f"not a TFLite flatbuffer: file identifier {data[4:8]!r}, expected {TFLITE_IDENTIFIER!r}")
    m = _schema().ModelT.InitFromPackedBuf(data, 0)
    main = m.subgraphs[0]
    if len(main.inputs) != 1 or len(main.outputs) != 1:
        raise InputError(
            f"expected a model with one input and one output, received {len(main.inputs)} and {len(main.outputs)}"
        )
    main.tensors[main.inputs[0]].name = input_name.encode()
    main.tensors[main.outputs[0]].name = output_name.encode()
    for signature in m.signatureDefs or []:
        for tensor_map, name in ((signature.inputs, input_name), (signature.outputs, output_name)):
            if len(tensor_map or []) != 1:
                raise InputError(f"signature {signature.signatureKey!r} must have one input and one output")
            tensor_map[0].name = name.encode()
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(m.Pack(builder), TFLITE_IDENTIFIER)
    return bytes(builder.Output())
