"""The docs harness's own gates: each is fed something broken and must refuse it (no TensorFlow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from markdown_blocks import Block, blocks
from test_docs import check_block, claimed_by, prepare, run_shell_block, shell_commands, unbound_names


def _doc(tmp_path: Path, text: str) -> list[Block]:
    (tmp_path / "docs").mkdir(exist_ok=True)
    path = tmp_path / "docs" / "page.md"
    path.write_text(text)
    return blocks(path, root=tmp_path)


def test_blocks_markers_and_languages_are_read(tmp_path):
    found = _doc(
        tmp_path,
        "text\n\n<!-- edgetl-test: skip (needs a GPU) -->\n```bash\nedgetl train\n```\n\n"
        "<!-- edgetl-test: node -->\n\n```js\nconsole.log(1)\n```\n```python\nx = 1\n```\n",
    )
    assert [(b.line, b.language, b.marker, b.reason) for b in found] == [
        (4, "bash", "skip", "needs a GPU"),
        (10, "js", "node", None),
        (13, "python", None, None),
    ]
    assert found[0].text == "edgetl train\n" and found[0].id == "docs/page.md:4:bash"


def test_an_unclosed_fence_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="never closed"):
        _doc(tmp_path, "```bash\nedgetl inspect b\n")


def test_commands_are_read_as_a_shell_reads_them():
    console = Block("d.md", 1, "console", "$ edgetl bench b \\\n  --recommend\nbackend  p50\n$ edgetl inspect b\n")
    assert shell_commands(console) == ["edgetl bench b    --recommend", "edgetl inspect b"]
    bash = Block("d.md", 1, "bash", "# a comment\nedgetl a   # trailing\n\nedgetl b\n")
    assert shell_commands(bash) == ["edgetl a   # trailing", "edgetl b"]


def test_deviations_come_from_the_tables_and_are_reported():
    command, notes = prepare("edgetl export r --out m [--calibration D] [--strict] [--sign KEY]  # note")
    assert command == "edgetl export r --out m --calibration my_photos/ --sign vendor.pem"
    assert len(notes) == 1 and "--strict" in notes[0]
    command, notes = prepare('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[all]" && edgetl demo')
    assert command.startswith("edgetl demo --seeds") and len(notes) == 4
    assert prepare("cp a/edgetl_model.[ch] dst/")[0] == "cp a/edgetl_model.[ch] dst/"  # a glob is not optional


def test_a_failing_command_fails_the_block(tmp_path):
    with pytest.raises(AssertionError, match="exit 3"):
        run_shell_block(Block("d.md", 1, "bash", "true\nexit 3\n"), tmp_path, world=None)
    with pytest.raises(AssertionError, match="traceback"):
        run_shell_block(Block("d.md", 1, "bash", "echo 'Traceback (most recent call last):'\n"), tmp_path, world=None)
    run_shell_block(Block("d.md", 1, "bash", "echo fine | head -1\n"), tmp_path, world=None)


def test_unbound_python_names_are_found():
    source = "import numpy as np\nfrom a import b\ny = np.zeros(3)\nclf.predict(images, y, b)\n"
    assert unbound_names(source) == ["clf", "images"]


def test_blocks_without_a_way_to_run_are_refused(tmp_path):
    with pytest.raises(AssertionError, match="neither run here nor claimed"):
        check_block(Block("d.md", 1, "cpp", "int main() {}\n"), tmp_path, world=None)
    with pytest.raises(AssertionError, match="must say why"):
        check_block(Block("d.md", 1, "bash", "edgetl x\n", marker="skip"), tmp_path, world=None)
    with pytest.raises(AssertionError, match="no test reads it"):
        check_block(Block("d.md", 1, "js", "f()\n", marker="no-such-kind"), tmp_path, world=None)


def test_a_claim_is_a_test_reading_the_kind(tmp_path):
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "test_x.py").write_text('for b in marked_blocks("node"):\n    run(b)\n')
    assert claimed_by("node", tmp_path) == [tmp_path / "host" / "test_x.py"]
    assert claimed_by("cpp", tmp_path) == []
