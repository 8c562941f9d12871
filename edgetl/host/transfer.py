"""The transfer model: shared layers -> [fusion with task features] -> head, and its training.

The recipe (DESIGN.md): the backbone (shared layers, learned on a source task) is frozen
with BatchNorm in inference mode; a task-specific head is learned on the target data;
optionally a small task branch on the raw input is concatenated with the shared embedding
(feature fusion); optionally the top N backbone layers are fine-tuned afterwards with a
lower learning rate.

The model is built as ``head(features(x))`` where ``features`` is the backbone (plus the
fusion branch) and ``head`` a separate Keras model: the seam between them is the embedding,
which is exactly where the exported bundle splits backbone and trainable head.

    >>> cfg = TrainConfig(backbone="edgetl_cnn", epochs=30)
    >>> result = train_transfer(splits, cfg)
    >>> result.metrics["test_accuracy"]
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Sequence

import numpy as np

from edgetl.errors import InputError, describe
from edgetl.host._tf import keras, tf
from edgetl.host.backbones import Backbone, adapt_normalization, create_backbone, leaf_layers
from edgetl.host.data import Augmentation, Dataset, Splits, class_weights, to_tf_dataset

STRATEGIES = ("default", "mirrored", "multi-worker")
FUSIONS = ("none", "concat")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a transfer run depends on; saved verbatim as the run's ``config.json``.

    Attributes:
        backbone: registry name, model file, or ``edgetl pretrain`` run directory.
        weights: ``"imagenet"``, a weights file, or ``None`` (registry backbones only).
        cut_layer: embedding layer of a model-file backbone (default: before the classifier).
        fusion: ``"none"`` or ``"concat"`` (a trainable task branch concatenated with the
            shared embedding).
        fusion_units: width of the task branch.
        head_hidden_units: 0 for a linear softmax head; >0 adds ``Dense(units, relu)`` first.
        dropout: dropout before the head's output layer.
        epochs, batch_size, learning_rate: the head phase (Adam).
        fine_tune_layers: unfreeze this many weight-bearing backbone layers from the top
            after the head phase (BatchNorm layers stay frozen and in inference mode).
        fine_tune_epochs, fine_tune_learning_rate: the fine-tune phase.
        early_stopping_patience: epochs without val-loss improvement before stopping and
            restoring the best weights; 0 disables it.
        class_weight: ``"none"`` or ``"balanced"``.
        label_smoothing: for the categorical cross-entropy.
        augmentation: image augmentation for training batches, or ``None``.
        seed: seeds Python, numpy and TensorFlow.
        strategy: ``"default"``, ``"mirrored"`` or ``"multi-worker"`` (tf.distribute).
        cache_embeddings: train the head on embeddings computed once (much faster); used
            only when nothing before the seam is trainable or random (no fusion, no
            augmentation).
        val_fraction, test_fraction: the stratified split when one dataset is given.
    """

    backbone: str = "edgetl_cnn"
    weights: str | None = None
    cut_layer: str | None = None
    fusion: Literal["none", "concat"] = "none"
    fusion_units: int = 16
    head_hidden_units: int = 0
    dropout: float = 0.0
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_layers: int = 0
    fine_tune_epochs: int = 10
    fine_tune_learning_rate: float = 1e-5
    early_stopping_patience: int = 5
    class_weight: Literal["none", "balanced"] = "none"
    label_smoothing: float = 0.0
    augmentation: Augmentation | None = None
    seed: int = 0
    strategy: Literal["default", "mirrored", "multi-worker"] = "default"
    cache_embeddings: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                raise InputError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, received {name}={describe(v)}")

        for n in ("epochs", "batch_size", "fusion_units"):
            positive(n)
        for n in ("head_hidden_units", "fine_tune_layers", "fine_tune_epochs", "early_stopping_patience", "seed"):
            positive(n, allow_zero=True)
        for n in ("learning_rate", "fine_tune_learning_rate"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or not 0 < v < 10:
                raise InputError(f"{n} must be a number in (0, 10), received {n}={describe(v)}")
        for n in ("dropout", "label_smoothing"):
            v = getattr(self, n)
            if not 0 <= v < 1:
                raise InputError(f"{n} must be in [0, 1), received {n}={describe(v)}")
        if self.fusion not in FUSIONS:
            raise InputError(f"fusion must be one of {FUSIONS}, received fusion={self.fusion!r}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, received strategy={self.strategy!r}")
        if self.class_weight not in ("none", "balanced"):
            raise InputError(f"class_weight must be 'none' or 'balanced', received {self.class_weight!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Rebuild from ``to_dict`` output; unknown (older or newer) keys are ignored with a warning."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"ignoring unknown TrainConfig keys {unknown}", stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in known}
        if isinstance(kwargs.get("augmentation"), dict):
            kwargs["augmentation"] = Augmentation(**kwargs["augmentation"])
        return cls(**kwargs)


@dataclass
class TransferModel:
    """The pieces of a transfer model; ``model`` is ``head(features(x))``."""

    model: Any
    features: Any  # raw input -> embedding (backbone, plus the fusion branch)
    head: Any  # embedding -> class probabilities
    backbone: Backbone


@dataclass
class TrainResult:
    """What :func:`train_transfer` returns; :func:`edgetl.host.run.save_run` writes it."""

    transfer: TransferModel
    config: TrainConfig
    class_names: tuple[str, ...]
    history: dict[str, list[float]]
    metrics: dict[str, Any]
    confusion: np.ndarray
    input_spec: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.transfer.model


def configure_cpu_devices(n: int) -> None:
    """Split the physical CPU into ``n`` logical devices (before TensorFlow initialises them).

    Lets ``strategy="mirrored"`` replicate on a machine without GPUs, e.g. for tests.
    """
    t = tf()
    if n < 1:
        raise InputError(f"cpu devices must be a positive integer, received {n}")
    cpu = t.config.list_physical_devices("CPU")[0]
    try:
        t.config.set_logical_device_configuration(cpu, [t.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError as exc:  # TensorFlow refuses once its devices are initialised
        current = len(t.config.list_logical_devices("CPU"))
        if current != n:
            raise InputError(f"cannot split the CPU into {n} devices after TensorFlow started ({current} now): {exc}") from exc


def make_strategy(name: str) -> Any:
    """The ``tf.distribute`` strategy for ``name`` (see :data:`STRATEGIES`).

    ``mirrored`` replicates over all local GPUs, or over the logical CPU devices when there
    is no GPU; ``multi-worker`` reads the cluster from ``TF_CONFIG`` (TensorFlow's own
    engine; without ``TF_CONFIG`` it runs as a single worker).
    """
    t = tf()
    if name == "default":
        return t.distribute.get_strategy()
    if name == "mirrored":
        gpus = t.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or t.config.list_logical_devices("CPU"))]
        return t.distribute.MirroredStrategy(devices=devices)
    if name == "multi-worker":
        return t.distribute.MultiWorkerMirroredStrategy()
    raise InputError(f"strategy must be one of {STRATEGIES}, received {name!r}")


def build_transfer_model(backbone: Backbone, num_classes: int, config: TrainConfig) -> TransferModel:
    """Assemble ``head(features(x))`` with the backbone frozen and in inference mode."""
    k = keras()
    if num_classes < 2:
        raise InputError(f"num_classes must be at least 2, received {num_classes}")
    bb = backbone.model
    bb.trainable = False
    inputs = k.Input(shape=bb.input_shape[1:], name="input")
    # training=False keeps BatchNorm in inference mode even when layers are later unfrozen.
    embedding = bb(inputs, training=False)
    if config.fusion == "concat":
        task = _task_branch(k, inputs, config.fusion_units, backbone.input_spec.get("kind", "image"))
        embedding = k.layers.Concatenate(name="fusion")([embedding, task])
    features = k.Model(inputs, embedding, name="features")

    emb_in = k.Input(shape=(int(embedding.shape[-1]),), name="embedding")
    x = emb_in
    if config.head_hidden_units:
        x = k.layers.Dense(config.head_hidden_units, activation="relu", name="head_hidden")(x)
    if config.dropout:
        x = k.layers.Dropout(config.dropout, seed=config.seed, name="head_dropout")(x)
    probs = k.layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    head = k.Model(emb_in, probs, name="head")

    model = k.Model(inputs, head(features(inputs)), name="transfer")
    return TransferModel(model, features, head, backbone)


def _task_branch(k: Any, inputs: Any, units: int, kind: str) -> Any:
    """The task-specific features fused with the shared embedding (trainable, small)."""
    if kind == "image":
        x = k.layers.Rescaling(1.0 / 255.0, name="task_rescale")(inputs)
        x = k.layers.Conv2D(units, 3, padding="same", activation="relu", name="task_conv")(x)
        return k.layers.GlobalAveragePooling2D(name="task_pool")(x)
    x = k.layers.Dense(units, activation="relu", name="task_dense")(inputs)
    return x


def unfreeze_top_layers(backbone_model: Any, n: int) -> list[str]:
    """Make exactly the top ``n`` weight-bearing, non-BatchNorm backbone layers trainable.

    Nested models (keras.applications inside the preprocessing wrapper) are flattened.
    Returns the names of the unfrozen layers, top first.
    """
    k = keras()
    backbone_model.trainable = True
    leaves = leaf_layers(backbone_model)
    for layer in leaves:
        layer.trainable = False
    candidates = [l for l in leaves if l.weights and not isinstance(l, k.layers.BatchNormalization) and l.name != "caffe_preprocess" and l.name != "standardize"]
    if n > len(candidates):
        raise InputError(f"fine_tune_layers={n} exceeds the {len(candidates)} trainable layers of the backbone; allowed: 0..{len(candidates)}")
    chosen = candidates[len(candidates) - n :] if n else []
    for layer in chosen:
        layer.trainable = True
    return [l.name for l in reversed(chosen)]


def trainable_parameter_count(model: Any) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _compile(model: Any, learning_rate: float, label_smoothing: float) -> None:
    k = keras()
    model.compile(
        optimizer=k.optimizers.Adam(learning_rate),
        loss=k.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy"],
    )


def _fit(model: Any, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray] | None, *, config: TrainConfig, epochs: int, num_classes: int, augmentation: Augmentation | None, callbacks: Sequence[Any], verbose: int) -> dict[str, list[float]]:
    k = keras()
    weights = None
    if config.class_weight == "balanced":
        cw = class_weights(train[1], num_classes)
        weights = np.asarray([cw[int(c)] for c in train[1]], dtype=np.float32)
    ds = to_tf_dataset(train[0], train[1], num_classes=num_classes, batch_size=config.batch_size, shuffle=True, seed=config.seed, augmentation=augmentation, sample_weights=weights)
    val_ds = None
    cbs = list(callbacks)
    if val is not None and len(val[1]):
        val_ds = to_tf_dataset(val[0], val[1], num_classes=num_classes, batch_size=256)
    if config.early_stopping_patience:
        cbs.append(k.callbacks.EarlyStopping(monitor="val_loss" if val_ds is not None else "loss", patience=config.early_stopping_patience, restore_best_weights=True))
    hist = model.fit(ds, validation_data=val_ds, epochs=epochs, verbose=verbose, callbacks=cbs)
    return {key: [float(v) for v in values] for key, values in hist.history.items()}


