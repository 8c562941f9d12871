"""What MediaPipe Tasks do with a gray image and a 3-channel model, and what the app must do.

Builds a small RGB classifier (16x16x3, random weights, TFLite with edgetl's metadata), writes
a gray PNG and the same pixels as an RGB PNG, computes LiteRT's scores on the 3-channel image,
then runs MediaPipe's Python ImageClassifier (in the throwaway MediaPipe venv of
tests/host/mediapipe_peer.py) on: the gray file as MediaPipe loads it (GRAY8), the RGB file, and
the gray file converted by the app to SRGB (gray repeated into R, G, B), as
docs/integration.md section 2 shows. Prints one JSON document.

Usage: ``python tools/mediapipe_gray.py [--work DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SIZE, LABELS = 16, ("a", "b", "c")
ROOT = Path(__file__).resolve().parents[1]


def build_model(work: Path) -> tuple[Path, Path, Path, list[float]]:
    """The model, the gray and RGB PNGs, and LiteRT's scores on the 3-channel pixels."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from ai_edge_litert.interpreter import Interpreter
    from PIL import Image

    from edgetl.host._tf import keras, tf
    from edgetl.host._tflite_metadata import TFLiteModelInfo, write_tflite_metadata

    k, t = keras(), tf()
    k.utils.set_random_seed(0)
    inp = k.Input((SIZE, SIZE, 3))
    h = k.layers.Conv2D(8, 3, activation="relu")(k.layers.Rescaling(1 / 255.0)(inp))
    model = k.Model(inp, k.layers.Dense(len(LABELS), activation="softmax")(k.layers.GlobalAveragePooling2D()(h)))
    flat = t.lite.TFLiteConverter.from_keras_model(model).convert()
    info = TFLiteModelInfo(
        name="rgb", description="gray test", version="1", kind="classifier", width=SIZE, height=SIZE, labels=LABELS
    )
    work.mkdir(parents=True, exist_ok=True)
    model_path = work / "rgb.tflite"
    model_path.write_bytes(write_tflite_metadata(flat, info))
    gray = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    Image.fromarray(gray, "L").save(work / "gray.png")
    Image.fromarray(rgb, "RGB").save(work / "rgb.png")
    it = Interpreter(model_content=flat)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], rgb[None].astype(np.float32))
    it.invoke()
    scores = it.get_tensor(it.get_output_details()[0]["index"])[0]
    return model_path, work / "gray.png", work / "rgb.png", [float(s) for s in scores]


def in_mediapipe(model: str, gray_png: str, rgb_png: str) -> dict:
    """Runs inside the MediaPipe venv: classify the three images; scores in label order."""
    sys.path.insert(0, str(ROOT / "tools"))
    import mediapipe_client

    mediapipe_client._stand_in_for_drawing_deps()
    import mediapipe as mp
    from mediapipe.tasks.python.core.base_options import BaseOptions
    from mediapipe.tasks.python.vision import image_classifier as ic

    failed: list = []

    def classify(image) -> dict:
        options = ic.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=model), max_results=-1)
        task = ic.ImageClassifier.create_from_options(options)  # a fresh graph: a failure ends one
        try:
            found = task.classify(image).classifications[0].categories
        except Exception as exc:  # MediaPipe reports the mismatch as ValueError with its status text
            failed.append(task)  # closing a failed graph raises its error again: keep it open
            return {"error": f"{type(exc).__name__}: {exc}"[:600]}
        task.close()
        by_name = {c.category_name: float(c.score) for c in found}
        return {"scores": [by_name[name] for name in LABELS]}

    gray = mp.Image.create_from_file(gray_png)
    fmt = next((f.name for f in mp.ImageFormat if f == gray.image_format), str(gray.image_format))
    pixels = gray.numpy_view().copy().reshape(gray.height, gray.width)  # copy: the view dies with its image
    converted = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(np.stack([pixels] * 3, -1)))
    return {
        "mediapipe": mp.__version__,
        "gray_file": {
            "format": fmt,
            "shape": list(gray.numpy_view().shape),
            **classify(gray),
        },
        "rgb_file": classify(mp.Image.create_from_file(rgb_png)),
        "gray_converted_to_srgb": classify(converted),
    }


def check(work: Path) -> dict:
    """Build, run MediaPipe, and report (raises the peer's MediaPipeUnavailable when it cannot install)."""
    sys.path.insert(0, str(ROOT / "tests" / "host"))
    import mediapipe_peer

    model, gray, rgb, litert = build_model(work)
    python = mediapipe_peer.ensure_mediapipe()
    cmd = [str(python), __file__, "--in-mediapipe", str(model), str(gray), str(rgb)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the MediaPipe run exited {done.returncode}: {done.stderr[-2000:]}")
    return {"litert_scores_3_channels": litert, **json.loads(lines[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--in-mediapipe", nargs=3, metavar=("MODEL", "GRAY_PNG", "RGB_PNG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_mediapipe:
        print(json.dumps(in_mediapipe(*args.in_mediapipe)), flush=True)
        os._exit(0)  # skip MediaPipe's shutdown of the failed graph, which raises its error again
    with tempfile.TemporaryDirectory(prefix="edgetl-mp-gray-") as tmp:
        print(json.dumps(check(args.work or Path(tmp)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
