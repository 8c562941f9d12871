"""Write files and directories so that they appear complete or not at all (stdlib only).

Used by run directories (host), bundles, keys and the advisor's cache. (The device store
is a SQLite database: SQLite makes its own writes durable; see edgetl/device/_store.py.)

Every write that must survive a power cut goes through one small file-system interface,
:data:`FS` (a :class:`FileSystem`): create a temporary file, write at an offset, fsync,
rename, fsync a directory, unlink, make a directory; a subclass sees every operation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class FileSystem:
    """The operations crash-safe writes are made of, on the real file system.

    A subclass sees every operation: each public method calls :meth:`_step` first with its
    name and path, which is where a simulation records it or a crash point stops.
    """

    def __init__(self) -> None:
        self.steps = 0

    def _step(self, op: str, path: str | os.PathLike[str]) -> None:
        """Count one operation (a subclass may record or interrupt it)."""
        self.steps += 1

    def create_temp(self, directory: Path, prefix: str) -> tuple[int, str]:
        """A new empty file in ``directory`` (mode 0600), open for writing: (fd, path)."""
        self._step("create", directory / prefix)
        return tempfile.mkstemp(prefix=prefix, dir=directory)

    def open_existing(self, path: Path) -> int:
        """An existing regular file, open for reading and writing (never through a symlink)."""
        self._step("open", path)
        return os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        """Write all of ``data`` at ``offset``."""
        self._step("write", f"fd{fd}")
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def fsync(self, fd: int) -> None:
        self._step("fsync", f"fd{fd}")
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def chmod(self, path: str | os.PathLike[str], mode: int) -> None:
        os.chmod(path, mode)

    def rename(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        self._step("rename", dst)
        os.replace(src, dst)

    def unlink(self, path: str | os.PathLike[str]) -> None:
        self._step("unlink", path)
        os.unlink(path)

    def mkdir(self, path: Path, mode: int) -> None:
        self._step("mkdir", path)
        os.mkdir(path, mode)
        os.chmod(path, mode)  # mkdir's mode is filtered by the umask

    def fsync_dir(self, path: str | os.PathLike[str]) -> None:
        """Make the directory's entries (creations, renames, unlinks) durable."""
        self._step("fsync_dir", path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# The file system every crash-safe write goes through (tests swap it for a simulation).
FS: FileSystem = FileSystem()


def fsync_dir(path: Path) -> None:
    FS.fsync_dir(path)


def make_dirs(path: Path, mode: int = 0o755) -> None:
    """Create ``path`` and missing parents; each new directory's entry is made durable
    (its parent fsynced), or a power cut could drop a directory whose files were synced."""
    path = Path(path)
    if path.is_dir():
        return
    make_dirs(path.parent, mode=0o755)
    try:
        FS.mkdir(path, mode)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    FS.fsync_dir(path.parent)


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
    the temporary file is created 0600.
    """
    fd, tmp = FS.create_temp(path.parent, f".{path.name}.")
    try:
        try:
            FS.pwrite(fd, data, 0)
            FS.fsync(fd)  # the data is durable before any name points at it
        finally:
            FS.close(fd)
        FS.chmod(tmp, mode)
        FS.rename(tmp, path)
        FS.fsync_dir(path.parent)  # the rename itself is durable when this returns
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
