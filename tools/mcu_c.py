"""The shipped C head trainer (edgetl/mcu/edgetl_head.c), compiled with the system C compiler and
called through ctypes (tools/measure_mcu.py and tests/mcu run it). Nothing here reimplements it."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

import edgetl.mcu

# The flags a firmware build would be strict with: C99, every warning an error.
CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Wpedantic", "-Wconversion", "-Wshadow", "-Werror")
F32P = ctypes.POINTER(ctypes.c_float)
I32P = ctypes.POINTER(ctypes.c_int32)


class HeadStruct(ctypes.Structure):
    _fields_ = [
        ("dim", ctypes.c_int32),
        ("capacity", ctypes.c_int32),
        ("W", F32P),
        ("b", F32P),
        ("mask", F32P),
        ("anchor", F32P),
        ("m_W", F32P),
        ("m_b", F32P),
        ("v_W", F32P),
        ("v_b", F32P),
        ("t", ctypes.c_float),
    ]


def source_dir() -> Path:
    return Path(edgetl.mcu.__file__).parent


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def build(out_dir: Path, sources: tuple[Path, ...] = (), include: tuple[Path, ...] = (), name: str = "head") -> Path:
    """Compile ``sources`` (default: the package's edgetl_head.c) into a shared library in ``out_dir``."""
    src = Path(edgetl.mcu.__file__).parent
    lib = out_dir / f"libedgetl_{name}.so"
    files = [str(s) for s in sources] or [str(src / "edgetl_head.c")]
    includes = [f"-I{d}" for d in (*include, src)]
    done = subprocess.run(
        [compiler(), *CFLAGS, "-shared", "-fPIC", *includes, *files, "-o", str(lib), "-lm"],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"the C compiler refused {files}:\n{done.stderr}")
    return lib


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32)


def _ptr(a: np.ndarray | None, kind=F32P):
    return None if a is None else a.ctypes.data_as(kind)


class Settings(ctypes.Structure):
    _fields_ = [
        ("epochs", ctypes.c_int32),
        ("batch_size", ctypes.c_int32),
        ("learning_rate", ctypes.c_float),
        ("l2", ctypes.c_float),
        ("momentum", ctypes.c_float),
        ("optimizer", ctypes.c_int),
        ("seed", ctypes.c_uint32),
    ]


class CHead:
    """One head in C memory-layout numpy buffers, trained by the compiled library."""

    def __init__(self, lib: ctypes.CDLL, W, b, mask, anchor, optimizer: str) -> None:
        self.lib = lib
        self.W, self.b, self.mask, self.anchor = _f32(W).copy(), _f32(b).copy(), _f32(mask), _f32(anchor)
        self.opt = {"sgd": 0, "adam": 1}[optimizer]
        self.m_W, self.m_b = np.zeros_like(self.W), np.zeros_like(self.b)
        self.v_W, self.v_b = (np.zeros_like(self.W), np.zeros_like(self.b)) if optimizer == "adam" else (None, None)
        d, c = self.W.shape
        buffers = (self.W, self.b, self.mask, self.anchor, self.m_W, self.m_b, self.v_W, self.v_b)
        self.struct = HeadStruct(d, c, *(_ptr(a) for a in buffers), 0)
        lib.edgetl_head_step.restype = ctypes.c_int
        lib.edgetl_head_step.argtypes = [
            ctypes.POINTER(HeadStruct), ctypes.c_int, F32P, I32P, I32P, ctypes.c_int32,
            ctypes.c_float, ctypes.c_float, ctypes.c_float, F32P, F32P,
        ]  # fmt: skip
        lib.edgetl_head_sgd_learning_rate.restype = ctypes.c_float
        lib.edgetl_head_sgd_learning_rate.argtypes = [ctypes.c_float, F32P, ctypes.c_int32, ctypes.c_int32]
        lib.edgetl_head_probabilities.argtypes = [ctypes.POINTER(HeadStruct), F32P, ctypes.c_int32, F32P]

    def step(self, emb, labels, rows, lr: float, l2: float, momentum: float) -> tuple[int, float]:
        emb, labels, rows = _f32(emb), np.ascontiguousarray(labels, np.int32), np.ascontiguousarray(rows, np.int32)
        scratch, loss = np.zeros(len(rows) * self.W.shape[1], np.float32), ctypes.c_float()
        status = self.lib.edgetl_head_step(
            ctypes.byref(self.struct), self.opt, _ptr(emb), _ptr(labels, I32P), _ptr(rows, I32P), len(rows),
            lr, l2, momentum, _ptr(scratch), ctypes.byref(loss),
        )  # fmt: skip
        return status, loss.value

    def sgd_learning_rate(self, learning_rate: float, emb) -> float:
        emb = _f32(emb)
        return self.lib.edgetl_head_sgd_learning_rate(learning_rate, _ptr(emb), len(emb), emb.shape[1])

    def probabilities(self, emb) -> np.ndarray:
        emb = _f32(emb)
        out = np.zeros((len(emb), self.W.shape[1]), np.float32)
        assert self.lib.edgetl_head_probabilities(ctypes.byref(self.struct), _ptr(emb), len(emb), _ptr(out)) == 0
        return out

    def fit(self, emb, labels, seed: int = 0, epochs: int = 30) -> tuple[int, float]:
        """``edgetl_head_fit`` from ``edgetl_default_settings()`` with this seed and epoch count."""
        self.lib.edgetl_default_settings.restype = Settings
        settings = self.lib.edgetl_default_settings()
        settings.seed, settings.epochs, settings.optimizer = seed, epochs, self.opt
        emb, labels = _f32(emb), np.ascontiguousarray(labels, np.int32)
        order = np.zeros(len(emb), np.int32)
        scratch, loss = np.zeros(settings.batch_size * self.W.shape[1], np.float32), ctypes.c_float()
        self.lib.edgetl_head_fit.argtypes = [
            ctypes.POINTER(HeadStruct), F32P, I32P, I32P, ctypes.c_int32, ctypes.POINTER(Settings), I32P, F32P, F32P,
        ]  # fmt: skip
        status = self.lib.edgetl_head_fit(
            ctypes.byref(self.struct), _ptr(emb), _ptr(labels, I32P), None, len(emb), ctypes.byref(settings),
            _ptr(order, I32P), _ptr(scratch), ctypes.byref(loss),
        )  # fmt: skip
        return status, loss.value
