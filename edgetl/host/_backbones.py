"""Backbones (the shared layers): one registry, one factory.

A backbone is a ``tf_keras.Model`` named ``"backbone"`` that takes **raw** inputs (pixels in
``[0, 255]`` or raw feature vectors) and returns an embedding vector. Each family's own
preprocessing is built into the model, so nothing has to be replicated on the device.

    >>> list_backbones()
    ['edgetl_cnn', 'edgetl_mlp', 'efficientnetb0', ...]
    >>> bb = create_backbone("mobilenetv2", (96, 96, 3), weights=None)
    >>> bb.model.output_shape, bb.embedding_size
    ((None, 1280), 1280)

``create_backbone`` also accepts a path: a Keras model file (``.keras``, ``.h5``, a
SavedModel directory) cut at a named layer, or a run directory written by
``edgetl pretrain`` (its ``backbone.keras``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from edgetl.errors import BackboneError, describe
from edgetl.host._keras3 import load_keras3_as_tf_keras, saved_by_keras3
from edgetl.host._tf import keras

WeightsArg = Literal["imagenet"] | str | None


@dataclass(frozen=True)
class BackboneRecipe:
    """A registry entry: how to build one backbone family and what it gives.

    Attributes:
        name: registry key, lower case.
        kind: ``"image"`` or ``"features"``.
        default_input_shape: the input the family is usually deployed at.
        min_size: smallest height/width the architecture accepts.
        embedding_size: length of the embedding vector at the seam.
        preprocessing: what the model does to raw inputs, in words (recorded in runs).
        builder: ``builder(input_shape, weights) -> tf_keras.Model`` (raw in, embedding out).
        weights: which ``weights`` values the family accepts.
    """

    name: str
    kind: Literal["image", "features"]
    default_input_shape: tuple[int, ...]
    min_size: int
    embedding_size: int
    preprocessing: str
    builder: Callable[[tuple[int, ...], WeightsArg], Any] = field(repr=False)
    weights: tuple[str, ...] = ("imagenet", "path", "None")


@dataclass
class Backbone:
    """A built backbone plus what a run must record about it."""

    model: Any
    name: str
    embedding_size: int
    input_spec: dict[str, Any]
    source: str  # "registry", "file" or "run"
    # False for a registry family built with weights=None: its embeddings are random
    # features, usually useless for transfer (train warns before fitting the head).
    pretrained: bool = True


PREPROCESSING_PRESETS = ("none", "0-1", "-1-1", "imagenet", "caffe")


@dataclass(frozen=True)
class InputPreprocessing:
    """What a model file expects its raw inputs (pixels in [0, 255]) to be turned into.

    ``y = (x[..., channel_order] * scale + offset - mean) / std``, per channel. Baked into
    the backbone as a frozen first layer, so the exported models still take raw inputs.
    Each preset string equals its config (:meth:`preset`): ``"none"``, ``"0-1"`` (x/255),
    ``"-1-1"`` (x/127.5 - 1), ``"imagenet"`` (mean/std of ImageNet in pixel units, RGB),
    ``"caffe"`` (RGB -> BGR, minus the ImageNet BGR mean).
    """

    scale: float = 1.0
    offset: float = 0.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channel_order: Literal["rgb", "bgr"] = "rgb"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in np.atleast_1d(self.mean)))
        object.__setattr__(self, "std", tuple(float(v) for v in np.atleast_1d(self.std)))
        if not np.isfinite(self.scale) or self.scale == 0 or not np.isfinite(self.offset):
            raise BackboneError(
                f"input scale must be a non-zero finite number and offset finite, received scale={self.scale}, "
                f"offset={self.offset}"
            )
        if not all(np.isfinite(self.mean)) or not all(np.isfinite(s) and s > 0 for s in self.std):
            raise BackboneError(
                f"input mean must be finite and std positive, received mean={self.mean}, std={self.std}"
            )
        if self.channel_order not in ("rgb", "bgr"):
            raise BackboneError(f"channel_order must be 'rgb' or 'bgr', received {self.channel_order!r}")

    @classmethod
    def preset(cls, value: "str | InputPreprocessing | dict | None") -> "InputPreprocessing":
        if value is None or isinstance(value, InputPreprocessing):
            return value or cls()
        if isinstance(value, dict):
            return cls(**value)
        presets = {
            "none": cls(),
            "0-1": cls(scale=1 / 255.0),
            "-1-1": cls(scale=1 / 127.5, offset=-1.0),
            "imagenet": cls(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)),
            "caffe": cls(mean=(103.939, 116.779, 123.68), channel_order="bgr"),
        }
        if value not in presets:
            raise BackboneError(
                f"unknown input preprocessing {value!r}; allowed presets: {', '.join(PREPROCESSING_PRESETS)}"
            )
        return presets[value]

    @property
    def is_identity(self) -> bool:
        return self == InputPreprocessing()

    def per_channel(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        for name, v in (("mean", mean), ("std", std)):
            if len(v) not in (1, channels):
                raise BackboneError(
                    f"input {name} has {len(v)} values, the model takes {channels} channels; give 1 or {channels}"
                )
        return np.broadcast_to(mean, (channels,)).copy(), np.broadcast_to(std, (channels,)).copy()

    def order(self, channels: int) -> list[int]:
        if self.channel_order == "bgr":
            if channels != 3:
                raise BackboneError(f"channel_order 'bgr' needs 3 channels, the model takes {channels}")
            return [2, 1, 0]
        return list(range(channels))

    def describe(self) -> str:
        parts = ["RGB->BGR"] if self.channel_order == "bgr" else []
        if self.scale != 1.0 or self.offset != 0.0:
            parts.append(f"x*{self.scale:.6g}{self.offset:+.6g}" if self.offset else f"x*{self.scale:.6g}")
        if any(self.mean) or any(s != 1 for s in self.std):
            parts.append(f"(x - {list(self.mean)}) / {list(self.std)}")
        return ", then ".join(parts) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "offset": self.offset,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": self.channel_order,
        }


_REGISTRY: dict[str, BackboneRecipe] = {}


def register_backbone(recipe: BackboneRecipe) -> BackboneRecipe:
    """Add a recipe; a name that is already registered is replaced with a warning."""
    key = recipe.name.lower()
    if key in _REGISTRY:
        warnings.warn(f"backbone {key!r} is already registered; replacing it", stacklevel=2)
    _REGISTRY[key] = recipe
    return recipe


def list_backbones(kind: str | None = None) -> list[str]:
    """Registered backbone names, sorted; ``kind`` filters to ``"image"`` or ``"features"``."""
    return sorted(n for n, r in _REGISTRY.items() if kind is None or r.kind == kind)


def get_recipe(name: str) -> BackboneRecipe:
    key = str(name).lower()
    if key not in _REGISTRY:
        raise BackboneError(
            f"unknown backbone {name!r}; allowed: {', '.join(list_backbones())}, or a path to a Keras model file or an "
            "`edgetl pretrain` run directory"
        )
    return _REGISTRY[key]


# --------------------------------------------------------------------------- builders


def _image_input(k: Any, input_shape: tuple[int, ...]) -> tuple[Any, Any]:
    """Input layer for raw pixels; grayscale is repeated to three channels for RGB nets."""
    inputs = k.Input(shape=input_shape, name="pixels")
    x = inputs
    if input_shape[-1] == 1:
        x = k.layers.Concatenate(name="gray_to_rgb")([x, x, x])
    return inputs, x


def _applications_builder(
    constructor: str,
    preprocess: Literal["mobilenet", "builtin", "caffe"],
    **extra: Any,
) -> Callable[[tuple[int, ...], WeightsArg], Any]:
    def build(input_shape: tuple[int, ...], weights: WeightsArg) -> Any:
        k = keras()
        inputs, x = _image_input(k, input_shape)
        rgb_shape = (*input_shape[:2], 3)
        kwargs = dict(extra)
        if preprocess == "builtin" and constructor.startswith(("MobileNetV3", "EfficientNetV2")):
            kwargs["include_preprocessing"] = True
        try:
            with warnings.catch_warnings():
                # MobileNetV3 at an input size other than 224 warns about imagenet weights;
                # the warning is about accuracy, not correctness.
                warnings.filterwarnings("ignore", message=".*input_shape is undefined or non-square.*")
                app = getattr(k.applications, constructor)(
                    input_shape=rgb_shape, include_top=False, weights=weights, pooling="avg", **kwargs
                )
        except Exception as exc:  # network failure when downloading imagenet weights
            if weights == "imagenet":
                raise BackboneError(
                    f"could not obtain imagenet weights for {constructor} ({exc}). Without internet, "
                    "download the weights file elsewhere and pass its path as weights=PATH (--weights PATH), "
                    "or pretrain it from random weights (weights=None, no --weights: `edgetl pretrain`)"
                ) from exc
            raise BackboneError(f"{constructor} cannot be built for input_shape={input_shape}: {exc}") from exc
        if preprocess == "mobilenet":
            x = k.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_unit_range")(x)
        elif preprocess == "caffe":
            # 'caffe' preprocessing = RGB->BGR and subtract the ImageNet mean, written as a frozen
            # 1x1 convolution so it serialises without a Lambda and converts to any runtime.
            conv = k.layers.Conv2D(3, 1, name="caffe_preprocess", trainable=False)
            conv.build((None, None, None, 3))
            perm = np.zeros((1, 1, 3, 3), dtype=np.float32)
            perm[0, 0, 2, 0] = perm[0, 0, 1, 1] = perm[0, 0, 0, 2] = 1.0
            conv.set_weights([perm, -np.array([103.939, 116.779, 123.68], dtype=np.float32)])
            x = conv(x)
        # No training= here: transfer calls the backbone with training=False (frozen, BN in
        # inference mode, propagated to nested layers), while pretrain must train BN.
        x = app(x)
        return k.Model(inputs, x, name="backbone")

    return build


def _build_edgetl_cnn(input_shape: tuple[int, ...], weights: WeightsArg) -> Any:
    """Small CNN for images: conv blocks down to a 2x2 map of 64 channels -> 256-d embedding.

    The embedding is the flattened 2x2 conv map: it keeps *where* in the image each feature
    fired. Global average pooling (or a dense layer trained for the source classes) throws
    that away and transferred measurably worse on digits (DESIGN.md, "conv features").
    """
    k = keras()
    inputs = k.Input(shape=input_shape, name="pixels")
    x = k.layers.Rescaling(1.0 / 255.0, name="to_unit_range")(inputs)
    x = k.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(x)
    x = k.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = k.layers.MaxPooling2D(2, name="pool1")(x)
    x = k.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(x)
    # Fixed 2x2 output grid whatever the input size (adaptive average pooling).
    h, w = (int(d) for d in x.shape[1:3])
    x = k.layers.AveragePooling2D((max(1, h // 2), max(1, w // 2)), name="pool_to_2x2")(x)
    x = k.layers.Flatten(name="embedding")(x)
    model = k.Model(inputs, x, name="backbone")
    _load_weights_file(model, weights)
    return model


def _build_edgetl_cnn_dense(input_shape: tuple[int, ...], weights: WeightsArg) -> Any:
    """``edgetl_cnn`` whose 256-d embedding goes through a ``Dense(256, relu)`` that starts as
    the identity plus 1 and stays frozen while pretraining and transferring: its inputs are
    averages of ReLU outputs (>= 0), so it outputs them plus 1, which the seam standardization
    (source statistics or the target's) maps to exactly ``edgetl_cnn``'s standardized
    embedding. The layer is a trainable tail for on-device personalization (``personalize
    --adapt tail``). The +1 keeps its pre-activations away from ReLU's kink: at 0 (identity
    alone, where many inputs are exactly 0) float32 and float64 disagree on which units pass
    after one step, and Adam's normalized steps turned that into differences of 2e-3 between
    the runtimes and the export's float64 reference (measured on the demo's bundle).
    Cost: 65,792 frozen parameters (the conv blocks have 28,064) and one 256 x 256 product.
    """
    k = keras()
    plain = _build_edgetl_cnn(input_shape, None)
    flat = plain.get_layer("embedding")
    flat._name = "flatten_2x2"  # the embedding is now the Dense layer's output
    dense = k.layers.Dense(
        int(flat.output.shape[-1]),
        activation="relu",
        kernel_initializer="identity",
        bias_initializer="ones",
        trainable=False,
        name="embedding",
    )
    model = k.Model(plain.inputs, dense(plain.output), name="backbone")
    _load_weights_file(model, weights)
    return model


def _build_edgetl_mlp(input_shape: tuple[int, ...], weights: WeightsArg) -> Any:
    """Small MLP for feature vectors (sensor/tabular): normalization -> 64 -> 32 (embedding).

    The ``Normalization`` layer starts as identity; ``pretrain`` and ``train`` adapt it to the
    training data when the backbone is new (see :func:`adapt_normalization`).
    """
    k = keras()
    inputs = k.Input(shape=input_shape, name="features")
    # No mean/variance arguments: those become constants; as weights (identity until
    # adapt_normalization sets them) they are saved with the model and can be adapted later.
    x = k.layers.Normalization(name="standardize")(inputs)
    x = k.layers.Dense(64, activation="relu", name="dense1")(x)
    x = k.layers.Dense(32, activation="relu", name="embedding")(x)
    model = k.Model(inputs, x, name="backbone")
    _load_weights_file(model, weights)
    return model


def _load_weights_file(model: Any, weights: WeightsArg) -> None:
    if weights is None:
        return
    if weights == "imagenet":
        raise BackboneError(
            "built-in edgetl backbones have no imagenet weights; pass weights=None or a weights file path"
        )
    try:
        model.load_weights(str(weights))
    except Exception as exc:
        raise BackboneError(f"cannot load weights file {str(weights)!r} into {model.name}: {exc}") from exc


def adapt_normalization(model: Any, x: np.ndarray) -> None:
    """Set every untouched ``Normalization`` layer in ``model`` to the statistics of ``x``."""
    for layer in model.layers:
        if layer.__class__.__name__ == "Normalization" and layer.name == "standardize":
            mean = x.mean(axis=0)
            var = x.var(axis=0)
            layer.set_weights(
                [mean.astype(np.float32), np.maximum(var, 1e-6).astype(np.float32), np.array(len(x), dtype=np.int64)]
            )


#: The families edgetl trains itself (input shape from the data; random weights are their start).
OWN_FAMILIES = ("edgetl_cnn", "edgetl_cnn_dense", "edgetl_mlp")
_IMG = "raw RGB pixels in [0, 255] (grayscale repeated to 3 channels)"
for _recipe in (
    BackboneRecipe(
        "mobilenetv2",
        "image",
        (224, 224, 3),
        32,
        1280,
        f"{_IMG}; x/127.5 - 1 in the model",
        _applications_builder("MobileNetV2", "mobilenet"),
    ),
    BackboneRecipe(
        "mobilenetv2_035",
        "image",
        (96, 96, 3),
        32,
        1280,
        f"{_IMG}; x/127.5 - 1 in the model",
        _applications_builder("MobileNetV2", "mobilenet", alpha=0.35),
    ),
    BackboneRecipe(
        "mobilenetv3small",
        "image",
        (224, 224, 3),
        32,
        576,
        f"{_IMG}; rescaling built into the Keras model",
        _applications_builder("MobileNetV3Small", "builtin"),
    ),
    BackboneRecipe(
        "mobilenetv3large",
        "image",
        (224, 224, 3),
        32,
        960,
        f"{_IMG}; rescaling built into the Keras model",
        _applications_builder("MobileNetV3Large", "builtin"),
    ),
    BackboneRecipe(
        "efficientnetb0",
        "image",
        (224, 224, 3),
        32,
        1280,
        f"{_IMG}; rescaling + normalization built into the Keras model",
        _applications_builder("EfficientNetB0", "builtin"),
    ),
    BackboneRecipe(
        "efficientnetv2b0",
        "image",
        (224, 224, 3),
        32,
        1280,
        f"{_IMG}; rescaling built into the Keras model",
        _applications_builder("EfficientNetV2B0", "builtin"),
    ),
    BackboneRecipe(
        "resnet50",
        "image",
        (224, 224, 3),
        32,
        2048,
        f"{_IMG}; RGB->BGR and ImageNet mean subtraction (1x1 conv) in the model",
        _applications_builder("ResNet50", "caffe"),
    ),
    BackboneRecipe(
        "edgetl_cnn",
        "image",
        (8, 8, 1),
        4,
        256,
        "raw pixels in [0, 255]; x/255 in the model",
        _build_edgetl_cnn,
        ("path", "None"),
    ),
    BackboneRecipe(
        "edgetl_cnn_dense",
        "image",
        (8, 8, 1),
        4,
        256,
        "raw pixels in [0, 255]; x/255 in the model",
        _build_edgetl_cnn_dense,
        ("path", "None"),
    ),
    BackboneRecipe(
        "edgetl_mlp",
        "features",
        (16,),
        1,
        32,
        "raw feature vectors; standardisation (adapted on training data) in the model",
        _build_edgetl_mlp,
        ("path", "None"),
    ),
):
    register_backbone(_recipe)


# --------------------------------------------------------------------------- factory


def _check_shape(recipe: BackboneRecipe, input_shape: tuple[int, ...]) -> None:
    if recipe.kind == "image":
        ok = len(input_shape) == 3 and input_shape[-1] in (1, 3) and min(input_shape[:2]) >= recipe.min_size
        allowed = f"(height, width, channels) with height and width >= {recipe.min_size} and 1 or 3 channels"
    else:
        ok = len(input_shape) == 1 and input_shape[0] >= 1
        allowed = "(num_features,), a feature vector"
    if not ok:
        raise BackboneError(f"backbone {recipe.name!r} cannot take input_shape={input_shape}; allowed: {allowed}")


def create_backbone(
    name_or_path: str | Path,
    input_shape: tuple[int, ...] | None = None,
    *,
    weights: WeightsArg = None,
    cut_layer: str | None = None,
    safe_mode: bool = True,
    preprocessing: "InputPreprocessing | str | None" = None,
) -> Backbone:
    """Build a registered backbone or load one from a file or an ``edgetl pretrain`` run.

    Args:
        name_or_path: a name from :func:`list_backbones`, a Keras model file (``.keras``,
            ``.h5``) or SavedModel directory, or a pretrain run directory.
        input_shape: raw input shape without the batch axis; defaults to the recipe's.
        weights: ``"imagenet"`` (downloaded by Keras; needs internet), a local weights file
            path, or ``None`` for random initialisation. Registry names only.
        cut_layer: for model files, the layer whose output is the embedding; default is the
            layer feeding the final classifier.
        safe_mode: refuse model files that would execute Python code (``Lambda`` layers
            serialised as bytecode). Only pass ``False`` for files you trust.
        preprocessing: what a model file expects its raw inputs turned into (a preset
            name or :class:`InputPreprocessing`); baked in as its first layer. Registry
            backbones and runs already contain theirs.

    Raises:
        BackboneError: unknown name, unusable input shape, unreadable or unsafe file.
    """
    path = Path(name_or_path)
    pre = InputPreprocessing.preset(preprocessing)
    if not is_registry_name(name_or_path):
        if weights is not None:
            raise BackboneError(
                f"weights={describe(weights)} applies to registry backbones only; a model file brings its own weights"
            )
        return _backbone_from_path(path, input_shape, cut_layer, safe_mode, pre)
    recipe = get_recipe(str(name_or_path))
    if not pre.is_identity:
        raise BackboneError(
            f"registry backbone {recipe.name!r} has its preprocessing built in ({recipe.preprocessing}); input "
            "preprocessing can be declared for model files only"
        )
    if cut_layer is not None:
        raise BackboneError(f"cut_layer applies to model files, not to registry backbone {recipe.name!r}")
    if weights is not None and weights != "imagenet":
        if "path" not in recipe.weights:
            raise BackboneError(
                f"backbone {recipe.name!r} accepts weights {recipe.weights}, received {describe(weights)}"
            )
        if not Path(weights).is_file():
            raise BackboneError(
                f"weights file {str(weights)!r} does not exist; allowed: 'imagenet', None or an existing file path"
            )
    elif weights == "imagenet" and "imagenet" not in recipe.weights:
        raise BackboneError(f"backbone {recipe.name!r} has no imagenet weights; allowed weights: {recipe.weights}")
    shape = tuple(int(d) for d in (input_shape or recipe.default_input_shape))
    _check_shape(recipe, shape)
    model = recipe.builder(shape, weights)
    spec = {
        "shape": list(shape),
        "dtype": "float32",
        "kind": recipe.kind,
        "layout": "NHWC" if recipe.kind == "image" else "NC",
        "value_range": [0, 255] if recipe.kind == "image" else None,
        "preprocessing": recipe.preprocessing,
    }
    spec["embedding"] = f"{recipe.name}'s pooled features ({int(model.output_shape[-1])}-d)"
    return Backbone(model, recipe.name, int(model.output_shape[-1]), spec, "registry", pretrained=weights is not None)


def load_keras_model(path: Path, *, safe_mode: bool = True) -> Any:
    """Load a Keras model file without compiling it, refusing unsafe Lambda bytecode. Files
    saved by Keras 3 are rebuilt in tf_keras (:mod:`edgetl.host._keras3`).

    tf_keras honours ``safe_mode`` only for the ``.keras`` format; the legacy ``.h5`` and
    SavedModel loaders read a thread-local flag that only the ``.keras`` loader sets, so
    they would deserialize Lambda bytecode. We set the same flag around those loaders.
    """
    k = keras()
    if not path.exists():
        raise BackboneError(f"model file {str(path)!r} does not exist")
    from tf_keras.src.saving.serialization_lib import SafeModeScope

    if saved_by_keras3(path):  # TensorFlow 2.16+'s `keras`: tf_keras cannot read these (see _keras3)
        return load_keras3_as_tf_keras(path, safe_mode=safe_mode)

    try:
        with SafeModeScope(safe_mode):
            if path.suffix == ".keras":
                model = k.models.load_model(str(path), compile=False, safe_mode=safe_mode)
            else:
                model = k.models.load_model(str(path), compile=False)
    except Exception as exc:
        hint = (
            " (the file contains a Lambda layer with Python code; pass safe_mode=False / --unsafe only if you trust it)"
            if "Lambda" in str(exc)
            else ""
        )
        raise BackboneError(f"cannot load Keras model {str(path)!r}: {exc}{hint}") from exc
    if not isinstance(model, k.Model):  # tf_keras returns a bare object for a SavedModel without Keras layers
        raise BackboneError(
            f"{str(path)!r} is a SavedModel without Keras layers (as Keras 3's model.export() writes): edgetl needs "
            "the layers to cut the embedding; save the model with model.save('model.keras')"
        )
    return model


# Layers without weights that may follow a classifier: they shape or squash its output.
_HEAD_TAIL = (
    "Activation",
    "Softmax",
    "Dropout",
    "SpatialDropout2D",
    "GaussianNoise",
    "Flatten",
    "Reshape",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
    "AveragePooling2D",
    "MaxPooling2D",
    "ReLU",
)


def _inbound(layer: Any) -> list[Any]:
    nodes = layer._inbound_nodes
    if not nodes:
        return []
    inbound = nodes[0].inbound_layers
    return list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]


def default_cut(model: Any) -> tuple[Any, str]:
    """The layer whose output is the embedding of a classifier ``model``, and why.

    Walks back from the output over weight-free tail layers (softmax ``Activation``,
    ``Dropout``, ``Flatten``/``Reshape``, pooling) to the classifier: the last ``Dense``,
    or a ``Conv2D`` (typically 1x1) whose map is pooled into class scores, together with a
    ``BatchNormalization`` right after it. The cut is the classifier's input, skipping
    ``Dropout`` (identity at inference) so the embedding is the real features.

    Raises:
        BackboneError: no such classifier (several outputs, a branch, an unknown layer).
    """
    k = keras()
    if len(model.outputs) != 1:
        raise BackboneError(
            f"model {model.name!r} has {len(model.outputs)} outputs; pass cut_layer=NAME (--cut-layer). "
            f"{_layer_hint(model)}"
        )
    layer = model.get_layer(index=-1) if not model.output_names else model.get_layer(model.output_names[0])
    seen_tail = []
    while layer.__class__.__name__ in _HEAD_TAIL or isinstance(layer, k.layers.BatchNormalization):
        seen_tail.append(layer)
        inbound = _inbound(layer)
        if len(inbound) != 1:
            raise BackboneError(
                f"cannot find the classifier of {model.name!r}: {layer.name!r} does not have one input. Pass "
                f"cut_layer=NAME (--cut-layer). {_layer_hint(model)}"
            )
        layer = inbound[0]
    if not isinstance(layer, (k.layers.Dense, k.layers.Conv2D)) or isinstance(layer, k.layers.DepthwiseConv2D):
        raise BackboneError(
            f"cannot find the classifier of {model.name!r}: expected a Dense or Conv2D layer before the output "
            f"({[l.name for l in reversed(seen_tail)] or 'directly'}), found {layer.__class__.__name__} "
            f"{layer.name!r}. "
            f"Pass cut_layer=NAME (--cut-layer). {_layer_hint(model)}"
        )
    classifier = layer
    inbound = _inbound(classifier)
    if len(inbound) != 1:
        raise BackboneError(
            f"the classifier {classifier.name!r} of {model.name!r} has {len(inbound)} inputs; pass cut_layer=NAME "
            "(--cut-layer)"
        )
    cut = inbound[0]
    while isinstance(cut, (k.layers.Dropout, k.layers.SpatialDropout2D)) and len(_inbound(cut)) == 1:
        cut = _inbound(cut)[0]
    kind = (
        "Dense"
        if isinstance(classifier, k.layers.Dense)
        else f"{classifier.kernel_size[0]}x{classifier.kernel_size[1]} Conv2D"
    )
    return cut, f"input of the {kind} classifier {classifier.name!r}"


def _layer_hint(model: Any) -> str:
    return f"Its layers: {[l.name for l in model.layers]} (see `edgetl layers MODEL`)"


def _backbone_from_path(
    path: Path,
    input_shape: tuple[int, ...] | None,
    cut_layer: str | None,
    safe_mode: bool,
    preprocessing: InputPreprocessing,
) -> Backbone:
    k = keras()
    if path.is_dir() and (path / "backbone.keras").is_file():  # an `edgetl pretrain` run
        if not preprocessing.is_identity:
            raise BackboneError(
                f"{str(path)!r} is an edgetl run: its backbone already contains its preprocessing; do not declare "
                "input preprocessing for it"
            )
        model = load_keras_model(path / "backbone.keras", safe_mode=safe_mode)
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        spec = dict(config.get("input_spec") or {})
        name, source, cut_note = f"run:{path.name}", "run", "the run's embedding"
        if cut_layer is not None:
            model = k.Model(model.inputs, _get_layer(model, cut_layer).output, name="backbone")
            cut_note = f"layer {cut_layer!r}"
    else:
        full = load_keras_model(path, safe_mode=safe_mode)
        layer, cut_note = (
            (_get_layer(full, cut_layer), f"layer {cut_layer!r} (given)") if cut_layer else default_cut(full)
        )
        out = layer.output
        if len(out.shape) == 4:  # a feature map: pool it into an embedding vector
            out = k.layers.GlobalAveragePooling2D(name="embedding_pool")(out)
            cut_note += ", global-average-pooled"
        if len(out.shape) != 2:
            raise BackboneError(
                f"layer {layer.name!r} of {str(path)!r} outputs shape {tuple(out.shape)}; an embedding must be a "
                "vector (or a feature map to pool)"
            )
        model = k.Model(full.inputs, out, name="backbone")
        name, source = f"file:{path.name}", "file"
        spec = {
            "preprocessing": f"declared: {preprocessing.describe()}, inside the exported models"
            if not preprocessing.is_identity
            else "none declared: the model file gets raw inputs (declare it with --input-preprocessing if it expects "
            "scaled inputs)"
        }
    model_shape = tuple(int(d) for d in model.input_shape[1:] if d is not None)
    if len(model_shape) != len(model.input_shape) - 1:
        raise BackboneError(
            f"{str(path)!r} has an input with unknown dimensions {model.input_shape}; edgetl needs a fixed input shape"
        )
    if input_shape is not None and tuple(input_shape) != model_shape:
        raise BackboneError(
            f"backbone {str(path)!r} takes input_shape={model_shape}, the data has shape {tuple(input_shape)}; resize "
            "the data (e.g. --image-size) or use a matching backbone"
        )
    if not preprocessing.is_identity:
        model = _with_preprocessing(model, preprocessing)
    spec.setdefault("shape", list(model_shape))
    spec.setdefault("dtype", "float32")
    spec.setdefault("kind", "image" if len(model_shape) == 3 else "features")
    spec.setdefault("layout", "NHWC" if len(model_shape) == 3 else "NC")
    if spec["kind"] == "image":
        spec.setdefault("value_range", [0, 255])
    spec["embedding"] = cut_note
    return Backbone(model, name, int(model.output_shape[-1]), spec, source)


def _with_preprocessing(model: Any, pre: InputPreprocessing) -> Any:
    """``model`` behind a frozen layer doing ``pre``: the result takes raw inputs.

    Images get one frozen 1x1 convolution that does the channel order, scale, offset, mean
    and std at once (no Lambda: it serialises safely and converts to every runtime);
    feature vectors get ``Rescaling`` and ``Normalization`` constants.
    """
    k = keras()
    shape = tuple(model.input_shape[1:])
    inputs = k.Input(shape=shape, name="pixels" if len(shape) == 3 else "features")
    channels = shape[-1]
    mean, std = pre.per_channel(channels)
    if len(shape) == 3:
        kernel = np.zeros((1, 1, channels, channels), np.float32)
        order = pre.order(channels)
        for j in range(channels):
            kernel[0, 0, order[j], j] = pre.scale / std[j]
        bias = ((pre.offset - mean) / std).astype(np.float32)
        conv = k.layers.Conv2D(channels, 1, name="input_preprocessing", trainable=False)
        conv.build((None, None, None, channels))
        conv.set_weights([kernel, bias])
        x = conv(inputs)
    else:
        x = k.layers.Rescaling(pre.scale, offset=pre.offset, name="input_rescale")(inputs)
        norm = k.layers.Normalization(name="input_preprocessing")
        norm.build((None, channels))
        norm.set_weights([mean.astype(np.float32), (std**2).astype(np.float32), np.array(0, np.int64)])
        norm.trainable = False
        x = norm(x)
    return k.Model(inputs, model(x), name="backbone")


def is_registry_name(name_or_path: str | Path) -> bool:
    """True when ``name_or_path`` names a registered backbone rather than a file or run."""
    path = Path(name_or_path)
    return not (path.exists() or path.suffix in (".keras", ".h5") or "/" in str(name_or_path))


def input_shape_of(name_or_path: str | Path, *, safe_mode: bool = True) -> tuple[int, ...] | None:
    """The raw input shape a backbone needs, or ``None`` when it adapts to the data.

    Registry families report their usual deployment size, except the built-in
    ``edgetl_cnn``/``edgetl_mlp`` which take the data's shape. Files and runs report the
    shape they were built for (read from the saved config when possible, else by loading).
    """
    path = Path(name_or_path)
    if is_registry_name(name_or_path):
        recipe = get_recipe(str(name_or_path))
        return None if recipe.name in OWN_FAMILIES else tuple(recipe.default_input_shape)
    if path.is_dir() and (path / "config.json").is_file():
        spec = json.loads((path / "config.json").read_text()).get("input_spec") or {}
        if spec.get("shape"):
            return tuple(int(d) for d in spec["shape"])
    model = load_keras_model(
        path / "backbone.keras" if path.is_dir() and (path / "backbone.keras").is_file() else path, safe_mode=safe_mode
    )
    return tuple(int(d) for d in model.input_shape[1:])


def describe_layers(path: str | Path, *, cut_layer: str | None = None, safe_mode: bool = True) -> list[dict[str, Any]]:
    """Every layer of a model file with class, output shape and parameters; the layer
    edgetl cuts at by default (or ``cut_layer``) has ``cut=True`` and a ``note``."""
    model = load_keras_model(Path(path), safe_mode=safe_mode)
    if cut_layer:
        cut, note = _get_layer(model, cut_layer), "given cut"
    else:
        try:
            cut, note = default_cut(model)
        except BackboneError as exc:  # listed, not raised: the listing is how to choose one
            cut, note = None, str(exc)
    rows = []
    for layer in model.layers:
        shape = layer.output_shape
        shape = shape[0] if isinstance(shape, list) and len(shape) == 1 else shape
        pooled = layer is cut and isinstance(shape, tuple) and len(shape) == 4
        rows.append(
            {
                "name": layer.name,
                "class": layer.__class__.__name__,
                "output_shape": shape,
                "params": int(layer.count_params()),
                "cut": layer is cut,
                "note": (f"<- embedding ({note}{', global-average-pooled' if pooled else ''})" if layer is cut else ""),
            }
        )
    if cut is None:
        rows.append(
            {"name": "(no default cut)", "class": "", "output_shape": "", "params": None, "cut": False, "note": note}
        )
    return rows


def _get_layer(model: Any, name: str) -> Any:
    try:
        return model.get_layer(name)
    except ValueError:
        raise BackboneError(
            f"model {model.name!r} has no layer {name!r}; its layers are {[l.name for l in model.layers]}"
        ) from None


def count_macs(model: Any) -> int:
    """Multiply-accumulates of one inference, counted from the layer graph.

    Counts Conv2D, DepthwiseConv2D and Dense (the layers that dominate these networks);
    pooling, activations and element-wise ops are ignored.
    """
    k = keras()
    total = 0
    for layer in leaf_layers(model):
        if isinstance(layer, k.layers.DepthwiseConv2D):
            _, h, w, c_out = layer.output_shape
            kh, kw = layer.kernel_size
            total += h * w * kh * kw * c_out
        elif isinstance(layer, k.layers.Conv2D):
            _, h, w, c_out = layer.output_shape
            kh, kw = layer.kernel_size
            c_in = layer.input_shape[-1] // layer.groups
            total += h * w * kh * kw * c_in * c_out
        elif isinstance(layer, k.layers.Dense):
            total += int(np.prod(layer.input_shape[1:])) * layer.units
    return int(total)


def leaf_layers(model: Any) -> list[Any]:
    """Every non-model layer of ``model``, nested models flattened, in order."""
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            out.extend(leaf_layers(layer))
        else:
            out.append(layer)
    return out
