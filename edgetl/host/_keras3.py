"""Model files saved by Keras 3 (TensorFlow 2.16+'s ``keras``), carried across to tf_keras.

edgetl builds and trains with tf_keras, because tensorflow-model-optimization (QAT) supports
Keras 2 only. A user's ``model.save("x.keras")`` under TensorFlow 2.21 writes a Keras 3
file, which tf_keras cannot read (``Unrecognized keyword arguments: ['batch_shape']``). So
the file is loaded with Keras 3 itself, its architecture is translated into the equivalent
tf_keras config (the formats differ in a few keys: dtype policies are objects, an input
layer has ``batch_shape``, inbound nodes are tensor dicts, initializers take new
arguments), rebuilt by tf_keras, and the weights are copied over in order. The rebuilt
model is a real tf_keras model: it can be cut at a layer, fine-tuned, quantization-aware
trained and exported like any other. The translation is checked, not assumed: both models
run the same random batch and must agree (:data:`PARITY_TOL`); measured 0.0 on a
Sequential CNN, a functional model with ``Add``/``Concatenate`` and MobileNetV2, from
``.keras`` and ``.h5`` files.

Why rebuild rather than wrap a SavedModel: a SavedModel written by Keras 3's
``model.export()`` holds a function, not layers, so it could not be cut at the embedding,
fine-tuned or QAT-annotated.
"""

from __future__ import annotations

import inspect
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import BackboneError

PARITY_TOL = 1e-4  # max |Keras 3 - tf_keras| on a random batch; float32 rounding is ~1e-6


def saved_by_keras3(path: Path) -> bool:
    """Whether ``path`` is a ``.keras`` or ``.h5`` file written by Keras 3 (cheap: the
    zip's ``metadata.json`` or the HDF5 root's ``keras_version``)."""
    version = ""
    try:
        if path.suffix == ".keras" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if "metadata.json" in z.namelist():
                    version = str(json.loads(z.read("metadata.json")).get("keras_version", ""))
        elif path.suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                raw = f.attrs.get("keras_version", "")
                version = raw.decode() if isinstance(raw, bytes) else str(raw)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False
    return version.startswith("3.")


def load_keras3_as_tf_keras(path: Path, *, safe_mode: bool = True) -> Any:
    """Load a Keras 3 model file and return the same model rebuilt in tf_keras, parity-checked.

    Raises:
        BackboneError: Keras 3 cannot load the file, the model uses a layer tf_keras does not
            have (named), a ``Lambda`` layer under safe mode, or the rebuilt model disagrees.
    """
    try:
        import keras as keras3
    except ImportError as exc:  # pragma: no cover - TensorFlow 2.16+ installs Keras 3
        raise BackboneError(f"{str(path)!r} was saved by Keras 3, which is not installed ({exc}): pip install keras")
    if int(keras3.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise BackboneError(f"{str(path)!r} was saved by Keras 3, but `keras` here is {keras3.__version__}")
    try:
        original = keras3.saving.load_model(str(path), compile=False, safe_mode=safe_mode)
    except Exception as exc:
        raise BackboneError(f"cannot load the Keras 3 model {str(path)!r}: {exc}") from exc
    if len(original.inputs) != 1:
        raise BackboneError(f"{str(path)!r} has {len(original.inputs)} inputs; an edgetl backbone takes one")
    spec = keras3.saving.serialize_keras_object(original)
    if safe_mode and '"Lambda"' in json.dumps(spec, default=str):
        raise BackboneError(
            f"{str(path)!r} contains a Lambda layer with Python code; pass safe_mode=False / --unsafe only if you "
            "trust it"
        )
    model = _rebuild(spec, original)
    _check_parity(original, model, path)
    return model


def _rebuild(spec: dict[str, Any], original: Any) -> Any:
    import tf_keras

    kind = spec["class_name"]
    if kind not in ("Sequential", "Functional"):
        raise BackboneError(
            f"a Keras 3 {kind} (subclassed) model cannot be rebuilt from its config; save a Sequential or functional "
            "model, or re-save the model with tf_keras"
        )
    config = _model_config(kind, spec["config"])
    try:
        model = (tf_keras.Sequential if kind == "Sequential" else tf_keras.Model).from_config(config)
        if kind == "Sequential" and not model.built:
            model.build((None, *original.input_shape[1:]))
        model.set_weights(original.get_weights())
    except (TypeError, ValueError, AttributeError) as exc:
        raise BackboneError(f"the Keras 3 model could not be rebuilt in tf_keras: {exc}") from exc
    return model


def _model_config(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": config["name"], "layers": [_layer(entry) for entry in config["layers"]]}
    if kind == "Functional":
        for key in ("input_layers", "output_layers"):
            v = config[key]
            out[key] = [list(t) for t in v] if v and isinstance(v[0], (list, tuple)) else [list(v)]
    return out


def _layer(entry: dict[str, Any]) -> dict[str, Any]:
    """One layer's Keras 3 config entry as tf_keras expects it."""
    import tf_keras

    kind = entry["class_name"]
    if kind in ("Sequential", "Functional"):
        config = _model_config(kind, entry["config"])
    else:
        config = _plain(entry["config"])
        if kind == "InputLayer":
            config = {
                "batch_input_shape": config.get("batch_shape") or config.get("batch_input_shape"),
                "dtype": config.get("dtype"),
                "name": config["name"],
                "sparse": config.get("sparse", False),
                "ragged": config.get("ragged", False),
            }
        else:
            target = getattr(tf_keras.layers, kind, None)
            if target is None:
                raise BackboneError(f"layer {entry['config'].get('name')!r} is a Keras 3 {kind}, which tf_keras lacks")
            accepted = set(inspect.signature(target.__init__).parameters) | {"name", "trainable", "dtype"}
            # Initializers are dropped: the weights are copied over, and Keras 3's take new arguments.
            config = {k: v for k, v in config.items() if k in accepted and not k.endswith("_initializer")}
    out: dict[str, Any] = {"class_name": kind, "config": config}
    if "name" in entry:
        out["name"] = entry["name"]
    if "inbound_nodes" in entry:
        out["inbound_nodes"] = [_inbound(node) for node in entry["inbound_nodes"]]
    return out


def _plain(value: Any) -> Any:
    """Keras 3 config values as tf_keras reads them: a dtype policy object becomes its name."""
    if isinstance(value, dict):
        if value.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and "config" in value:
            return value["config"]["name"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _inbound(node: dict[str, Any]) -> list[list[Any]]:
    """A Keras 3 node (``{"args": [tensor or [tensors]], "kwargs": ...}``) as tf_keras's
    ``[[layer, node_index, tensor_index, kwargs], ...]``."""
    tensors: list[Any] = []
    for arg in node.get("args", []):
        tensors += arg if isinstance(arg, list) else [arg]
    out = []
    for t in tensors:
        if isinstance(t, dict) and t.get("class_name") == "__keras_tensor__":
            layer, index, tensor = t["config"]["keras_history"]
            out.append([layer, index, tensor, {}])
    return out


def _check_parity(original: Any, model: Any, path: Path) -> None:
    shape = tuple(d or 1 for d in original.input_shape[1:])
    x = np.random.default_rng(0).uniform(0, 1, (2, *shape)).astype(np.float32)
    diff = float(np.max(np.abs(np.asarray(original(x, training=False)) - np.asarray(model(x, training=False)))))
    if not diff <= PARITY_TOL:
        raise BackboneError(
            f"the Keras 3 model {str(path)!r} rebuilt in tf_keras differs by {diff:.3g} (allowed {PARITY_TOL}); "
            "re-save it with tf_keras"
        )
