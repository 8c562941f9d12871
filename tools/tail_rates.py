#!/usr/bin/env python
"""What the trainable tail buys over head-only personalization, on the guard's EVALUATION family.

    python tools/tail_rates.py [--seeds 2] [--per-class 10] [--bundle B] [--out DIR]

The bundle: a user's own CNN (convolutions -> Flatten -> ``Dense(64, relu)`` embedding ->
softmax), trained on digits 0-4, its head transferred to the train half of digits 5-9
(:func:`build_tail_bundle`), so its last embedding layer is eligible for a tail. New users are
``tools/guard_rates.py``'s kinds of the evaluation family only (never the tuning family),
drawn from the bundle's train half in the user's style; the truth is the other half (the
user's accuracy in their style, the factory classes' as they are). Each user is personalized
three ways on the same examples and held-out split: head-only (the default training), the tail
(same settings), and ``auto`` (the tail when the guard's evidence prefers it to the head, see
``edgetl.device._tail``); a candidate the guard refuses leaves the factory head in place.

Targets (issue 24): on users whose head-only gain is under 10 points, the tail's mean user
accuracy >= head-only's + 5 points; factory classes within 3 points of head-only; auto never
below head-only on average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

LOW_GAIN = 0.10  # users whose head-only gain is under this ...
TARGET_TAIL_GAIN = 0.05  # ... gain at least this much more with the tail
FACTORY_SLACK = 0.03


def user_cnn(path: Path, seed: int = 0, epochs: int = 15) -> Path:
    """The user's own model file: conv -> Flatten -> Dense(64, relu) -> softmax on digits 0-4."""
    from edgetl.data import load_digits_dataset
    from edgetl.host._tf import keras, tf

    tf().random.set_seed(seed)
    k = keras()
    d = load_digits_dataset((0, 1, 2, 3, 4))
    inputs = k.Input((8, 8, 1), name="pixels")
    x = k.layers.Rescaling(1.0 / 255.0)(inputs)
    x = k.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = k.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = k.layers.MaxPooling2D(2)(x)
    x = k.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = k.layers.Flatten()(x)
    x = k.layers.Dense(64, activation="relu", name="embedding_dense")(x)
    model = k.Model(inputs, k.layers.Dense(5, activation="softmax", name="classifier")(x))
    model.compile(k.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(d.x.astype(np.float32), d.y, epochs=epochs, batch_size=32, verbose=0)
    model.save(path)
    return path


def build_tail_bundle(out: Path, seed: int = 0) -> Path:
    """An fp32 bundle whose backbone ends in the user CNN's Dense(64, relu): it has a tail."""
    from edgetl.host._export import export_bundle
    from edgetl.host._run import save_run
    from edgetl.host._transfer import TrainConfig, train_transfer
    from guard_rates import digit_halves

    out.mkdir(parents=True, exist_ok=True)
    model = user_cnn(out / f"user_cnn{seed}.keras", seed)
    config = TrainConfig(backbone=str(model), epochs=60, learning_rate=1e-2, val_fraction=0.1, test_fraction=0.0)
    halves = digit_halves()
    run = save_run(train_transfer(halves.train, config), out / f"tail_target{seed}")
    result = export_bundle(run, out / f"tail{seed}.edgetl", quantize=["none"], calibration=halves.train)
    return result.bundle.path
