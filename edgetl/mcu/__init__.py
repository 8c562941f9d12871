"""C sources shipped with edgetl for microcontrollers (no Python API runs them).

``edgetl_head.c``/``edgetl_head.h`` are the dependency-free C99 head trainer that
``edgetl export --target mcu`` copies into a bundle (docs/integration.md, "Microcontrollers").
"""

from __future__ import annotations

from pathlib import Path

HEAD_SOURCES = ("edgetl_head.h", "edgetl_head.c")


def source(name: str) -> bytes:
    """The bytes of one shipped C file (one of :data:`HEAD_SOURCES`)."""
    if name not in HEAD_SOURCES:
        raise ValueError(f"edgetl ships the C files {HEAD_SOURCES}, received {name!r}")
    return (Path(__file__).parent / name).read_bytes()
