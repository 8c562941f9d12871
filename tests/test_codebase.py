"""Rules of the codebase that a reader relies on, checked rather than hoped for."""

from __future__ import annotations

import ast
import importlib
import importlib.util
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
    "device/_store.py": (
        {"W", "b", "mask", "anchor", "labels", "ok", "W1", "b1"},
        "the store's own SQLite/JSON record keys and columns",
    ),
    "device/_guard.py": ({"labels"}, "the user's labels, in messages"),
    "device/_personalizer.py": ({"labels"}, "the user's labels, in messages"),
    "device/_classifier.py": ({"probabilities"}, "an attribute of Prediction"),
    "device/_verify.py": ({"ok", "optimizer"}, "keys of the verification report's JSON"),
    "cli.py": ({"embedding", "input", "l2", "optimizer", "mean"}, "CLI options, --json keys and an input statistic"),
    "host/_backbones.py": (
        {"embedding", "mean"},
        "Keras layer names (exported files are renamed by _export); ImageNet preprocessing's mean",
    ),
    "host/_pretrain.py": ({"embedding", "input"}, "Keras layer names; exported files are renamed by _export"),
    "host/_transfer.py": ({"embedding", "input"}, "Keras layer names; exported files are renamed by _export"),
    "host/_linear_head.py": ({"l2"}, "a Keras regularizer keyword"),
    "host/_report.py": ({"ok", "optimizer"}, "keys of verification checks"),
    "host/_demo_report.py": ({"ok", "optimizer"}, "keys of verification checks"),
    "host/_demo.py": ({"ok"}, "keys of verification checks"),
    "host/_export.py": ({"labels", "ok", "optimizer"}, "manifest fields and keys of verification checks"),
    "host/_int8_onnx.py": ({"ok"}, "a key of the ladder gate's record"),
    "host/_export_mcu.py": ({"labels", "input"}, "a flash budget entry and a message word"),
    "host/_onnx_metadata.py": ({"labels"}, "a metadata_props key"),
    "host/_tflite_metadata.py": ({"labels", "input", "embedding", "mean"}, "TFLite Model Metadata fields"),
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


