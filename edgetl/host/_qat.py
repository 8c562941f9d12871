"""Quantization-aware training with tensorflow-model-optimization (tfmot).

tfmot refuses nested models ("Quantizing a keras Model inside another keras Model is not
supported") and raises on layers its 8-bit registry does not know (``Rescaling``,
``Normalization``). edgetl models are nested by design (``features``/``head``, and
keras.applications inside the preprocessing wrapper), so :func:`flatten_model` first
rebuilds a single-level functional model that shares the same layer objects, and
:func:`quantize_aware` annotates only the layers the registry supports; the others stay
float (they are cheap element-wise ops) and are quantized by the TFLite converter from
the representative data.

Why QAT used to end 5-12 points below fp32 and below PTQ on MobileNetV2 (issue 23, measured
layer by layer against the float model, ``/tmp`` probes summarized here):

1. the seam's ``Normalization`` kept stale mean/variance tensors (0 and 1) after cloning,
   so the QAT model did not standardize embeddings: agreement with fp32 0.47 before any
   training (fixed in :func:`quantize_aware`: ``finalize_state``);
2. tfmot's wrappers made every wrapped kernel trainable, so fine-tuning moved the frozen
   pretrained backbone (backbone cosine to fp32 0.24): wrappers now keep the layer's flag;
3. activation ranges started at [-6, 6] and moved by a 0.999 moving average, so they never
   reached the real ranges in an export's few steps: :func:`calibrate_ranges`;
4. BatchNorm was not annotated, so tfmot's Conv+BN transform did not fire and QAT
   fake-quantized convolution outputs before BatchNorm, a graph TFLite never runs.

And QAT is kept only when it is not worse than post-training int8 on held-out data
(``edgetl.host._export.qat_versus_ptq``).
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

    folded = _batchnorms_after_conv(flat)

    def annotate(layer: Any) -> Any:
        # Depthwise kernels stay float here: tfmot quantizes them per tensor (its per-axis is
        # the depth multiplier), TFLite per channel; the converter calibrates them instead.
        skip = isinstance(layer, (k.layers.InputLayer, k.layers.DepthwiseConv2D))
        if skip or not (registry.supports(layer) or layer.name in folded):
            return layer.__class__.from_config(layer.get_config())
        return tfmot.quantization.keras.quantize_annotate_layer(layer.__class__.from_config(layer.get_config()))

    annotated = k.models.clone_model(flat, clone_function=annotate)
    annotated.set_weights(flat.get_weights())
    with tfmot.quantization.keras.quantize_scope():
        qat = tfmot.quantization.keras.quantize_apply(annotated)
    trains = _trains(model, flat)
    for layer in qat.layers:
        inner = getattr(layer, "layer", None)
        if inner is not None and not trains.get(inner.name, True):
            # tfmot's wrappers train whatever the run froze: QuantizeWrapperV2.build copies the
            # wrapped kernel into its own trainable list, so the flag alone does not freeze it.
            inner.trainable = layer.trainable = False
            layer._non_trainable_weights += layer._trainable_weights
            layer._trainable_weights = []
        if isinstance(layer, k.layers.Normalization) and hasattr(layer, "adapt_mean"):
            # Cloned with its weights set after build, tf_keras' Normalization keeps the mean
            # and variance *tensors* build() took from them (0 and 1): the QAT model skipped
            # the seam's standardization (head agreement with fp32 0.47 on MobileNetV2-0.35).
            layer.finalize_state()
    return qat


def _trains(model: Any, flat: Any) -> dict[str, bool]:
    """Layer name -> whether the run trained it, for ``flat``'s layers (see :func:`_nested_layers`)."""
    out = {layer.name: trains for layer, trains in _nested_layers(model)}
    return {layer.name: out.get(layer.name, layer.trainable) for layer in flat.layers}


def _nested_layers(model: Any) -> list[tuple[Any, bool]]:
    """Every layer of ``model``, nested models' included, and whether the run trained it. A layer
    inside a frozen nested model (the ``features`` of an ``edgetl train`` run) may still say
    ``trainable`` itself: Keras freezes it through its parent, which flattening removes."""
    k = keras()
    out: list[tuple[Any, bool]] = []

    def walk(m: Any, parent: bool) -> None:
        for layer in m.layers:
            trains = parent and layer.trainable
            if isinstance(layer, k.Model):
                walk(layer, trains)
            out.append((layer, trains))

    walk(model, model.trainable)
    return out


