"""Run directories: what a training run leaves on disk.

``RUN/`` holds ``model.keras`` (raw input -> probabilities), ``backbone.keras`` (raw input
-> embedding, for pretrain runs and for the exporter), ``config.json`` (the exact
:class:`TrainConfig`, labels and input spec), ``history.json``, ``metrics.json``,
``training_curves.png`` and ``confusion_matrix.png``.

A run is written into a temporary sibling directory and renamed into place, so a crash
never leaves a half-written run under the final name. A run on streamed data also holds
``embeddings.npy`` + ``embeddings.json``: the backbone's embeddings of its data (a hard link
to the on-disk cache entry, see :mod:`edgetl.host._embedding_cache`). With
``strategy="multi-worker"`` only the chief writes the run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import __version__
from edgetl._atomic import atomic_directory
from edgetl.data import conform_images, load_dataset
from edgetl.errors import EdgeTLError, InputError
from edgetl.host._backbones import load_keras_model
from edgetl.host._embedding_cache import load_from_run, store_in_run
from edgetl.host._tf import tf
from edgetl.host._transfer import TrainConfig, TrainResult


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def save_run(result: TrainResult, out: str | os.PathLike[str], *, kind: str = "train", overwrite: bool = False) -> Path:
    """Write ``result`` as a run directory at ``out``.

    Raises:
        InputError: ``out`` exists and ``overwrite`` is false.
    """

    out = Path(out)
    if result.config.strategy == "multi-worker" and not is_chief():
        return _save_as_worker(result, out)
    if out.exists() and not overwrite:
        raise InputError(f"run directory {str(out)!r} already exists; choose another --out or pass --overwrite")
    with atomic_directory(out) as tmp:
        result.transfer.model.save(tmp / "model.keras")
        result.transfer.features.save(tmp / "backbone.keras")
        write_json(
            tmp / "config.json",
            {
                "kind": kind,
                "edgetl_version": __version__,
                "tensorflow_version": tf().__version__,
                "class_names": list(result.class_names),
                "input_spec": result.input_spec,
                "backbone_name": result.transfer.backbone.name,
                "config": result.config.to_dict(),
                # Where the training data came from and its hash: export calibrates and
                # evaluates on it by default (when it is still there, unchanged).
                "data": result.data,
                "assumptions": result.assumptions,
            },
        )
        write_json(tmp / "history.json", result.history)
        write_json(tmp / "metrics.json", {**result.metrics, "confusion_matrix": result.confusion})
        plot_history(result.history, tmp / "training_curves.png")
        plot_confusion(result.confusion, result.class_names, tmp / "confusion_matrix.png")
        _store_embeddings(result, tmp)
    return out


def is_chief() -> bool:
    """Whether this process writes results in a multi-worker cluster (``TF_CONFIG``): the
    ``chief`` task, else worker 0 when the cluster has no chief; any process without
    ``TF_CONFIG`` is its own chief."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except ValueError:
        raise InputError(f"TF_CONFIG is not valid JSON: {os.environ.get('TF_CONFIG')!r}") from None
    task = config.get("task") or {}
    kind, index = task.get("type"), int(task.get("index", 0) or 0)
    if not kind:
        return True
    if "chief" in (config.get("cluster") or {}):
        return kind == "chief"
    return kind == "worker" and index == 0


def _save_as_worker(result: TrainResult, out: Path) -> Path:
    """A non-chief worker saves the models into a directory it then deletes: saving reads
    every variable, and reading a synchronized variable is a collective every worker must
    join. The chief writes the run at ``out``."""

    tmp = Path(tempfile.mkdtemp(prefix=".edgetl-worker-"))
    try:
        result.transfer.model.save(tmp / "model.keras")
        result.transfer.features.save(tmp / "backbone.keras")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _store_embeddings(result: TrainResult, run_dir: Path) -> None:
    """Link the run's on-disk embedding entry into the run, for export: only when one entry
    covers the run's data and the backbone is the one that computed it (not fine-tuned)."""

    entries = result.metrics.get("embedding_cache") or []
    if len(entries) == 1 and not result.metrics.get("fine_tune_kept"):
        store_in_run(entries[0], run_dir, result.data)


@dataclass
class Run:
    """A run directory read back: the model (loaded in safe mode) and its records."""

    path: Path
    model: Any
    class_names: list[str]
    input_spec: dict[str, Any]
    config: TrainConfig
    metrics: dict[str, Any]
    info: dict[str, Any]

    def training_data(self) -> tuple[Any, str]:
        """The run's training data loaded again, or ``None``, and a note saying which and why.

        Used only when it is still where the run recorded it and hashes to the same
        sha256 (the same examples, labels and classes), then conformed to the model's input
        as training conformed it. Anything else returns ``None`` with the reason.
        """

        record = self.info.get("data") or {}
        load = dict(record.get("load") or {})
        path = load.pop("path", None)
        if not path or not record.get("sha256"):
            return None, "the run does not record its training data"
        if path != "builtin:digits" and not Path(path).exists():
            return None, f"the run's training data {path!r} no longer exists"
        # Loaded as training loaded it (streamed data hashes its files, in-memory data its
        # pixels); runs from before streaming loaded everything into memory.
        load.setdefault("streaming", "off")
        allowed = ("image_size", "channels", "label_column", "streaming")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in load.items() if v is not None and k in allowed}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = load_dataset(path, **kwargs)
        except EdgeTLError as exc:
            return None, f"the run's training data {path!r} cannot be loaded ({exc})"
        found = data.fingerprint()
        if found != record["sha256"]:
            return (
                None,
                f"the run's training data {path!r} changed since training (sha256 {found[:12]}, the run recorded "
                f"{record['sha256'][:12]})",
            )
        data, _ = conform_images(data, self.input_spec["shape"])
        how = ", streamed" if data.streamed else ""
        return data, f"the run's training data {path} (sha256 {found[:12]} verified{how})"

    def embeddings(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The backbone's raw embeddings of the run's training data (memory-mapped, one row per
        example in the data's order) and their record, when the run stored them for the data
        it records; ``None`` otherwise. Valid only while that data is unchanged (see
        :meth:`training_data`, which checks it)."""

        return load_from_run(self.path, (self.info.get("data") or {}).get("sha256"))


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read a run directory written by :func:`save_run`."""

    path = Path(path)
    missing = [f for f in ("model.keras", "config.json") if not (path / f).is_file()]
    if missing:
        raise InputError(
            f"{str(path)!r} is not an edgetl run directory (missing {missing}); create one with `edgetl train`"
        )
    info = json.loads((path / "config.json").read_text())
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else {}
    model = load_keras_model(path / "model.keras")
    return Run(
        path, model, info["class_names"], info["input_spec"], TrainConfig.from_dict(info["config"]), metrics, info
    )


def plot_history(history: dict[str, list[float]], path: Path) -> None:
    """Loss and accuracy per epoch (train and validation), phases marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in history:
                ax.plot(range(1, len(history[key]) + 1), history[key], style, label=key)
        phases = history.get("phase", [])
        if 2.0 in phases:
            ax.axvline(phases.index(2.0) + 0.5, color="grey", linewidth=0.8, label="fine-tune starts")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, class_names: tuple[str, ...] | list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if confusion[i, j]:
                dark = confusion[i, j] > confusion.max() / 2  # white on dark cells, black on light
                ax.text(
                    j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7, color="white" if dark else "black"
                )
    ax.set_title("confusion matrix (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
