"""The demo's pretrained source backbone is cached by recipe, reused, and rebuilt when unreadable."""

from __future__ import annotations

import numpy as np

from edgetl.host._demo_source import GlyphSourceRecipe, cache_entry, pretrained_source, source_accuracy

TINY = GlyphSourceRecipe(characters="0123456789", images=600, epochs=1, batch_size=64)


def test_second_run_loads_the_cache_and_a_broken_entry_is_rebuilt(tmp_path, monkeypatch):
    from edgetl._glyphs import glyph_fonts

    monkeypatch.setenv("EDGETL_CACHE_DIR", str(tmp_path / "cache"))  # never the user's cache
    lines: list[str] = []
    first = pretrained_source(TINY, tmp_path / "out1" / "source_run", lines.append)
    entry = cache_entry(TINY, glyph_fonts(TINY.characters))
    assert not first.cached and entry.is_relative_to(tmp_path / "cache") and (entry / "backbone.keras").is_file()
    assert (tmp_path / "out1" / "source_run" / "backbone.keras").is_file()  # the demo's copy
    assert any("cached it in" in line for line in lines)
    assert first.metrics["train_examples"] > 500 and first.embedding_size == 256
    # 600 images of 62 characters leave no test image (5% of ~10 rounds to 0): NaN when fresh,
    # None read back from the cache; the demo prints why instead of failing on the format.
    assert source_accuracy(first.metrics).startswith(("source test accuracy 0.", "no source test images"))
    for missing in (float("nan"), None):
        assert source_accuracy({"test_accuracy": missing, "train_examples": 600}) == (
            "no source test images: 600 images left none per character"
        )

    second = pretrained_source(TINY, tmp_path / "out2" / "source_run", lines.append)
    assert second.cached and any("loaded the pretrained source backbone" in line for line in lines)
    assert source_accuracy(second.metrics) == source_accuracy(first.metrics)
    for a, b in zip(first.backbone.get_weights(), second.backbone.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(first.backbone(x).numpy(), second.backbone(x).numpy(), rtol=1e-6)

    # another recipe is another entry; a truncated model file is not trusted but rebuilt
    assert cache_entry(GlyphSourceRecipe(characters="0123456789", images=601), glyph_fonts("0123456789")) != entry
    (entry / "backbone.keras").write_bytes(b"truncated")
    third = pretrained_source(TINY, None, lines.append)
    assert not third.cached and third.run == entry and (entry / "backbone.keras").stat().st_size > 1000


def _row(shots, transfer, scratch, seconds=(0.5, 2.0)):
    return {
        "shots": shots,
        "transfer_accuracy_mean": transfer,
        "scratch_accuracy_mean": scratch,
        "transfer_trainable_params": 1285,
        "scratch_trainable_params": 29_000,
        "transfer_train_seconds_mean": seconds[0],
        "scratch_train_seconds_mean": seconds[1],
    }


def test_reading_line_says_what_the_numbers_say():
    from edgetl.host._demo_report import interpret

    rows = [_row(1, 0.85, 0.76), _row(3, 0.90, 0.895), _row(10, 0.93, 0.95), _row("all", 0.98, 0.9705)]
    lines = interpret(rows)
    assert lines[1].strip() == (
        "examples per class where transfer is more accurate: 1; less accurate: 10; within 1 point: 3, all."
    )
    assert "+9.0 (1), +0.5 (3), -2.0 (10), +0.9 (all)" in lines[2]
    assert "4.4% of the parameters in 25% of the time" in lines[3]
    # the other way round, the words turn round
    flipped = interpret([_row(1, 0.76, 0.85), _row(3, 0.895, 0.90)])
    assert "more accurate: none; less accurate: 1; within 1 point: 3." in flipped[1]
