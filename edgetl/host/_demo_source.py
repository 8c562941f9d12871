"""The demo's source task: ``edgetl_cnn`` pretrained on synthetic printed glyphs, cached.

Rendering the glyphs and pretraining take most of a first ``edgetl demo``; the pretrained
run directory is kept under ``$EDGETL_CACHE_DIR/demo`` (default ``~/.cache/edgetl/demo``),
keyed by everything that decides its weights: the recipe below, the glyph generator's
version, characters and font files (:func:`edgetl._glyphs.glyph_fingerprint`), the
backbone's architecture and the TensorFlow version. A second run with the same key loads it
instead of pretraining; any change gives another key, so a stale entry is never used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgetl._glyphs import DEFAULT_CHARACTERS, glyph_fingerprint, glyph_fonts, render_glyphs
from edgetl.errors import EdgeTLError
from edgetl.host._backbones import create_backbone, load_keras_model
from edgetl.host._embedding_cache import cache_home
from edgetl.host._linear_head import standardization
from edgetl.host._pretrain import pretrain
from edgetl.host._run import save_run
from edgetl.host._tf import keras, tf
from edgetl.host._transfer import TrainConfig

# The demo's backbone: edgetl_cnn with its embedding through a frozen Dense(256, relu) (identity, +1),
# the same features as edgetl_cnn's, and a last layer the device can train (the tail).
DEMO_BACKBONE = "edgetl_cnn_dense"
# Bump when the way the demo pretrains changes in a way the key below does not see.
DEMO_SOURCE_VERSION = 3
# Source images whose embeddings give the backbone's standardization statistics.
STATISTICS_SAMPLE = 5000


@dataclass(frozen=True)
class GlyphSourceRecipe:
    """How the demo's source backbone is made (chosen in ``tools/glyph_transfer.py`` on a
    tuning target the demo never reports)."""

    characters: str = DEFAULT_CHARACTERS
    images: int = 60_000
    image_size: int = 8
    epochs: int = 6
    batch_size: int = 256
    learning_rate: float = 2e-3
    seed: int = 0

    def train_config(self) -> Any:

        return TrainConfig(
            backbone=DEMO_BACKBONE,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            early_stopping_patience=3,
            val_fraction=0.05,
            test_fraction=0.05,
            seed=self.seed,
        )


@dataclass
class SourceModel:
    """The pretrained backbone the demo transfers, and where it came from."""

    backbone: Any  # tf_keras model: raw pixels -> embedding
    embedding_size: int
    input_spec: dict[str, Any]
    metrics: dict[str, Any]
    run: Path  # the `edgetl pretrain` run directory (the cache entry or its copy)
    cached: bool  # loaded from the cache instead of pretrained now
    recipe: GlyphSourceRecipe
    fonts: int


def cache_entry(recipe: GlyphSourceRecipe, fonts: list[Any]) -> Path:

    shape = (recipe.image_size, recipe.image_size, 1)
    ident = {
        "version": DEMO_SOURCE_VERSION,
        "recipe": asdict(recipe),
        "glyphs": glyph_fingerprint(recipe.characters, fonts),
        "architecture": create_backbone(DEMO_BACKBONE, shape, weights=None).model.to_json(),
        "tensorflow": tf().__version__,
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    return cache_home() / "demo" / f"glyph-source-{key}"


def pretrained_source(
    recipe: GlyphSourceRecipe, run_dir: Path | None, echo: Callable[[str], None] = print
) -> SourceModel:
    """The source backbone: from the cache when there, else pretrained now and cached.

    ``run_dir`` (if given) receives a copy of the run directory. A cache that cannot be
    written (read-only home) only costs the next run its speed-up; it is said, not raised.
    """
    fonts = glyph_fonts(recipe.characters)
    entry = cache_entry(recipe, fonts)
    source = _load(entry, recipe, len(fonts)) if (entry / "backbone.keras").is_file() else None
    if source is None:
        source = _pretrain(recipe, fonts, entry, echo)
    else:
        echo(f"  loaded the pretrained source backbone from the cache {entry} (delete it to pretrain again)")
    if run_dir is not None and source.run != run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(source.run, run_dir)
        source.run = run_dir
    return source


def _load(entry: Path, recipe: GlyphSourceRecipe, n_fonts: int) -> SourceModel | None:
    """The cached run, or ``None`` when it cannot be read (then it is made again)."""

    try:
        info = json.loads((entry / "config.json").read_text())
        metrics = json.loads((entry / "metrics.json").read_text())
        model = load_keras_model(entry / "backbone.keras")
    except (OSError, ValueError, EdgeTLError):
        return None
    metrics.pop("confusion_matrix", None)
    return SourceModel(model, int(model.output_shape[-1]), info["input_spec"], metrics, entry, True, recipe, n_fonts)


def source_accuracy(metrics: dict[str, Any]) -> str:
    """The source run's test accuracy, or why there is none (``--source-images`` small enough that
    5% of each character's images rounds to no test image)."""
    acc = metrics.get("test_accuracy")
    if acc is None or acc != acc:  # None (read back from JSON) or NaN (no test split)
        return f"no source test images: {metrics.get('train_examples', '?')} images left none per character"
    return f"source test accuracy {acc:.3f}"


