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

from edgetl._options import option
from edgetl.data import STREAMING_MODES, Dataset, Splits, class_weights, conform_images, stratified_split
from edgetl.errors import BackboneError, InputError, describe
from edgetl.host._backbones import (
    OWN_FAMILIES,
    Backbone,
    InputPreprocessing,
    adapt_normalization,
    create_backbone,
    is_registry_name,
    leaf_layers,
)
from edgetl.host._embedding_cache import embed
from edgetl.host._fit import compile_model, fit_model
from edgetl.host._linear_head import Standardization, fit_linear_head, standardization
from edgetl.host._tf import keras, tf
from edgetl.host._tf_data import Augmentation

STRATEGIES = ("default", "mirrored", "multi-worker")
FUSIONS = ("none", "concat")
TRAIN = ("train",)  # command-line options only `edgetl train` takes
DEFAULT_GUARD_FRACTION = 0.1
# Adam's step is about lr per weight whatever the gradient's scale, so one rate moves
# every backbone by about the same absolute amount. 1e-5 (the usual advice when all of a
# large ImageNet backbone is unfrozen) left a small CNN where it was (issue 9: val 0.43 ->
# 0.68 after 10 epochs, still rising). Measured by tools/fine_tune_lr.py (validation gain
# over the converged head, mean of 2 seeds, top 2/3/10 layers, 10 epochs):
#   rate    digits CNN  user's CNN  MobileNetV2-0.35 (96px)
#   1e-5       +0.00       +1.68        +0.56
#   1e-4       +0.00       +7.26        +3.37
#   1e-3       +0.00      +14.25        +8.43
# 1e-3 gains most on all three. It is only a default: the run keeps fine-tuned weights
# only when validation improves on head-only, so a rate too large for a backbone costs
# time, not accuracy.
FINE_TUNE_LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class TrainConfig:
    """Everything a transfer run depends on; saved verbatim as the run's ``config.json``.

    Attributes:
        backbone: registry name, model file, or ``edgetl pretrain`` run directory.
        weights: ``"imagenet"``, a weights file, or ``None`` (registry backbones only).
        cut_layer: embedding layer of a model-file backbone (default: the classifier's input,
            see :func:`edgetl.host._backbones.default_cut`).
        input_preprocessing: what a model-file backbone expects its raw inputs turned into:
            a preset (``"0-1"``, ``"-1-1"``, ``"imagenet"``, ``"caffe"``) or an
            :class:`~edgetl.host._backbones.InputPreprocessing`; baked into the exported models.
        standardize_embeddings: standardize the embedding per dimension with the training
            split's statistics, as a frozen layer at the seam (exported with the backbone).
        head_solver: ``"auto"`` fits a linear head to convergence with full-batch L-BFGS on
            cached embeddings (see :mod:`edgetl.host._linear_head`) and trains everything
            else with Adam; ``"adam"`` always uses Adam.
        head_C: inverse L2 strength of the L-BFGS head (scikit-learn's ``C``); ``None``
            chooses it on the validation split (or by cross-validation without one).
        fusion: ``"none"`` or ``"concat"`` (a trainable task branch concatenated with the
            shared embedding).
        fusion_units: width of the task branch.
        head_hidden_units: 0 for a linear softmax head; >0 adds ``Dense(units, relu)`` first.
        dropout: dropout before the head's output layer.
        epochs, batch_size, learning_rate: Adam training of the head (hidden-layer heads,
            fusion, augmentation, or ``head_solver="adam"``).
        fine_tune_layers: unfreeze this many weight-bearing backbone layers from the top
            after the head phase (BatchNorm layers stay frozen and in inference mode).
        fine_tune_epochs, fine_tune_learning_rate: the fine-tune phase (Adam). The
            fine-tuned weights are kept only if validation accuracy improves on head-only.
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
        guard_fraction: the share of each class (at most
            :data:`edgetl.data.GUARD_MAX_PER_CLASS`) held out of training as the guard
            split: never fitted, the bundle ships it so the device's guard judges
            forgetting on factory examples the head did not memorize. 0 holds none out
            (the device then judges on training examples, and export says so).
        streaming: how ``edgetl train`` loads the data: ``"auto"`` streams it from disk when
            it would not fit comfortably in memory (see :func:`edgetl.data.choose_streaming`),
            ``"on"`` always streams folders (and uncompressed ``.npz``), ``"off"`` loads into
            memory; ``train`` given streamed data with ``"off"`` decodes it into memory first.
        embedding_cache: for streamed data, keep the backbone's embeddings in an on-disk
            cache (keyed by backbone, preprocessing and files; see
            :mod:`edgetl.host._embedding_cache`) that later runs and ``edgetl export`` reuse.
            In-memory data keeps its embeddings in memory as before.
    """

    # `edgetl pretrain` and `edgetl train` flags come from these fields (edgetl._options);
    # TRAIN marks the ones only `train` (transfer) takes.
    backbone: str = option(
        "edgetl_cnn",
        help="registered backbone (see `edgetl backbones`); for train also a Keras model file or an `edgetl "
        "pretrain` run directory",
    )
    weights: str | None = option(
        None, help="imagenet (downloads; needs internet), a local weights file, or omit for random init"
    )
    cut_layer: str | None = option(
        None,
        commands=TRAIN,
        help="for a model-file backbone: the layer whose output is the embedding (default: the classifier's input; "
        "see `edgetl layers MODEL`)",
    )
    input_preprocessing: InputPreprocessing | str | None = option(
        None,
        commands=TRAIN,
        choices=("none", "0-1", "-1-1", "imagenet", "caffe"),
        help="what a model-file backbone expects its raw pixels turned into: 0-1 (x/255), -1-1 (x/127.5-1), "
        "imagenet (mean/std), caffe (BGR, mean); baked into the exported models",
    )
    standardize_embeddings: bool = True
    head_solver: Literal["auto", "adam"] = "auto"
    head_C: float | None = option(
        None,
        commands=TRAIN,
        type=float,
        help="inverse L2 strength of the linear head (default: chosen on the validation split or by cross-validation)",
    )
    fusion: Literal["none", "concat"] = option(
        "none",
        commands=TRAIN,
        choices=FUSIONS,
        help="concat: fuse a trainable task branch with the shared embedding",
    )
    fusion_units: int = option(16, commands=TRAIN)
    head_hidden_units: int = option(
        0,
        commands=TRAIN,
        help="0 = linear softmax head (fitted to convergence); N adds Dense(N, relu), trained with Adam",
    )
    dropout: float = option(0.0)
    epochs: int = option(30, help="Adam epochs (hidden-layer heads, fusion, pretrain)")
    batch_size: int = option(32)
    learning_rate: float = option(1e-3)
    fine_tune_layers: int = option(
        0,
        commands=TRAIN,
        help="after the head phase, fine-tune the top N backbone layers (kept only if validation improves)",
    )
    fine_tune_epochs: int = option(10, commands=TRAIN)
    fine_tune_learning_rate: float = option(FINE_TUNE_LEARNING_RATE, commands=TRAIN)
    early_stopping_patience: int = option(
        5, flag="--patience", help="early-stopping patience in epochs, restoring the best weights; 0 disables"
    )
    class_weight: Literal["none", "balanced"] = option("none", choices=("none", "balanced"))
    label_smoothing: float = option(0.0)
    augmentation: Augmentation | None = option(
        None,
        flag="--augment",
        action="store_true",
        cli_default=False,
        to_config=lambda on: Augmentation() if on else None,
        help="random flip/rotation/zoom/brightness on training images",
    )
    seed: int = option(0)
    strategy: Literal["default", "mirrored", "multi-worker"] = option(
        "default",
        choices=STRATEGIES,
        help="tf.distribute strategy; multi-worker reads the cluster from TF_CONFIG",
    )
    cache_embeddings: bool = True
    val_fraction: float = option(0.1)
    test_fraction: float = option(0.2)
    # Why 0.1, on the guard's tuning family (tools/guard_rates.py --tune --guard-fraction F, the
    # transfer of digits 5-9 with ~90 examples per class): with 0.1 the tuned guard accepted 1 of 407
    # forgetting heads and 98% of helpful ones (shuffled batches apart); with 0.2, 0 and 88%, and the
    # head fitted on a fifth less data. Capped at 100 per class, so large datasets give up little.
    guard_fraction: float = option(
        DEFAULT_GUARD_FRACTION,
        commands=TRAIN,
        help="share of each class (at most 100 examples) never trained on and shipped in the bundle, so the "
        "device's guard judges forgetting on examples the head has not memorized; 0 holds none out "
        "(default: %(default)s)",
    )
    # `pretrain` trains every layer on arrays in memory; only `train` streams.
    streaming: Literal["auto", "on", "off"] = option(
        "auto",
        commands=TRAIN,
        choices=STREAMING_MODES,
        help="read image folders (and uncompressed .npz) lazily from disk instead of into memory: auto streams when "
        "loading into memory would take more than half the available memory (default: %(default)s)",
    )
    embedding_cache: bool = option(
        True,
        commands=TRAIN,
        flag="--no-embedding-cache",
        help="for streamed data, do not keep the backbone's embeddings in the on-disk cache ($EDGETL_CACHE_DIR, "
        "default ~/.cache/edgetl) that later runs and export reuse",
    )

    def __post_init__(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                raise InputError(
                    f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, received "
                    f"{name}={describe(v)}"
                )

        for n in ("epochs", "batch_size", "fusion_units"):
            positive(n)
        for n in ("head_hidden_units", "fine_tune_layers", "fine_tune_epochs", "early_stopping_patience", "seed"):
            positive(n, allow_zero=True)
        for n in ("learning_rate", "fine_tune_learning_rate"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or not 0 < v < 10:
                raise InputError(f"{n} must be a number in (0, 10), received {n}={describe(v)}")
        for n in ("dropout", "label_smoothing", "guard_fraction"):
            v = getattr(self, n)
            if not 0 <= v < 1:
                raise InputError(f"{n} must be in [0, 1), received {n}={describe(v)}")
        if self.fusion not in FUSIONS:
            raise InputError(f"fusion must be one of {FUSIONS}, received fusion={self.fusion!r}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, received strategy={self.strategy!r}")
        if self.class_weight not in ("none", "balanced"):
            raise InputError(f"class_weight must be 'none' or 'balanced', received {self.class_weight!r}")
        if self.streaming not in STREAMING_MODES:
            raise InputError(
                f"streaming must be one of {STREAMING_MODES}, received streaming={describe(self.streaming)}"
            )
        if not isinstance(self.embedding_cache, bool):
            raise InputError(f"embedding_cache must be true or false, received {describe(self.embedding_cache)}")
        if self.head_solver not in ("auto", "adam"):
            raise InputError(f"head_solver must be 'auto' or 'adam', received {self.head_solver!r}")
        if self.head_C is not None and not (isinstance(self.head_C, (int, float)) and 0 < self.head_C < 1e12):
            raise InputError(f"head_C must be a positive number or None, received head_C={describe(self.head_C)}")
        if isinstance(self.input_preprocessing, (str, dict)):  # a preset or a saved config: normalise to the dataclass
            object.__setattr__(self, "input_preprocessing", InputPreprocessing.preset(self.input_preprocessing))

    def split(self, data: Splits | Dataset) -> Splits:
        """``data`` itself when already split, else its stratified split by this config's
        fractions and seed (the split export reproduces)."""
        if isinstance(data, Splits):
            return data
        return stratified_split(
            data,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            guard_fraction=self.guard_fraction,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(self.input_preprocessing, InputPreprocessing):
            d["input_preprocessing"] = self.input_preprocessing.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Rebuild from ``to_dict`` output; unknown (older or newer) keys are ignored with a warning."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"ignoring unknown TrainConfig keys {unknown}", stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in known}
        # A run recorded before the guard split held none out: re-split it exactly as it trained.
        kwargs.setdefault("guard_fraction", 0.0)
        if isinstance(kwargs.get("augmentation"), dict):
            kwargs["augmentation"] = Augmentation(**kwargs["augmentation"])
        return cls(**kwargs)


@dataclass
class TransferModel:
    """The pieces of a transfer model; ``model`` is ``head(features(x))``."""

    model: Any
    features: Any  # raw input -> embedding (backbone, standardization, the fusion branch)
    head: Any  # embedding -> class probabilities
    backbone: Backbone


@dataclass
class TrainResult:
    """What :func:`train_transfer` returns; :func:`edgetl.host._run.save_run` writes it."""

    transfer: TransferModel
    config: TrainConfig
    class_names: tuple[str, ...]
    history: dict[str, list[float]]
    metrics: dict[str, Any]
    confusion: np.ndarray
    input_spec: dict[str, Any] = field(default_factory=dict)
    # Where the training data came from (``Dataset.record()``) and what was assumed about
    # it (resizing, channel conversion, preprocessing): written to the run's config.json.
    data: dict[str, Any] | None = None
    assumptions: list[str] = field(default_factory=list)

    @property
    def model(self) -> Any:
        return self.transfer.model

    def describe(self) -> list[str]:
        """What the run did, in a few lines (what ``edgetl train`` prints)."""
        m = self.metrics
        lines = [f"assumed: {note}" for note in self.assumptions]
        fit = m.get("head_fit") or {}
        if fit.get("method") == "lbfgs":
            lines.append(
                f"head: L-BFGS to convergence ({fit['steps']} steps, gradient {fit['grad_norm']:.1e}, C={fit['C']:g} "
                f"chosen by {fit['selection']}, fitted on {fit.get('fit_examples', '?')} examples)"
            )
        elif fit.get("method") == "adam":
            lines.append(f"head: Adam, {fit['epochs']} epochs, final loss {fit['final_loss']:.4f}")
        if "fine_tune_kept" in m:
            verdict = "kept" if m["fine_tune_kept"] else "discarded (head-only was better on validation)"
            detail = (
                f"; validation accuracy {m['head_only_val_accuracy']:.4f} head-only -> "
                f"{m['fine_tuned_val_accuracy']:.4f} fine-tuned"
                if m.get("fine_tune_validated")
                else "; no validation split to judge it"
            )
            lines.append(f"fine-tune of {len(m['unfrozen_layers'])} layers: {verdict}{detail}")
        params = m.get("trainable_params_head_phase", m.get("trainable_params"))
        lines.append(
            f"test accuracy {m['test_accuracy']:.4f} on {m.get('test_examples', '?')} examples; trainable parameters "
            f"{params}"
        )
        return lines


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
            raise InputError(
                f"cannot split the CPU into {n} devices after TensorFlow started ({current} now): {exc}"
            ) from exc


def make_strategy(name: str) -> Any:
    """The ``tf.distribute`` strategy for ``name`` (see :data:`STRATEGIES`).

    ``mirrored`` replicates over all local GPUs, or over the logical CPU devices when there
    is no GPU; ``multi-worker`` reads the cluster from ``TF_CONFIG`` (TensorFlow's own
    engine; without ``TF_CONFIG`` it runs as a single worker).
    """
    if name in _STRATEGIES:
        return _STRATEGIES[name]
    t = tf()
    if name == "default":
        return t.distribute.get_strategy()
    if name == "mirrored":
        gpus = t.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or t.config.list_logical_devices("CPU"))]
        return t.distribute.MirroredStrategy(devices=devices)
    if name == "multi-worker":
        # Created once per process: its collective ops must be configured before anything
        # initializes TensorFlow's context (loading a model file does), so `edgetl train`
        # creates it first and training reuses it.
        _STRATEGIES[name] = t.distribute.MultiWorkerMirroredStrategy()
        return _STRATEGIES[name]
    raise InputError(f"strategy must be one of {STRATEGIES}, received {name!r}")


_STRATEGIES: dict[str, Any] = {}


def build_transfer_model(
    backbone: Backbone, num_classes: int, config: TrainConfig, standardization: Standardization | None = None
) -> TransferModel:
    """Assemble ``head(features(x))`` with the backbone frozen and in inference mode.

    ``features`` is backbone -> frozen standardization (when given) -> [fusion]: the
    standardization is part of what the bundle exports as the backbone, so the host head,
    the device head and the device's optimizers all see well-conditioned embeddings.
    """
    k = keras()
    if num_classes < 2:
        raise InputError(f"num_classes must be at least 2, received {num_classes}")
    bb = backbone.model
    bb.trainable = False
    inputs = k.Input(shape=bb.input_shape[1:], name="input")
    # training=False keeps BatchNorm in inference mode even when layers are later unfrozen.
    embedding = bb(inputs, training=False)
    if standardization is not None:
        norm = k.layers.Normalization(name="embedding_standardize")
        norm.build((None, backbone.embedding_size))
        norm.set_weights([standardization.mean, standardization.variance, np.array(0, np.int64)])
        norm.trainable = False
        embedding = norm(embedding)
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
    candidates = [
        l
        for l in leaves
        if l.weights
        and not isinstance(l, k.layers.BatchNormalization)
        and l.name != "caffe_preprocess"
        and l.name != "standardize"
    ]
    if n > len(candidates):
        raise InputError(
            f"fine_tune_layers={n} exceeds the {len(candidates)} trainable layers of the backbone; allowed: "
            f"0..{len(candidates)}"
        )
    chosen = candidates[len(candidates) - n :] if n else []
    for layer in chosen:
        layer.trainable = True
    return [l.name for l in reversed(chosen)]


def trainable_parameter_count(model: Any) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def train_transfer(
    data: Splits | Dataset,
    config: TrainConfig = TrainConfig(),
    *,
    backbone: Backbone | None = None,
    safe_mode: bool = True,
    callbacks: Sequence[Any] = (),
    verbose: int = 0,
    progress: bool = False,
) -> TrainResult:
    """Train a transfer model: head phase, then the optional fine-tune phase.

    Images are resized and converted to the backbone's input first (recorded in
    ``result.assumptions``). The backbone's training-split embeddings are checked (a
    backbone whose embeddings carry no information is refused before any training) and
    standardized at the seam. A linear head is then fitted to convergence with L-BFGS on
    the cached embeddings; other heads train with Adam.

    Args:
        data: a :class:`Splits` (train/val/test), or one :class:`Dataset` that is split
            with ``config.val_fraction`` / ``config.test_fraction`` and ``config.seed``.
        config: the run configuration.
        backbone: an already-built backbone (skips ``create_backbone(config.backbone)``);
            it must have been built under the same distribution strategy.
        safe_mode: refuse model-file backbones containing Python code (Lambda bytecode).
        callbacks: user Keras callbacks, passed to every Keras training phase.
        verbose: Keras ``fit`` verbosity.
        progress: a progress bar per Keras training phase, on a terminal only.

    Returns:
        A :class:`TrainResult` with the model, history, test metrics and confusion matrix.

    Raises:
        InputError: bad data or configuration; BackboneError: unusable backbone, including
            one whose embeddings are constant, vanishing or not finite.
    """
    k = keras()
    data = _as_configured(data, config)
    record = data.record() if isinstance(data, Dataset) and data.origin else None
    splits = config.split(data)
    splits.train.require_trainable()
    if config.augmentation is not None and splits.train.kind != "image":
        raise InputError(f"augmentation applies to image data only; the data is {splits.train.kind!r}")
    k.utils.set_random_seed(config.seed)
    strategy = make_strategy(config.strategy)
    backbone, splits, assumptions = _prepare_backbone(splits, config, backbone, strategy, safe_mode)
    guard = guard_record(splits)  # conformed, as export's data is when it re-splits
    start = time.perf_counter()
    streamed = _embed_streamed(splits, backbone, config, strategy, record)
    if streamed is not None:
        raw_train = streamed.of(splits.train)
        assumptions += streamed.notes()
    else:
        raw_train = backbone.model.predict(splits.train.x.astype(np.float32), batch_size=256, verbose=0)
    stats = _check_embeddings(raw_train, backbone, config)
    assumptions += _stats_notes(stats, config)
    seam = stats if config.standardize_embeddings else None
    with strategy.scope():
        tm = build_transfer_model(backbone, splits.train.num_classes, config, seam)
    timings = {"embed_seconds": time.perf_counter() - start}
    phase = _PhaseContext(tm, splits, config, strategy, callbacks, verbose, progress, streamed)
    history, info = _head_phase(phase, raw_train, seam)
    if streamed is not None:
        info.update(streamed.metrics())
    timings["head_train_seconds"] = info.pop("seconds")
    info.update(unfrozen_layers=[], trainable_params_fine_tune=0)
    if config.fine_tune_layers:
        t0 = time.perf_counter()
        info.update(_fine_tune_phase(phase, history))
        timings["fine_tune_seconds"] = time.perf_counter() - t0
    timings["train_seconds"] = time.perf_counter() - start
    metrics, confusion = evaluate_model(
        tm.model, splits.test if len(splits.test) else splits.val, splits.train.num_classes
    )
    metrics.update(_run_metrics(tm, splits, strategy, stats, info, timings))
    metrics.update(guard)
    spec = {**backbone.input_spec, "shape": list(splits.train.input_shape)}
    if config.standardize_embeddings:
        spec["embedding_standardized"] = True
    return TrainResult(tm, config, splits.train.class_names, history, metrics, confusion, spec, record, assumptions)


def guard_record(splits: Splits) -> dict[str, Any]:
    """What a run records about its guard split: how many examples and their sha256, so
    export ships them as unseen only when it re-splits exactly these (data given to export
    that differs, or a :class:`Splits` trained on directly, has none the run can vouch for)."""
    if splits.guard is None or not len(splits.guard):
        return {"guard_examples": 0}
    return {"guard_examples": len(splits.guard), "guard_sha256": splits.guard.fingerprint()}


def _prepare_backbone(
    splits: Splits, config: TrainConfig, backbone: Backbone | None, strategy: Any, safe_mode: bool
) -> tuple[Backbone, Splits, list[str]]:
    """Build the backbone (unless given) and conform the data to its input."""
    with strategy.scope():
        if backbone is None:
            # Registry families are built for the data's size; files and runs take their own
            # input, and the data is conformed to it below.
            shape = splits.train.input_shape if is_registry_name(config.backbone) else None
            backbone = create_backbone(
                config.backbone,
                shape,
                weights=config.weights,
                cut_layer=config.cut_layer,
                safe_mode=safe_mode,
                preprocessing=config.input_preprocessing,
            )
    splits, assumptions = _conform_splits(splits, backbone)
    with strategy.scope():
        if backbone.source == "registry" and config.weights is None:
            x = splits.train.x.astype(np.float32)
            if splits.train.streamed and any(l.name == "standardize" for l in backbone.model.layers):
                x = np.asarray(x)  # its statistics need every training row (feature vectors: small)
            adapt_normalization(backbone.model, x)
    return backbone, splits, assumptions


def _as_configured(data: Splits | Dataset, config: TrainConfig) -> Splits | Dataset:
    """``streaming="off"`` decodes streamed data into memory; otherwise data stays as given."""
    if config.streaming != "off":
        return data
    if isinstance(data, Splits):
        return Splits(**{name: ds.materialize() for name, ds in data.parts().items()})
    return data.materialize()


@dataclass
class _Streamed:
    """Raw backbone embeddings of streamed splits, computed once (or read from the on-disk cache).

    Splits viewing the same source (the usual case: one folder split by index) share one
    entry covering their union, so its key does not depend on how the data was split.
    """

    groups: list[tuple[Any, Any]]  # (LazyArray covering the rows, Embeddings)

    def of(self, ds: Dataset) -> np.ndarray:
        for view, emb in self.groups:
            if view.same_source(ds.x):
                return emb.rows_of(ds.x)
        raise InputError(f"no embeddings were computed for {ds.source or 'this split'}")  # pragma: no cover

    def notes(self) -> list[str]:
        out = []
        for _, emb in self.groups:
            where = f"on-disk cache entry {emb.key[:12]}" if emb.key else "a temporary file (embedding cache off)"
            verb = "read from the" if emb.reused else f"computed once ({emb.seconds:.1f} s) into"
            out.append(f"embeddings of {len(emb.array)} streamed examples {verb} {where}")
        return out

    def metrics(self) -> dict[str, Any]:
        return {"data_streamed": True, "embedding_cache": [emb.info() for _, emb in self.groups]}


def _embed_streamed(
    splits: Splits, backbone: Backbone, config: TrainConfig, strategy: Any, record: dict[str, Any] | None
) -> _Streamed | None:
    """Embeddings of every streamed example (``None`` for in-memory data: embedded as before)."""

    # Every split, the guard split included: the run's cache then covers all of its data, which
    # export reuses (and the guard rows' embeddings go into replay.npz).
    split_data = [ds for ds in splits.parts().values() if len(ds)]
    parts = [ds.x for ds in split_data]
    if not splits.train.streamed or not all(ds.streamed for ds in split_data):
        return None
    groups: list[Any] = []
    for part in parts:
        for i, group in enumerate(groups):
            if group.same_source(part):
                groups[i] = group.with_rows(np.union1d(group.rows, part.rows))
                break
        else:
            groups.append(part.with_rows(np.unique(part.rows)))
    out = []
    for group in groups:
        # Each split in its own run of batches, as in-memory data is embedded split by split.
        segments = [np.searchsorted(group.rows, p.rows) for p in parts if group.same_source(p)]
        emb = embed(
            backbone.model, group, strategy=strategy, use_cache=config.embedding_cache, record=record, segments=segments
        )
        out.append((group, emb))
    return _Streamed(out)


def _run_metrics(
    tm: TransferModel,
    splits: Splits,
    strategy: Any,
    stats: Standardization,
    info: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """Everything ``metrics.json`` records besides the test accuracy and loss."""
    return {
        "trainable_params_head_phase": info.pop("trainable_params"),
        "total_params": int(tm.model.count_params()),
        "embedding_size": int(tm.head.input_shape[-1]),
        "train_examples": len(splits.train),
        "val_examples": len(splits.val),
        "test_examples": len(splits.test),
        "replicas": int(strategy.num_replicas_in_sync),
        "embedding_scale_mean_abs": round(stats.scale, 6),
        "embedding_constant_dims": stats.constant_dims,
        **info,
        **{k: round(v, 4) for k, v in timings.items()},
    }


def _conform_splits(splits: Splits, backbone: Backbone) -> tuple[Splits, list[str]]:
    """Resize/convert images to what the backbone takes; say what was done."""
    shape = tuple(int(d) for d in backbone.model.input_shape[1:])
    if splits.train.input_shape == shape:
        return splits, []
    if splits.train.kind != "image" or len(shape) != 3:
        raise InputError(
            f"backbone {backbone.name!r} takes inputs of shape {shape}, the data has {splits.train.input_shape}"
        )
    parts = {name: conform_images(ds, shape) for name, ds in splits.parts().items()}
    notes = parts["train"][1]
    warnings.warn(f"{'; '.join(notes)} to fit backbone {backbone.name!r} (input {shape})", stacklevel=3)
    return Splits(**{name: ds for name, (ds, _) in parts.items()}), notes


def _check_embeddings(raw: np.ndarray, backbone: Backbone, config: TrainConfig) -> Standardization:
    """Refuse a backbone whose embeddings carry no information, before any training;
    warn when a registry family has random weights."""
    stats = standardization(raw)
    if stats.problem:
        if backbone.source == "registry" and not backbone.pretrained:
            fix = (
                "it was built with random weights (weights=None): pass --weights imagenet (needs internet) or "
                f"--weights FILE, or pretrain one with `edgetl pretrain --backbone {backbone.name}` and pass the run "
                "as --backbone"
            )
        elif backbone.source == "file":
            fix = (
                "check that the file holds trained weights, that --input-preprocessing matches what the model expects, "
                "and try another --cut-layer (see `edgetl layers MODEL`)"
            )
        else:
            fix = "retrain the backbone (`edgetl pretrain`) or choose another one"
        raise BackboneError(
            f"backbone {backbone.name!r} cannot be used: {stats.problem} on {len(raw)} training examples, so no head "
            f"can learn from it; {fix}"
        )
    if backbone.source == "registry" and not backbone.pretrained and backbone.name not in OWN_FAMILIES:
        warnings.warn(
            f"backbone {backbone.name!r} has random weights (no --weights): its embeddings are random features and "
            "transfer will be poor. Pass --weights imagenet or --weights FILE, or use an `edgetl pretrain` run",
            stacklevel=3,
        )
    return stats


def _stats_notes(stats: Standardization, config: TrainConfig) -> list[str]:
    if not config.standardize_embeddings:
        return [f"embeddings not standardized (mean |e| = {stats.scale:.3g})"]
    note = f"embeddings standardized with training-split statistics (mean |e| was {stats.scale:.3g})"
    if stats.constant_dims:
        note += (
            f"; {stats.constant_dims} dimension(s) constant (or nearly: under 1% of the median std) on the "
            "training data are ignored"
        )
    return [note]


@dataclass
class _PhaseContext:
    """What every training phase needs (keeps the phase functions' signatures short)."""

    tm: TransferModel
    splits: Splits
    config: TrainConfig
    strategy: Any
    callbacks: Sequence[Any]
    verbose: int
    progress: bool = False
    streamed: _Streamed | None = None  # raw embeddings of streamed data, computed once

    def features_of(self, split: str) -> np.ndarray | None:
        """The seam's embeddings (standardized when the model standardizes) of a split.

        In-memory data runs ``features`` on the arrays; streamed data passes its raw
        embeddings (computed once) through the same standardization layer, so both give the
        same numbers.
        """
        ds = getattr(self.splits, split)
        if not len(ds):
            return None
        if self.streamed is None:
            return self.tm.features.predict(ds.x.astype(np.float32), batch_size=256, verbose=0)
        raw = self.streamed.of(ds)
        names = [layer.name for layer in self.tm.features.layers]
        if "embedding_standardize" not in names:
            return raw
        # Run as a Keras model, as inside ``features``: TensorFlow's graph optimizer rewrites
        # the arithmetic, and an eager call differs from it in the last bits (~1e-6).
        k = keras()
        inputs = k.Input(shape=raw.shape[1:])
        seam = k.Model(inputs, self.tm.features.get_layer("embedding_standardize")(inputs))
        return seam.predict(raw, batch_size=256, verbose=0)

    @property
    def progress_label(self) -> str | None:
        return "training" if self.progress else None

    @property
    def val(self) -> tuple[np.ndarray, np.ndarray] | None:
        return (self.splits.val.x, self.splits.val.y) if len(self.splits.val) else None

    def sample_weights(self) -> np.ndarray | None:
        if self.config.class_weight != "balanced":
            return None
        cw = class_weights(self.splits.train.y, self.splits.train.num_classes)
        return np.asarray([cw[int(c)] for c in self.splits.train.y], dtype=np.float32)


def _uses_lbfgs(config: TrainConfig) -> bool:
    linear = config.head_hidden_units == 0 and config.dropout == 0
    cacheable = config.fusion == "none" and config.augmentation is None and config.cache_embeddings
    return config.head_solver == "auto" and linear and cacheable


def _head_phase(
    ctx: _PhaseContext, raw_train: np.ndarray, stats: Standardization | None
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Train the head on the frozen features; returns the history and what to record."""
    tm, cfg, n_cls = ctx.tm, ctx.config, ctx.splits.train.num_classes
    t0 = time.perf_counter()
    info: dict[str, Any] = {"trainable_params": trainable_parameter_count(tm.model)}
    if _uses_lbfgs(cfg):
        history, info["head_fit"] = _lbfgs_head(ctx, raw_train, stats)
        info["cached_embeddings"] = True
    else:
        cache = cfg.cache_embeddings and cfg.fusion == "none" and cfg.augmentation is None
        with ctx.strategy.scope():
            compile_model(tm.head if cache else tm.model, cfg.learning_rate, cfg.label_smoothing)
        if cache:  # nothing before the seam is trainable or random: embed once, train the head alone
            emb = ctx.features_of("train")
            emb_val = (ctx.features_of("val"), ctx.splits.val.y) if len(ctx.splits.val) else None
            history = fit_model(
                tm.head,
                (emb, ctx.splits.train.y),
                emb_val,
                config=cfg,
                epochs=cfg.epochs,
                num_classes=n_cls,
                augmentation=None,
                callbacks=ctx.callbacks,
                verbose=ctx.verbose,
                progress=ctx.progress_label,
            )
        else:
            history = fit_model(
                tm.model,
                (ctx.splits.train.x, ctx.splits.train.y),
                ctx.val,
                config=cfg,
                epochs=cfg.epochs,
                num_classes=n_cls,
                augmentation=cfg.augmentation,
                callbacks=ctx.callbacks,
                verbose=ctx.verbose,
                progress=ctx.progress_label,
            )
        info.update(
            head_fit={
                "method": "adam",
                "epochs": len(history.get("loss", [])),
                "final_loss": history["loss"][-1] if history.get("loss") else None,
            },
            cached_embeddings=cache,
        )
    history["phase"] = [1.0] * len(history.get("loss", []))
    info["seconds"] = time.perf_counter() - t0
    return history, info


# A validation split at least this large (and >= 10 per class) chooses the head's L2
# strength by itself; a smaller one is too noisy to choose with (a few examples decide),
# so C is chosen by cross-validation and the head is fitted on train + validation, as
# scikit-learn's LogisticRegressionCV does. Measured on tools/linear_probe_gap.py's
# 24-example task: choosing on 12 validation examples lost 1.4 points to the reference.
MIN_VALIDATION_FOR_SELECTION = 200


def _lbfgs_head(
    ctx: _PhaseContext, raw_train: np.ndarray, stats: Standardization | None
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Fit the linear head to convergence on cached (standardized) embeddings.

    The validation split stays held out when fine-tuning will need it to judge, or when
    it is large enough to choose C on; otherwise it joins the fit (see
    MIN_VALIDATION_FOR_SELECTION).
    """
    tm, cfg, splits = ctx.tm, ctx.config, ctx.splits
    emb = stats.apply(raw_train) if stats is not None else raw_train.astype(np.float32)
    emb_val = ctx.features_of("val")
    counts = np.bincount(splits.val.y, minlength=splits.train.num_classes)
    large_val = len(splits.val) >= MIN_VALIDATION_FOR_SELECTION and counts.min() >= 10
    weights = ctx.sample_weights()
    if emb_val is not None and not large_val and not cfg.fine_tune_layers:
        x = np.concatenate([emb, emb_val])
        y = np.concatenate([splits.train.y, splits.val.y])
        if weights is not None:
            cw = class_weights(y, splits.train.num_classes)
            weights = np.asarray([cw[int(c)] for c in y], np.float32)
        fit = fit_linear_head(
            x, y, splits.train.num_classes, sample_weight=weights, label_smoothing=cfg.label_smoothing, C=cfg.head_C
        )
        held_out = None
    else:
        use_val = emb_val is not None and large_val
        fit = fit_linear_head(
            emb,
            splits.train.y,
            splits.train.num_classes,
            x_val=emb_val if use_val else None,
            y_val=splits.val.y if use_val else None,
            sample_weight=weights,
            label_smoothing=cfg.label_smoothing,
            C=cfg.head_C,
        )
        held_out = emb_val
    tm.head.get_layer("classifier").set_weights([fit.W, fit.b])
    summary = {
        **fit.summary(),
        "fit_examples": len(emb) if held_out is not None or emb_val is None else len(emb) + len(emb_val),
    }
    return _one_point_history(tm.head, emb, splits.train.y, held_out, splits.val.y), summary


def _one_point_history(
    head: Any, emb: np.ndarray, y: np.ndarray, emb_val: np.ndarray | None, y_val: np.ndarray | None
) -> dict[str, list[float]]:
    """The L-BFGS phase as one history point (Keras-style keys), so curves and reports show it."""
    out: dict[str, list[float]] = {}
    for prefix, e, labels in (("", emb, y), ("val_", emb_val, y_val)):
        if e is None or labels is None or not len(labels):
            continue
        p = head.predict(e, batch_size=1024, verbose=0)
        out[f"{prefix}loss"] = [float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-7, 1.0))))]
        out[f"{prefix}accuracy"] = [float(np.mean(p.argmax(1) == labels))]
    return out


