"""docs/integration.md's tables of files, models, signatures, graphs, tensors and defaults,
parsed and checked against the contract module (edgetl/bundle/_contract.py and _head.py)."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest

from edgetl.bundle import _contract as contract
from edgetl.bundle._head import SHUFFLE, TRAINING_DEFAULTS

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "integration.md"


def tables(text: str) -> dict[tuple[str, ...], list[list[str]]]:
    """Every Markdown table of ``text``: its header cells -> its rows of cells."""
    out: dict[tuple[str, ...], list[list[str]]] = {}
    lines = [line.strip() for line in text.splitlines()]  # tables inside list items are indented
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.fullmatch(r"\|(\s*-+\s*\|)+", lines[i + 1].replace(" ", "")):
            header = tuple(_cells(line))
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            out[header] = rows
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def names(cell: str) -> list[str]:
    """The backticked names of a cell, without shapes: ``embedding[N,D]`` -> ``embedding``."""
    return [re.sub(r"\[.*", "", n) for n in re.findall(r"`([^`]+)`", cell)]


@pytest.fixture(scope="module")
def guide():
    return tables(GUIDE.read_text())


def test_the_file_table_lists_every_contract_file_and_no_retired_one(guide):
    listed = {n for row in guide[("file", "what it is", "run it with")] for n in names(row[0])}
    wanted = {
        contract.MANIFEST_FILE,
        contract.SIGNATURE_FILE,
        contract.HEAD_TFLITE_FILE,
        contract.HEAD_INFER_FILE,
        contract.HEAD_INIT_NPZ_FILE,
        contract.REPLAY_FILE,
        contract.PARITY_FILE,
        *(contract.HEAD_TRAIN_LOOP_FILE.format(optimizer=o) for o in contract.OPTIMIZERS),
        *(contract.HEAD_INIT_BIN_FILE.format(member=m) for m in contract.HEAD_INIT_MEMBERS),
        *(
            p.format(precision="<precision>", format=f)
            for p in (contract.FUSED_FILE, contract.BACKBONE_FILE)
            for f in ("tflite", "onnx")
        ),
    }
    assert wanted <= listed, wanted - listed
    retired = {contract.LEGACY_HEAD_TRAIN_FILE.format(optimizer=o) for o in contract.OPTIMIZERS}
    assert not retired & listed


def test_the_model_table_has_the_contract_io_names(guide):
    rows = {names(r[0])[0]: (names(r[1]), names(r[2])) for r in guide[("model", "input", "output")]}
    assert rows == {
        "model.*": ([contract.MODEL_INPUT], [contract.FUSED_OUTPUT]),
        "backbone.*": ([contract.MODEL_INPUT], [contract.BACKBONE_OUTPUT]),
    }


def test_the_signature_table_is_the_contracts(guide):
    rows = {names(r[0])[0]: (names(r[1]), names(r[2])) for r in guide[("signature", "inputs", "outputs")]}
    assert rows == {
        name: (list(contract.TFLITE_SIGNATURES[name]), list(contract.TFLITE_SIGNATURE_OUTPUTS[name]))
        for name in contract.TFLITE_SIGNATURES
    }


def test_the_onnx_graph_table_is_the_contracts_in_graph_order(guide):
    rows = {names(r[0])[0]: (names(r[1]), names(r[2])) for r in guide[("graph", "inputs", "outputs")]}
    want = {contract.HEAD_INFER_FILE: (list(contract.INFER_INPUTS), [contract.INFER_OUTPUT])}
    for opt in contract.OPTIMIZERS:
        want[contract.HEAD_TRAIN_LOOP_FILE.format(optimizer=opt)] = (
            list(contract.LOOP_INPUTS[opt]),
            list(contract.LOOP_OUTPUTS[opt]),
        )
    assert rows == want


def test_the_tensor_table_has_every_head_tensor_with_its_dtype_and_shape(guide):
    rows = {names(r[0])[0]: (r[1], r[2].strip("`")) for r in guide[("tensor", "dtype", "shape")]}
    assert rows == dict(contract.HEAD_TENSORS)


def test_the_defaults_table_is_what_the_manifest_records(guide):
    rows = {names(r[0])[0]: names(r[1])[0] for r in guide[("field", "default")]}
    want = {**asdict(TRAINING_DEFAULTS), "shuffle": SHUFFLE}
    assert set(rows) == set(contract.HEAD_TRAINING_FIELDS) == set(want)
    assert {k: type(want[k])(rows[k]) for k in rows} == want


def test_the_parser_reads_a_table_and_sees_a_changed_name():
    text = "| signature | inputs | outputs |\n|---|---|---|\n| `infer` | `embeding[N,D]` | `probabilities[N,C]` |\n"
    rows = tables(text)[("signature", "inputs", "outputs")]
    assert names(rows[0][1]) == ["embeding"] != list(contract.TFLITE_SIGNATURES["infer"])


def test_the_tail_tables_are_the_contracts(guide):
    """Section 4b: the tail's files, graphs (graph order), signatures and tensor shapes."""
    files = {n for row in guide[("file", "what")] for n in names(row[0])}
    assert {
        contract.TRUNK_FILE.format(precision="fp32", format="onnx"),
        contract.TRUNK_FILE.format(precision="fp32", format="tflite"),
        contract.TAIL_INIT_FILE,
        contract.TAIL_INFER_FILE,
        contract.TAIL_TFLITE_FILE,
        *(contract.TAIL_TRAIN_LOOP_FILE.format(optimizer=o) for o in contract.OPTIMIZERS),
    } <= files
    graphs = {names(r[0])[0]: (names(r[1]), names(r[2])) for r in guide[("tail graph", "inputs", "outputs")]}
    want = {contract.TAIL_INFER_FILE: (list(contract.TAIL_INFER_INPUTS), [contract.PROBABILITIES])}
    for opt in contract.OPTIMIZERS:
        want[contract.TAIL_TRAIN_LOOP_FILE.format(optimizer=opt)] = (
            list(contract.TAIL_LOOP_INPUTS[opt]),
            list(contract.TAIL_LOOP_OUTPUTS[opt]),
        )
    assert graphs == want
    signatures = {names(r[0])[0]: (names(r[1]), names(r[2])) for r in guide[("tail signature", "inputs", "outputs")]}
    assert signatures == {
        k: (list(v), list(contract.TAIL_TFLITE_SIGNATURE_OUTPUTS[k]))
        for k, v in contract.TAIL_TFLITE_SIGNATURES.items()
    }
    tensors = {names(r[0])[0]: (r[1], r[2].strip("`")) for r in guide[("tail tensor", "dtype", "shape")]}
    assert tensors == dict(contract.TAIL_TENSORS)
