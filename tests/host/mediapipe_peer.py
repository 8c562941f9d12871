"""A MediaPipe peer for tests: a throwaway venv with MediaPipe Tasks, and a runner for tools/mediapipe_client.py.

MediaPipe is never installed into edgetl's own environment: its wheel pins its own numpy-facing
dependencies (absl-py ~= 2.3, flatbuffers ~= 25.9) and pulls opencv-contrib-python, matplotlib and
sounddevice. The venv is created once under ``tempfile.gettempdir()/edgetl_mediapipe_venv`` (or
``$EDGETL_MEDIAPIPE_VENV``) and reused while its marker file names the same recipe.

The recipe installs the wheel with ``--no-deps`` plus the four packages
``mediapipe.tasks.python.vision`` needs at run time (numpy, flatbuffers, absl-py, certifi).
Measured for mediapipe 1.2.2 on Linux x86_64 / CPython 3.11: about 230 MB and 10 s (pip cache warm)
instead of 650 MB and 21 s for ``pip install mediapipe``; the difference is opencv-contrib-python,
matplotlib (and its deps) and sounddevice. ``cv2`` and ``matplotlib`` are imported by the vision
package's drawing utilities only, so the client puts placeholders in their place (see its docstring).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MEDIAPIPE = "mediapipe==1.2.2"
RUNTIME_DEPS = ("numpy", "flatbuffers~=25.9", "absl-py~=2.3", "certifi")
RECIPE = {"mediapipe": MEDIAPIPE, "deps": list(RUNTIME_DEPS), "python": sys.version_info[:2]}
CLIENT = Path(__file__).resolve().parents[2] / "tools" / "mediapipe_client.py"
_MARKER = "edgetl_recipe.json"


class MediaPipeUnavailable(Exception):
    """MediaPipe cannot be installed here (no network, no wheel for this platform); the message says why."""


def venv_dir() -> Path:
    return Path(os.environ.get("EDGETL_MEDIAPIPE_VENV") or Path(tempfile.gettempdir()) / "edgetl_mediapipe_venv")


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PIP_NO_INPUT": "1"})


def ensure_mediapipe(timeout: float = 900.0) -> Path:
    """Return the Python interpreter of a venv with MediaPipe, creating the venv on first use.

    Safe to call from concurrent test processes (a file lock serialises creation). Records the
    install time and size in the marker file (``install_seconds``, ``size_mb``).

    Raises:
        MediaPipeUnavailable: the venv cannot be created or MediaPipe cannot be installed.
    """
    venv = venv_dir()
    python = _python(venv)
    marker = venv / _MARKER
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(str(venv) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            recipe = json.loads(json.dumps(RECIPE))  # as stored: tuples become lists
            if python.exists() and marker.exists() and json.loads(marker.read_text()).get("recipe") == recipe:
                return python
        except (OSError, ValueError):
            pass
        import shutil

        shutil.rmtree(venv, ignore_errors=True)
        start = time.perf_counter()
        base = getattr(sys, "_base_executable", sys.executable)
        # Bounded network waits: without network pip fails fast instead of retrying for minutes.
        pip = [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--timeout",
            "60",
            "--retries",
            "2",
        ]
        steps = [[base, "-m", "venv", str(venv)], [*pip, "--no-deps", MEDIAPIPE], [*pip, *RUNTIME_DEPS]]
        for cmd in steps:
            try:
                proc = _run(cmd, timeout)
            except (OSError, subprocess.TimeoutExpired) as exc:
                shutil.rmtree(venv, ignore_errors=True)
                raise MediaPipeUnavailable(
                    f"cannot set up a MediaPipe venv in {venv} ({' '.join(cmd[1:4])}): {exc}"
                ) from exc
            if proc.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                raise MediaPipeUnavailable(
                    f"cannot install {MEDIAPIPE} into {venv} ({' '.join(cmd[1:4])} exited {proc.returncode}): {tail}"
                )
        seconds = time.perf_counter() - start
        size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
        record = {"recipe": RECIPE, "install_seconds": round(seconds, 1), "size_mb": round(size / 2**20)}
        marker.write_text(json.dumps(record))
        return python


def run_client(
    model: str | os.PathLike[str], images: np.ndarray, mode: str, *, timeout: float = 300.0
) -> dict[str, Any]:
    """Run tools/mediapipe_client.py on ``images`` (uint8 (N, H, W, C)) in the MediaPipe venv.

    Returns:
        The client's JSON: ``{"results": [...]}`` on success, ``{"error": ..., "stage": ...}`` when
        MediaPipe refused the model.

    Raises:
        MediaPipeUnavailable: MediaPipe cannot be installed.
        RuntimeError: the client crashed (its stderr is in the message).
    """
    python = ensure_mediapipe()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "images.npy"
        np.save(path, np.ascontiguousarray(images, dtype=np.uint8))
        proc = subprocess.run(
            [str(python), str(CLIENT), str(model), str(path), mode], capture_output=True, text=True, timeout=timeout
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, 2) or not lines:
        raise RuntimeError(f"mediapipe_client exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def skip_reason() -> str | None:
    """``None`` when MediaPipe is usable, else why not (for ``pytest.skip``)."""
    try:
        ensure_mediapipe()
    except MediaPipeUnavailable as exc:
        return str(exc)
    return None
