"""A device-only install is a first-class target: a fresh venv with only ``.[device]``, and
one with only one runtime (``.[device-onnxruntime]``, ``.[device-litert]``).

Each venv gets edgetl and its extra from the package registry (pip's cache makes this fast
after the first time: about 23 s per venv here; it is reused while pyproject.toml and the
package are unchanged) and never TensorFlow. Every device command then runs on a bundle
made by the suite, with image files, ``.npy``, ``.npz`` and CSV inputs.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _device_venv(extra: str = "device") -> Path:
    """A venv with ``edgetl[extra]`` only, reused while pyproject.toml and the package are unchanged.
    Built under a file lock: tests in other files (tests/device/test_tail_store.py) use it too, and
    the suite's two workers must not build the same venv at once."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    for f in sorted((ROOT / "edgetl").rglob("*.py")):
        digest.update(f.read_bytes())
    venv = Path(tempfile.gettempdir()) / f"edgetl_{extra.replace('-', '_')}_venv_{digest.hexdigest()[:12]}"
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _build_venv(venv, extra)


def _build_venv(venv: Path, extra: str) -> Path:
    py = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return py
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{ROOT}[{extra}]"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if proc.returncode:
        if (
            "Could not find a version" in proc.stderr
            or "NewConnectionError" in proc.stderr
            or "Temporary failure in name resolution" in proc.stderr
        ):
            pytest.skip(
                f"cannot install edgetl[{extra}] from the package registry here: {proc.stderr.strip().splitlines()[-1]}"
            )
        raise AssertionError(proc.stderr[-3000:])
    (venv / ".complete").touch()
    return py


@pytest.mark.slow  # builds a device-only venv, ~25 s
def test_every_device_command_in_a_device_only_install(tmp_path, digits_bundle):
    from PIL import Image

    py = _device_venv()
    edgetl = str(py.parent / "edgetl")
    assert subprocess.run([str(py), "-c", "import tensorflow"], capture_output=True).returncode != 0, (
        "TensorFlow must not be installed"
    )
    bundle, halves = digits_bundle
    b = str(bundle.path)
    # inputs as a user has them: an image folder (PNG/JPEG, two sizes), .npy, .npz, CSV
    folder = tmp_path / "mine"
    for i, (x, y) in enumerate(zip(halves.test.x[:40], halves.test.y[:40])):
        (folder / halves.test.class_names[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[..., 0]).resize((16, 16) if i % 2 else (8, 8)).save(
            folder / halves.test.class_names[y] / f"{i}.{'png' if i % 3 else 'jpg'}"
        )
    image = next(folder.rglob("*.png"))
    np.save(tmp_path / "batch.npy", halves.test.x[:5])
    np.savez(tmp_path / "test.npz", x=halves.test.x, y=halves.test.y, class_names=np.array(halves.test.class_names))
    store = str(tmp_path / "store")
    env = {**os.environ, "PYTHONPATH": ""}  # nothing from the test's own environment
    commands = [
        ["predict", b, str(image), str(tmp_path / "batch.npy"), "--backend", "litert"],
        ["inspect", b],
        ["verify", b, "--data", str(tmp_path / "test.npz")],
        ["personalize", b, "--data", str(folder), "--store", store, "--margin", "1", "--forget-margin", "1"],
        ["store", "history", "--store", store],
        ["predict", b, str(image), "--store", store],
        ["store", "rollback", "--store", store],
        ["store", "reset", "--store", store],
        ["bench", b, "--runs", "5", "--backend", "onnxruntime", "--data", str(tmp_path / "test.npz")],
    ]
    for cmd in commands:
        proc = subprocess.run([edgetl, *cmd], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (cmd, proc.stderr[-2000:])
    # a host command says what to install instead of a traceback
    proc = subprocess.run(
        [edgetl, "train", "--data", str(folder), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and 'pip install "edgetl[host]"' in proc.stderr and "Traceback" not in proc.stderr, (
        proc.stderr[-2000:]
    )


@pytest.mark.slow  # two more venvs, one per runtime, ~30 s
@pytest.mark.parametrize(
    "extra, runtime, module, other, other_module",
    [
        ("device-onnxruntime", "onnxruntime", "onnxruntime", "litert", "ai_edge_litert"),
        ("device-litert", "litert", "ai_edge_litert", "onnxruntime", "onnxruntime"),
    ],
)
def test_one_runtime_is_enough(tmp_path, digits_bundle, extra, runtime, module, other, other_module):
    """With one runtime installed, every device command runs on it (the default backend is
    the installed one); asking for the other names the extra that installs it."""
    py = _device_venv(extra)
    edgetl = str(py.parent / "edgetl")
    for absent in ("tensorflow", other_module):
        assert subprocess.run([str(py), "-c", f"import {absent}"], capture_output=True).returncode != 0, absent
    assert subprocess.run([str(py), "-c", f"import {module}"], capture_output=True).returncode == 0
    bundle, halves = digits_bundle
    b = str(bundle.path)
    np.save(tmp_path / "batch.npy", halves.test.x[:5])
    np.savez(tmp_path / "user.npz", x=halves.test.x[:60], y=halves.test.y[:60], class_names=halves.test.class_names)
    store = str(tmp_path / "store")
    env = {**os.environ, "PYTHONPATH": ""}
    run = lambda *cmd: subprocess.run([edgetl, *cmd], capture_output=True, text=True, timeout=300, env=env)
    for cmd in (
        ["predict", b, str(tmp_path / "batch.npy"), "--precision", "int8"],
        ["personalize", b, "--data", str(tmp_path / "user.npz"), "--store", store, "--margin", "1"],
        ["predict", b, str(tmp_path / "batch.npy"), "--store", store],
        ["bench", b, "--runs", "5"],
    ):
        proc = run(*cmd)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (cmd, proc.stderr[-2000:])
        assert cmd[0] != "predict" or f"# backend {runtime}," in proc.stdout, proc.stdout
    # verify checks what this runtime runs and says what it could not check, and why
    proc = run("verify", b)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not checked: " in proc.stdout and f'pip install "edgetl[device-{other}]"' in proc.stdout, proc.stdout
    # asking for the missing runtime: exit 2, the extra to install, no traceback
    for cmd in (["predict", b, str(tmp_path / "batch.npy")], ["bench", b, "--runs", "5"]):
        proc = run(*cmd, "--backend", other)
        assert proc.returncode == 2 and f'pip install "edgetl[device-{other}]"' in proc.stderr, (cmd, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
