"""Run MediaPipe Tasks' Python ImageClassifier or ImageEmbedder on a batch of images; print JSON.

Meant to run inside a throwaway venv that has MediaPipe installed (see ``tests/host/mediapipe_peer.py``,
which creates one), not in edgetl's own environment: it imports nothing from edgetl.

    python tools/mediapipe_client.py model.tflite images.npy classify
    python tools/mediapipe_client.py backbone.tflite images.npy embed

``images.npy`` holds uint8 RGB images, shape (N, H, W, 3); grayscale images, (N, H, W, 1) or
(N, H, W), are repeated to 3 channels first, as edgetl does, because MediaPipe 1.2.2's CPU path does
not convert a GRAY8 ``mp.Image`` for an RGB model (the inference calculator fails with "TfLiteTensor and
Tensor sizes do not match"). Images are given at their own size: MediaPipe resizes them to the model's
input size. Output on stdout, one JSON object:

    {"mediapipe": "1.2.2", "mode": "classify", "results": [
        {"head_name": "probability", "categories": [{"index": 2, "category_name": "cat", "score": 0.91}, ...]}, ...]}
    {"mediapipe": "1.2.2", "mode": "embed", "results": [{"head_name": "embedding", "embedding": [0.1, ...]}, ...]}

Categories are MediaPipe's own order (descending score), all of them (max_results -1, score
threshold 0). When MediaPipe refuses the model, the JSON is ``{"error": "...", "stage": "create"}``
(or ``"run"`` when it fails on an image) and the exit status 2, so a caller can tell a refusal from a
crash.

MediaPipe 1.2.2's ``mediapipe.tasks.python.vision`` package imports ``cv2`` and ``matplotlib`` at
import time, for its drawing utilities only. The recommended install skips both (about 250 MB);
when they are missing, placeholder modules stand in for them, and any use of them raises.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from typing import Any


def _placeholder(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def __getattr__(attr: str) -> Any:
        raise AttributeError(
            f"{name} is not installed in this environment (only MediaPipe's drawing utilities use "
            f"it); install it to use {name}.{attr}"
        )

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


def _stand_in_for_drawing_deps() -> list[str]:
    stubbed = []
    if importlib.util.find_spec("cv2") is None:
        sys.modules["cv2"] = _placeholder("cv2")
        stubbed.append("cv2")
    if importlib.util.find_spec("matplotlib") is None:
        mpl, pyplot = _placeholder("matplotlib"), _placeholder("matplotlib.pyplot")
        mpl.pyplot = pyplot  # type: ignore[attr-defined]
        sys.modules["matplotlib"], sys.modules["matplotlib.pyplot"] = mpl, pyplot
        stubbed.append("matplotlib")
    return stubbed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help=".tflite file")
    parser.add_argument("images", help=".npy file of uint8 images (N, H, W, C)")
    parser.add_argument("mode", choices=("classify", "embed"))
    args = parser.parse_args(argv)

    stubbed = _stand_in_for_drawing_deps()
    import mediapipe as mp
    import numpy as np
    from mediapipe.tasks.python.core.base_options import BaseOptions
    from mediapipe.tasks.python.vision import image_classifier, image_embedder

    images = np.load(args.images, allow_pickle=False)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        print(
            json.dumps(
                {"error": f"images must be uint8 (N, H, W[, C]), got {images.dtype} {images.shape}", "stage": "input"}
            )
        )
        return 2
    base = BaseOptions(model_asset_path=args.model)
    try:
        if args.mode == "classify":
            # max_results -1 = every category; threshold 0 keeps scores that round to 0.
            options = image_classifier.ImageClassifierOptions(base_options=base, max_results=-1, score_threshold=0.0)
            task: Any = image_classifier.ImageClassifier.create_from_options(options)
        else:
            options = image_embedder.ImageEmbedderOptions(base_options=base)
            task = image_embedder.ImageEmbedder.create_from_options(options)
    except Exception as exc:  # MediaPipe reports a refused model as ValueError/RuntimeError with its status text
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "stage": "create", "mediapipe": mp.__version__}))
        return 2

    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    results = []
    with task:
        for img in images:
            image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img))
            try:
                results.append(_run_one(task, image, args.mode))
            except Exception as exc:
                error = {"error": f"{type(exc).__name__}: {exc}", "stage": "run", "mediapipe": mp.__version__}
                print(json.dumps(error))
                return 2
    print(json.dumps({"mediapipe": mp.__version__, "mode": args.mode, "stubbed": stubbed, "results": results}))
    return 0


def _run_one(task: Any, image: Any, mode: str) -> dict[str, Any]:
    if mode == "classify":
        head = task.classify(image).classifications[0]
        return {
            "head_name": head.head_name,
            "categories": [
                {"index": c.index, "category_name": c.category_name, "score": float(c.score)} for c in head.categories
            ],
        }
    emb = task.embed(image).embeddings[0]
    return {"head_name": emb.head_name, "embedding": [float(v) for v in emb.embedding]}


if __name__ == "__main__":
    sys.exit(main())
