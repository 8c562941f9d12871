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
        raise BackboneError(f"unknown backbone {name!r}; allowed: {', '.join(list_backbones())}, or a path to a Keras model file or an `edgetl pretrain` run directory")
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
                    "or use weights=None"
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
        raise BackboneError("built-in edgetl backbones have no imagenet weights; pass weights=None or a weights file path")
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
            layer.set_weights([mean.astype(np.float32), np.maximum(var, 1e-6).astype(np.float32), np.array(len(x), dtype=np.int64)])


_IMG = "raw RGB pixels in [0, 255] (grayscale repeated to 3 channels)"
for _recipe in (
    BackboneRecipe("mobilenetv2", "image", (224, 224, 3), 32, 1280, f"{_IMG}; x/127.5 - 1 in the model", _applications_builder("MobileNetV2", "mobilenet")),
    BackboneRecipe("mobilenetv2_035", "image", (96, 96, 3), 32, 1280, f"{_IMG}; x/127.5 - 1 in the model", _applications_builder("MobileNetV2", "mobilenet", alpha=0.35)),
    BackboneRecipe("mobilenetv3small", "image", (224, 224, 3), 32, 576, f"{_IMG}; rescaling built into the Keras model", _applications_builder("MobileNetV3Small", "builtin")),
    BackboneRecipe("mobilenetv3large", "image", (224, 224, 3), 32, 960, f"{_IMG}; rescaling built into the Keras model", _applications_builder("MobileNetV3Large", "builtin")),
    BackboneRecipe("efficientnetb0", "image", (224, 224, 3), 32, 1280, f"{_IMG}; rescaling + normalization built into the Keras model", _applications_builder("EfficientNetB0", "builtin")),
    BackboneRecipe("efficientnetv2b0", "image", (224, 224, 3), 32, 1280, f"{_IMG}; rescaling built into the Keras model", _applications_builder("EfficientNetV2B0", "builtin")),
    BackboneRecipe("resnet50", "image", (224, 224, 3), 32, 2048, f"{_IMG}; RGB->BGR and ImageNet mean subtraction (1x1 conv) in the model", _applications_builder("ResNet50", "caffe")),
    BackboneRecipe("edgetl_cnn", "image", (8, 8, 1), 4, 256, "raw pixels in [0, 255]; x/255 in the model", _build_edgetl_cnn, ("path", "None")),
    BackboneRecipe("edgetl_mlp", "features", (16,), 1, 32, "raw feature vectors; standardisation (adapted on training data) in the model", _build_edgetl_mlp, ("path", "None")),
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

    Raises:
        BackboneError: unknown name, unusable input shape, unreadable or unsafe file.
    """
    path = Path(name_or_path)
    looks_like_path = path.exists() or path.suffix in (".keras", ".h5") or "/" in str(name_or_path)
    if looks_like_path:
        if weights is not None:
            raise BackboneError(f"weights={describe(weights)} applies to registry backbones only; a model file brings its own weights")
        return _backbone_from_path(path, input_shape, cut_layer, safe_mode)
    recipe = get_recipe(str(name_or_path))
    if cut_layer is not None:
        raise BackboneError(f"cut_layer applies to model files, not to registry backbone {recipe.name!r}")
    if weights is not None and weights != "imagenet":
        if "path" not in recipe.weights:
            raise BackboneError(f"backbone {recipe.name!r} accepts weights {recipe.weights}, received {describe(weights)}")
        if not Path(weights).is_file():
            raise BackboneError(f"weights file {str(weights)!r} does not exist; allowed: 'imagenet', None or an existing file path")
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
    return Backbone(model, recipe.name, int(model.output_shape[-1]), spec, "registry")


def load_keras_model(path: Path, *, safe_mode: bool = True) -> Any:
    """Load a Keras model file without compiling it, refusing unsafe Lambda bytecode.

    tf_keras honours ``safe_mode`` only for the ``.keras`` format; the legacy ``.h5`` and
    SavedModel loaders read a thread-local flag that only the ``.keras`` loader sets, so
    they would deserialize Lambda bytecode. We set the same flag around those loaders.
    """
    k = keras()
    if not path.exists():
        raise BackboneError(f"model file {str(path)!r} does not exist")
    from tf_keras.src.saving.serialization_lib import SafeModeScope

    try:
        with SafeModeScope(safe_mode):
            if path.suffix == ".keras":
                return k.models.load_model(str(path), compile=False, safe_mode=safe_mode)
            return k.models.load_model(str(path), compile=False)
    except Exception as exc:
        hint = " (the file contains a Lambda layer with Python code; pass safe_mode=False / --unsafe only if you trust it)" if "Lambda" in str(exc) else ""
        raise BackboneError(f"cannot load Keras model {str(path)!r}: {exc}{hint}") from exc


def _classifier_input_layer(model: Any) -> Any:
    """The layer feeding the final classifier: the input side of the last Dense layer."""
    k = keras()
    dense_idx = [i for i, l in enumerate(model.layers) if isinstance(l, k.layers.Dense)]
    if not dense_idx:
        raise BackboneError(f"model {model.name!r} has no Dense classifier to cut before; pass cut_layer=NAME (--cut-layer). Layers: {[l.name for l in model.layers]}")
    last = model.layers[dense_idx[-1]]
    inbound = last._inbound_nodes[0].inbound_layers
    layer = inbound[0] if isinstance(inbound, list) else inbound
    # Dropout is identity at inference; cut before it so the embedding is the real features.
    while isinstance(layer, k.layers.Dropout):
        nxt = layer._inbound_nodes[0].inbound_layers
        layer = nxt[0] if isinstance(nxt, list) else nxt
    return layer


def _backbone_from_path(path: Path, input_shape: tuple[int, ...] | None, cut_layer: str | None, safe_mode: bool) -> Backbone:
    k = keras()
    if path.is_dir() and (path / "backbone.keras").is_file():  # an `edgetl pretrain` run
        model = load_keras_model(path / "backbone.keras", safe_mode=safe_mode)
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        spec = dict(config.get("input_spec") or {})
        name, source = f"run:{path.name}", "run"
        if cut_layer is not None:
            model = k.Model(model.inputs, _get_layer(model, cut_layer).output, name="backbone")
    else:
        full = load_keras_model(path, safe_mode=safe_mode)
        layer = _get_layer(full, cut_layer) if cut_layer else _classifier_input_layer(full)
        out = layer.output
        if len(out.shape) == 4:  # a feature map: pool it into an embedding vector
            out = k.layers.GlobalAveragePooling2D(name="embedding_pool")(out)
        if len(out.shape) != 2:
            raise BackboneError(f"layer {layer.name!r} of {str(path)!r} outputs shape {tuple(out.shape)}; an embedding must be a vector (or a feature map to pool)")
        model = k.Model(full.inputs, out, name="backbone")
        name, source, spec = f"file:{path.name}", "file", {}
    model_shape = tuple(int(d) for d in model.input_shape[1:] if d is not None)
    if len(model_shape) != len(model.input_shape) - 1:
        raise BackboneError(f"{str(path)!r} has an input with unknown dimensions {model.input_shape}; edgetl needs a fixed input shape")
    if input_shape is not None and tuple(input_shape) != model_shape:
        raise BackboneError(f"backbone {str(path)!r} takes input_shape={model_shape}, the data has shape {tuple(input_shape)}; resize the data (e.g. --image-size) or use a matching backbone")
    spec.setdefault("shape", list(model_shape))
    spec.setdefault("dtype", "float32")
    spec.setdefault("kind", "image" if len(model_shape) == 3 else "features")
    spec.setdefault("layout", "NHWC" if len(model_shape) == 3 else "NC")
    spec.setdefault("preprocessing", "whatever the model file does (edgetl feeds it raw inputs)")
    return Backbone(model, name, int(model.output_shape[-1]), spec, source)


def _get_layer(model: Any, name: str) -> Any:
    try:
        return model.get_layer(name)
    except ValueError:
        raise BackboneError(f"model {model.name!r} has no layer {name!r}; its layers are {[l.name for l in model.layers]}") from None


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