def train_transfer(
    data: Splits | Dataset,
    config: TrainConfig = TrainConfig(),
    *,
    backbone: Backbone | None = None,
    safe_mode: bool = True,
    callbacks: Sequence[Any] = (),
    verbose: int = 0,
) -> TrainResult:
    """Train a transfer model: head phase, then the optional fine-tune phase.

    Args:
        data: a :class:`Splits` (train/val/test), or one :class:`Dataset` that is split
            with ``config.val_fraction`` / ``config.test_fraction`` and ``config.seed``.
        config: the run configuration.
        backbone: an already-built backbone (skips ``create_backbone(config.backbone)``);
            it must have been built under the same distribution strategy.
        safe_mode: refuse model-file backbones containing Python code (Lambda bytecode).
        callbacks: user Keras callbacks, passed to both phases.
        verbose: Keras ``fit`` verbosity (1 = progress bar).

    Returns:
        A :class:`TrainResult` with the model, history, test metrics and confusion matrix.
    """
    from edgetl.host.data import stratified_split

    k = keras()
    splits = data if isinstance(data, Splits) else stratified_split(data, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed)
    splits.train.require_trainable()
    if config.augmentation is not None and splits.train.kind != "image":
        raise InputError(f"augmentation applies to image data only; the data is {splits.train.kind!r}")
    names, n_cls = splits.train.class_names, splits.train.num_classes
    k.utils.set_random_seed(config.seed)

    strategy = make_strategy(config.strategy)
    with strategy.scope():
        if backbone is None:
            backbone = create_backbone(config.backbone, splits.train.input_shape, weights=config.weights, cut_layer=config.cut_layer, safe_mode=safe_mode)
            if backbone.source == "registry" and config.weights is None:
                adapt_normalization(backbone.model, splits.train.x.astype(np.float32))
        elif tuple(backbone.model.input_shape[1:]) != splits.train.input_shape:
            raise InputError(f"backbone takes {tuple(backbone.model.input_shape[1:])}, the data has {splits.train.input_shape}")
        tm = build_transfer_model(backbone, n_cls, config)

    history: dict[str, list[float]] = {}
    timings: dict[str, float] = {}
    val = (splits.val.x, splits.val.y) if len(splits.val) else None
    cache = config.cache_embeddings and config.fusion == "none" and config.augmentation is None
    start = time.perf_counter()
    if cache:
        # Nothing before the seam is trainable or random: embed once, train the head alone.
        emb_train = tm.features.predict(splits.train.x.astype(np.float32), batch_size=256, verbose=0)
        emb_val = tm.features.predict(val[0].astype(np.float32), batch_size=256, verbose=0) if val else None
        timings["embed_seconds"] = time.perf_counter() - start
        with strategy.scope():
            _compile(tm.head, config.learning_rate, config.label_smoothing)
        t0 = time.perf_counter()
        history.update(_fit(tm.head, (emb_train, splits.train.y), (emb_val, val[1]) if val else None, config=config, epochs=config.epochs, num_classes=n_cls, augmentation=None, callbacks=callbacks, verbose=verbose))
        timings["head_train_seconds"] = time.perf_counter() - t0
    else:
        with strategy.scope():
            _compile(tm.model, config.learning_rate, config.label_smoothing)
        t0 = time.perf_counter()
        history.update(_fit(tm.model, (splits.train.x, splits.train.y), val, config=config, epochs=config.epochs, num_classes=n_cls, augmentation=config.augmentation, callbacks=callbacks, verbose=verbose))
        timings["head_train_seconds"] = time.perf_counter() - t0
    head_trainable = trainable_parameter_count(tm.model)
    history["phase"] = [1.0] * len(history.get("loss", []))

    unfrozen: list[str] = []
    fine_tune_trainable = 0
    if config.fine_tune_layers:
        with strategy.scope():
            unfrozen = unfreeze_top_layers(backbone.model, config.fine_tune_layers)
            _compile(tm.model, config.fine_tune_learning_rate, config.label_smoothing)
        fine_tune_trainable = trainable_parameter_count(tm.model)
        t0 = time.perf_counter()
        ft = _fit(tm.model, (splits.train.x, splits.train.y), val, config=config, epochs=config.fine_tune_epochs, num_classes=n_cls, augmentation=config.augmentation, callbacks=callbacks, verbose=verbose)
        timings["fine_tune_seconds"] = time.perf_counter() - t0
        for key, values in ft.items():
            history.setdefault(key, [float("nan")] * len(history["phase"]) if key != "phase" else [])
            history[key] = history[key] + values
        history["phase"] += [2.0] * len(ft.get("loss", []))
        backbone.model.trainable = False  # the saved model records a frozen backbone again
    timings["train_seconds"] = time.perf_counter() - start

    metrics, confusion = evaluate_model(tm.model, splits.test if len(splits.test) else splits.val, n_cls)
    metrics.update(
        {
            "trainable_params_head_phase": head_trainable,
            "trainable_params_fine_tune": fine_tune_trainable,
            "total_params": int(tm.model.count_params()),
            "embedding_size": int(tm.head.input_shape[-1]),
            "unfrozen_layers": unfrozen,
            "train_examples": len(splits.train),
            "val_examples": len(splits.val),
            "test_examples": len(splits.test),
            "cached_embeddings": cache,
            "replicas": int(strategy.num_replicas_in_sync),
            **{k_: round(v, 4) for k_, v in timings.items()},
        }
    )
    spec = dict(backbone.input_spec)
    spec["shape"] = list(splits.train.input_shape)
    return TrainResult(tm, config, names, history, metrics, confusion, spec)


def evaluate_model(model: Any, ds: Dataset, num_classes: int) -> tuple[dict[str, Any], np.ndarray]:
    """Accuracy, loss and confusion matrix of ``model`` on ``ds`` (empty -> NaNs)."""
    if not len(ds):
        return {"test_accuracy": float("nan"), "test_loss": float("nan")}, np.zeros((num_classes, num_classes), dtype=np.int64)
    probs = model.predict(ds.x.astype(np.float32), batch_size=256, verbose=0)
    pred = probs.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (ds.y, pred), 1)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(ds)), ds.y], 1e-7, 1.0))))
    return {"test_accuracy": float((pred == ds.y).mean()), "test_loss": loss}, confusion

