"""Synthetic printed glyphs: a large, varied source task generated offline (numpy + Pillow).

Letters and digits are rendered from the fonts that matplotlib and the system ship, each
with a random affine transform (rotation, slant, width, size, position), stroke width,
blur, threshold and speckle noise, then reduced the way scikit-learn's handwritten digits
were made from scanned forms (UCI optdigits): a 32x32 binary bitmap whose "on" pixels are
counted in 4x4 blocks, giving 8x8 images with 17 grey levels. ``image_size`` other than 8
counts ``4 * image_size`` bitmaps in 4x4 blocks the same way.

The same ``seed``, characters, size and fonts give the same images (the font files are part
of :func:`glyph_fingerprint`, so a cache keyed by it changes when the fonts do).

    >>> ds = render_glyphs(20_000, seed=0)      # 62 classes: 0-9, A-Z, a-z; uint8 (n, 8, 8, 1)
    >>> ds.class_names[:3], ds.x.shape
    (('0', '1', '2'), (20000, 8, 8, 1))
"""

from __future__ import annotations

import hashlib
import os
import re
import string
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgetl.data import Dataset
from edgetl.errors import DependencyError, InputError

# Bump when anything below changes the images a seed produces (caches are keyed by it).
GLYPH_RECIPE_VERSION = 1
DEFAULT_CHARACTERS = string.digits + string.ascii_uppercase + string.ascii_lowercase
# Fonts whose letters are not letters: symbol, math-extension and fallback fonts (they map
# ASCII codes to other shapes or to one box), and matplotlib's empty "Display" faces.
_NOT_TEXT_FONTS = re.compile(r"sym|nonuni|emoji|dingbat|wingding|webding|cmex|cmsy|last ?resort|display|ornament", re.I)
_RENDER_PX = 48  # font size of the master glyphs, before the random transform
ELASTIC = 0.08  # largest elastic displacement, as a share of the bitmap side
_CONTROL = 4  # the displacement field is interpolated from CONTROL x CONTROL random vectors
_CHUNK = 1024  # images rendered together (vectorized steps); part of the recipe (noise per chunk)
_BLOCK = 4  # "on" pixels are counted in BLOCK x BLOCK blocks (optdigits: 32x32 -> 8x8)


@dataclass(frozen=True)
class GlyphFont:
    """One usable font face."""

    name: str  # "family style", the key fonts are de-duplicated by
    path: Path


def glyph_fonts(characters: str = DEFAULT_CHARACTERS) -> list[GlyphFont]:
    """Text fonts found through matplotlib's font manager (its own and the system's).

    One file per family and style, sorted by name. A font is kept only when every
    character renders to a non-empty bitmap and no two characters render the same (a
    fallback font draws one box for all).
    """
    try:
        from matplotlib import font_manager
    except ImportError as exc:
        raise DependencyError(
            f'glyph rendering finds fonts with matplotlib ({exc}): pip install "edgetl[host]"'
        ) from exc
    ImageFont = _pillow_font()
    paths = sorted({*font_manager.findSystemFonts(), *(f.fname for f in font_manager.fontManager.ttflist)})
    chosen: dict[str, GlyphFont] = {}
    for path in paths:
        if not path.lower().endswith((".ttf", ".otf")):
            continue
        try:
            font = ImageFont.truetype(path, 24)
        except OSError:
            continue
        name = " ".join(font.getname())
        if name in chosen or _NOT_TEXT_FONTS.search(name) or not _renders_distinct(font, characters):
            continue
        chosen[name] = GlyphFont(name, Path(path))
    return [chosen[n] for n in sorted(chosen)]


def _pillow_font() -> Any:
    try:
        from PIL import ImageFont
    except ImportError as exc:
        raise DependencyError(f"glyph rendering needs Pillow ({exc}): pip install pillow") from exc
    return ImageFont


def _renders_distinct(font: Any, characters: str) -> bool:
    seen = set()
    for ch in characters:
        mask = font.getmask(ch)
        if mask.size[0] == 0 or mask.size[1] == 0:
            return False
        bits = bytes(mask)
        if not any(bits) or (mask.size, bits) in seen:
            return False
        seen.add((mask.size, bits))
    return True


def glyph_fingerprint(characters: str = DEFAULT_CHARACTERS, fonts: Sequence[GlyphFont] | None = None) -> str:
    """A short hash of everything besides the seed that decides the images: the recipe
    version, the characters and the content of every font file."""
    h = hashlib.sha256(f"glyphs v{GLYPH_RECIPE_VERSION} {characters}".encode())
    for f in fonts if fonts is not None else glyph_fonts(characters):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.path.read_bytes()).digest())
    return h.hexdigest()[:16]


