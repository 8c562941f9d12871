"""``edgetl bench``: speed, size and memory of a bundle on this machine, per backend and
precision, measured side by side in one run (numpy + runtimes; never TensorFlow).

Timings on a shared machine are noisy, so every figure that matters is also given as a
ratio to something measured in the same run (the raw runtime call on the same file).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgetl.bundle import Bundle
from edgetl.device._classifier import Classifier
from edgetl.device._head import HeadState, TrainSettings
from edgetl.device._runtimes import BACKEND_FORMATS, install_hint, installed_backends, litert_interpreter
from edgetl.errors import DependencyError


def timings(fn: Callable[[], Any], warmup: int, runs: int) -> np.ndarray:
    """Seconds per call of ``fn`` over ``runs`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def _paired_timings(
    a: Callable[[], Any], b: Callable[[], Any], warmup: int, runs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Time two calls alternately, so that a noisy neighbour slows both alike."""
    for _ in range(warmup):
        a()
        b()
    out = np.empty((2, runs))
    for i in range(runs):
        for j, fn in enumerate((a, b)):
            t0 = time.perf_counter()
            fn()
            out[j, i] = time.perf_counter() - t0
    return out[0], out[1]


def public_api_call(path: Path, fmt: str, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """The raw runtime call SDK/raw compares with: the file run through the runtime's public
    Python API the way its documentation shows (``InferenceSession.run``; LiteRT's
    ``set_tensor``/``invoke``/``get_tensor``), nothing of edgetl's in between."""
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        name, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
        return lambda x: sess.run([out], {name: x})[0]

    it = litert_interpreter(path, threads=threads)
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]

    def call(x: np.ndarray) -> np.ndarray:
        it.set_tensor(inp["index"], x.astype(inp["dtype"]))
        it.invoke()
        return it.get_tensor(outp["index"])

    return call


_RSS_PROBE = textwrap.dedent(
    """
    import resource, sys, numpy as np
    from edgetl.device._classifier import Classifier
    clf = Classifier.open(sys.argv[1], backend=sys.argv[2], precision=sys.argv[3], threads=int(sys.argv[4]) or None)
    x = np.zeros((32, *clf.input_shape), np.float32)
    for _ in range(3):
        clf.predict(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    """
)


def peak_rss_mb(bundle: Path, backend: str, precision: str, threads: int | None) -> float:
    """Peak resident memory of a fresh process that opens the bundle and predicts a batch."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(bundle), backend, precision, str(threads or 0)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode:
        raise RuntimeError(f"memory probe failed: {out.stderr[-500:]}")
    return float(out.stdout.split()[-1])


def bench_bundle(
    bundle: Bundle,
    *,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    backends: tuple[str, ...] | None = None,
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 100,
    batch: int = 32,
) -> dict[str, Any]:
    """Measure every available backend x precision of ``bundle``; returns a JSON-able dict."""

    backends = backends or installed_backends()
    if not backends:
        raise DependencyError(f"no runtime installed (onnxruntime or ai-edge-litert): {install_hint()}")
    sample = bundle.arrays("parity", ("x",))["x"]
    one = sample[:1]
    many = np.repeat(sample, int(np.ceil(batch / len(sample))), axis=0)[:batch]
    rows = []
    for backend in backends:
        fmt = BACKEND_FORMATS[backend]
        for precision in bundle.precisions("fused", fmt):
            clf = Classifier(bundle, backend=backend, precision=precision, threads=threads)
            raw = public_api_call(bundle.artifact("fused", fmt, precision), fmt, threads)
            sdk, direct = _paired_timings(lambda: clf.predict(one), lambda: raw(one.astype(np.float32)), warmup, runs)
            thr = timings(lambda: clf.predict(many), max(1, warmup // 5), max(5, runs // 10))
            row: dict[str, Any] = {
                "backend": backend,
                "precision": precision,
                "file": bundle.artifact("fused", fmt, precision).name,
                "size_bytes": bundle.artifact("fused", fmt, precision).stat().st_size,
                "latency_ms": {q: float(np.percentile(sdk, q) * 1e3) for q in (50, 90, 99)},
                "raw_runtime_latency_ms": {q: float(np.percentile(direct, q) * 1e3) for q in (50, 90, 99)},
                "sdk_overhead_ratio_p50": float(np.percentile(sdk, 50) / np.percentile(direct, 50)),
                "throughput_examples_per_s": float(batch / np.median(thr)),
                "peak_rss_mb": peak_rss_mb(bundle.path, backend, precision, threads),
            }
            if data is not None:
                x, y = data
                row["accuracy"] = float(
                    np.mean(np.asarray(clf.predict(x).labels) == np.asarray([clf.head.labels[i] for i in y]))
                )
            row.update(_train_step(clf, sample))
            rows.append(row)
    return {"bundle": bundle.name, "threads": threads, "runs": runs, "batch": batch, "rows": rows}


def _train_step(clf: Classifier, sample: np.ndarray) -> dict[str, float]:
    """Time of one head train step (batch 16) in the runtime, on real embeddings."""
    head = HeadState.factory(clf.bundle)
    emb = clf.embed(np.repeat(sample, 1, axis=0)[:16])
    onehot = np.eye(head.capacity, dtype=np.float32)[np.arange(len(emb)) % len(head.labels)]
    settings = TrainSettings(epochs=1, batch_size=len(emb))
    clf.head_runtime.train(head, emb, onehot, settings)  # warm-up
    steps = timings(lambda: clf.head_runtime.train(head, emb, onehot, settings), 2, 20)
    return {"train_step_ms": float(np.median(steps) * 1e3), "train_examples_per_s": float(len(emb) / np.median(steps))}


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'backend':<12} {'precision':<9} {'size':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'SDK/raw':>8} "
        f"{'ex/s @32':>9} {'RSS MB':>7} {'step ms':>8} {'acc':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        acc = f"{r['accuracy']:.4f}" if "accuracy" in r else ""
        lat = r["latency_ms"]
        lines.append(
            f"{r['backend']:<12} {r['precision']:<9} {r['size_bytes']:>10,} {lat[50]:>8.3f} {lat[90]:>8.3f} "
            f"{lat[99]:>8.3f} {r['sdk_overhead_ratio_p50']:>8.2f} {r['throughput_examples_per_s']:>9.0f} "
            f"{r['peak_rss_mb']:>7.0f} {r['train_step_ms']:>8.3f} {acc:>6}"
        )
    lines.append(
        "SDK/raw: edgetl Classifier.predict latency / the runtime's public Python API on the same file "
        "(p50, batch 1, the two timed alternately in the same run)."
    )
    return "\n".join(lines)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)