def with_source_standardization(backbone: Any, source_x: Any) -> Any:
    """``backbone`` followed by a frozen per-dimension standardization with statistics of the
    source task's embeddings.

    A target task with one example per class cannot estimate 256 variances from its own
    five embeddings (what ``edgetl train`` standardizes with by default); the source task
    can. Measured on the tuning target (tools/glyph_transfer.py, 10 seeds): +3 points at one
    example per class, within a point at 3-10.
    """

    k = keras()
    stats = standardization(backbone.predict(source_x.astype("float32"), batch_size=512, verbose=0))
    # A unit that almost never fires on the source (measured: variance 8e-8 against a median
    # of 1.9) would be multiplied by ~3,600; int8 export quantizes the 1/std vector as one
    # tensor and rounded every typical factor to 0 (accuracy 0.19). Such units are scaled
    # like a unit with a tenth of the typical spread instead.
    variance = np.maximum(stats.variance, 0.01 * float(np.median(stats.variance)))
    norm = k.layers.Normalization(name="source_standardize")
    norm.build((None, int(backbone.output_shape[-1])))
    norm.set_weights([stats.mean, variance.astype(np.float32), np.array(0, np.int64)])
    norm.trainable = False
    return k.Model(backbone.input, norm(backbone.output), name="backbone")


def _pretrain(recipe: GlyphSourceRecipe, fonts: list[Any], entry: Path, echo: Callable[[str], None]) -> SourceModel:

    t0 = time.perf_counter()
    glyphs = render_glyphs(
        recipe.images, seed=recipe.seed, characters=recipe.characters, image_size=recipe.image_size, fonts=fonts
    )
    render_seconds = time.perf_counter() - t0
    result = pretrain(glyphs, recipe.train_config())
    model = with_source_standardization(result.transfer.features, glyphs.x[:STATISTICS_SAMPLE])
    result = replace(result, transfer=replace(result.transfer, features=model))
    metrics = {k: v for k, v in result.metrics.items() if k != "confusion_matrix"}
    metrics["render_seconds"] = round(render_seconds, 2)
    result.metrics["render_seconds"] = metrics["render_seconds"]
    echo(
        f"  rendered {len(glyphs):,} glyph images ({render_seconds:.1f}s) and pretrained {DEMO_BACKBONE} on them: "
        f"{source_accuracy(metrics)} over {glyphs.num_classes} characters, "
        f"{metrics['train_seconds']:.0f}s"
    )
    try:
        run = save_run(result, entry, kind="pretrain", overwrite=True)
        echo(f"  cached it in {entry} (a second run skips pretraining)")
    except OSError as exc:
        run = Path(tempfile.mkdtemp(prefix="edgetl-demo-source-")) / "source_run"
        save_run(result, run, kind="pretrain", overwrite=True)
        echo(f"  could not cache it in {entry} ({exc}); the next run pretrains again")
    return SourceModel(
        model, int(model.output_shape[-1]), dict(result.input_spec), metrics, run, False, recipe, len(fonts)
    )
