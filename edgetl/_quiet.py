"""Quiet by default, loud on request: third-party noise off, progress bars on terminals only.

TensorFlow, its converter and LiteRT print from C++ straight to the process's stdout and
stderr file descriptors (the CUDA probe, ``fully_quantize: 0, inference_type: 6, ...``,
``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.``), where Python's
``sys.stdout`` redirection cannot reach. :func:`native_output_silenced` redirects the two
file descriptors around those calls only. ``EDGETL_VERBOSE=1`` (or ``edgetl --verbose``)
turns all of it back on.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def verbose() -> bool:
    return os.environ.get("EDGETL_VERBOSE", "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """What ``--verbose`` does: third-party logs and native output are shown from now on.
    ``False`` leaves the environment (``EDGETL_VERBOSE``) as it is."""
    if on:
        os.environ["EDGETL_VERBOSE"] = "1"
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


@contextmanager
def native_output_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptors 1 and 2 to /dev/null meanwhile.

    Python exceptions still propagate (they are printed by whoever catches them, after
    the descriptors are restored). A no-op when verbose, or when the descriptors cannot
    be duplicated (e.g. an embedded interpreter without them).
    """
    if verbose():
        yield
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def quiet_python_loggers() -> None:
    """Third-party Python loggers (TensorFlow's retracing warnings, tf2onnx, absl) to ERROR."""
    if verbose():
        return
    for name in ("tensorflow", "tf2onnx", "absl", "h5py", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


def progress(items: Iterable[T], *, desc: str, total: int | None = None) -> Iterable[T]:
    """A tqdm progress bar on a terminal (stderr), the plain iterable anywhere else."""
    if not sys.stderr.isatty() or os.environ.get("EDGETL_NO_PROGRESS"):
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with ai-edge-litert; without it, no bar
        return items
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
