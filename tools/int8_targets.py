#!/usr/bin/env python
"""Does int8 ship within 1 point of fp32 on a pretrained small backbone? (issue 23, targets)

    nice -n 10 python tools/int8_targets.py prepare [--backbone mobilenetv2_035] [--image-size 96] [--epochs 15]
    nice -n 10 python tools/int8_targets.py export  [--backbone mobilenetv2_035] [--quantize int8,qat]
    nice -n 10 python tools/int8_targets.py files   [--backbone efficientnetb0 --image-size 128]
    nice -n 10 python tools/int8_targets.py explain [--backbone mobilenetv3small --image-size 224]
    nice -n 10 python tools/int8_targets.py explain --keep-float _se_ [--backbone efficientnetb0 --image-size 128]

What a new user does, with the CLI: ``edgetl pretrain`` on scikit-learn's handwritten digits
0-4 upscaled to RGB (about 900 real images, tools/user_models.py), ``edgetl train`` on digits
5-9 with the pretrained run as backbone, then ``edgetl export RUN --quantize int8,qat`` on the
run's own data. ``prepare`` caches the runs and data under ``--root`` (default
/tmp/edgetl-int8-run/BACKBONE-SIZE, reused by the ONNX work); ``export`` reports, per
quantized file kept or left out, accuracy against fp32 on the test split, the remedy-ladder
rung that got it there, its float share and size, and the split that chose it (the run's
validation split: the ladders and QAT-or-PTQ never choose on the test split they are reported on).

Target: each int8 file ships at most 1 point below fp32 of its format (PASS/MISS printed).

``export`` also keeps the files the gates left out (``ROOT/left_out/``, with their manifest
entries in ``ROOT/export-summary.json``); ``files`` then measures every fused file, shipped or
left out, on the run's test split with the device runtimes (fp32 and int8 accuracy, points,
ladder rung, float share); ``explain`` ranks the fused model's layers by int8 noise with
TensorFlow's QuantizationDebugger and prints what the ONNX ladder's sensitivity pass found:
the evidence for why a file missed. EfficientNetB0 and MobileNetV3Small run through the same
stages (``--backbone efficientnetb0 --image-size 128``; sizes in README's precision section).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TARGET_POINTS = 1.0


def _edgetl(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgetl.cli", *args]
    print("$ edgetl " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def prepare(root: Path, backbone: str, size: int, epochs: int) -> None:
    import user_models as um

    root.mkdir(parents=True, exist_ok=True)
    for name, classes, seed in (("source", (0, 1, 2, 3, 4), 0), ("target", (5, 6, 7, 8, 9), 1)):
        x, y = um.digit_images(classes, size, 3, seed=seed)
        np.savez(root / f"{name}.npz", x=x, y=y, class_names=np.asarray([str(c) for c in classes]))
        print(f"{name}: {len(y)} images {x.shape[1:]} digits {classes}")
    _edgetl("pretrain", "--data", str(root / "source.npz"), "--backbone", backbone, "--image-size", str(size),
            "--epochs", str(epochs), "--out", str(root / "pretrain"), "--overwrite")  # fmt: skip
    _edgetl("train", "--data", str(root / "target.npz"), "--backbone", str(root / "pretrain"),
            "--out", str(root / "run"), "--overwrite")  # fmt: skip


def report(bundle_dir: Path, left_out: list[dict], quantize: str) -> bool:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    checks = {c["file"]: c for c in manifest["parity"]["checks"]}
    entries = {e["file"]: e for e in manifest["artifacts"]}
    print(f"\n{'file':<22} {'acc':>6} {'fp32':>6} {'points':>7} {'rung':<28} {'float share':>11} {'KB':>6}")
    ok = True
    for file, c in sorted(checks.items()):
        if c["role"] != "fused" or "accuracy" not in c:
            continue
        e, drop = entries[file], c.get("accuracy_drop", 0.0) * 100
        ladder = e.get("ladder") or e.get("int8_ladder") or {}  # TFLite's ladder, or the int8 ONNX one
        rung = ladder.get("rung", "-" if c["precision"] == "fp32" else c["precision"])
        share = ladder.get("float_share", ladder.get("float_share_macs"))
        print(
            f"{file:<22} {c['accuracy']:>6.3f} {c['accuracy'] + drop / 100:>6.3f} {-drop:>+7.2f} "
            f"{rung:<28} {'' if share is None else f'{share:.3f}':>11} {e.get('size', 0) / 1024:>6.0f}"
        )
        if c["precision"] == "int8":
            ok = ok and drop <= TARGET_POINTS
        chosen = e.get("selection") or {}
        if chosen.get("chosen_on"):  # the ladder and QAT-or-PTQ chose on another split than this one
            sel, on = chosen["selection_accuracy_drop"], chosen["chosen_on"]
            sel_points = "-" if sel is None else f"{-100 * sel:+.2f} points"
            print(f"{'':<22} chosen on {on['split']} ({on['examples']} examples): {sel_points}; reported above on "
                  f"{chosen['reported_on']['split']} ({chosen['reported_on']['examples']} examples)")  # fmt: skip
        if c.get("gate"):
            print(f"{'':<22} gate {c['outcome']}: {c['gate']}")
    for file, e in sorted(entries.items()):
        if e.get("ladder") and e.get("role") == "backbone":
            lad = e["ladder"]
            print(
                f"{file:<22} rung {lad['rung']}, float share {lad['float_share']}, float layers {lad['float_layers']}"
            )
    for o in left_out:
        print(f"left out {', '.join(o['files'])}: {o['reason']}")
        ok = ok and o["precision"] != "int8"
    qat = manifest.get("qat_choice")
    if qat:
        print(f"QAT or PTQ: {qat}")
    print(f"\nint8 within {TARGET_POINTS:g} point of fp32 in every format: {'PASS' if ok else 'MISS'} ({quantize})")
    return ok


def export(root: Path, quantize: str, extra: list[str]) -> bool:
    from edgetl.host import export_bundle

    out = root / "bundle.edgetl"
    t0 = time.perf_counter()
    kwargs = dict(quantize=quantize.split(","))
    if "full" in extra:
        kwargs["full_integer"] = True
    targets = [e.split("=", 1)[1] for e in extra if e.startswith("target=")]
    if targets:
        kwargs["targets"] = targets
    result = export_bundle(root / "run", out, overwrite=True, **kwargs)
    took = time.perf_counter() - t0
    print(f"export_bundle({root / 'run'}, quantize={quantize}, targets={kwargs.get('targets')}) in {took:.0f} s")
    _keep_left_out(root, result, took)
    if not result.ok:
        print(result.describe())
        return False
    return report(out, result.omitted, quantize)


def _keep_left_out(root: Path, result: object, seconds: float) -> None:
    """The files the gates left out, and their manifest entries, for ``files`` and ``explain``."""
    folder = root / "left_out"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    entries = {}
    for file, (entry, content) in result.left_out.items():
        (folder / file).write_bytes(content)
        entries[file] = entry
    summary = {"omitted": result.omitted, "left_out": entries, "export_seconds": round(seconds)}
    (root / "export-summary.json").write_text(json.dumps(summary, indent=1, default=str))


def _held_out(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's test split, exactly as training and export split it."""
    from edgetl.host._export import plan_export

    test = plan_export(root / "run", quantize=["none"]).data.test
    return np.asarray(test[0], np.float32), np.asarray(test[1])


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from edgetl.device._runtimes import OnnxModel, TFLiteModel

    model = (OnnxModel if path.suffix == ".onnx" else TFLiteModel)(path)
    pred = np.concatenate([np.asarray(model(x[i : i + 32])).argmax(1) for i in range(0, len(x), 32)])
    return float((pred == y).mean())


