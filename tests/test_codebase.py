"""Rules of the codebase that a reader relies on, checked rather than hoped for."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgetl"
MAX_FUNCTION_LINES = 80


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{p.relative_to(PACKAGE.parent)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for p, n in _functions()
        if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


@pytest.mark.parametrize(
    "module", ["edgetl", "edgetl.data", "edgetl.bundle", "edgetl.host", "edgetl.device", "edgetl.errors"]
)
def test_public_modules_declare_what_they_export(module):
    mod = importlib.import_module(module)
    assert mod.__all__, module
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, missing


def test_internal_modules_are_underscored():
    public = {"__init__.py", "cli.py", "data.py", "errors.py"}
    for sub in ("host", "device", "bundle"):
        named = [p.name for p in (PACKAGE / sub).glob("*.py") if p.name not in public]
        assert all(n.startswith("_") for n in named), named


# Literals equal to a contract tensor name that mean something else where they appear (each
# with its reason); everywhere else outside edgetl/bundle/ the name comes from the contract.
OTHER_MEANINGS = {
    "device/_store.py": ({"W", "b", "mask", "anchor", "labels", "ok"}, "the store's own SQLite/JSON record keys"),
    "device/_guard.py": ({"labels"}, "the user's labels, in messages"),
    "device/_personalizer.py": ({"labels"}, "the user's labels, in messages"),
    "device/_classifier.py": ({"probabilities"}, "an attribute of Prediction"),
    "device/_verify.py": ({"ok", "optimizer"}, "keys of the verification report's JSON"),
    "cli.py": ({"embedding", "input", "l2", "optimizer"}, "CLI options and --json keys"),
    "host/_backbones.py": ({"embedding"}, "Keras layer names; exported files are renamed by _export"),
    "host/_pretrain.py": ({"embedding", "input"}, "Keras layer names; exported files are renamed by _export"),
    "host/_transfer.py": ({"embedding", "input"}, "Keras layer names; exported files are renamed by _export"),
    "host/_linear_head.py": ({"l2"}, "a Keras regularizer keyword"),
    "host/_report.py": ({"ok", "optimizer"}, "keys of verification checks"),
    "host/_demo_report.py": ({"ok", "optimizer"}, "keys of verification checks"),
    "host/_demo.py": ({"ok"}, "keys of verification checks"),
    "host/_export.py": ({"labels", "ok", "optimizer"}, "manifest fields and keys of verification checks"),
    "host/_export_mcu.py": ({"labels", "input"}, "a flash budget entry and a message word"),
    "host/_onnx_metadata.py": ({"labels"}, "a metadata_props key"),
    "host/_tflite_metadata.py": ({"labels", "input", "embedding"}, "TFLite Model Metadata fields"),
}


def _string_literals(tree: ast.AST):
    """String constants that are not docstrings."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_contract_tensor_names_are_spelled_only_in_the_bundle_package():
    """Tensor names, signature inputs and model I/O names have one home, edgetl/bundle/_contract.py."""
    from edgetl.bundle._contract import contract_tensor_names

    names = contract_tensor_names()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("bundle/"):
            continue
        allowed = OTHER_MEANINGS.get(rel, (set(), ""))[0]
        found += [
            f"{rel}:{node.lineno} {node.value!r}"
            for node in _string_literals(ast.parse(path.read_text()))
            if node.value in names and node.value not in allowed
        ]
    assert not found, found


def test_the_literal_check_sees_a_spelled_name(tmp_path):
    tree = ast.parse('"""doc: embedding"""\nfeed = {"row_weight": 1}\n')
    assert [n.value for n in _string_literals(tree)] == ["row_weight"]
