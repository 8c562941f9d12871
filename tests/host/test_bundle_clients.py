"""A bundle made by edgetl export, used by clients that are not edgetl.

MediaPipe Tasks (``ImageClassifier``, ``ImageEmbedder``; the Android/iOS/web task APIs use
the same C++ core) run the exported TFLite files as they are, reading labels and
normalization from the TFLite Model Metadata edgetl writes; onnxruntime reads the labels
back from the ONNX model's ``metadata_props``. MediaPipe runs in a throwaway venv
(tests/host/mediapipe_peer.py) and the tests skip, saying why, only when it cannot be
installed.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_tool
from model_metadata_readers import read_onnx_metadata, read_tflite_metadata

from edgetl.device import Classifier


@pytest.fixture(scope="module")
def rgb_bundle(tmp_path_factory):
    """A user's RGB model (tools/user_models.py) transferred to digit photos, exported fp32 + int8."""
    from edgetl import host

    um = load_tool("user_models")
    base = tmp_path_factory.mktemp("clients")
    model = um.dense_classifier_model(base / "user.keras", epochs=3)
    x, y = um.digit_images(tuple(range(10)), 32, 3, seed=1, restyle=True, per_class=40)
    names = tuple(f"digit {i}" for i in range(10))  # spaces: labels.txt is one label per line
    data = host.Dataset(x, y, names, "image", "photos")
    result = host.train(data, host.TrainConfig(backbone=str(model)))
    run = host.save_run(result, base / "run")
    splits = result.config.split(data)
    out = host.export_bundle(run, base / "photos.edgetl", quantize=["int8"], calibration=data, version="3")
    assert out.ok and not out.omitted, out.describe()
    return out.bundle, splits.test


def test_every_model_file_describes_itself(rgb_bundle):
    bundle, _ = rgb_bundle
    for precision in ("fp32", "int8"):
        fused = read_tflite_metadata(bundle.artifact("fused", "tflite", precision).read_bytes())
        assert fused["kind"] == "classifier" and fused["labels"] == bundle.labels and fused["version"] == "3"
        assert fused["input"]["mean"] == [0.0] and fused["input"]["std"] == [1.0]  # preprocessing is inside
        assert (fused["input"]["width"], fused["input"]["height"], fused["input"]["color_space"]) == (32, 32, "RGB")
        backbone = read_tflite_metadata(bundle.artifact("backbone", "tflite", precision).read_bytes())
        assert backbone["kind"] == "embedder" and backbone["labels"] is None
        meta = read_onnx_metadata(bundle.artifact("fused", "onnx", precision))
        assert meta["labels"] == bundle.labels and meta["input_spec"]["shape"] == [32, 32, 3]
        assert meta["props"]["edgetl.bundle_version"] == "3"
    entry = next(a for a in bundle.manifest.artifacts if a.file == "model.int8.tflite")
    assert entry.extra["metadata"] == "tflite_model_metadata"


def test_bundle_with_metadata_still_verifies_and_runs(rgb_bundle):
    from edgetl.bundle import read_bundle
    from edgetl.device import verify_bundle

    bundle, test = rgb_bundle
    report = verify_bundle(read_bundle(bundle.path), test.x, test.y)
    assert report.ok, report.describe()
    for backend in ("onnxruntime", "litert"):
        assert len(Classifier.open(bundle.path, backend=backend, precision="int8").predict(test.x[:4]).labels) == 4


@pytest.fixture(scope="module")
def mediapipe():
    import mediapipe_peer

    reason = mediapipe_peer.skip_reason()
    if reason:
        pytest.skip(f"MediaPipe unavailable: {reason}")
    return mediapipe_peer


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_mediapipe_image_classifier_runs_the_exported_file_and_agrees_with_edgetl(mediapipe, rgb_bundle, precision):
    bundle, test = rgb_bundle
    out = mediapipe.run_client(bundle.artifact("fused", "tflite", precision), test.x, "classify")
    assert "error" not in out, out
    ours = Classifier.open(bundle.path, backend="litert", precision=precision).predict(test.x)
    theirs = [r["categories"][0]["category_name"] for r in out["results"]]
    agreement = float(np.mean(np.asarray(theirs) == np.asarray(ours.labels)))
    print(
        f"\nMediaPipe ImageClassifier vs edgetl predict ({precision}): top-1 agreement {agreement:.3f} on {len(test)} "
        "held-out images"
    )
    assert len(test) >= 50 and agreement >= 0.98


def test_mediapipe_image_embedder_runs_the_exported_backbone(mediapipe, rgb_bundle):
    bundle, test = rgb_bundle
    out = mediapipe.run_client(bundle.artifact("backbone", "tflite"), test.x, "embed")
    assert "error" not in out, out
    got = np.array([r["embedding"] for r in out["results"]], dtype=np.float32)
    ref = Classifier.open(bundle.path, backend="litert").embed(test.x)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert got.shape == ref.shape and cos.min() >= 0.99