def _rung_and_share(entry: dict) -> tuple[str, str]:
    """The ladder rung and float share a manifest entry records (TFLite: share of compute ops;
    ONNX: share of multiply-accumulates)."""
    if "int8_ladder" in entry:
        lad = entry["int8_ladder"]
        return f"{lad['rung']}{'' if lad['passed'] else ' (failed)'}", f"{lad['float_share_macs']:.3f} MACs"
    if "ladder" in entry:
        lad = entry["ladder"]
        return f"{lad['rung']}{'' if lad['meets_target'] else ' (missed)'}", f"{lad['float_share']:.3f} ops"
    return "-", "-"


def files_table(root: Path) -> bool:
    """Every fused file, shipped or left out, on the test split: PASS when each int8 file ships
    within the target of its format's fp32."""
    bundle = root / "bundle.edgetl"
    manifest = json.loads((bundle / "manifest.json").read_text())
    summary = json.loads((root / "export-summary.json").read_text())
    entries = {e["file"]: (e, bundle / e["file"], "shipped") for e in manifest["artifacts"] if e["role"] == "fused"}
    for file, e in summary["left_out"].items():
        if e["role"] == "fused":
            entries[file] = (e, root / "left_out" / file, "left out")
    x, y = _held_out(root)
    fp32 = {p.suffix: _accuracy(p, x, y) for e, p, _ in entries.values() if e["precision"] == "fp32"}
    print(f"\n{len(y)} test examples; export took {summary['export_seconds']} s")
    print(f"{'file':<20} {'fp32':>6} {'acc':>6} {'points':>7} {'verdict':<9} {'rung':<28} {'float':<12} {'KB':>6}")
    ok = True
    for file, (e, path, verdict) in sorted(entries.items()):
        acc, base = _accuracy(path, x, y), fp32[path.suffix]
        rung, share = _rung_and_share(e)
        points = (acc - base) * 100
        print(
            f"{file:<20} {base:>6.3f} {acc:>6.3f} {points:>+7.2f} {verdict:<9} {rung:<28} {share:<12} "
            f"{path.stat().st_size / 1024:>6.0f}"
        )
        if e["precision"] == "int8":
            ok = ok and verdict == "shipped" and points >= -TARGET_POINTS
    for o in summary["omitted"]:
        print(f"left out {', '.join(o['files'])}: {o['reason'][:400]}")
    print(f"\nint8 ships within {TARGET_POINTS:g} point of fp32 in every format: {'PASS' if ok else 'MISS'}")
    return ok