def _val_scores(model: Any, splits: Splits) -> tuple[float, float] | None:
    if not len(splits.val):
        return None
    p = model.predict(splits.val.x.astype(np.float32), batch_size=256, verbose=0)
    y = splits.val.y
    return float(np.mean(p.argmax(1) == y)), float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1.0))))


def _fine_tune_phase(ctx: _PhaseContext, history: dict[str, list[float]]) -> dict[str, Any]:
    """Fine-tune the top backbone layers; keep the result only if validation improves.

    "Improves" is higher validation accuracy, or equal accuracy and lower validation
    loss; otherwise every variable goes back to its head-only value (restored by variable,
    not by ``get_weights`` order, which changes when layers are (un)frozen). Without a
    validation split nothing can be judged: the fine-tuned weights are kept and the run
    records ``fine_tune_validated: false``.
    """
    tm, cfg = ctx.tm, ctx.config
    saved = [(v, v.numpy()) for v in tm.model.variables]
    before = _val_scores(tm.model, ctx.splits)
    with ctx.strategy.scope():
        unfrozen = unfreeze_top_layers(tm.backbone.model, cfg.fine_tune_layers)
        compile_model(tm.model, cfg.fine_tune_learning_rate, cfg.label_smoothing)
    trainable = trainable_parameter_count(tm.model)
    ft = fit_model(
        tm.model,
        (ctx.splits.train.x, ctx.splits.train.y),
        ctx.val,
        config=cfg,
        epochs=cfg.fine_tune_epochs,
        num_classes=ctx.splits.train.num_classes,
        augmentation=cfg.augmentation,
        callbacks=ctx.callbacks,
        verbose=ctx.verbose,
        progress=ctx.progress_label,
    )
    tm.backbone.model.trainable = False  # the saved model records a frozen backbone again
    after = _val_scores(tm.model, ctx.splits)
    kept = before is None or after[0] > before[0] or (after[0] == before[0] and after[1] < before[1])
    if not kept:
        for variable, value in saved:
            variable.assign(value)
    n_head = len(history["phase"])
    for key, values in ft.items():
        history[key] = history.get(key, [float("nan")] * n_head) + values
    history["phase"] += [2.0] * len(ft.get("loss", []))
    info: dict[str, Any] = {
        "unfrozen_layers": unfrozen,
        "trainable_params_fine_tune": trainable,
        "fine_tune_kept": bool(kept),
        "fine_tune_validated": before is not None,
    }
    if before is not None:
        info.update(
            head_only_val_accuracy=before[0],
            head_only_val_loss=before[1],
            fine_tuned_val_accuracy=after[0],
            fine_tuned_val_loss=after[1],
        )
    if not kept:
        warnings.warn(
            f"fine-tuning did not improve validation accuracy ({before[0]:.4f} -> {after[0]:.4f}); the head-only "
            "weights are kept",
            stacklevel=3,
        )
    return info


def evaluate_model(model: Any, ds: Dataset, num_classes: int) -> tuple[dict[str, Any], np.ndarray]:
    """Accuracy, loss and confusion matrix of ``model`` on ``ds`` (empty -> NaNs)."""
    if not len(ds):
        return {"test_accuracy": float("nan"), "test_loss": float("nan")}, np.zeros(
            (num_classes, num_classes), dtype=np.int64
        )
    probs = model.predict(ds.x.astype(np.float32), batch_size=256, verbose=0)
    pred = probs.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (ds.y, pred), 1)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(ds)), ds.y], 1e-7, 1.0))))
    return {"test_accuracy": float((pred == ds.y).mean()), "test_loss": loss}, confusion
