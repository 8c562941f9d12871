#!/usr/bin/env python
"""The standard benchmark suite: every ratio measured side by side in one run.

    python tools/bench_suite.py [--out bench] [--runs 50] [--no-peer]

Models: the demo's digits CNN (trained), MobileNetV2 (alpha 0.35, 96x96), MobileNetV3Small
(224x224) and EfficientNetB0 (224x224) with weights=None and BatchNorm statistics estimated
on the data (speed does not depend on the weights; estimated statistics keep the random
features informative, so the int8 files pass their export gates), each with a linear head
on upscaled digits. Each is exported fp32 + int8 in TFLite and ONNX. Runtime threads = 1
throughout, so latencies compare with a one-core lower bound. For each model the advisor
(``edgetl bench --recommend``) chooses a configuration, and its choice is checked against
the latencies measured here.

Every target is compared with its measured figure and printed PASS or MISS (in
results.md too); ``--strict`` exits 1 on a miss.

Writes OUT/results.json, OUT/results.md (the tables) and OUT/latency_vs_size.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

# Issue 11's targets. SDK/raw: the digits CNN (a 25 us model, where a Python call's fixed
# cost shows) and the larger models; int8/fp32 latency on onnxruntime for MobileNetV2 and
# EfficientNetB0; the head step against onnxruntime-training; the advisor's choice against
# the fastest configuration within its accuracy budget.
TARGETS = {
    "sdk_over_raw_small": 1.10,
    "sdk_over_raw_large": 1.03,
    "ort_int8_over_fp32_latency": 0.7,
    "head_step_over_peer": 0.5,
    "advisor_over_fastest": 1.05,
}


def cpu_peak() -> dict[str, Any]:
    """Optimistic per-core peak MAC rates from the CPU's vector features (stated, not measured)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    mhz = float(next((l.split(":", 1)[1] for l in info.splitlines() if l.startswith("cpu MHz")), "2000"))
    model = next(
        (l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), platform.processor()
    )
    if "avx512f" in flags:
        fp32, int8, why = (
            32,
            128 if "avx512_vnni" in flags else 64,
            "AVX-512: 2 x 16-lane FP32 FMA per cycle; VNNI: 2 x 64 int8 MAC per cycle",
        )
    elif "avx2" in flags and "fma" in flags:
        fp32, int8, why = 16, 64 if "avx_vnni" in flags else 32, "AVX2+FMA: 2 x 8-lane FP32 FMA per cycle"
    else:
        fp32, int8, why = 4, 8, "no AVX2: SSE estimate"
    return {
        "cpu": model,
        "flags": {f: f in flags for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")},
        "mhz": mhz,
        "fp32_macs_per_cycle": fp32,
        "int8_macs_per_cycle": int8,
        "assumption": f"{why}, at the reported {mhz:.0f} MHz on one core; both optimistic (a split 512-bit unit or "
        "lower clocks only raise the bound's distance), so measured/bound >= 1 always",
    }


def median_cpu_seconds(fn, warmup: int, runs: int) -> float:
    """Median CPU time of the calling thread per call: with one runtime thread the inference
    runs on it, and other processes on a shared machine cannot inflate it by preemption."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.thread_time()
        fn()
        out.append(time.thread_time() - t0)
    return float(np.median(out))


def median_seconds(fn, warmup: int, runs: int) -> float:
    from edgetl.device._bench import timings

    return float(np.median(timings(fn, warmup, runs)))


gated_out: list[str] = []  # suite models whose int8 files failed their export gate (timed anyway)


SUITE = (
    ("mobilenetv2_035 (96x96)", "mobilenetv2_035", 96),
    ("mobilenetv2 (224x224)", "mobilenetv2", 224),  # issue 23's int8 target model
    ("mobilenetv3small (224x224)", "mobilenetv3small", 224),
    ("efficientnetb0 (224x224)", "efficientnetb0", 224),
)


def build_models(work: Path, only: list[str], targets: list[str]) -> list[tuple[str, Path, Any]]:
    """(name, bundle path, Keras model) for each suite model (those whose name contains one of
    ``only``, when given); ``targets`` go to ``export --target``."""
    from edgetl.data import load_digits_dataset, stratified_split
    from edgetl.host._export import export_bundle
    from edgetl.host._pretrain import pretrain
    from edgetl.host._run import load_run, save_run
    from edgetl.host._transfer import TrainConfig, train_transfer

    out = []
    for name, family, size in SUITE:
        if not only or any(o in name for o in only):
            path, model = build_app_bundle(work, family, size, name, targets=targets)
            out.append((name, path, model))
    if only and not any(o in "digits_cnn (8x8)" for o in only):
        return out
    src = save_run(
        pretrain(load_digits_dataset((0, 1, 2, 3, 4)), TrainConfig(epochs=15)), work / "src", kind="pretrain"
    )
    target = load_digits_dataset((5, 6, 7, 8, 9))
    halves = stratified_split(target, val_fraction=0.0, test_fraction=0.5, seed=0)
    run = save_run(
        train_transfer(halves.train, TrainConfig(backbone=str(src), epochs=40, learning_rate=1e-2)), work / "digits"
    )
    bundle = export_bundle(
        run,
        work / "digits.edgetl",
        quantize=["none", "int8"],
        calibration=halves.train,
        evaluation=halves.test,
        targets=targets,
    ).bundle
    return [("digits_cnn (8x8)", bundle.path, load_run(run).model), *out]


def build_app_bundle(
    work: Path,
    family: str,
    size: int,
    name: str | None = None,
    *,
    classes: int = 4,
    per_class: int = 30,
    targets: list[str] | tuple[str, ...] = (),
) -> tuple[Path, Any]:
    """A keras.applications backbone (weights=None, BatchNorm statistics estimated on the
    data) with a linear head on upscaled digits, exported fp32 + int8; returns the bundle
    path (with the int8 files even if their gate left them out) and the Keras model."""
    from user_models import digit_images

    from edgetl.bundle import write_bundle
    from edgetl.data import Dataset
    from edgetl.host._backbones import create_backbone
    from edgetl.host._export import export_bundle
    from edgetl.host._pretrain import recalibrate_batchnorm
    from edgetl.host._run import load_run, save_run
    from edgetl.host._transfer import TrainConfig, train_transfer

    name = name or family
    x, y = digit_images(tuple(range(classes)), size, 3, seed=0, per_class=per_class)
    ds = Dataset(x, y, tuple(str(c) for c in range(classes)), "image", "digits upscaled")
    bb = create_backbone(family, x.shape[1:], weights=None)
    recalibrate_batchnorm(bb.model, x.astype(np.float32))
    config = TrainConfig(backbone=family, val_fraction=0.0, test_fraction=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": on purpose here
        run = save_run(train_transfer(ds, config, backbone=bb), work / family)
    # Random weights: int8 misses its gate whatever the ladder does (no layer stands out), and
    # the suite times the left-out files anyway, so it quantizes once (rung a1).
    result = export_bundle(
        run,
        work / f"{family}.edgetl",
        quantize=["none", "int8"],
        calibration=ds,
        targets=list(targets),
        int8_ladder=False,
    )
    if not result.ok:
        raise RuntimeError(f"{name}: export failed: {result.describe()}")
    path = result.bundle.path
    if result.left_out:
        # Random weights: the int8 files can fail their accuracy gates and be left out of
        # the bundle. Speed does not depend on the weights, so the suite times them anyway,
        # in a bench-only copy of the bundle that includes them (results.md says so).
        for omitted in result.omitted:
            print(f"{name}: int8 {omitted['format']} left out by its gate (timed anyway): {omitted['reason'][:160]}")
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["artifacts"] += [entry for entry, _ in result.left_out.values()]
        files = {a["file"]: path / a["file"] for a in manifest["artifacts"] if a["file"] not in result.left_out}
        files.update({f: content for f, (_, content) in result.left_out.items()})
        path = write_bundle(work / f"{family}.bench.edgetl", manifest, files).path
        gated_out.append(name)
    return path, load_run(run).model


def measure_model(name: str, bundle_path: Path, keras_model: Any, peak: dict[str, Any], runs: int) -> dict[str, Any]:
    from edgetl.bundle import read_bundle
    from edgetl.device._classifier import Classifier
    from edgetl.device._runtimes import load_model
    from edgetl.host._backbones import count_macs

    bundle = read_bundle(bundle_path)
    x = bundle.arrays("parity", ("x",))["x"][:1].astype(np.float32)
    macs = count_macs(keras_model)
    row: dict[str, Any] = {"model": name, "macs": macs, "latency_ms": {}, "raw_ms": {}, "cpu_ms": {}, "size": {}}
    for backend, fmt in (("onnxruntime", "onnx"), ("litert", "tflite")):
        for precision in ("fp32", "int8"):
            key = f"{backend}/{precision}"
            if precision not in bundle.precisions("fused", fmt):
                continue  # left out by its export gate (printed when the bundle was built)
            clf = Classifier(bundle, backend=backend, precision=precision, threads=1)
            raw = load_model(bundle.artifact("fused", fmt, precision), fmt, threads=1)
            # Interleave SDK and raw calls so drift on a shared machine hits both alike.
            sdk_t, raw_t = [], []
            for _ in range(5):
                sdk_t.append(median_seconds(lambda: clf.predict(x), 3, max(1, runs // 5)))
                raw_t.append(median_seconds(lambda: raw(x), 3, max(1, runs // 5)))
            row["latency_ms"][key] = float(np.median(sdk_t) * 1e3)
            row["raw_ms"][key] = float(np.median(raw_t) * 1e3)
            row["cpu_ms"][key] = median_cpu_seconds(lambda: raw(x), 3, runs) * 1e3
            row["size"][key] = bundle.artifact("fused", fmt, precision).stat().st_size
    row["keras_ms"] = median_seconds(lambda: keras_model(x, training=False), 3, runs) * 1e3
    ghz = peak["mhz"] / 1e3
    row["bound_ms"] = {
        "fp32": macs / (peak["fp32_macs_per_cycle"] * ghz * 1e9) * 1e3,
        "int8": macs / (peak["int8_macs_per_cycle"] * ghz * 1e9) * 1e3,
    }
    lat, raw, size, cpu = row["latency_ms"], row["raw_ms"], row["size"], row["cpu_ms"]
    nan = float("nan")

    def ratio(a: str, b: str, table: dict[str, float]) -> float:
        return table[a] / table[b] if a in table and b in table else nan

    row["ratios"] = {
        **{f"sdk_over_raw {k}": lat[k] / raw[k] for k in lat},
        **{f"int8_over_fp32_latency {b}": ratio(f"{b}/int8", f"{b}/fp32", lat) for b in ("onnxruntime", "litert")},
        **{f"int8_over_fp32_raw {b}": ratio(f"{b}/int8", f"{b}/fp32", raw) for b in ("onnxruntime", "litert")},
        **{f"int8_over_fp32_cpu {b}": ratio(f"{b}/int8", f"{b}/fp32", cpu) for b in ("onnxruntime", "litert")},
        **{f"int8_over_fp32_size {b}": ratio(f"{b}/int8", f"{b}/fp32", size) for b in ("onnxruntime", "litert")},
        **{f"litert_over_onnxruntime {p}": ratio(f"litert/{p}", f"onnxruntime/{p}", lat) for p in ("fp32", "int8")},
        "best_exported_fp32_over_keras": min(lat["onnxruntime/fp32"], lat["litert/fp32"]) / row["keras_ms"],
        **{f"measured_over_bound {k}": raw[k] / row["bound_ms"][k.split("/")[1]] for k in raw},
    }
    row["advisor"] = advisor_choice(bundle, lat, runs)
    manifest = bundle.manifest.to_json()
    onnx_int8 = next((a for a in manifest["artifacts"] if a["file"] == "model.int8.onnx"), {})
    ladder = onnx_int8.get("int8_ladder", {})
    row["int8_onnx"] = {"target": manifest.get("target"), "rung": ladder.get("rung"), "ops": ladder.get("ops")}
    return row


def advisor_choice(bundle: Any, latency_ms: dict[str, float], runs: int) -> dict[str, Any]:
    """The advisor's recommendation (measured by itself, cache off), judged by this suite's own
    SDK latencies: its choice against the fastest configuration within its budget."""
    from edgetl.device._advisor import advise

    advice = advise(bundle, runs=runs, use_cache=False, threads=1)
    eligible = [f"{c.backend}/{c.precision}" for c in advice.candidates if c.within_budget]
    chosen = f"{advice.backend}/{advice.precision}"
    fastest = min((k for k in eligible if k in latency_ms), key=latency_ms.__getitem__)
    return {
        "chosen": chosen,
        "fastest_within_budget": fastest,
        "within_budget": eligible,
        "chosen_over_fastest": latency_ms[chosen] / latency_ms[fastest],
    }


def check_targets(results: dict[str, Any]) -> list[tuple[bool, str]]:
    """Each target against its measured figure: (met, line)."""
    out = []

    def check(what: str, value: float, limit: float) -> None:
        met = bool(value <= limit)  # NaN (not measured) is a miss
        out.append((met, f"{'PASS' if met else 'MISS'}  {what}: {value:.3f} (target <= {limit:g})"))

    for r in results["models"]:
        small = r["model"].startswith("digits")
        limit = TARGETS["sdk_over_raw_small" if small else "sdk_over_raw_large"]
        for k in r["latency_ms"]:
            check(f"SDK/raw {r['model']} {k}", r["ratios"][f"sdk_over_raw {k}"], limit)
        if r["model"].startswith(("mobilenetv2", "efficientnetb0")):
            check(
                f"onnxruntime int8/fp32 latency {r['model']}",
                r["ratios"]["int8_over_fp32_latency onnxruntime"],
                TARGETS["ort_int8_over_fp32_latency"],
            )
        a = r["advisor"]
        check(
            f"advisor's choice {a['chosen']} / fastest within budget {a['fastest_within_budget']}, {r['model']}",
            a["chosen_over_fastest"],
            TARGETS["advisor_over_fastest"],
        )
    h = results["head_step"]
    for backend in ("onnxruntime", "litert") if h else ():
        peer = h["onnxruntime_training_ms"]
        value = h[f"edgetl_{backend}_ms"] / peer if peer else float("nan")
        check(f"head step edgetl {backend} / onnxruntime-training", value, TARGETS["head_step_over_peer"])
    return out


def head_step_times(bundle_path: Path, peer: bool) -> dict[str, Any]:
    """One head train step (SGD, batch 16) per implementation, on the same tensors."""
    from edgetl.bundle import read_bundle
    from edgetl.bundle._head import initial_state, reference_step
    from edgetl.device._head import HeadState, TrainSettings
    from edgetl.device._head_loop import make_trainer

    bundle = read_bundle(bundle_path)
    head = HeadState.factory(bundle)
    rng = np.random.default_rng(0)
    emb = rng.random((16, head.W.shape[0]), dtype=np.float32)
    onehot = np.eye(head.capacity, dtype=np.float32)[np.arange(16) % len(head.labels)]
    # Per step, amortising per-call setup the way the peer's loop does: one train() call
    # running 200 steps of batch 16, divided by 200.
    steps = 200
    settings = TrainSettings(epochs=steps, batch_size=16)
    out: dict[str, Any] = {"embedding": head.W.shape[0], "classes": head.capacity, "batch": 16}
    for backend in ("onnxruntime", "litert"):
        trainer = make_trainer(bundle, backend, threads=1)
        out[f"edgetl_{backend}_ms"] = (
            median_seconds(lambda: trainer.train(head, emb, onehot, settings), 1, 5) * 1e3 / steps
        )
    state = initial_state(head.W, head.b, "sgd")
    out["numpy_reference_ms"] = (
        median_seconds(
            lambda: reference_step(state, emb, onehot, head.mask, head.anchor, optimizer="sgd", lr=0.01, l2=1e-3),
            5,
            200,
        )
        * 1e3
    )
    out["onnxruntime_training_ms"], out["onnxruntime_training_note"] = (
        ort_training_peer(head.W.shape[0], head.capacity) if peer else (None, "skipped (--no-peer)")
    )
    return out


PEER_SCRIPT = textwrap.dedent(
    """
    import sys, time, tempfile, numpy as np, onnx
    from onnx import helper, TensorProto
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module, Optimizer
    D, C = int(sys.argv[1]), int(sys.argv[2])
    W = helper.make_tensor("W", TensorProto.FLOAT, [D, C], np.zeros(D * C, np.float32))
    b = helper.make_tensor("b", TensorProto.FLOAT, [C], np.zeros(C, np.float32))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])
    out_info = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", C])
    g = helper.make_graph(nodes, "head", [x_info], [out_info], [W, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 9
    d = tempfile.mkdtemp()
    loss, optim = artifacts.LossType.CrossEntropyLoss, artifacts.OptimType.AdamW
    artifacts.generate_artifacts(m, requires_grad=["W", "b"], loss=loss, optimizer=optim, artifact_directory=d)
    state = CheckpointState.load_checkpoint(d + "/checkpoint")
    module = Module(d + "/training_model.onnx", state, d + "/eval_model.onnx", "cpu")
    opt = Optimizer(d + "/optimizer_model.onnx", module)
    x = np.random.default_rng(0).random((16, D), dtype=np.float32); y = (np.arange(16) % 5).astype(np.int64)
    module.train()
    def step():
        module(x, y); opt.step(); module.lazy_reset_grad()
    for _ in range(5): step()
    ts = []
    for _ in range(200):
        t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
    print(float(np.median(ts)) * 1e3)
    """
)


def ort_training_peer(d: int, c: int) -> tuple[float | None, str]:
    """ONNX Runtime's deprecated on-device training (1.19.2), in a throwaway venv.

    Its optimizer graphs offer AdamW/SGD via generate_artifacts; AdamW is used (its SGD
    artifact support varies by version), so the peer does slightly more work per step.
    Its training Module takes no session options, so it runs with onnxruntime's default
    threads (all cores) while edgetl's runtimes here use one: a head this small gains
    little from threads, but the comparison leans toward the peer.
    """
    venv = Path(tempfile.gettempdir()) / "edgetl_ort_training_venv"
    py = venv / "bin" / "python"
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
            # Its Python API imports torch (onnxruntime/training/optim/_modifier.py); 2.13.0 is the
            # CPU wheel this machine kind keeps on disk for pip (no multi-GB CUDA download).
            subprocess.run(
                [
                    str(py),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "onnxruntime-training==1.19.2",
                    "numpy<2",
                    "onnx==1.16.2",
                    "torch==2.13.0",
                ],
                check=True,
                timeout=900,
                capture_output=True,
            )
        out = subprocess.run([str(py), "-c", PEER_SCRIPT, str(d), str(c)], capture_output=True, text=True, timeout=600)
        if out.returncode:
            return (
                None,
                "skipped: the peer failed to run "
                f"({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'no message'})",
            )
        return float(out.stdout.split()[-1]), "onnxruntime-training 1.19.2 (AdamW artifact), same D x C head, batch 16"
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"skipped: could not install onnxruntime-training 1.19.2 ({type(exc).__name__})"


def _verdict(ratio: float) -> str:
    """int8/fp32 latency in words; within 5% is a tie (run-to-run noise on a shared machine)."""
    if ratio != ratio:  # NaN: not measured
        return "n/a"
    return "int8 faster" if ratio < 0.95 else "int8 SLOWER" if ratio > 1.05 else "same"


def int8_table(results: dict[str, Any]) -> list[str]:
    """Where int8 pays on this machine: int8/fp32 batch-1 latency per model and runtime."""
    m = results["machine"]
    flags = ", ".join(f for f, on in m.get("flags", {}).items() if on) or "none"
    lines = [
        "",
        f"Where int8 pays on this machine ({m['cpu']}; flags: {flags}; load average at the end "
        f"{m.get('loadavg', '?')}): raw runtime batch-1, one thread, int8/fp32 of the calling thread's median CPU "
        "time (wall-time medians in parentheses: they also count time other processes held the core).",
        "",
        "| model | MACs | ORT int8/fp32 | LiteRT int8/fp32 | fp32 ms ORT / LiteRT | ORT int8 recipe | ORT int8 graph |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        q, onnx, cpu = r["ratios"], r.get("int8_onnx", {}), r.get("cpu_ms", {})
        ort_r, lite_r = q["int8_over_fp32_cpu onnxruntime"], q["int8_over_fp32_cpu litert"]
        ort_w, lite_w = q["int8_over_fp32_raw onnxruntime"], q["int8_over_fp32_raw litert"]
        fp32 = f"{cpu.get('onnxruntime/fp32', float('nan')):.3f} / {cpu.get('litert/fp32', float('nan')):.3f}"
        lines.append(
            f"| {r['model']} | {r['macs'] / 1e6:.1f} M | {ort_r:.2f} ({ort_w:.2f}) {_verdict(ort_r)} | {lite_r:.2f} "
            f"({lite_w:.2f}) {_verdict(lite_r)} | {fp32} | {onnx.get('target', '?')}, rung {onnx.get('rung', '?')} | "
            f"{onnx.get('ops', '?')} |"
        )
    return lines


def write_outputs(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# edgetl benchmark suite",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, Python "
        f"{results['machine']['python']}; runtime threads = 1.",
        f"Peak-rate assumption: {results['peak']['assumption']}.",
        "",
        "Generated by `python tools/bench_suite.py`; every ratio is measured side by side in one run.",
        "",
    ]
    if results.get("int8_left_out_by_gate"):
        lines += [
            f"int8 of {', '.join(results['int8_left_out_by_gate'])} failed its export accuracy gate (random weights: "
            "its features carry little information) and is not in a bundle edgetl would ship; its speed is "
            "measured anyway, on the left-out files.",
            "",
        ]
    lines += [
        "| model | MACs | backend/precision | SDK ms | raw ms | SDK/raw | bytes | lower bound ms | raw/bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        for k in r["latency_ms"]:
            lines.append(
                f"| {r['model']} | {r['macs'] / 1e6:.1f} M | {k} | {r['latency_ms'][k]:.3f} | {r['raw_ms'][k]:.3f} | "
                f"{r['ratios'][f'sdk_over_raw {k}']:.3f} | {r['size'][k]:,} | {r['bound_ms'][k.split('/')[1]]:.4f} | "
                f"{r['ratios'][f'measured_over_bound {k}']:.1f} |"
            )
    lines += [
        "",
        "| model | int8/fp32 latency ORT | int8/fp32 latency LiteRT | int8/fp32 size ORT | int8/fp32 size LiteRT | "
        "LiteRT/ORT fp32 | LiteRT/ORT int8 | exported fp32 / Keras |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        q = r["ratios"]
        lines.append(
            f"| {r['model']} | {q['int8_over_fp32_latency onnxruntime']:.2f} | "
            f"{q['int8_over_fp32_latency litert']:.2f} | {q['int8_over_fp32_size onnxruntime']:.3f} | "
            f"{q['int8_over_fp32_size litert']:.3f} | {q['litert_over_onnxruntime fp32']:.2f} | "
            f"{q['litert_over_onnxruntime int8']:.2f} | {q['best_exported_fp32_over_keras']:.3f} |"
        )
    lines += int8_table(results)
    h = results["head_step"] or {"onnxruntime_training_ms": None}
    peer = f"{h['onnxruntime_training_ms']:.3f} ms" if h["onnxruntime_training_ms"] else "n/a"
    lines += (
        []
        if not results["head_step"]
        else [
            "",
            f"Head train step (D={h['embedding']}, C={h['classes']}, batch {h['batch']}): edgetl onnxruntime "
            f"{h['edgetl_onnxruntime_ms']:.3f} ms, edgetl LiteRT {h['edgetl_litert_ms']:.3f} ms, numpy reference "
            f"{h['numpy_reference_ms']:.3f} ms, onnxruntime-training {peer} ({h['onnxruntime_training_note']}).",
            "",
        ]
    )
    lines += ["| model | advisor's choice | fastest within budget | choice / fastest |", "|---|---|---|---|"]
    for r in results["models"]:
        a = r["advisor"]
        lines.append(
            f"| {r['model']} | {a['chosen']} | {a['fastest_within_budget']} | {a['chosen_over_fastest']:.3f} |"
        )
    lines += ["", "Targets (issue 11), each measured in this run:", ""]
    lines += [f"- {line}" for _, line in results["targets"]]
    lines += ["", "![latency vs size](latency_vs_size.png)"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results["models"]:
        for k in r["latency_ms"]:
            ax.scatter(
                r["size"][k] / 1e6, r["latency_ms"][k], marker="o" if "fp32" in k else "^", label=f"{r['model']} {k}"
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model file (MB)")
    ax.set_ylabel("latency, batch 1, 1 thread (ms)")
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_size.png", dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--no-peer", action="store_true", help="skip onnxruntime-training")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any target is missed")
    parser.add_argument("--models", default="", help="comma-separated name parts: only these suite models")
    parser.add_argument("--target", default="", help="export --target for every bundle (default: export's)")
    args = parser.parse_args()
    import os

    from edgetl.host._tf import tf

    # One thread for Keras too, like the runtimes; TensorFlow only accepts this before it starts.
    tf().config.threading.set_intra_op_parallelism_threads(1)
    tf().config.threading.set_inter_op_parallelism_threads(1)
    peak = cpu_peak()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        only, targets = ([p for p in v.split(",") if p] for v in (args.models, args.target))
        models = build_models(Path(d), only, targets)
        rows = [measure_model(name, path, model, peak, args.runs) for name, path, model in models]
        digits = [path for name, path, _ in models if name.startswith("digits")]
        head = head_step_times(digits[0], not args.no_peer) if digits else None
    results = {
        "machine": {
            "cpu": peak["cpu"],
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "flags": peak["flags"],
            "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        },
        "peak": peak,
        "models": rows,
        "head_step": head,
        "int8_left_out_by_gate": gated_out,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    results["targets"] = check_targets(results)
    write_outputs(args.out, results)
    print((args.out / "results.md").read_text())
    misses = [line for met, line in results["targets"] if not met]
    print(f"{len(misses)} target(s) missed" if misses else "every target met")
    return 1 if misses and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