def explain(root: Path, top: int) -> None:
    """Why int8 misses: the TFLite layers with the most int8 noise (QuantizationDebugger, as the
    ladder ranks them) and the ONNX ladder's tensor sensitivity and rungs, from the manifests."""
    from edgetl.host._convert import tflite_converter
    from edgetl.host._export import plan_export
    from edgetl.host._int8_tflite import RANK_SAMPLES, _debugger, rank_layers
    from edgetl.host._tf import tf

    plan = plan_export(root / "run", quantize=["int8"])
    q = next(c for c in plan.configs if c.mode == "int8")
    calib = plan.data.calibration_x[: q.calibration_samples]

    def factory() -> object:  # as the ladder builds it: float layers allowed
        conv = tflite_converter(plan.run.model, q, calib, output_name="probabilities")
        conv.target_spec.supported_ops = [tf().lite.OpsSet.TFLITE_BUILTINS]
        return conv

    debugger = _debugger(factory)
    ranked = rank_layers(debugger, calib[:RANK_SAMPLES])
    ratios = np.array([r["noise_to_signal"] for r in ranked])
    print(f"\nTFLite int8, fused model: {len(ranked)} quantized layers, noise/signal median {np.median(ratios):.4f}")
    print(f"{'noise/signal':>12}  {'op':<20} tensor")
    for r in ranked[:top]:
        print(f"{r['noise_to_signal']:>12.4f}  {r['op_name']:<20} {r['tensor_name'][:90]}")
    summary = json.loads((root / "export-summary.json").read_text())
    manifest = json.loads((root / "bundle.edgetl" / "manifest.json").read_text())
    entries = {**{e["file"]: e for e in manifest["artifacts"]}, **summary["left_out"]}
    for file, e in sorted(entries.items()):
        for key in ("ladder", "int8_ladder"):
            if key in e:
                lad = e[key]
                print(f"\n{file} ({key}): rung {lad['rung']}; sensitivity {lad.get('sensitivity', '-')}")
                for t in lad["tried"]:
                    print("   ", {k: v for k, v in t.items() if k not in ("float_tensors",)})


