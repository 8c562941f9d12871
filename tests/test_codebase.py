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
