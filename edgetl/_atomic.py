"""Write a directory so that it appears complete or not at all (stdlib only).

Used by run directories (host) and bundles (shared with the device side).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success fsync its files and itself, then rename it to ``out``
    (replacing an existing ``out``); on any failure remove it and leave ``out`` untouched.

    The caller decides beforehand whether replacing ``out`` is allowed.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        for path in sorted(tmp.rglob("*"), reverse=True):  # files before their directories
            if path.is_symlink():
                continue
            if path.is_dir():
                fsync_dir(path)
            else:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace one file atomically: write a temporary sibling, fsync, rename, fsync the dir.

    ``mode`` is set before the rename, so a private file (0600) is never readable by others:
    mkstemp creates the temporary file 0600.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