def _master_glyphs(fonts: Sequence[GlyphFont], characters: str) -> list[list[np.ndarray]]:
    """Every character of every font, white on black, cropped to its ink: [font][char]."""
    from PIL import Image, ImageDraw

    ImageFont = _pillow_font()
    out = []
    for f in fonts:
        font = ImageFont.truetype(str(f.path), _RENDER_PX)
        row = []
        for ch in characters:
            canvas = Image.new("L", (_RENDER_PX * 2, _RENDER_PX * 2), 0)
            ImageDraw.Draw(canvas).text((_RENDER_PX // 2, _RENDER_PX // 4), ch, fill=255, font=font)
            row.append(np.asarray(canvas.crop(canvas.getbbox())))
        out.append(row)
    return out


def _draw_params(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """The random variation of each image (ranges fixed before any transfer was measured)."""
    return {
        "rotation": np.deg2rad(rng.uniform(-12, 12, n)),
        "slant": rng.uniform(-0.35, 0.35, n),  # horizontal shear
        "width": np.exp(rng.uniform(np.log(0.7), np.log(1.3), n)),  # relative to the font's own width
        "height": rng.uniform(0.8, 1.0, n),  # share of the frame height the glyph spans
        "shift": rng.uniform(-1.5, 1.5, (n, 2)),  # bitmap pixels
        # Pen width in bitmap pixels, whatever the font's own (handwriting in optdigits is
        # thick: most strokes fill whole 4x4 blocks).
        "stroke_width": rng.uniform(3.0, 7.0, n),
        "blur": rng.uniform(0.0, 1.2, n),  # Gaussian sigma, bitmap pixels
        "threshold": rng.uniform(0.4, 0.6, n),
        "speckle": rng.uniform(0.0, 0.004, n),  # share of bitmap pixels flipped
        # Elastic distortion (as Simard et al. 2003 made printed-like digits look handwritten):
        # a smooth random displacement field, up to this share of the bitmap side.
        "elastic": rng.uniform(0.0, ELASTIC, n),
    }


def _place(master: np.ndarray, side: int, p: dict[str, np.ndarray], i: int) -> np.ndarray:
    """One master glyph transformed into a side x side grey frame (float in [0, 1])."""
    from PIL import Image

    h, w = master.shape
    c, s = np.cos(p["rotation"][i]), np.sin(p["rotation"][i])
    # Shape change (width, slant, rotation) about the glyph's centre, then scale so the
    # transformed glyph spans the chosen share of the frame height (as optdigits normalized size).
    shape = np.array([[c, -s], [s, c]]) @ np.array([[1.0, p["slant"][i]], [0.0, 1.0]]) @ np.diag([p["width"][i], 1.0])
    corners = np.array([[-w, -h], [w, -h], [-w, h], [w, h]], np.float64) / 2 @ shape.T
    extent = corners.max(0) - corners.min(0)
    scale = min(p["height"][i] * side / extent[1], 0.95 * side / extent[0])
    forward = scale * shape
    centre = np.array([side / 2, side / 2]) + p["shift"][i]
    inverse = np.linalg.inv(forward)  # PIL maps output pixels back to input pixels
    offset = np.array([w / 2, h / 2]) - inverse @ centre
    coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    img = Image.fromarray(master).transform((side, side), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


def _interpolation(side: int) -> np.ndarray:
    """(side, CONTROL) linear interpolation weights from control points to pixel centres."""
    pos = (np.arange(side) + 0.5) / side * (_CONTROL - 1)
    lower = np.minimum(np.floor(pos).astype(int), _CONTROL - 2)
    frac = pos - lower
    m = np.zeros((side, _CONTROL), np.float32)
    m[np.arange(side), lower] = 1 - frac
    m[np.arange(side), lower + 1] = frac
    return m


def _elastic(x: np.ndarray, strength: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Warp each image by its own smooth random displacement field (bilinear sampling)."""
    b, side, _ = x.shape
    m = _interpolation(side)
    control = rng.uniform(-1, 1, (b, 2, _CONTROL, _CONTROL)).astype(np.float32)
    field = (m @ control @ m.T) * (strength * side).astype(np.float32)[:, None, None, None]
    grid = np.arange(side, dtype=np.float32)
    ys = np.clip(grid[None, :, None] + field[:, 0], 0, side - 1)
    xs = np.clip(grid[None, None, :] + field[:, 1], 0, side - 1)
    y0, x0 = np.minimum(ys.astype(np.int32), side - 2), np.minimum(xs.astype(np.int32), side - 2)
    fy, fx = ys - y0, xs - x0
    # Flat indices: one gather per corner over the whole batch.
    flat = x.reshape(-1)
    base = (np.arange(b, dtype=np.int32) * side * side)[:, None, None] + y0 * side + x0
    top = flat[base] * (1 - fx) + flat[base + 1] * fx
    bottom = flat[base + side] * (1 - fx) + flat[base + side + 1] * fx
    return top * (1 - fy) + bottom * fy


def _blur(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Per-image Gaussian blur (separable, 5 taps), vectorized over the batch."""
    taps = np.arange(-2, 3, dtype=np.float32)
    kernels = np.exp(-0.5 * (taps[None] / np.maximum(sigma[:, None], 1e-3)) ** 2).astype(np.float32)
    kernels /= kernels.sum(1, keepdims=True)
    pad = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    rows = sum(kernels[:, t, None, None] * pad[:, t : t + x.shape[1], :] for t in range(5))
    return sum(kernels[:, t, None, None] * rows[:, :, t : t + x.shape[2]] for t in range(5))


def _neighbours(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each bitmap dilated and eroded by one pixel (3x3)."""
    pad = np.pad(bits, ((0, 0), (1, 1), (1, 1)), constant_values=False)
    h, w = bits.shape[1:]
    shifts = [pad[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return np.logical_or.reduce(shifts), np.logical_and.reduce(shifts)


def _stroke(bits: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Dilate or erode each bitmap towards a pen ``width`` (pixels).

    A stroke of width w and length L has area w*L and about 2L boundary pixels, so the
    current width is estimated as 2 * area / boundary; each dilation adds about 2 pixels.
    """
    grown, shrunk = _neighbours(bits)
    area = bits.sum((1, 2))
    boundary = np.maximum((bits & ~shrunk).sum((1, 2)), 1)
    steps = np.clip(np.round((width - 2.0 * area / boundary) / 2.0), -1, 2).astype(int)
    out = np.where((steps < 0)[:, None, None] & (shrunk.sum((1, 2)) > 0)[:, None, None], shrunk, bits)
    for step in range(1, int(steps.max(initial=0)) + 1):
        out = np.where((steps >= step)[:, None, None], _neighbours(out)[0] if step > 1 else grown, out)
    return out


def render_glyphs(
    n: int,
    *,
    seed: int = 0,
    characters: str = DEFAULT_CHARACTERS,
    image_size: int = 8,
    fonts: Sequence[GlyphFont] | None = None,
) -> Dataset:
    """``n`` glyph images, classes balanced (one class per character), deterministic by seed.

    Returns a :class:`Dataset` of uint8 ``(n, image_size, image_size, 1)`` images, white
    ink on black as scikit-learn's digits, with ``class_names = tuple(characters)``.
    Chunks of images are rendered on a few threads (Pillow and numpy release the GIL);
    each chunk draws its noise from its own generator, so threads do not change the result.

    Raises:
        InputError: ``n`` < 1, fewer than two distinct characters, or ``image_size`` < 4.
        DependencyError: no usable font found.
    """
    if int(n) < 1 or int(image_size) < 4 or len(set(characters)) != len(characters) or len(characters) < 2:
        raise InputError(
            f"render_glyphs needs n >= 1, image_size >= 4 and at least two distinct characters; received n={n}, "
            f"image_size={image_size}, characters={characters!r}"
        )
    fonts = list(fonts) if fonts is not None else glyph_fonts(characters)
    if not fonts:
        raise DependencyError("no usable text font found through matplotlib's font manager; install matplotlib")
    masters = _master_glyphs(fonts, characters)
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % len(characters))
    font_of = rng.integers(0, len(fonts), n)
    params = _draw_params(rng, n)
    x = np.empty((n, image_size, image_size, 1), np.uint8)

    def render_chunk(start: int) -> None:
        idx = np.arange(start, min(n, start + _CHUNK))
        noise = np.random.default_rng([seed, start])
        side = _BLOCK * int(image_size)
        grey = np.stack([_place(masters[font_of[i]][y[i]], side, params, i) for i in idx])
        grey = _elastic(grey, params["elastic"][idx], noise)
        bits = _blur(grey, params["blur"][idx]) > params["threshold"][idx, None, None]
        bits = _stroke(bits, params["stroke_width"][idx])
        bits ^= noise.random(bits.shape) < params["speckle"][idx, None, None]
        counts = bits.reshape(len(idx), image_size, _BLOCK, image_size, _BLOCK).sum((2, 4))
        x[idx, ..., 0] = np.round(counts * (255.0 / _BLOCK**2)).astype(np.uint8)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(render_chunk, range(0, n, _CHUNK)))
    return Dataset(
        x, y.astype(np.int64), tuple(characters), "image", f"synthetic glyphs ({len(fonts)} fonts, seed {seed})"
    )
