"""Compile and fit a Keras classifier the one way every edgetl training phase does.

Used by transfer (Adam heads, fine-tuning), pretraining and quantization-aware training:
Adam, categorical cross-entropy with label smoothing, balanced class weights as sample
weights, early stopping on validation loss restoring the best weights, a progress bar on
terminals only.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import numpy as np

from edgetl.data import class_weights
from edgetl.host._tf import keras
from edgetl.host._tf_data import Augmentation, to_tf_dataset


def compile_model(model: Any, learning_rate: float, label_smoothing: float = 0.0) -> None:
    k = keras()
    model.compile(
        optimizer=k.optimizers.Adam(learning_rate),
        loss=k.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy"],
    )


def fit_model(
    model: Any,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    *,
    config: Any,
    epochs: int,
    num_classes: int,
    augmentation: Augmentation | None = None,
    callbacks: Sequence[Any] = (),
    verbose: int = 0,
    progress: str | None = None,
) -> dict[str, list[float]]:
    """Fit ``model`` (compiled) and return its history as plain lists.

    ``config`` supplies ``batch_size``, ``seed``, ``class_weight`` and
    ``early_stopping_patience`` (a :class:`edgetl.host.TrainConfig`).
    """
    k = keras()
    weights = None
    if config.class_weight == "balanced":
        cw = class_weights(train[1], num_classes)
        weights = np.asarray([cw[int(c)] for c in train[1]], dtype=np.float32)
    ds = to_tf_dataset(
        train[0],
        train[1],
        num_classes=num_classes,
        batch_size=config.batch_size,
        shuffle=True,
        seed=config.seed,
        augmentation=augmentation,
        sample_weights=weights,
    )
    val_ds = (
        to_tf_dataset(val[0], val[1], num_classes=num_classes, batch_size=256)
        if val is not None and len(val[1])
        else None
    )
    cbs = list(callbacks)
    if config.early_stopping_patience:
        cbs.append(
            k.callbacks.EarlyStopping(
                monitor="val_loss" if val_ds is not None else "loss",
                patience=config.early_stopping_patience,
                restore_best_weights=True,
            )
        )
    bar = epoch_progress(epochs, progress) if progress else None
    if bar is not None:
        cbs.append(bar)
    hist = model.fit(ds, validation_data=val_ds, epochs=epochs, verbose=verbose, callbacks=cbs)
    return {key: [float(v) for v in values] for key, values in hist.history.items()}


def epoch_progress(epochs: int, desc: str) -> Any:
    """A Keras callback that advances a terminal progress bar once per epoch, or ``None``."""
    if not sys.stderr.isatty() or os.environ.get("EDGETL_NO_PROGRESS"):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None

    class EpochBar(keras().callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.bar = tqdm(total=epochs, desc=desc, leave=False, dynamic_ncols=True)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.bar.update(1)
            if logs and "loss" in logs:
                self.bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if "loss" in k or "accuracy" in k})

        def on_train_end(self, logs: Any = None) -> None:
            self.bar.close()

    return EpochBar()
