"""An exported bundle is what the contract module says: names, dtypes, signatures, head_init, defaults."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from edgetl.bundle import _contract as contract
from edgetl.bundle._head import SHUFFLE, TRAINING_DEFAULTS


def test_every_model_reads_input_and_writes_its_contract_name_in_every_precision_and_format(digits_bundle):
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    bundle, _ = digits_bundle
    models = bundle.artifacts("fused") + bundle.artifacts("backbone")
    assert {(a.format.value, a.precision.value) for a in models} == {
        (f, p) for f in ("onnx", "tflite") for p in ("fp32", "int8")
    }
    for a in models:
        output = contract.FUSED_OUTPUT if a.role == "fused" else contract.BACKBONE_OUTPUT
        assert [t.name for t in a.inputs] == [contract.MODEL_INPUT] and [t.name for t in a.outputs] == [output], a.file
        path = str(bundle.path / a.file)
        if a.format.value == "onnx":
            s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            assert ([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]) == (
                [contract.MODEL_INPUT],
                [output],
            )
        else:
            it = Interpreter(model_path=path)
            assert list(it.get_signature_list().values()) == [{"inputs": [contract.MODEL_INPUT], "outputs": [output]}]
            assert [d["name"] for d in it.get_input_details()] == [contract.MODEL_INPUT]


def test_every_manifest_tensor_has_a_dtype_and_the_head_graphs_have_the_contract_names(digits_bundle):
    bundle, _ = digits_bundle
    for a in bundle.artifacts():
        assert all(t.dtype in ("float32", "int8", "uint8", "int64") for t in (*a.inputs, *a.outputs)), a.file
    for a in bundle.artifacts("head_train_loop", "onnx"):
        assert tuple(t.name for t in a.inputs) == contract.LOOP_INPUTS[a.optimizer]
        assert tuple(t.name for t in a.outputs) == contract.LOOP_OUTPUTS[a.optimizer]
        dtypes = {t.name: t.dtype for t in a.inputs}
        assert all(dtypes[n] == contract.HEAD_TENSORS[n][0] for n in dtypes), dtypes
    (infer,) = bundle.artifacts("head_infer", "onnx")
    assert tuple(t.name for t in infer.inputs) == contract.INFER_INPUTS
    (head,) = bundle.artifacts("head", "tflite")
    assert head.extra["signatures"] == list(contract.TFLITE_SIGNATURES)


def test_the_tflite_head_signatures_are_the_contracts(digits_bundle):
    from ai_edge_litert.interpreter import Interpreter

    bundle, _ = digits_bundle
    signatures = Interpreter(model_path=str(bundle.artifact("head", "tflite"))).get_signature_list()
    assert {k: sorted(v["inputs"]) for k, v in signatures.items()} == {
        k: sorted(v) for k, v in contract.TFLITE_SIGNATURES.items()
    }
    assert {k: sorted(v["outputs"]) for k, v in signatures.items()} == {
        k: sorted(v) for k, v in contract.TFLITE_SIGNATURE_OUTPUTS.items()
    }


def test_head_init_bin_files_are_the_npz_arrays_readable_without_a_zip_parser(digits_bundle):
    bundle, _ = digits_bundle
    npz = bundle.arrays("head_init", contract.HEAD_INIT_MEMBERS)
    raw = {a.extra["member"]: a for a in bundle.artifacts("head_init", "bin")}
    assert set(raw) == set(contract.HEAD_INIT_MEMBERS)
    for member, a in raw.items():
        assert a.file == contract.HEAD_INIT_BIN_FILE.format(member=member)
        assert (a.extra["dtype"], a.extra["byte_order"]) == ("float32", "little")
        data = (bundle.path / a.file).read_bytes()  # what fread or an ArrayBuffer sees
        array = np.frombuffer(data, "<f4").reshape(a.extra["shape"])
        np.testing.assert_array_equal(array, npz[member])
    d, c = bundle.manifest.embedding_size, bundle.manifest.head.max_classes
    assert raw["W"].extra["shape"] == [d, c] and raw["b"].extra["shape"] == raw["mask"].extra["shape"] == [c]


def test_the_manifest_records_the_training_defaults(digits_bundle):
    bundle, _ = digits_bundle
    m = bundle.manifest
    assert m.schema_version == 3 and m.backbone_id and isinstance(m.version, str)
    assert {**asdict(m.head.training)} == {**asdict(TRAINING_DEFAULTS), "shuffle": SHUFFLE}
