"""The int8 TFLite remedy ladder (issue 23, 1b): a model with one deliberately fragile layer
loses everything to post-training int8; the QuantizationDebugger ranking finds that layer,
the ladder keeps it float, and the result passes the gate."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def fragile():
    """A digits classifier (8x8x1) and the same function with one fragile layer.

    ``mix`` reads an extra input channel that is always 0 (``c1``'s ninth filter, bias -1,
    ReLU) with weight 1e4: the float model computes exactly what the healthy one does, but
    per-channel int8 weights take their scale from 1e4, so every real weight of ``mix``
    rounds to zero."""
    from sklearn.datasets import load_digits

    from edgetl.host._tf import keras

    k = keras()
    k.utils.set_random_seed(0)
    d = load_digits()
    keep = d.target < 5
    x = (d.images[keep][..., None] * (255 / 16)).astype(np.float32)
    y = d.target[keep]
    inp = k.Input((8, 8, 1))
    h = k.layers.Rescaling(1 / 255.0)(inp)
    h = k.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(h)
    h = k.layers.Conv2D(8, 1, activation="relu", name="mix")(h)
    h = k.layers.GlobalAveragePooling2D()(h)
    out = k.layers.Dense(5, activation="softmax", name="cls")(h)
    healthy = k.Model(inp, out)
    healthy.compile(optimizer=k.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    healthy.fit(x, y, epochs=30, batch_size=64, verbose=0)

    h = k.layers.Rescaling(1 / 255.0)(inp)
    h = k.layers.Conv2D(9, 3, padding="same", activation="relu", name="c1")(h)
    h = k.layers.Conv2D(8, 1, activation="relu", name="mix")(h)
    h = k.layers.GlobalAveragePooling2D()(h)
    out = k.layers.Dense(5, activation="softmax", name="cls")(h)
    model = k.Model(inp, out)
    w1, b1 = healthy.get_layer("c1").get_weights()
    model.get_layer("c1").set_weights(
        [np.concatenate([w1, np.zeros_like(w1[..., :1])], -1), np.concatenate([b1, [-1.0]]).astype(np.float32)]
    )
    w2, b2 = healthy.get_layer("mix").get_weights()
    model.get_layer("mix").set_weights([np.concatenate([w2, np.full_like(w2[:, :, :1], 1e4)], 2), b2])
    model.get_layer("cls").set_weights(healthy.get_layer("cls").get_weights())
    assert np.allclose(model.predict(x, verbose=0), healthy.predict(x, verbose=0), atol=1e-5)
    order = np.random.default_rng(0).permutation(len(y))
    return model, x[order], y[order]


def _climb(model, x, y):
    from edgetl.host._convert import tflite_converter, to_tflite
    from edgetl.host._export import QuantizeConfig
    from edgetl.host._int8_tflite import Judge, climb
    from edgetl.host._tf import tf

    calib, held_x, held_y = x[:200], x[200:], y[200:]
    q = QuantizeConfig("int8")
    ptq = to_tflite(model, q, calib)

    def factory():
        conv = tflite_converter(model, q, calib)
        conv.target_spec.supported_ops = [tf().lite.OpsSet.TFLITE_BUILTINS]
        return conv

    xs = np.concatenate([held_x, calib])
    judge = Judge(xs, model.predict(xs, verbose=0), held_y, lambda p: p)
    return ptq, climb(factory, calib, ptq, judge)


def test_the_ladder_keeps_the_fragile_layer_float_and_the_gate_passes(fragile):
    model, x, y = fragile
    ptq, climbed = _climb(model, x, y)
    ladder = climbed["ladder"]
    first = ladder["tried"][0]
    assert first["rung"] == "ptq" and first["outcome"] == "fail" and first["accuracy_drop"] > 0.3, ladder
    assert ladder["rung"] == "float-fallback" and ladder["meets_target"], ladder
    assert len(ladder["float_layers"]) == 1 and "mix" in ladder["float_layers"][0], ladder["float_layers"]
    # one of three compute ops (c1, mix, cls) runs float; the file grows by mix's float weights
    assert ladder["float_share"] == pytest.approx(1 / 3, abs=0.01)
    assert ladder["size_ratio_to_ptq"] > 1 and ladder["latency_ratio_to_ptq"] > 0
    assert ladder["tried"][-1]["accuracy_drop"] <= 0.01 and climbed["content"] is not ptq


def test_a_healthy_int8_model_stays_on_the_first_rung(fragile):
    """The same function without the fragile weight: post-training int8 meets the target, no layer goes float."""
    from edgetl.host._tf import keras

    model, x, y = fragile
    k = keras()
    healthy = k.models.clone_model(model)
    healthy.set_weights(model.get_weights())
    w, b = healthy.get_layer("mix").get_weights()
    w[:, :, 8, :] = 0.0
    healthy.get_layer("mix").set_weights([w, b])
    ptq, climbed = _climb(healthy, x, y)
    assert climbed["ladder"]["rung"] == "ptq" and climbed["ladder"]["float_layers"] == []
    assert climbed["content"] is ptq and climbed["ladder"]["float_share"] == 0.0


def test_the_ladder_stops_before_a_file_that_is_mostly_float(fragile, monkeypatch):
    """A rung leaving more than MAX_FLOAT_SHARE of the compute ops float is not an int8 model: with
    the cap below the fragile model's one-of-three, the ladder does not try it and keeps (failing)
    post-training int8 for the gate to refuse, saying why."""
    import edgetl.host._int8_tflite as ladder_module

    model, x, y = fragile
    monkeypatch.setattr(ladder_module, "MAX_FLOAT_SHARE", 0.2)
    ptq, climbed = _climb(model, x, y)
    ladder = climbed["ladder"]
    assert [r["rung"] for r in ladder["tried"]] == ["ptq"] and climbed["content"] is ptq, ladder
    assert ladder["note"] == (
        "stopped before keeping 1 layer(s) float: 33% of the compute ops would run float "
        "(more than 20% is not an int8 model)"
    )


def test_a_backbone_rung_meets_the_target_only_at_the_minimum_agreement():
    """Without labels (a backbone) a rung the gate passes meets the ladder's target only when its
    top-1 agreement with fp32 reaches MIN_TOP1_AGREEMENT as measured (0.896 climbs on)."""
    from edgetl.host._int8_tflite import Rung

    def rung(agreement, drop=None, outcome="pass"):
        return Rung("ptq", b"", [], outcome, drop, agreement)

    assert not rung(0.896).meets_target and rung(0.9).meets_target and rung(0.95).meets_target
    assert not rung(0.95, outcome="thin").meets_target
    assert rung(0.85, drop=0.0).meets_target and not rung(1.0, drop=0.015).meets_target  # labelled: the drop decides
