from __future__ import annotations

import re

import numpy as np
import pytest

from edgetl.errors import BackboneError
from edgetl.host._backbones import count_macs, create_backbone, get_recipe, list_backbones
from edgetl.host._tf import keras

APPLICATION_FAMILIES = [
    "mobilenetv2",
    "mobilenetv2_035",
    "mobilenetv3small",
    "mobilenetv3large",
    "efficientnetb0",
    "efficientnetv2b0",
    "resnet50",
]


def test_registry_covers_the_device_families():
    names = list_backbones()
    for family in APPLICATION_FAMILIES + ["edgetl_cnn", "edgetl_mlp"]:
        assert family in names
    assert list_backbones("features") == ["edgetl_mlp"]


# One family in the fast suite; the others build keras.applications-size graphs (10-25 s each).
@pytest.mark.parametrize(
    "name", [n if n == "mobilenetv3small" else pytest.param(n, marks=pytest.mark.slow) for n in APPLICATION_FAMILIES]
)
def test_application_family_builds_small_and_gives_registry_embedding(name):
    bb = create_backbone(name, (32, 32, 3), weights=None)
    assert bb.model.output_shape == (None, get_recipe(name).embedding_size)
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 32, 32, 3)).astype(np.float32)
    emb = bb.model.predict(x, verbose=0)
    assert emb.shape == (2, bb.embedding_size) and np.all(np.isfinite(emb))
    assert bb.input_spec["value_range"] == [0, 255] and bb.input_spec["shape"] == [32, 32, 3]


def test_builtin_backbones_and_grayscale_input():
    cnn = create_backbone("edgetl_cnn", (8, 8, 1))
    assert cnn.model.output_shape == (None, 256) == (None, get_recipe("edgetl_cnn").embedding_size)
    mlp = create_backbone("edgetl_mlp", (10,))
    assert mlp.model.output_shape == (None, 32)
    gray = create_backbone("mobilenetv3small", (32, 32, 1))
    assert gray.model.get_layer("gray_to_rgb") is not None


def test_resnet_caffe_preprocessing_matches_keras():
    k = keras()
    bb = create_backbone("resnet50", (32, 32, 3))
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 32, 32, 3)).astype(np.float32)
    ours = bb.model.get_layer("caffe_preprocess")(x).numpy()
    np.testing.assert_allclose(ours, k.applications.resnet50.preprocess_input(x.copy()), atol=1e-4)


def test_unknown_backbone_names_the_allowed_ones():
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet51'; allowed: .*mobilenetv2"):
        create_backbone("resnet51", (32, 32, 3))


@pytest.mark.parametrize(
    "name, shape",
    [("mobilenetv2", (8, 8, 1)), ("mobilenetv2", (32, 32, 4)), ("edgetl_mlp", (8, 8, 1)), ("edgetl_cnn", (16,))],
)
def test_input_shape_the_backbone_cannot_take(name, shape):
    with pytest.raises(BackboneError, match=re.escape(f"cannot take input_shape={shape}") + ".*allowed"):
        create_backbone(name, shape)


def test_imagenet_weights_refused_for_builtins_and_missing_weights_file(tmp_path):
    with pytest.raises(BackboneError, match="no imagenet weights"):
        create_backbone("edgetl_cnn", (8, 8, 1), weights="imagenet")
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("edgetl_cnn", (8, 8, 1), weights=str(tmp_path / "none.h5"))


def test_local_weights_file_is_loaded(tmp_path):
    a = create_backbone("edgetl_cnn", (8, 8, 1))
    path = tmp_path / "cnn.weights.h5"
    a.model.save_weights(path)
    b = create_backbone("edgetl_cnn", (8, 8, 1), weights=str(path))
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def _user_classifier():
    k = keras()
    inputs = k.Input((12,), name="x")
    h = k.layers.Dense(24, activation="relu", name="features")(inputs)
    h = k.layers.Dropout(0.2, name="drop")(h)
    out = k.layers.Dense(3, activation="softmax", name="classes")(h)
    return k.Model(inputs, out)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_user_model_file_cut_at_default_and_named_layer(tmp_path, suffix):
    model = _user_classifier()
    path = tmp_path / f"user{suffix}"
    model.save(path)
    default = create_backbone(path, (12,))
    assert default.model.output_shape == (None, 24)  # the layer feeding the classifier, before dropout
    x = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32)
    expected = keras().Model(model.input, model.get_layer("features").output).predict(x, verbose=0)
    np.testing.assert_allclose(default.model.predict(x, verbose=0), expected, rtol=1e-6)
    named = create_backbone(path, cut_layer="classes")
    assert named.model.output_shape == (None, 3)
    with pytest.raises(BackboneError, match="has no layer 'nope'"):
        create_backbone(path, cut_layer="nope")
    with pytest.raises(BackboneError, match=r"takes input_shape=\(12,\), the data has shape \(13,\)"):
        create_backbone(path, (13,))


def test_conv_feature_map_cut_is_pooled(tmp_path):
    k = keras()
    inputs = k.Input((16, 16, 3))
    h = k.layers.Conv2D(5, 3, name="conv")(inputs)
    out = k.layers.Dense(2, activation="softmax")(k.layers.Flatten()(h))
    path = tmp_path / "conv.keras"
    k.Model(inputs, out).save(path)
    assert create_backbone(path, cut_layer="conv").model.output_shape == (None, 5)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_model_file_refused_in_safe_mode(tmp_path, suffix):
    k = keras()
    inputs = k.Input((4,))
    h = k.layers.Lambda(lambda t: t * 2.0, name="code")(inputs)
    out = k.layers.Dense(2, activation="softmax")(k.layers.Dense(3)(h))
    path = tmp_path / f"lambda{suffix}"
    k.Model(inputs, out).save(path)
    with pytest.raises(BackboneError, match="Lambda"):
        create_backbone(path, (4,))
    assert create_backbone(path, (4,), safe_mode=False).model.output_shape == (None, 3)


def test_missing_model_file(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone(tmp_path / "model.keras")


def test_count_macs_of_a_known_graph():
    k = keras()
    inputs = k.Input((8, 8, 3))
    x = k.layers.Conv2D(4, 3, padding="same")(inputs)  # 8*8*3*3*3*4 = 6912
    x = k.layers.DepthwiseConv2D(3, padding="same")(x)  # 8*8*3*3*4 = 2304
    x = k.layers.Dense(5)(k.layers.Flatten()(x))  # 256*5 = 1280
    assert count_macs(k.Model(inputs, x)) == 6912 + 2304 + 1280


def test_batchnorm_follows_the_caller_training_flag():
    """Pretraining must update BatchNorm statistics; a frozen transfer backbone must not."""
    from edgetl.host._transfer import TrainConfig, build_transfer_model

    k = keras()
    bb = create_backbone("mobilenetv3small", (32, 32, 3))
    bn = next(l for l in bb.model.get_layer("MobilenetV3small").layers if isinstance(l, k.layers.BatchNormalization))
    x = np.random.default_rng(0).uniform(0, 255, size=(4, 32, 32, 3)).astype(np.float32)
    before = bn.moving_mean.numpy().copy()
    bb.model(x, training=True)  # the backbone on its own, as pretrain trains it
    trained = bn.moving_mean.numpy().copy()
    assert not np.allclose(trained, before)
    tm = build_transfer_model(bb, 2, TrainConfig())
    tm.model(x, training=True)  # the frozen transfer model: BN stays in inference mode
    np.testing.assert_array_equal(bn.moving_mean.numpy(), trained)
