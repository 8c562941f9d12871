"""README.md and docs/*.md are tests: every shell and Python block runs as written.

The harness reads the markdown (tests/markdown_blocks.py), so a command changed in the
docs is changed here. Each document runs in its own directory, block after block in the
order a reader follows them; the names the docs use (my_photos/, mine.edgetl, test.npz ...)
are bound to small files made here (``FILES``) the first time a command reads one that no
earlier command wrote. A block that cannot run says why in a marker next to it
(``<!-- edgetl-test: skip (reason) -->``), blocks in other languages are claimed by the test
that runs them (``<!-- edgetl-test: node -->``), and every deviation from the text as
written is in one of the tables below, each entry with its reason.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import shutil
import subprocess
import sys
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
from markdown_blocks import ROOT, Block, all_blocks

SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
PYTHON_LANGUAGES = {"python", "py"}
# Shown, not executed: diagrams, example documents and output (`console` blocks run their `$` lines).
DATA_LANGUAGES = {"", "text", "json", "sql", "toml", "yaml", "ini", "csv"}
# Languages no machine of this project can build: reported as skipped with this reason (a marker overrides).
NO_TOOLCHAIN = {
    "kotlin": "Kotlin for Android: no Android SDK on CI",
    "java": "Java for Android: no Android SDK on CI",
    "swift": "Swift for iOS: no Xcode on CI",
    "objc": "Objective-C for iOS: no Xcode on CI",
}
COMMAND_TIMEOUT = 900  # seconds, one command

# Commands that build the environment this suite already runs in: not run again.
SATISFIED = {
    r"python3? -m venv \S+": "the suite runs inside the venv this makes (.ci/run makes it)",
    r"\. \S*\.venv/bin/activate": "the suite runs inside that venv",
    r"pip install -e \S+": "this checkout is installed in that venv (.ci/run installs it)",
}
# Where a command, as written, would take minutes: extra arguments appended, each with its reason.
APPENDED = {
    r"^edgetl demo$": (
        "--seeds 1 --source-images 600",
        "the full demo pretrains on 60,000 glyphs over 3 seeds (minutes on 2 cores); the harness checks that "
        "every step runs, not the figures (tools/ and the README's table measure those)",
    ),
}
# Optional groups (`[--opt VALUE]`) are run with their brackets removed, except these.
DROPPED_OPTIONS = {
    "--strict": "on the tiny fixture model a quantized file may fail its gate, which --strict turns into an error",
    "--no-keep-examples": "the commands after it (store examples, migrate, forget) work on the kept examples",
}
# Blocks that train or export take tens of CPU-seconds each: run in the full suite only (`-m slow`).
SLOW = {
    r"\bedgetl (demo|pretrain|train|export)\b|\bhost\.(train|pretrain|export_bundle)\(": "trains or exports",
}
# Exit codes other than 0 that a command's own comment documents, each with its reason.
EXIT_CODES = {
    r"^edgetl personalize\b": (
        {0, 3},
        "3 is the guard refusing the head (documented next to the command); the store and its history are written "
        "either way, and the commands after it read them. Acceptance itself is tested in tests/cli and tests/device",
    ),
}
# One-letter and upper-case placeholders in synopses, bound to a value here.
TOKENS = {"D": "my_photos/", "B": "onnxruntime", "N": "1", "KEY": "vendor.pem", "PUBKEY": "vendor.pub"}
# Python names a block uses without defining them: the code that binds them.
PYTHON_NAMES = {
    "images": "images = __import__('numpy').load('batch.npy')",
    "my_images": "my_images = __import__('numpy').load('my_examples.npz')['x']",
    "my_labels": "my_labels = __import__('numpy').load('my_examples.npz')['y']",
}
CLASSES = ("cat", "dog", "fish")  # the labels the docs use (store forget --label cat)
SIDE = 16  # pixels: the fixture model's input is 16x16x3


class World:
    """Small files the docs' names are bound to; each is made on first use, then copied."""

    def __init__(self, base: Path, request: pytest.FixtureRequest):
        self.base = base
        self.request = request  # for the suite's own digits bundle, asked for only when a doc needs it

    @property
    def digits_bundle(self) -> Path:
        return self.request.getfixturevalue("digits_bundle")[0].path

    @cached_property
    def digits_run(self) -> Path:
        """Digits 5-9 transferred from the suite's pretrained source run, trained from a file as
        `edgetl train --data` does (so the run records its data, which export calibrates on)."""
        from edgetl import host
        from edgetl.data import load_digits_dataset

        digits = load_digits_dataset((5, 6, 7, 8, 9))
        np.savez(self.base / "digits.npz", x=digits.x, y=np.asarray(digits.class_names)[digits.y])
        source = self.request.getfixturevalue("source_run")[0]
        result = host.train(host.load_dataset(str(self.base / "digits.npz")), host.TrainConfig(backbone=str(source)))
        return host.save_run(result, self.base / "digits_run")

    @cached_property
    def photos(self) -> tuple[np.ndarray, np.ndarray]:
        from conftest import load_tool

        return load_tool("user_models").digit_images((0, 1, 2), SIDE, 3, seed=1, per_class=200)

    @cached_property
    def held_out(self) -> tuple[np.ndarray, np.ndarray]:
        """Another draw of photos of the same classes (other tints and shifts, mostly other digits): test.npz."""
        from conftest import load_tool

        return load_tool("user_models").digit_images((0, 1, 2), SIDE, 3, seed=7, per_class=40)

    @cached_property
    def user_examples(self) -> tuple[np.ndarray, np.ndarray]:
        """More photos of the same classes (another draw)."""
        from conftest import load_tool

        return load_tool("user_models").digit_images((0, 1, 2), SIDE, 3, seed=4, per_class=100)

    def folder(self, dest: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
        from conftest import load_tool

        load_tool("user_models").write_image_folder(dest, *data, CLASSES, sizes=(SIDE,))

    @cached_property
    def model_h5(self) -> Path:
        """A user's tf_keras digits classifier (.h5), trained on inputs in [-1, 1]; the photos
        are of three of its classes (its features separate them well, so int8 keeps its accuracy)."""
        from conftest import load_tool

        from edgetl.host._tf import keras

        k = keras()
        k.utils.set_random_seed(0)
        x, y = load_tool("user_models").digit_images(tuple(range(10)), SIDE, 3, seed=0, per_class=100)
        inputs = k.Input((SIDE, SIDE, 3))
        h = k.layers.Conv2D(16, 3, activation="relu")(inputs)
        h = k.layers.MaxPooling2D()(h)
        h = k.layers.Conv2D(32, 3, activation="relu")(h)
        h = k.layers.GlobalAveragePooling2D()(h)
        h = k.layers.Dense(32, activation="relu")(h)
        model = k.Model(inputs, k.layers.Dense(10, activation="softmax")(h))
        model.compile(optimizer=k.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
        model.fit(x.astype(np.float32) / 127.5 - 1, y, epochs=15, batch_size=32, verbose=0)
        path = self.base / "my_model.h5"
        model.save(path, save_format="h5")
        return path

    @cached_property
    def run(self) -> Path:
        """runs/mine as the README makes it, for a document that needs it without making it."""
        from edgetl import host

        photos = self.base / "photos"
        if not photos.exists():
            self.folder(photos, self.photos)
        data = host.load_dataset(str(photos), image_size=(SIDE, SIDE), channels=3)
        config = host.TrainConfig(backbone=str(self.model_h5), input_preprocessing="-1-1")
        return host.save_run(host.train(data, config), self.base / "run")

    def bundle(self, version: str, signed: bool) -> Path:
        from edgetl import host

        out = self.base / f"bundle_v{version}_{signed}.edgetl"
        if not out.exists():
            from edgetl.bundle import load_private_key, sign_bundle

            result = host.export_bundle(self.run, out, quantize=["none", "int8"], version=version)  # as the README
            assert result.ok and not result.omitted, result.describe()
            if signed:
                sign_bundle(out, load_private_key(self.keys[0]))
        return out

    @cached_property
    def keys(self) -> tuple[Path, Path]:
        from edgetl.bundle import generate_keypair

        generate_keypair(self.base / "vendor.pem", self.base / "vendor.pub")
        return self.base / "vendor.pem", self.base / "vendor.pub"


def _npz(dest: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    np.savez(dest, x=data[0].astype(np.float32), y=np.asarray([CLASSES[i] for i in data[1]]))


def _image(dest: Path, world: World) -> None:
    from PIL import Image

    Image.fromarray(world.photos[0][0]).save(dest)


def _copy(src: Path, dest: Path) -> None:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dest)


# name in the docs -> how to make it in the document's directory (only if no earlier command wrote it)
FILES = {
    "my_photos/": lambda w, d: w.folder(d, w.photos),
    "my_examples/": lambda w, d: w.folder(d, w.user_examples),
    "my_examples.npz": lambda w, d: _npz(d, w.user_examples),
    "my_model.h5": lambda w, d: _copy(w.model_h5, d),
    "test.npz": lambda w, d: _npz(d, w.held_out),
    "photo.png": lambda w, d: _image(d, w),
    "batch.npy": lambda w, d: np.save(d, w.photos[0][:4].astype(np.float32)),
    "vendor.pem": lambda w, d: _copy(w.keys[0], d),
    "vendor.pub": lambda w, d: _copy(w.keys[1], d),
    "runs/mine": lambda w, d: _copy(w.run, d),
    "mine.edgetl": lambda w, d: _copy(w.bundle("1", signed=True), d),
    "new.edgetl": lambda w, d: _copy(w.bundle("2", signed=True), d),
    "sensors.csv": lambda w, d: _sensors_csv(d),
    "runs/digits": lambda w, d: _copy(w.digits_run, d),
    "runs/source": lambda w, d: _copy(w.request.getfixturevalue("source_run")[0], d),
    "edgetl-demo/digits.edgetl": lambda w, d: _copy(w.digits_bundle, d),
    "my_firmware/src/": lambda w, d: d.mkdir(parents=True),
}


def _sensors_csv(dest: Path) -> None:
    """Accelerometer-like features of three gestures (a label column named as in the README)."""
    rng = np.random.default_rng(0)
    rows = ["ax,ay,az,gx,gy,gz,gesture"]
    for i in range(120):
        centre = np.eye(3)[i % 3].repeat(2) * 2
        rows.append(",".join(f"{v:.4f}" for v in centre + rng.normal(0, 1, 6)) + "," + ("wave", "tap", "shake")[i % 3])
    dest.write_text("\n".join(rows) + "\n")


# --- running a block ------------------------------------------------------------------------


def shell_commands(block: Block) -> list[str]:
    """The commands of a shell block, continuation lines joined; a console block's are its `$` lines."""
    commands: list[str] = []
    pending = ""
    for raw in block.text.splitlines():
        line = raw.rstrip()
        if not pending:
            if block.language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        commands.append(pending.strip())
        pending = ""
    return commands


def prepare(command: str) -> tuple[str, list[str]]:
    """The command as run and the deviations from it as written (from the tables above)."""
    notes: list[str] = []
    command = re.sub(r"\s+#\s.*$", "", command)  # a trailing comment

    def optional(group: re.Match) -> str:
        option = group[1].split()[0]
        if option in DROPPED_OPTIONS:
            notes.append(f"left out {group[0]}: {DROPPED_OPTIONS[option]}")
            return ""
        return group[1]

    command = re.sub(r"(?<=\s)\[(-[^\[\]]*)\]", optional, command)
    command = re.sub(r"(?<=\s)(" + "|".join(map(re.escape, TOKENS)) + r")(?=\s|$)", lambda t: TOKENS[t[1]], command)
    parts = []
    for part in (p.strip() for p in command.split(" && ")):
        reason = next((why for pattern, why in SATISFIED.items() if re.fullmatch(pattern, part)), None)
        if reason:
            notes.append(f"not run {part!r}: {reason}")
        else:
            parts.append(part)
    command = " && ".join(parts)
    for pattern, (extra, why) in APPENDED.items():
        if re.search(pattern, command):
            command = f"{command} {extra}"
            notes.append(f"appended {extra!r}: {why}")
    return re.sub(r"\s+", " ", command).strip(), notes


def _mentions(text: str, name: str) -> bool:
    return re.search(r"(?<![\w./-])" + re.escape(name.rstrip("/")) + r"(?![\w-])", text) is not None


def provide_files(text: str, here: Path, world: World) -> None:
    """Make every name of ``FILES`` the text reads that is not there yet (a `--out` target is written, not read)."""
    for name, make in FILES.items():
        if not _mentions(text, name) or (here / name).exists():
            continue
        if re.search(r"--out[ =]" + re.escape(name.rstrip("/")) + r"(?![\w-])", text):
            continue
        (here / name).parent.mkdir(parents=True, exist_ok=True)
        make(world, here / name)


def docs_env(here: Path) -> dict[str, str]:
    """A reader's shell: this checkout's `edgetl` first on PATH, no test-suite settings, its own caches."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS", "PYTEST_CURRENT_TEST")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["EDGETL_CACHE_DIR"] = str(here / ".cache")  # never the user's cache, and no demo backbone from before
    env["EDGETL_NO_PROGRESS"] = "1"
    return env


def run_checked(argv: list[str], here: Path, what: str, allowed: set[int] = frozenset({0})) -> str:
    """Run one command in ``here``; it must exit 0 (or a code of ``allowed``) and print no traceback."""
    done = subprocess.run(argv, cwd=here, env=docs_env(here), capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    output = done.stdout + done.stderr
    assert done.returncode in allowed, f"{what}\nexit {done.returncode}\n{output[-4000:]}"
    assert "Traceback (most recent call last)" not in output, f"{what}\nprinted a traceback\n{output[-4000:]}"
    return output


def run_shell_block(block: Block, here: Path, world: World) -> list[str]:
    notes = []
    for written in shell_commands(block):
        command, changed = prepare(written)
        notes += changed
        if not command:
            continue
        provide_files(command, here, world)
        allowed = next((codes for p, (codes, _) in EXIT_CODES.items() if re.search(p, command)), {0})
        run_checked(["bash", "-c", "set -o pipefail\n" + command], here, f"{block.id}: $ {command}", allowed)
    return notes


def unbound_names(source: str) -> list[str]:
    """Names a Python block reads but never binds (assignments, imports, defs, builtins)."""
    tree = ast.parse(source)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    used = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
    return sorted(set(used) - bound)


def run_python_block(block: Block, here: Path, world: World) -> list[str]:
    missing = unbound_names(block.text)
    unknown = [n for n in missing if n not in PYTHON_NAMES]
    assert not unknown, f"{block.id} uses {unknown} without defining them: bind them in PYTHON_NAMES"
    prelude = "".join(PYTHON_NAMES[n] + "\n" for n in missing)
    provide_files(prelude + block.text, here, world)
    script = here / f"_block_{block.line}.py"
    script.write_text(prelude + block.text)
    run_checked([sys.executable, script.name], here, f"{block.id}:\n{prelude}{block.text}")
    return [f"bound {missing} (PYTHON_NAMES)"] if missing else []


def claimed_by(kind: str, tests: Path = ROOT / "tests") -> list[Path]:
    """Test files (outside tests/docs) that read the blocks marked ``kind``."""
    k = re.escape(kind)
    pattern = re.compile(rf"marked_blocks\(\s*[\"']{k}[\"']|edgetl-test:\s*{k}\b")
    harness = {Path(__file__).resolve(), tests / "markdown_blocks.py"}
    return [p for p in sorted(tests.rglob("*.py")) if p.resolve() not in harness and pattern.search(p.read_text())]


def check_block(block: Block, here: Path, world: World) -> list[str]:
    """Run (or check the claim of) one block; returns the notes on what was not run as written."""
    if block.marker is None and block.language in NO_TOOLCHAIN:
        pytest.skip(f"{block.id}: {NO_TOOLCHAIN[block.language]}")
    if block.marker == "skip":
        assert block.reason, f"{block.id}: a skip marker must say why: <!-- edgetl-test: skip (reason) -->"
        pytest.skip(f"{block.id}: {block.reason}")
    if block.marker not in (None, "slow"):
        claims = claimed_by(block.marker)
        assert claims, (
            f"{block.id} is marked {block.marker!r} (run elsewhere) but no test reads it: "
            f"use marked_blocks({block.marker!r}) from tests/markdown_blocks.py"
        )
        return [f"run by {', '.join(str(p.relative_to(ROOT)) for p in claims)}"]
    if block.language in SHELL_LANGUAGES:
        return run_shell_block(block, here, world)
    if block.language in PYTHON_LANGUAGES:
        return run_python_block(block, here, world)
    raise AssertionError(
        f"{block.id}: a {block.language} block is neither run here nor claimed by a test: mark it "
        "<!-- edgetl-test: KIND --> and read it with marked_blocks(KIND) in the test that runs it, "
        "or <!-- edgetl-test: skip (why it cannot run) -->"
    )


# --- the tests --------------------------------------------------------------------------------


def _params():
    for block in all_blocks():
        if block.language in DATA_LANGUAGES and block.marker is None:
            continue
        slow = block.marker == "slow" or any(re.search(p, block.text) for p in SLOW)
        marks = [pytest.mark.slow] if slow else []
        yield pytest.param(block, id=block.id, marks=marks)


@pytest.fixture(scope="session")
def world(tmp_path_factory, request):
    return World(tmp_path_factory.mktemp("docs_world"), request)


@pytest.fixture(scope="session")
def doc_dirs(tmp_path_factory):
    """One directory per document: its blocks run there in order, as a reader follows them."""
    dirs: dict[str, Path] = {}
    return lambda doc: dirs.setdefault(doc, tmp_path_factory.mktemp(Path(doc).stem))


@pytest.mark.parametrize("block", list(_params()))
def test_documented_block_runs(block, world, doc_dirs, record_property):
    for note in check_block(block, doc_dirs(block.doc), world):
        record_property("deviation", note)
        print(note)
