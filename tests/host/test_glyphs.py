"""The synthetic glyph source task (edgetl._glyphs): deterministic, varied, digit-like, no TensorFlow."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgetl._glyphs import glyph_fingerprint, glyph_fonts, render_glyphs
from edgetl.errors import InputError


@pytest.fixture(scope="module")
def fonts():
    return glyph_fonts()


@pytest.fixture(scope="module")
def glyphs(fonts):
    return render_glyphs(1240, seed=3, fonts=fonts)


def test_images_are_balanced_uint8_on_the_optdigits_grey_levels(glyphs):
    from edgetl.data import load_digits_dataset

    assert glyphs.x.shape == (1240, 8, 8, 1) and glyphs.x.dtype == np.uint8 and glyphs.kind == "image"
    assert glyphs.class_names[:10] == tuple("0123456789") and glyphs.num_classes == 62
    assert set(np.bincount(glyphs.y, minlength=62)) == {20}
    # 32x32 bitmaps counted in 4x4 blocks: 17 levels, the same ones load_digits_dataset produces
    digits = load_digits_dataset()
    assert set(np.unique(glyphs.x)) <= set(np.round(np.arange(17) * 255 / 16).astype(np.uint8))
    assert set(np.unique(glyphs.x)) <= set(np.unique(digits.x))
    # ink like handwriting: about as much of the frame covered (measured 0.54 vs 0.51)
    assert abs((glyphs.x > 0).mean() - (digits.x > 0).mean()) < 0.1
    assert all(glyphs.x[i].max() > 0 for i in range(len(glyphs)))  # no empty image


def test_deterministic_by_seed_and_varied(glyphs, fonts):
    again = render_glyphs(1240, seed=3, fonts=fonts)
    assert np.array_equal(again.x, glyphs.x) and np.array_equal(again.y, glyphs.y)
    other = render_glyphs(1240, seed=4, fonts=fonts)
    assert not np.array_equal(other.x, glyphs.x)
    zeros = glyphs.x[glyphs.y == 0].reshape(20, -1).astype(float)
    # twenty renderings of the same character all differ (fonts, transforms, pen, noise)
    assert len({row.tobytes() for row in zeros}) == 20
    assert np.mean(np.abs(zeros - zeros.mean(0))) > 20


def test_fonts_are_text_fonts_and_a_fallback_font_is_refused(fonts):
    from matplotlib import font_manager
    from PIL import ImageFont

    from edgetl._glyphs import _renders_distinct

    names = [f.name for f in fonts]
    assert len(fonts) >= 10 and len(set(names)) == len(names)
    assert not any(bad in n for n in names for bad in ("Last Resort", "cmsy", "cmex", "STIXSize", "Display"))
    # matplotlib's fallback font draws the same box for every letter: refused by rendering, not by name
    last_resort = next(f.fname for f in font_manager.fontManager.ttflist if "LastResort" in f.fname)
    assert not _renders_distinct(ImageFont.truetype(last_resort, 24), "ABC")
    assert _renders_distinct(ImageFont.truetype(str(fonts[0].path), 24), "ABC")


def test_fingerprint_follows_characters_and_fonts(fonts):
    base = glyph_fingerprint("0123456789", fonts)
    assert base == glyph_fingerprint("0123456789", fonts)
    assert base != glyph_fingerprint("0123456789A", fonts)
    assert base != glyph_fingerprint("0123456789", fonts[:-1])


@pytest.mark.parametrize(
    "kwargs", [{"n": 0}, {"n": 5, "characters": "AA"}, {"n": 5, "characters": "A"}, {"n": 5, "image_size": 2}]
)
def test_bad_arguments_are_refused(kwargs, fonts):
    n = kwargs.pop("n")
    with pytest.raises(InputError, match="render_glyphs needs"):
        render_glyphs(n, fonts=fonts, **kwargs)


def test_other_sizes_and_characters(fonts):
    ds = render_glyphs(30, seed=0, characters="xyz", image_size=16, fonts=fonts)
    assert ds.x.shape == (30, 16, 16, 1) and ds.class_names == ("x", "y", "z")


def test_no_tensorflow_import():
    code = (
        "import sys; from edgetl._glyphs import render_glyphs; render_glyphs(20, characters='ab'); "
        "assert 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
