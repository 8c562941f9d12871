"""Model files saved by Keras 3 (``import keras`` under TensorFlow 2.21) work as backbones:
loaded, rebuilt in tf_keras with the same outputs, trained on, exported and verified."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.errors import BackboneError


@pytest.fixture(scope="module")
def keras3():
    import keras

    assert keras.__version__.startswith("3.")
    return keras


def _digits_cnn(keras3, functional: bool):
    """A small classifier of 8x8 gray digits, as a user would write it in Keras 3."""
    L = keras3.layers
    if not functional:
        return keras3.Sequential(
            [
                keras3.Input((8, 8, 1)),
                L.Rescaling(1 / 255.0),
                L.Conv2D(16, 3, padding="same", activation="relu"),
                L.BatchNormalization(),
                L.Flatten(),
                L.Dense(32, activation="relu"),
                L.Dense(5, activation="softmax"),
            ]
        )
    x = keras3.Input((8, 8, 1))
    s = L.Rescaling(1 / 255.0)(x)
    a = L.Conv2D(8, 3, padding="same", activation="relu")(s)
    b = L.Conv2D(8, 1)(s)
    h = L.Concatenate()([L.Add()([a, b]), a])
    h = L.Dense(32, activation="relu")(L.GlobalAveragePooling2D()(h))
    return keras3.Model(x, L.Dense(5, activation="softmax")(h))


@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_files_are_rebuilt_in_tf_keras_with_the_same_outputs(tmp_path, keras3, functional, suffix):
    from edgetl.host._backbones import load_keras_model
    from edgetl.host._keras3 import saved_by_keras3

    original = _digits_cnn(keras3, functional)
    path = tmp_path / f"model{suffix}"
    original.save(path)
    assert saved_by_keras3(path)
    model = load_keras_model(path)
    import tf_keras

    assert isinstance(model, tf_keras.Model)
    x = np.random.default_rng(1).uniform(0, 255, (16, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0), original.predict(x, verbose=0), atol=1e-6)
    assert [w.shape for w in model.get_weights()] == [w.shape for w in original.get_weights()]


def test_tf_keras_files_are_not_taken_for_keras3(tmp_path):
    import tf_keras

    from edgetl.host._keras3 import saved_by_keras3

    model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(2)])
    for suffix in (".keras", ".h5"):
        model.save(tmp_path / f"m{suffix}")
        assert not saved_by_keras3(tmp_path / f"m{suffix}")


def test_a_keras3_lambda_layer_is_refused_under_safe_mode(tmp_path, keras3):
    from edgetl.host._backbones import load_keras_model

    model = keras3.Sequential([keras3.Input((4,)), keras3.layers.Lambda(lambda t: t * 2), keras3.layers.Dense(2)])
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(BackboneError, match="Lambda"):
        load_keras_model(tmp_path / "lambda.keras")


def test_a_keras3_model_file_trains_exports_and_verifies(tmp_path, keras3, digits_source, digits_target):
    """The user's Keras 3 classifier of digits 0-4, cut before its classifier, transfers to
    digits 5-9; the exported bundle passes every verification gate."""
    from edgetl.data import stratified_split
    from edgetl.device import verify_bundle
    from edgetl.host import TrainConfig, export_bundle, save_run, train

    keras3.utils.set_random_seed(0)
    user_model = _digits_cnn(keras3, functional=False)
    user_model.compile("adam", "sparse_categorical_crossentropy")
    user_model.fit(digits_source.x.astype(np.float32), digits_source.y, epochs=8, verbose=0)
    path = tmp_path / "users_model.keras"
    user_model.save(path)
    halves = stratified_split(digits_target, val_fraction=0.0, test_fraction=0.3, seed=0)
    result = train(halves.train, TrainConfig(backbone=str(path), val_fraction=0.1, test_fraction=0.2))
    assert result.metrics["test_accuracy"] > 0.85, result.metrics
    run = save_run(result, tmp_path / "run")
    exported = export_bundle(run, tmp_path / "b.edgetl", quantize=["none"], evaluation=halves.test)
    assert exported.ok, exported.describe()
    report = verify_bundle(exported.bundle)
    assert report.ok, report


def test_a_keras3_export_savedmodel_is_refused_with_what_to_do(tmp_path, keras3):
    from edgetl.host._backbones import load_keras_model

    keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2)]).export(tmp_path / "exported")
    with pytest.raises(BackboneError, match=r"SavedModel without Keras layers.*model.save\('model.keras'\)"):
        load_keras_model(tmp_path / "exported")


def test_a_keras3_layer_tf_keras_lacks_is_named(tmp_path, keras3):
    """A real Keras 3 layer with no tf_keras counterpart (RMSNormalization): refused by name."""
    from edgetl.host._backbones import load_keras_model

    model = keras3.Sequential(
        [keras3.Input((8,)), keras3.layers.RMSNormalization(name="rms"), keras3.layers.Dense(2, activation="softmax")]
    )
    model.save(tmp_path / "rms.keras")
    with pytest.raises(BackboneError, match=r"layer 'rms' is a Keras 3 RMSNormalization, which tf_keras lacks"):
        load_keras_model(tmp_path / "rms.keras")


def test_a_tf_keras_savedmodel_is_a_backbone(tmp_path, capsys):
    """tf_keras's SavedModel (``model.save(dir, save_format="tf")``) keeps its Keras layers:
    loaded as it is (not taken for Keras 3), same outputs, and `edgetl layers` shows the cut."""
    import tf_keras

    from edgetl.cli import main
    from edgetl.host._backbones import load_keras_model
    from edgetl.host._keras3 import saved_by_keras3

    L = tf_keras.layers
    model = tf_keras.Sequential(
        [tf_keras.Input((8, 8, 1)), L.Conv2D(4, 3, activation="relu"), L.Flatten(), L.Dense(8, activation="relu")]
        + [L.Dense(3, activation="softmax")]
    )
    path = tmp_path / "saved_model"
    model.save(path, save_format="tf")
    assert path.is_dir() and not saved_by_keras3(path)
    loaded = load_keras_model(path)
    assert isinstance(loaded, tf_keras.Model)
    x = np.random.default_rng(2).uniform(0, 255, (8, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert main(["layers", str(path)]) == 0
    cut = [line for line in capsys.readouterr().out.splitlines() if "<- embedding" in line]
    assert len(cut) == 1 and cut[0].split()[1] == "Dense", cut
