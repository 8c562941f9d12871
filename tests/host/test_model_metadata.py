"""TFLite Model Metadata and ONNX metadata_props: written, read back, runtime-neutral, and accepted by MediaPipe.

The models are tiny Keras models trained here for a few steps on synthetic images (a coloured patch
says the class), so their outputs are far from uniform and a wrong label order would show. The
MediaPipe tests run MediaPipe Tasks' real Python ImageClassifier/ImageEmbedder in a throwaway venv
(tests/host/mediapipe_peer.py) and are skipped only when MediaPipe cannot be installed.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from model_metadata_readers import decode_metadata, read_onnx_metadata, read_tflite_metadata

from edgetl.errors import InputError
from edgetl.host._onnx_metadata import edgetl_onnx_props, write_onnx_metadata
from edgetl.host._tflite_metadata import TFLiteModelInfo, min_parser_version, write_tflite_metadata

LABELS = ("red", "green", "blue", "grüne Äpfel")  # a non-ASCII label with a space: labels.txt is UTF-8
SIZE = 32
COLORS = np.array([[255, 40, 40], [40, 255, 40], [40, 40, 255], [255, 255, 255]], dtype=np.float32)
INPUT_SPEC = {
    "shape": [SIZE, SIZE, 3],
    "dtype": "float32",
    "kind": "image",
    "layout": "NHWC",
    "value_range": [0, 255],
    "preprocessing": "raw RGB pixels in [0, 255]; rescaling inside the model",
}


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images: dim noise plus one 10x10 patch whose colour is the class, at a random place."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(LABELS), n)
    x = rng.uniform(0, 90, (n, SIZE, SIZE, 3)).astype(np.float32)
    for i, k in enumerate(y):
        r, c = rng.integers(0, SIZE - 10, 2)
        x[i, r : r + 10, c : c + 10] = COLORS[k] * rng.uniform(0.6, 1.0)
    return np.clip(x, 0, 255).astype(np.uint8), y


def _litert(model: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    idx = it.get_input_details()[0]["index"]
    it.resize_tensor_input(idx, list(x.shape))
    it.allocate_tensors()
    it.set_tensor(idx, x.astype(np.float32))
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).copy()


def _ort(model: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def models():
    """fp32 + full-int8 (float I/O) TFLite classifier, fp32 TFLite embedder, ONNX classifier; held-out images."""
    from edgetl.host._tf import keras, tf

    k, t = keras(), tf()
    k.utils.set_random_seed(0)
    x, y = _images(400, seed=1)
    inp = k.Input((SIZE, SIZE, 3), name="image")
    h = k.layers.Rescaling(1 / 255.0)(inp)
    h = k.layers.Conv2D(16, 3, activation="relu", padding="same")(h)
    emb = k.layers.GlobalAveragePooling2D()(h)
    clf = k.Model(inp, k.layers.Dense(len(LABELS), activation="softmax")(emb))
    clf.compile(k.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    clf.fit(x.astype(np.float32), y, epochs=12, batch_size=32, verbose=0)
    embedder = k.Model(inp, emb)

    def convert(model, int8: bool = False) -> bytes:
        conv = t.lite.TFLiteConverter.from_keras_model(model)
        if int8:
            calib = x[:100].astype(np.float32)
            conv.optimizations = [t.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(len(calib)))
            conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = conv.inference_output_type = t.float32
        with warnings.catch_warnings():  # TensorFlow's int8 calibrator warns about its own internals
            warnings.simplefilter("ignore")
            return conv.convert()

    import tf2onnx

    spec = (t.TensorSpec((None, SIZE, SIZE, 3), t.float32, name="image"),)
    onnx_model, _ = tf2onnx.convert.from_keras(clf, input_signature=spec, opset=13)
    test_x, test_y = _images(60, seed=2)
    return {
        "fp32": convert(clf),
        "int8": convert(clf, int8=True),
        "embedder": convert(embedder),
        "onnx": onnx_model.SerializeToString(),
        "x": test_x,
        "y": test_y,
    }


def _info(kind: str = "classifier", **kw) -> TFLiteModelInfo:
    base = dict(
        name="patches",
        description="Colour of the patch.",
        version="1.2.0",
        kind=kind,
        width=SIZE,
        height=SIZE,
        labels=LABELS if kind == "classifier" else (),
    )
    return TFLiteModelInfo(**{**base, **kw})


@pytest.fixture(scope="module")
def with_metadata(models):
    return {
        "fp32": write_tflite_metadata(models["fp32"], _info()),
        "int8": write_tflite_metadata(models["int8"], _info()),
        "embedder": write_tflite_metadata(models["embedder"], _info("embedder")),
    }


# ---------------------------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_classifier_metadata_reads_back(models, with_metadata, precision):
    assert read_tflite_metadata(models[precision]) is None  # nothing there before
    md = read_tflite_metadata(with_metadata[precision])
    general = (md["name"], md["description"], md["version"], md["author"])
    assert general == ("patches", "Colour of the patch.", "1.2.0", "edgetl")
    assert md["kind"] == "classifier" and md["labels"] == list(LABELS)
    assert md["min_parser_version"] == "1.0.0"  # as MediaPipe's populator computes it for these fields
    i = md["input"]
    assert (i["color_space"], i["width"], i["height"], i["channels"], i["dtype"]) == ("RGB", SIZE, SIZE, 3, "float32")
    assert (i["mean"], i["std"], i["value_range"]) == ([0.0], [1.0], [0.0, 255.0])
    assert md["output"]["score_type"] == "probability" and md["output"]["shape"] == [1, len(LABELS)]
    # Both a valid flatbuffer (above) and a valid zip holding exactly labels.txt, stored uncompressed.
    with zipfile.ZipFile(io.BytesIO(with_metadata[precision])) as zf:
        assert zf.testzip() is None
        assert [(e.filename, e.compress_type) for e in zf.infolist()] == [("labels.txt", zipfile.ZIP_STORED)]
        assert zf.read("labels.txt").decode("utf-8").split("\n") == list(LABELS)
    # An independent parser, the TFLite schema's generated code, sees one TFLITE_METADATA entry
    # whose buffer is a ModelMetadata flatbuffer.
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAs(with_metadata[precision], 0)
    entries = [model.Metadata(j) for j in range(model.MetadataLength())]
    ours = [e for e in entries if e.Name() == b"TFLITE_METADATA"]
    assert len(ours) == 1
    buf = model.Buffers(ours[0].Buffer()).DataAsNumpy().tobytes()
    assert buf[4:8] == b"M001"
    assert decode_metadata(buf)["subgraph_metadata"][0]["output_tensor_metadata"][0]["name"] == "probability"


def test_embedder_metadata_and_replacing_metadata(models, with_metadata):
    md = read_tflite_metadata(with_metadata["embedder"])
    assert md["kind"] == "embedder" and md["labels"] is None and md["associated_files"] == []
    assert md["output"]["name"] == "embedding" and md["input"]["mean"] == [0.0]
    # Writing again replaces: one entry, the new labels, one labels.txt, no growth beyond the change.
    again = write_tflite_metadata(with_metadata["fp32"], _info(labels=("a", "b", "c", "d"), version="2"))
    md = read_tflite_metadata(again)
    assert md["labels"] == ["a", "b", "c", "d"] and md["version"] == "2"
    assert zipfile.ZipFile(io.BytesIO(again)).namelist() == ["labels.txt"]
    from ai_edge_litert import schema_py_generated as fb

    m = fb.Model.GetRootAs(again, 0)
    names = [m.Metadata(j).Name() for j in range(m.MetadataLength())]
    assert names.count(b"TFLITE_METADATA") == 1
    assert m.BuffersLength() == fb.Model.GetRootAs(with_metadata["fp32"], 0).BuffersLength()
    # Same input, same bytes: exports stay reproducible.
    assert write_tflite_metadata(models["fp32"], _info()) == with_metadata["fp32"]


def test_reader_needs_no_tensorflow(with_metadata, models, tmp_path):
    """The device side reads both formats' metadata with TensorFlow (and the onnx package) unimportable."""
    tfl, onx = tmp_path / "m.tflite", tmp_path / "m.onnx"
    tfl.write_bytes(with_metadata["int8"])
    onx.write_bytes(
        write_onnx_metadata(
            models["onnx"],
            edgetl_onnx_props(bundle_name="b", bundle_version="1", input_spec=INPUT_SPEC, labels=list(LABELS)),
            doc_string="d",
            input_docs={},
            output_docs={},
        )
    )
    code = textwrap.dedent(
        """
        import sys, json, importlib.abc
        HEAVY = ("tensorflow", "tf_keras", "keras", "tf2onnx", "onnx")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in HEAVY:
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, sys.argv[3])
        from model_metadata_readers import read_onnx_metadata, read_tflite_metadata
        a = read_tflite_metadata(open(sys.argv[1], "rb").read())
        b = read_onnx_metadata(sys.argv[2])
        assert not [m for m in sys.modules if m.split(".")[0] in HEAVY]
        print(json.dumps([a["labels"], a["kind"], b["labels"]]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tfl), str(onx), str(Path(__file__).parents[1])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [list(LABELS), "classifier", list(LABELS)]


def test_min_parser_version_follows_the_schema_rules():
    """Each rule of metadata_version.cc, through an encode/decode round trip of the flatbuffer codec."""
    from edgetl.host._tflite_metadata import _metadata_bytes

    def sg(**fields):
        tensor = {"name": "t", **fields.pop("tensor", {})}
        return {"name": "m", "subgraph_metadata": [{"input_tensor_metadata": [tensor], **fields}]}

    cases = [
        (sg(), "1.0.0"),
        (sg(tensor={"associated_files": [{"name": "v.txt", "type": 5}]}), "1.0.1"),  # VOCABULARY
        (sg(input_process_units=[]), "1.1.0"),  # present, even empty
        (sg(output_tensor_groups=[{"name": "g", "tensor_names": ["t"]}]), "1.2.0"),
        (
            sg(tensor={"process_units": [{"options": {"_type": "RegexTokenizerOptions", "delim_regex_pattern": " "}}]}),
            "1.2.1",
        ),
        (
            sg(
                tensor={
                    "content": {"content_properties": {"_type": "AudioProperties", "sample_rate": 16000, "channels": 1}}
                }
            ),
            "1.3.0",
        ),
        (sg(tensor={"associated_files": [{"name": "i", "type": 6}]}), "1.4.0"),  # SCANN_INDEX_FILE
        (sg(tensor={"associated_files": [{"name": "l.txt", "type": 2, "version": "7"}]}), "1.4.1"),
        (sg(custom_metadata=[{"name": "c", "data": b"\x01\x02"}]), "1.5.0"),
    ]
    for md, expected in cases:
        decoded = decode_metadata(_metadata_bytes(md))
        assert min_parser_version(decoded) == expected, md
    decoded = decode_metadata(_metadata_bytes(cases[5][0]))
    props = decoded["subgraph_metadata"][0]["input_tensor_metadata"][0]["content"]["content_properties"]
    assert (props["_type"], props["sample_rate"], props["channels"]) == ("AudioProperties", 16000, 1)


def test_onnx_metadata_reads_back(models):
    props = edgetl_onnx_props(
        bundle_name="patches", bundle_version="1.2.0", input_spec=INPUT_SPEC, labels=list(LABELS), license="Apache-2.0"
    )
    model = write_onnx_metadata(
        models["onnx"],
        props,
        doc_string="Colour of the patch.",
        input_docs={"image": "raw RGB pixels, NHWC, [0, 255]"},
        output_docs={},
    )
    md = read_onnx_metadata(model)
    assert md["labels"] == list(LABELS) and md["input_spec"] == INPUT_SPEC
    assert md["description"] == "Colour of the patch."
    assert {
        k: md["props"][k]
        for k in (
            "edgetl.bundle_name",
            "edgetl.bundle_version",
            "model_author",
            "model_license",
            "Image.BitmapPixelFormat",
            "Image.NominalPixelRange",
        )
    } == {
        "edgetl.bundle_name": "patches",
        "edgetl.bundle_version": "1.2.0",
        "model_author": "edgetl",
        "model_license": "Apache-2.0",
        "Image.BitmapPixelFormat": "Rgb8",
        "Image.NominalPixelRange": "NominalRange_0_255",
    }
    assert md["props"]["edgetl.producer"].startswith("edgetl ")
    import onnx

    proto = onnx.load_from_string(model)
    assert [i.doc_string for i in proto.graph.input if i.name == "image"] == ["raw RGB pixels, NHWC, [0, 255]"]
    # Replacing a key keeps the others.
    again = read_onnx_metadata(
        write_onnx_metadata(model, {"edgetl.bundle_version": "2"}, doc_string="x", input_docs={}, output_docs={})
    )
    assert again["props"]["edgetl.bundle_version"] == "2" and again["labels"] == list(LABELS)


# ---------------------------------------------------------------------------------------------- (b)


def test_runtime_outputs_are_unchanged(models, with_metadata):
    x = models["x"].astype(np.float32)
    for key in ("fp32", "int8", "embedder"):
        before, after = _litert(models[key], x), _litert(with_metadata[key], x)
        assert np.array_equal(before, after), key
    probs = _litert(models["fp32"], x)
    assert probs.max(axis=1).mean() > 0.6 and (probs.argmax(1) == models["y"]).mean() > 0.9  # a real classifier
    onnx_after = write_onnx_metadata(
        models["onnx"], {"edgetl.labels": json.dumps(LABELS)}, doc_string="d", input_docs={}, output_docs={}
    )
    assert np.array_equal(_ort(models["onnx"], x), _ort(onnx_after, x))


def test_large_model_stays_fast_and_intact(models):
    """16 MB of weights (here an extra 16 MB buffer, as in EfficientNetB0) is rewritten in well under 2 s."""
    import time

    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    m = fb.ModelT.InitFromPackedBuf(models["fp32"], 0)
    payload = np.random.default_rng(4).integers(0, 256, 16 << 20, dtype=np.uint8)
    big = fb.BufferT()
    big.data = payload
    m.buffers.append(big)
    builder = flatbuffers.Builder(0)
    builder.Finish(m.Pack(builder), b"TFL3")
    large = bytes(builder.Output())
    start = time.perf_counter()
    out = write_tflite_metadata(large, _info())
    seconds = time.perf_counter() - start
    assert seconds < 2.0, seconds
    assert read_tflite_metadata(out)["labels"] == list(LABELS)
    kept = fb.Model.GetRootAs(out, 0).Buffers(len(m.buffers) - 1).DataAsNumpy()
    assert np.array_equal(kept, payload)
    x = models["x"][:4].astype(np.float32)
    assert np.array_equal(_litert(large, x), _litert(out, x))


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")  # inside tf2onnx, not edgetl
def test_tf2onnx_still_converts_the_tflite(models, with_metadata, tmp_path):
    import tf2onnx

    x = models["x"][:8].astype(np.float32)
    outs = []
    for name, data in (("plain", models["fp32"]), ("meta", with_metadata["fp32"])):
        path = tmp_path / f"{name}.tflite"
        path.write_bytes(data)
        proto, _ = tf2onnx.convert.from_tflite(str(path), opset=13)
        outs.append(_ort(proto.SerializeToString(), x))
    assert np.array_equal(outs[0], outs[1]) and np.allclose(outs[1], _litert(models["fp32"], x), atol=1e-5)


# ---------------------------------------------------------------------------------------------- (c)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": ()}, "needs at least one label"),
        ({"labels": ["a", "b\nc", "d", "e"]}, r"labels\[1\] must be a non-empty single-line string"),
        ({"labels": ["a", "a", "b", "c"]}, "must be distinct"),
        ({"mean": (0.0, 0.0, 0.0), "std": (1.0,)}, "same length"),
        ({"mean": (0.0, 0.0), "std": (1.0, 1.0)}, r"1 or channels \(3\)"),
        ({"std": (0.0,)}, "must be > 0"),
        ({"kind": "detector"}, "kind must be one of"),
        ({"color_space": "GRAYSCALE"}, "GRAYSCALE has 1 channel"),
        ({"value_range": (255, 0)}, "min < max"),
        ({"width": 0}, "width must be an integer"),
    ],
)
def test_bad_model_info_is_refused_clearly(kwargs, message):
    with pytest.raises(InputError, match=message):
        _info(**kwargs)


def test_bad_models_are_refused_clearly(models, with_metadata):
    with pytest.raises(InputError, match="an embedder has no labels"):
        _info("embedder", labels=("a",))
    for junk in (b"", b"not a tflite model at all", models["onnx"]):
        with pytest.raises(InputError, match="not a TFLite flatbuffer"):
            write_tflite_metadata(junk, _info())
        with pytest.raises(InputError, match="not a TFLite flatbuffer"):
            read_tflite_metadata(junk)
    with pytest.raises(InputError, match=r"does not match 3 labels"):
        write_tflite_metadata(models["fp32"], _info(labels=("a", "b", "c")))
    with pytest.raises(InputError, match=r"input shape \[1, 32, 32, 3\] does not match"):
        write_tflite_metadata(models["fp32"], _info(width=64))
    # A damaged metadata buffer (identifier overwritten) is reported, not misread.
    data = bytearray(with_metadata["fp32"])
    at = data.index(b"M001")
    data[at : at + 4] = b"XXXX"
    with pytest.raises(InputError, match="file identifier"):
        read_tflite_metadata(bytes(data))
    # ONNX side.
    with pytest.raises(InputError, match="not an ONNX"):
        write_onnx_metadata(models["fp32"], {}, doc_string="", input_docs={}, output_docs={})
    with pytest.raises(InputError, match=r"no input named 'pixels'; its inputs are \['image'\]"):
        write_onnx_metadata(models["onnx"], {}, doc_string="", input_docs={"pixels": "x"}, output_docs={})
    with pytest.raises(InputError, match="must be JSON"):
        write_onnx_metadata(models["onnx"], {"edgetl.labels": "[oops"}, doc_string="", input_docs={}, output_docs={})
    with pytest.raises(InputError, match="onnxruntime cannot load"):
        read_onnx_metadata(b"junk")


# ---------------------------------------------------------------------------------------------- (d), (e)


@pytest.fixture(scope="module")
def mediapipe(tmp_path_factory):
    import mediapipe_peer

    reason = mediapipe_peer.skip_reason()
    if reason:
        pytest.skip(f"MediaPipe unavailable: {reason}")
    return mediapipe_peer, tmp_path_factory.mktemp("mediapipe")


def _mp(mediapipe, model: bytes, x: np.ndarray, mode: str, name: str) -> dict:
    peer, d = mediapipe
    path = d / f"{name}.tflite"
    path.write_bytes(model)
    return peer.run_client(path, x, mode)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_mediapipe_image_classifier_agrees_with_litert(mediapipe, models, with_metadata, precision):
    x = models["x"]
    out = _mp(mediapipe, with_metadata[precision], x, "classify", precision)
    assert "error" not in out, out
    ref = _litert(models[precision], x.astype(np.float32))
    mp_scores = np.zeros_like(ref)
    for i, r in enumerate(out["results"]):
        assert len(r["categories"]) == len(LABELS) and r["head_name"] == "probability"
        for c in r["categories"]:
            assert c["category_name"] == LABELS[c["index"]]  # labels.txt read in output order
            mp_scores[i, c["index"]] = c["score"]
        assert r["categories"][0]["index"] == int(np.argmax(mp_scores[i]))
    agreement = float((mp_scores.argmax(1) == ref.argmax(1)).mean())
    print(
        f"\nMediaPipe vs LiteRT ({precision}): top-1 agreement {agreement:.3f} on {len(x)} images, "
        f"max |score diff| {np.abs(mp_scores - ref).max():.2e}"
    )
    assert len(x) >= 50 and agreement >= 0.98
    if precision == "fp32":
        assert np.abs(mp_scores - ref).max() <= 0.01


def test_mediapipe_image_embedder_agrees_with_litert(mediapipe, models, with_metadata):
    x = models["x"]
    out = _mp(mediapipe, with_metadata["embedder"], x, "embed", "embedder")
    assert "error" not in out, out
    got = np.array([r["embedding"] for r in out["results"]], dtype=np.float32)
    ref = _litert(models["embedder"], x.astype(np.float32))
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    print(f"\nMediaPipe vs LiteRT embedder: min cosine {cos.min():.6f} on {len(x)} images")
    assert got.shape == ref.shape and cos.min() >= 0.99


def test_mediapipe_refuses_a_model_without_metadata(mediapipe, models):
    out = _mp(mediapipe, models["fp32"], models["x"][:2], "classify", "plain")
    assert out.get("stage") == "create" and "NormalizationOptions" in out["error"], out


def test_mediapipe_input_constraints(mediapipe):
    """What MediaPipe accepts: 8x8 RGB inputs work; a 1-channel model is refused whatever its metadata."""
    from edgetl.host._tf import keras, tf

    k, t = keras(), tf()
    results = {}
    for channels in (3, 1):
        inp = k.Input((8, 8, channels))
        out = k.layers.Dense(2, activation="softmax")(k.layers.Flatten()(k.layers.Rescaling(1 / 255.0)(inp)))
        tfl = t.lite.TFLiteConverter.from_keras_model(k.Model(inp, out)).convert()
        info = _info(
            width=8, height=8, channels=channels, color_space="RGB" if channels == 3 else "GRAYSCALE", labels=("a", "b")
        )
        x = np.random.default_rng(3).integers(0, 256, (2, 8, 8, channels), dtype=np.uint8)
        results[channels] = _mp(mediapipe, write_tflite_metadata(tfl, info), x, "classify", f"c{channels}")
    assert "error" not in results[3] and len(results[3]["results"]) == 2, results[3]
    assert results[1].get("stage") == "create" and "Only RGB color space" in results[1]["error"], results[1]
