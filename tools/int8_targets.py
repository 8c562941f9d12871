#!/usr/bin/env python
"""Does int8 ship within 1 point of fp32 on a pretrained small backbone? (issue 23, targets)

    nice -n 10 python tools/int8_targets.py prepare [--backbone mobilenetv2_035] [--image-size 96] [--epochs 15]
    nice -n 10 python tools/int8_targets.py export  [--backbone mobilenetv2_035] [--quantize int8,qat]

What a new user does, with the CLI: ``edgetl pretrain`` on scikit-learn's handwritten digits
0-4 upscaled to RGB (about 900 real images, tools/user_models.py), ``edgetl train`` on digits
5-9 with the pretrained run as backbone, then ``edgetl export RUN --quantize int8,qat`` on the
run's own data. ``prepare`` caches the runs and data under ``--root`` (default
/tmp/edgetl-int8-run/BACKBONE-SIZE, reused by the ONNX work); ``export`` reports, per
quantized file kept or left out, accuracy against fp32 on the test split, the remedy-ladder
rung that got it there, its float share and size.

Target: each int8 file ships at most 1 point below fp32 of its format (PASS/MISS printed).
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
    if not result.ok:
        print(result.describe())
        return False
    return report(out, result.omitted, quantize)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="int8 accuracy targets on a pretrained small backbone")
    parser.add_argument("stage", choices=("prepare", "export", "all"))
    parser.add_argument("--backbone", default="mobilenetv2_035")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--quantize", default="int8,qat")
    parser.add_argument("--full-integer", action="store_true", help="also the full-integer TFLite")
    parser.add_argument("--root", help="default /tmp/edgetl-int8-run/BACKBONE-SIZE")
    parser.add_argument("--target", help="edgetl export --target (int8 ONNX recipe), e.g. x86-vnni")
    args = parser.parse_args(argv)
    root = Path(args.root or f"/tmp/edgetl-int8-run/{args.backbone}-{args.image_size}")
    print(f"CPU: {_cpu()}; load {Path('/proc/loadavg').read_text().split()[:3]}")
    if args.stage in ("prepare", "all"):
        prepare(root, args.backbone, args.image_size, args.epochs)
    if args.stage in ("export", "all"):
        extra = ["full"] * args.full_integer + ([f"target={args.target}"] if args.target else [])
        return 0 if export(root, args.quantize, extra) else 1
    return 0


def _cpu() -> str:
    text = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f" {f}" in text]
    return f"{name} ({', '.join(flags)})"


if __name__ == "__main__":
    sys.exit(main())
