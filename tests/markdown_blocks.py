"""The fenced code blocks of README.md and docs/*.md, with the test marker written next to each.

A marker is an HTML comment on the line before the fence (blank lines between allowed);
GitHub does not render it:

    <!-- edgetl-test: skip (needs internet: --weights imagenet) -->   not run; the reason is reported
    <!-- edgetl-test: slow -->                                        run, but only in the full suite
    <!-- edgetl-test: node -->                                        run by another test, which claims
                                                                      it (see ``marked_blocks``)

Any word other than ``skip`` and ``slow`` names a kind of block run elsewhere (``node``,
``cpp``, ...). A test claims the blocks of a kind by reading them with
``marked_blocks("node")`` (``from markdown_blocks import marked_blocks``: tests/ is on the
import path), so the docs harness (tests/docs/test_docs.py) can check that each such block
is run by some test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*edgetl-test:\s*(?P<kind>[\w-]+)\s*(?:\((?P<reason>.*)\))?\s*-->")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    language: str  # the fence's info word, lower case ("" when none)
    text: str
    marker: str | None = None  # skip, slow, or a kind run elsewhere (node, cpp, ...)
    reason: str | None = None

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.language or 'text'}"


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md, in that order."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _marker_before(lines: list[str], index: int) -> re.Match | None:
    """The marker comment on the nearest non-blank line before ``lines[index]``, if any."""
    j = index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    return MARKER.search(lines[j]) if j >= 0 else None


def blocks(doc: Path, root: Path = ROOT) -> list[Block]:
    """Every fenced block of one markdown file, in order. An unclosed fence is an error."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening["fence"]
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        if end is None:
            raise ValueError(f"{doc}:{i + 1}: code fence {fence} is never closed")
        indent = len(opening["indent"])
        body = "\n".join(line[indent:] if line[:indent].isspace() else line for line in lines[i + 1 : end])
        marker = _marker_before(lines, i)
        out.append(
            Block(
                doc=str(doc.relative_to(root)),
                line=i + 1,
                language=opening["info"].lower(),
                text=body + "\n",
                marker=marker["kind"] if marker else None,
                reason=marker["reason"] if marker else None,
            )
        )
        i = end + 1
    return out


def all_blocks(root: Path = ROOT) -> list[Block]:
    return [b for doc in documents(root) for b in blocks(doc, root)]


def marked_blocks(kind: str, root: Path = ROOT) -> list[Block]:
    """The blocks whose marker is ``kind`` (e.g. "node"): what a client test runs as written."""
    return [b for b in all_blocks(root) if b.marker == kind]
