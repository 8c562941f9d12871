"""verify and the export's evidence gates run models on bounded batches.

A runtime's memory for one call grows with the batch, and the process keeps what it took:
verifying EfficientNetB0 (128x128) on 379 examples in one call per file grew the export to
12.7 GB, and a larger held-out split at 224x224 ran out of memory. Each model now sees at most
``EVALUATION_BATCH`` examples per call, with the same results.
"""

from __future__ import annotations

import numpy as np

from edgetl.device import _evidence_gate, _runtimes, _verify
from edgetl.device._runtimes import EVALUATION_BATCH, run_batched
from edgetl.device._verify import verify_bundle


def test_verify_feeds_every_model_bounded_batches(digits_bundle, monkeypatch):
    bundle, halves = digits_bundle
    x, y = halves.test.x.astype(np.float32), halves.test.y
    assert len(x) > 4 * EVALUATION_BATCH  # enough examples that one call would exceed the bound
    batches: dict[str, list[int]] = {}
    real_load = _runtimes.load_model

    def recording_load(path, fmt, **kwargs):  # the real runtime, with the batch sizes it was fed written down
        model = real_load(path, fmt, **kwargs)

        def call(inputs):
            batches.setdefault(str(path).rsplit("/", 1)[-1], []).append(len(inputs))
            return model(inputs)

        return call

    monkeypatch.setattr(_verify, "load_model", recording_load)
    monkeypatch.setattr(_evidence_gate, "load_model", recording_load)
    report = verify_bundle(bundle, x, y, inputs=x[:100])
    assert report.ok, report.describe()
    fused = [f for f in batches if f.startswith("model.")]
    assert {"model.fp32.onnx", "model.int8.onnx", "model.fp32.tflite", "model.int8.tflite"} <= set(fused)
    assert max(max(sizes) for sizes in batches.values()) <= EVALUATION_BATCH, batches
    assert sum(batches["model.int8.tflite"]) >= len(x) + 100  # accuracy and gate saw every example
    for check in report.checks:  # the same accuracy as one call on every example
        if check.role == "fused" and "accuracy" in check.extra:
            whole = real_load(bundle.path / check.file, check.format)(x)
            assert check.extra["accuracy"] == float(np.mean(whole.argmax(1) == y)), check.file


def test_run_batched_concatenates_in_order():
    x = np.arange(70, dtype=np.float32).reshape(70, 1)
    calls: list[int] = []

    def model(v):
        calls.append(len(v))
        return v * 2

    assert np.array_equal(run_batched(model, x, batch=32), x * 2) and calls == [32, 32, 6]
    assert np.array_equal(run_batched(model, x[:5], batch=32), x[:5] * 2) and calls[-1] == 5