def keep_float_experiment(root: Path, parts: list[str]) -> None:
    """The fused model's int8 ONNX with every node whose name contains one of ``parts`` kept
    float, up the calibration rungs: how much such a float fallback recovers, and of how much.

    The rungs are chosen as the export chooses them: by the export's own gate on its selection
    data (``int8_onnx_gate``: the validation split and the labelled calibration examples, see
    edgetl/host/_selection.py); the result is then reported on the data the export reports on
    (the run's test split, or its reporting half), which no choice looked at."""
    from edgetl.host._export import int8_onnx_gate, plan_export
    from edgetl.host._int8_onnx import RECIPES, agreement_gate, quantize_onnx_int8

    bundle = root / "bundle.edgetl"
    target = json.loads((bundle / "manifest.json").read_text()).get("target", "any")
    fp32 = (bundle / "model.fp32.onnx").read_bytes()
    plan = plan_export(root / "run", quantize=["int8"])
    calibration = plan.data.calibration_x
    keep = ("embedding_standardize", *parts)
    gate = int8_onnx_gate(plan, "fused", fp32, calibration)
    result = quantize_onnx_int8(fp32, calibration, gate, recipe=RECIPES[target], keep_float=keep)
    ops = result.record["ops"]
    kept, total = sum(ops["float"].values()), sum(ops["float"].values()) + sum(ops["quantized"].values())
    roles = plan.data.source["selection"]
    chooses, reports = roles["chooses"] or {"split": "calibration inputs (unlabelled)"}, roles["reports"]
    print(f"\nint8 ONNX with nodes matching {list(parts)} kept float: {kept} of {total} Conv/MatMul/Gemm float")
    print(f"  rungs chosen on {chooses['split']} ({chooses.get('examples', '-')} examples):")
    for t in result.record["tried"]:
        g = t["gate"]
        drop = "" if "accuracy_drop" not in g else f"accuracy {0.0 - 100 * g['accuracy_drop']:+.2f} points, "
        print(f"  {t['rung']:<26} {drop}agreement {g['top1_agreement']:.3f}")
    size = result.record["size_bytes"]
    verdict = "passed" if result.passed else "failed"
    print(f"  size {size['int8'] / 1024:.0f} KB (fp32 {size['fp32'] / 1024:.0f} KB); gate {verdict}")
    if plan.data.test is None or reports is None:
        print("  no labelled held-out data to report on")
        return
    x, y = np.asarray(plan.data.test[0], np.float32), np.asarray(plan.data.test[1])
    shown = agreement_gate(fp32, x, y=y)(result.content)
    print(
        f"  reported on {reports['split']} ({reports['examples']} examples, never chosen on): rung "
        f"{result.record['rung']}, accuracy {0.0 - 100 * shown['accuracy_drop']:+.2f} points, "
        f"agreement {shown['top1_agreement']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="int8 accuracy targets on a pretrained small backbone")
    parser.add_argument("stage", choices=("prepare", "export", "all", "files", "explain"))
    parser.add_argument("--backbone", default="mobilenetv2_035")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--quantize", default="int8,qat")
    parser.add_argument("--full-integer", action="store_true", help="also the full-integer TFLite")
    parser.add_argument("--root", help="default /tmp/edgetl-int8-run/BACKBONE-SIZE")
    parser.add_argument("--target", help="edgetl export --target (int8 ONNX recipe), e.g. x86-vnni")
    parser.add_argument("--top", type=int, default=12, help="explain: layers to list")
    parser.add_argument(
        "--keep-float", nargs="*", default=[], help="explain: int8 ONNX with these node-name parts float"
    )
    args = parser.parse_args(argv)
    root = Path(args.root or f"/tmp/edgetl-int8-run/{args.backbone}-{args.image_size}")
    print(f"CPU: {_cpu()}; load {Path('/proc/loadavg').read_text().split()[:3]}")
    if args.stage in ("prepare", "all"):
        prepare(root, args.backbone, args.image_size, args.epochs)
    if args.stage in ("export", "all"):
        extra = ["full"] * args.full_integer + ([f"target={args.target}"] if args.target else [])
        return 0 if export(root, args.quantize, extra) else 1
    if args.stage == "explain" and args.keep_float:
        keep_float_experiment(root, args.keep_float)
        return 0
    if args.stage == "explain":
        explain(root, args.top)
        return 0
    if args.stage == "files":
        return 0 if files_table(root) else 1
    return 0


def _cpu() -> str:
    text = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f" {f}" in text]
    return f"{name} ({', '.join(flags)})"


if __name__ == "__main__":
    sys.exit(main())
