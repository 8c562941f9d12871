"""Quantization-aware training with tensorflow-model-optimization (tfmot).

tfmot refuses nested models ("Quantizing a keras Model inside another keras Model is not
supported") and raises on layers its 8-bit registry does not know (``Rescaling``,
``Normalization``). edgetl models are nested by design (``features``/``head``, and
keras.applications inside the preprocessing wrapper), so :func:`flatten_model` first
rebuilds a single-level functional model that shares the same layer objects, and
:func:`quantize_aware` annotates only the layers the registry supports; the others stay
float (they are cheap element-wise ops) and are quantized by the TFLite converter from
the representative data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgetl.errors import DependencyError
from edgetl.host._fit import compile_model
from edgetl.host._tf import keras, tf
from edgetl.host._tf_data import to_tf_dataset


def flatten_model(model: Any) -> Any:
    """A single-level functional copy of ``model`` that reuses its layers (and weights)."""
    k = keras()
    inputs = [k.Input(shape=t.shape[1:], name=t.name.split(":")[0].split("/")[0]) for t in model.inputs]
    outputs = _apply_flat(model, inputs)
    return k.Model(inputs, outputs, name=f"{model.name}_flat")


def _apply_flat(model: Any, inputs: list[Any]) -> Any:
    """Run ``model``'s graph on ``inputs`` the way tf_keras' ``Functional._run_internal_graph``
    does, but recurse into nested functional models instead of calling them as one layer."""
    k = keras()
    t = tf()
    usage = model._tensor_usage_count
    tensors: dict[str, list[Any]] = {}
    for ref, value in zip(model.inputs, inputs):
        tensors[str(id(ref))] = [value] * usage[str(id(ref))]
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or any(i not in tensors for i in node.flat_input_ids):
                continue
            args, kwargs = node.map_arguments(tensors)
            layer = node.layer
            if isinstance(layer, k.Model) and getattr(layer, "_is_graph_network", False):
                # The nested call's training=False is not needed: frozen layers (trainable=False)
                # already run BatchNorm in inference mode in Keras 2.
                outputs = _apply_flat(layer, t.nest.flatten(args))
            else:
                outputs = layer(*args, **kwargs)
            for out_id, value in zip(node.flat_output_ids, t.nest.flatten(outputs)):
                tensors[out_id] = [value] * usage[out_id]
    result = [tensors[str(id(ref))].pop() for ref in model.outputs]
    return t.nest.pack_sequence_as(model._nested_outputs, result)


def quantize_aware(model: Any) -> Any:
    """Flatten ``model`` and insert fake-quantization for every tfmot-supported layer."""
    try:
        import tensorflow_model_optimization as tfmot
        from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
            default_8bit_quantize_registry,
        )
    except ImportError as exc:  # pragma: no cover
        raise DependencyError(f'QAT needs tensorflow-model-optimization ({exc}); pip install "edgetl[host]"') from exc
    k = keras()
    flat = flatten_model(model)
    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()

    def annotate(layer: Any) -> Any:
        if isinstance(layer, k.layers.InputLayer) or not registry.supports(layer):
            return layer.__class__.from_config(layer.get_config())
        return tfmot.quantization.keras.quantize_annotate_layer(layer.__class__.from_config(layer.get_config()))

    annotated = k.models.clone_model(flat, clone_function=annotate)
    annotated.set_weights(flat.get_weights())
    with tfmot.quantization.keras.quantize_scope():
        return tfmot.quantization.keras.quantize_apply(annotated)


def train_qat(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    epochs: int,
    learning_rate: float,
    batch_size: int = 32,
    seed: int = 0,
) -> Any:
    """QAT model of ``model`` fine-tuned for ``epochs`` on (x, y); returns the QAT model."""

    k = keras()
    k.utils.set_random_seed(seed)
    qat = quantize_aware(model)
    compile_model(qat, learning_rate, 0.0)
    qat.fit(
        to_tf_dataset(x, y, num_classes=num_classes, batch_size=batch_size, shuffle=True, seed=seed),
        epochs=epochs,
        verbose=0,
    )
    return qat