def float_twin(model: Any, qat: Any) -> Any:
    """A copy of ``model`` (same layers, same nesting) holding the weights QAT trained: the layers
    the run trained take the QAT model's float weights (a wrapper's inner layer holds them, before
    fake-quantization), the frozen ones keep the run's. Returns a string saying why when a trained
    layer's weights cannot be read back (not in the QAT model, or of other shapes).

    What it is for: the QAT ONNX. tf2onnx cannot convert the QAT Keras model (its
    ``FakeQuantWithMinMaxVars`` stay unconverted, ``tools/qat_onnx_check.py``), and converting the
    QAT TFLite file leaves a layout Transpose around each convolution (55 in MobileNetV3Small's
    QAT ONNX, 0 in its int8 ONNX). The twin converts like the fp32 model, and onnxruntime
    quantizes it as it does int8 (``edgetl.host._export``).
    """
    k = keras()
    twin = k.models.clone_model(model)
    twin.set_weights(model.get_weights())
    # A wrapper holds its inner layer's variables (named "<layer>/<variable>") beside its quantizers'
    # ("quant_<layer>/..."); the inner layer itself no longer lists the kernel it quantizes.
    held: dict[str, dict[str, Any]] = {}
    for layer in qat.layers:
        inner = getattr(layer, "layer", layer)
        own = (
            [w for w in layer.weights if not w.name.startswith(f"{layer.name}/")]
            if inner is not layer
            else layer.weights
        )
        held[inner.name] = {w.name.split("/")[-1]: w for w in own}
    for layer, trains in _nested_layers(twin):
        if not trains or not layer.weights or isinstance(layer, k.Model):
            continue
        source = held.get(layer.name, {})
        values = [source.get(w.name.split("/")[-1]) for w in layer.weights]
        if not source or any(v is None or tuple(v.shape) != tuple(w.shape) for v, w in zip(values, layer.weights)):
            found = {name: tuple(v.shape) for name, v in source.items()}
            return f"the QAT model holds no weights {[w.name for w in layer.weights]} of layer {layer.name!r} ({found})"
        layer.set_weights([v.numpy() for v in values])
    return twin


def _batchnorms_after_conv(flat: Any) -> set[str]:
    """BatchNormalization layers that follow a convolution. The registry does not support
    BatchNormalization alone, so they used to stay unannotated, and then tfmot's Conv+BN
    transform did not fire: QAT fake-quantized the convolution's output *before* BatchNorm
    (per tensor, with BatchNorm's per-channel scale applied after), a graph TFLite never
    runs (it folds BatchNorm into the convolution). Annotated, the transform moves the
    quantization after BatchNorm, as in the deployed model (MobileNetV2-0.35 QAT before
    fine-tuning: agreement with fp32 0.47 -> see tools/int8_targets.py)."""
    k = keras()
    convs = (k.layers.Conv2D,)  # not DepthwiseConv2D (left float, see quantize_aware)
    out = set()
    for layer in flat.layers:
        if isinstance(layer, k.layers.BatchNormalization):
            inbound = layer.inbound_nodes[-1].inbound_layers
            inbound = inbound if isinstance(inbound, list) else [inbound]
            if len(inbound) == 1 and isinstance(inbound[0], convs):
                out.add(layer.name)
    return out


def calibrate_ranges(qat: Any, flat: Any, x: np.ndarray, batch_size: int = 32) -> int:
    """Start every activation range of ``qat`` where post-training int8 would: the min/max
    (with 0 inside, as TFLite's calibration) of the float layer's output on ``x``; returns
    how many ranges were set.

    Why: tfmot starts activation ranges at [-6, 6] and moves them by a 0.999 moving average
    per training step, so the ~50 steps of an export's QAT leave them near [-6, 6]:
    MobileNetV2's linear bottlenecks and the standardized embedding (|e| up to ~10) were
    clipped, and QAT ended below PTQ (issue 23: 5-12 points below fp32)."""
    k = keras()
    wrapped = {layer.layer.name: layer for layer in qat.layers if getattr(layer, "layer", None) is not None}
    names = [layer.name for layer in flat.layers if layer.name in wrapped]
    # A layer shared with the run's nested model has a node per graph: flat's is the newest.
    probe = k.Model(flat.input, [flat.get_layer(n).get_output_at(-1) for n in names])
    lo = {n: 0.0 for n in names}
    hi = {n: 0.0 for n in names}
    for i in range(0, len(x), batch_size):
        outs = probe(np.asarray(x[i : i + batch_size], np.float32), training=False)
        for n, o in zip(names, outs if len(names) > 1 else [outs]):
            lo[n], hi[n] = min(lo[n], float(np.min(o))), max(hi[n], float(np.max(o)))
    count = 0
    for n in names:
        for w in wrapped[n].weights:
            tail = w.name.split("/")[-1]
            if tail.startswith(("post_activation_", "output_")):
                w.assign(np.full(w.shape, lo[n] if "_min" in tail else hi[n], np.float32))
                count += 1
    return count


CALIBRATION_SAMPLES = 200  # training examples the starting activation ranges are measured on


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
    rows = np.sort(np.random.default_rng(seed).permutation(len(y))[:CALIBRATION_SAMPLES])
    sample = x[rows] if isinstance(x, np.ndarray) else x.take(rows)  # streamed data decodes only these
    calibrate_ranges(qat, flatten_model(model), np.asarray(sample, np.float32))
    compile_model(qat, learning_rate, 0.0)
    qat.fit(
        to_tf_dataset(x, y, num_classes=num_classes, batch_size=batch_size, shuffle=True, seed=seed),
        epochs=epochs,
        verbose=0,
    )
    return qat
