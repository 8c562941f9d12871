"""The contract module against what ships with it: the JSON Schema, the manifest's typed fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import edgetl.bundle
import edgetl.bundle._head
from edgetl.bundle import Manifest, Role
from edgetl.bundle import _contract as contract
from edgetl.errors import BundleError

SCHEMA = json.loads((Path(edgetl.bundle.__file__).parent / "manifest.schema.json").read_text())


def test_the_json_schema_names_exactly_the_contract_fields():
    props = SCHEMA["properties"]
    assert set(props) == set(contract.MANIFEST_FIELDS)
    assert set(props["input_spec"]["properties"]) == set(contract.INPUT_SPEC_FIELDS)
    assert set(props["head"]["properties"]) == set(contract.HEAD_FIELDS + contract.HEAD_TRAINING_FIELDS)
    artifact = props["artifacts"]["items"]["properties"]
    assert set(artifact) == set(contract.ARTIFACT_FIELDS)
    assert set(artifact["role"]["enum"]) == {r.value for r in Role}
    assert set(SCHEMA["$defs"]["tensors"]["items"]["properties"]) == set(contract.TENSOR_FIELDS)
    assert props["head"]["properties"]["shuffle"]["const"] == edgetl.bundle._head.SHUFFLE


def test_loop_graph_names_are_derived_from_the_step_and_state_names():
    assert contract.LOOP_INPUTS["sgd"] == (
        *("embedding", "labels", "order", "row_weight", "mask", "W", "b", "W0", "lr", "l2"),
        *("momentum", "vel_W", "vel_b"),
    )
    assert contract.LOOP_OUTPUTS["adam"] == (
        "W_out",
        "b_out",
        "m_W_out",
        "m_b_out",
        "v_W_out",
        "v_b_out",
        "t_out",
        "losses",
    )
    names = contract.contract_tensor_names()
    assert {"input", "probabilities", "embedding", "unused", "anchor", "t_out", "ok"} <= names
    assert all(n in contract.HEAD_TENSORS for sig in contract.TFLITE_SIGNATURES.values() for n in sig)


def _manifest(**changes):
    m = {
        "schema_version": 3,
        "name": "n",
        "version": "7",
        "backbone_id": "ab" * 32,
        "labels": ["a", "b"],
        "input_spec": {"shape": [4], "dtype": "float32"},
        "embedding_size": 3,
        "head": {
            "max_classes": 2,
            **edgetl.bundle._head.TRAINING_DEFAULTS.__dict__,
            "shuffle": "xorshift32-fisher-yates",
        },
        "artifacts": [
            {"file": "f.onnx", "role": "fused", "format": "onnx", "precision": "fp32", "sha256": "0" * 64, "size": 1}
        ],
    }
    m.update(changes)
    return m


def test_version_backbone_id_and_training_defaults_are_typed_and_round_trip():
    m = Manifest.from_json(_manifest())
    assert m.version == "7" and m.backbone_id == "ab" * 32 and "version" not in m.extra
    assert m.head.training.learning_rate == 0.1 and m.head.training.shuffle == "xorshift32-fisher-yates"
    assert Manifest.from_json(m.to_json()) == m
    old = Manifest.from_json(_manifest(schema_version=2, head={"max_classes": 2}, version=None))
    assert old.head.training is None and old.version is None


@pytest.mark.parametrize(
    "change,message",
    [
        ({"version": 7}, "version must be a string, received 7"),
        ({"backbone_id": ["x"]}, "backbone_id must be a string"),
        (
            {"head": {"max_classes": 2, "optimizer": "sgd", "shuffle": "numpy"}},
            "head.shuffle 'xorshift32-fisher-yates'",
        ),
        (
            {"head": {**_manifest()["head"], "batch_size": 0}},
            "head.batch_size must be an integer in range, received 0",
        ),
        ({"head": {**_manifest()["head"], "learning_rate": "fast"}}, "head.learning_rate must be a finite number"),
    ],
)
def test_bad_typed_fields_are_refused_by_name(change, message):
    with pytest.raises(BundleError, match=message):
        Manifest.from_json(_manifest(**change))