# Cycles allowed for now (none). The test fails as well when a listed cycle is gone, so the
# list cannot go stale.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(module: str, node: ast.AST, is_package: bool, modules: set[str]) -> list[str]:
    """The edgetl modules an import statement loads (``from pkg import name`` loads
    ``pkg.name`` when that is a module, else ``pkg``); relative imports resolved."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = module.split(".") if is_package else module.split(".")[:-1]
        if node.level:
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """edgetl module -> the edgetl modules it imports anywhere: at the top, inside functions,
    under ``if TYPE_CHECKING`` (a cycle hidden in a function is still a cycle of the design)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(_imported_modules(module, node, path.name == "__init__.py", set(paths)))
        graph[module] = deps - {module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_among_edgetl_modules():
    cycles = set(import_cycles(import_graph()))
    assert cycles - KNOWN_CYCLES == set(), sorted(sorted(c) for c in cycles - KNOWN_CYCLES)
    assert KNOWN_CYCLES - cycles == set(), f"no longer cyclic, remove from KNOWN_CYCLES: {KNOWN_CYCLES - cycles}"


def test_the_cycle_check_sees_function_local_and_relative_imports():
    """The checker itself can fail: a cycle made only by an import inside a function, and
    one made by a relative import, are both found."""
    graph = import_graph()
    graph["edgetl.bundle._manifest"] = graph["edgetl.bundle._manifest"] | {"edgetl.bundle._io"}
    assert frozenset({"edgetl.bundle._manifest", "edgetl.bundle._io"}) <= set().union(*import_cycles(graph))
    local = ast.parse("def f():\n    from ._io import read_bundle\n")
    node = next(n for n in ast.walk(local) if isinstance(n, ast.ImportFrom))
    modules = set(graph)
    assert set(_imported_modules("edgetl.bundle._manifest", node, False, modules)) == {"edgetl.bundle._io"}


# Packages a function may import when it runs instead of at module import: heavy ones
# (TensorFlow and its converters, the runtimes, cryptography, plotting and ML libraries) and
# optional ones (tqdm, Pillow, absl, h5py). Everything else is imported at the top, where a
# reader sees a module's dependencies (and the cycle check above sees them too).
DEFERRED_PACKAGES = {
    "tensorflow", "tf_keras", "keras", "tensorflow_model_optimization", "tf2onnx", "onnx", "onnxruntime",
    "ai_edge_litert", "tflite_micro", "cryptography", "matplotlib", "sklearn", "scipy", "threadpoolctl",
    "PIL", "tqdm", "flatbuffers", "absl", "h5py", "google",
}  # fmt: skip
DEFERRED_MODULES = {
    # Each command imports the library in its function: `edgetl --help` starts in ~20 ms
    # (not 0.5 s), and a device command never loads the host half.
    "edgetl/cli.py": "*",
}
# Function-local imports of light edgetl modules still waiting to move to the top (none).
# Listed exactly, so the list cannot go stale.
PENDING_DEFERRED: set[tuple[str, str]] = set()


def test_imports_inside_functions_only_defer_heavy_or_optional_packages():
    found = set()
    for path, fn in _functions():
        where = str(path.relative_to(PACKAGE.parent))
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    if name.split(".")[0] not in DEFERRED_PACKAGES and where not in DEFERRED_MODULES:
                        found.add((where, name))
    assert found - PENDING_DEFERRED == set(), sorted(found - PENDING_DEFERRED)
    assert PENDING_DEFERRED - found == set(), (
        f"moved to the top: remove from PENDING_DEFERRED {PENDING_DEFERRED - found}"
    )


def test_the_architecture_guide_names_every_module_and_bundle_role():
    """docs/architecture.md shows the current shape: each module by its path under edgetl/
    (a new module gets its line) and each artifact role of the manifest."""
    from edgetl.bundle._manifest import Role

    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    modules = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    assert [m for m in modules if m not in text] == []
    assert [r.value for r in Role if f"`{r.value}`" not in text] == []


def _missing_edgetl_names(paths) -> list[str]:
    """``from edgetl.x import name`` statements (function-local ones included) in ``paths`` whose
    name edgetl.x no longer has."""
    missing = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgetl")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                submodule = hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")
                if not hasattr(module, alias.name) and not submodule:
                    missing.append(f"{path.name}:{node.lineno}: {node.module}.{alias.name}")
    return missing


def test_tools_and_tests_import_only_names_edgetl_has(tmp_path):
    """A renamed or removed private helper breaks the tools and tests that import it inside a
    function only when they run (tools/int8_onnx_probe.py and a test imported _int8_onnx._run
    after it was removed); this finds them all at once."""
    root = PACKAGE.parent
    files = [*sorted((root / "tools").glob("*.py")), *sorted((root / "tests").rglob("*.py"))]
    assert _missing_edgetl_names(files) == []
    stale = tmp_path / "stale.py"  # the check sees a function-local import of a removed name
    stale.write_text("def f():\n    from edgetl.host._int8_onnx import RECIPES, _run\n")
    assert _missing_edgetl_names([stale]) == ["stale.py:2: edgetl.host._int8_onnx._run"]


def test_ci_exits_with_the_readme_test_commands_status(tmp_path):
    """`.ci/run` under `set -e`: a failing command early in the README's && list (ruff) does not
    stop bash, so the script must keep the list's status. Its own lines up to that check, with the
    list replaced by one whose middle command fails, must exit non-zero and say so."""
    import subprocess

    lines = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().splitlines()
    command = next(i for i, line in enumerate(lines) if line.startswith("python3 -m venv .venv && "))
    end = next(i for i in range(command, len(lines)) if lines[i] == "fi")
    script = ["set -euo pipefail", "true && false && true", *lines[command + 1 : end + 1], "echo reached"]
    (tmp_path / "run").write_text("\n".join(script) + "\n")
    done = subprocess.run(["bash", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 1 and "README test command: exit 1" in done.stdout and "reached" not in done.stdout
    script[1] = "true && true && true"
    (tmp_path / "run").write_text("\n".join(script) + "\n")
    assert "reached" in subprocess.run(["bash", str(tmp_path / "run")], capture_output=True, text=True).stdout
