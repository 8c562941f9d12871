#!/usr/bin/env python
"""Measure issue 13's data targets: embedding extraction in memory vs streamed, 1 and 2 workers.

    python tools/bench_data.py [--images 50000] [--folder /tmp/edgetl_bench_data] [--backbone edgetl_cnn]

1. Generates (once, then reused) a folder of ``--images`` PNG files in 10 classes, mixed sizes
   (40x56 to 72x72), RGB, each class a coloured shape at its own place plus noise.
2. For each configuration, in fresh processes: load the folder at ``--size`` (in memory:
   ``load_dataset(streaming="off")``; streamed: ``streaming="on"``), embed every image with
   the backbone the way training does (in memory: ``model.predict``; streamed:
   ``edgetl.host._embedding_cache.embed``, cache off), then fit the linear head on the
   training split (L-BFGS, C chosen on validation) and measure test accuracy. Reported:
   images/s of embedding extraction (decoding included for streaming, whose decoding is
   the extraction's input pipeline) and of load + extraction, and the process's peak RSS
   (VmHWM). With 2 workers, two processes on 127.0.0.1 form a MultiWorkerMirroredStrategy
   cluster (``TF_CONFIG``) and share the extraction; the slower worker's time counts.
3. Streaming also runs on the first fifth of the folder, to show its peak RSS does not grow
   with the folder.

Targets (PASS/MISS): streaming peak RSS < 2 GB; streaming load + extraction throughput within
20% of in-memory; 2 workers complete with test accuracy within 1 point of 1 worker. On a
2-core machine two workers share the same two cores: their speed is reported, not judged.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = ((48, 48), (64, 48), (40, 56), (72, 72), (56, 64))
CLASSES = 10


def _make_one(args: tuple[str, int]) -> None:
    from PIL import Image

    path, i = args
    rng = np.random.default_rng(i)
    c = i % CLASSES
    w, h = SIZES[rng.integers(len(SIZES))]
    img = rng.normal(110, 40, (h, w, 3))
    colour = np.array([(c * 53) % 256, (c * 97 + 80) % 256, (c * 151 + 30) % 256], float)
    cy, cx = (0.25 + 0.5 * (c // 5)) * h, (0.15 + 0.175 * (c % 5)) * w
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - cy - rng.normal(0, 2)) ** 2 + (xx - cx - rng.normal(0, 2)) ** 2 < (0.18 * min(h, w)) ** 2
    img[disk] = 0.6 * img[disk] + 0.4 * colour + rng.normal(0, 30)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def generate(folder: Path, n: int) -> None:
    """``n`` PNG files in 10 class folders (skipped when the folder already has them)."""
    from multiprocessing import Pool

    marker = folder / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(n):
        return
    jobs = []
    for i in range(n):
        d = folder / f"class_{i % CLASSES}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((str(d / f"{i:06d}.png"), i))
    t0 = time.perf_counter()
    with Pool(os.cpu_count() or 2) as pool:
        pool.map(_make_one, jobs, chunksize=500)
    marker.write_text(str(n))
    print(f"generated {n} PNG files in {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, folder: str, size: int, limit: int, backbone_name: str, strategy_name: str) -> dict:
    """One configuration in this process: load, embed, fit the head, measure."""
    import warnings

    warnings.simplefilter("ignore")
    from edgetl.data import load_dataset, stratified_split
    from edgetl.host._backbones import create_backbone
    from edgetl.host._embedding_cache import embed
    from edgetl.host._tf import keras
    from edgetl.host._transfer import make_strategy

    strategy = make_strategy(strategy_name)  # first: multi-worker must start before any other TF work
    keras().utils.set_random_seed(0)
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    ds = load_dataset(folder, image_size=size, streaming=mode)
    if limit and limit < len(ds):
        ds = ds.subset(np.arange(0, len(ds), len(ds) // limit)[:limit])  # every class kept
    load_s = time.perf_counter() - t0
    with strategy.scope():
        model = create_backbone(backbone_name, ds.input_shape).model
    t1 = time.perf_counter()
    if mode == "on":
        emb = np.asarray(embed(model, ds.x, strategy=strategy, use_cache=False).array)
    else:
        emb = model.predict(ds.x.astype(np.float32), batch_size=256, verbose=0)
    embed_s = time.perf_counter() - t1
    rss = peak_rss_mb()
    return {
        "mode": "streamed" if mode == "on" else "in memory",
        "images": len(ds),
        "load_s": round(load_s, 1),
        "embed_s": round(embed_s, 1),
        "peak_rss_mb": round(rss),
        "start_rss_mb": round(rss0),
        "decoded_mb": round(int(np.prod(ds.x.shape)) / 2**20),
        "accuracy": head_accuracy(emb, ds, stratified_split),
        "replicas": int(strategy.num_replicas_in_sync),
    }


def head_accuracy(emb: np.ndarray, ds, stratified_split) -> float:
    """Test accuracy of the L-BFGS linear head on standardized embeddings (as training fits it)."""
    from edgetl.data import Dataset
    from edgetl.host._linear_head import fit_linear_head, standardization

    index = Dataset(np.arange(len(ds), dtype=np.float32)[:, None], ds.y, ds.class_names, "features")
    splits = stratified_split(index, seed=0)
    rows = {k: getattr(splits, k).x[:, 0].astype(np.int64) for k in ("train", "val", "test")}
    stats = standardization(emb[rows["train"]])
    fit = fit_linear_head(
        stats.apply(emb[rows["train"]]),
        ds.y[rows["train"]],
        ds.num_classes,
        x_val=stats.apply(emb[rows["val"]]),
        y_val=ds.y[rows["val"]],
    )
    z = stats.apply(emb[rows["test"]]) @ fit.W + fit.b
    return round(float(np.mean(z.argmax(1) == ds.y[rows["test"]])), 4)


def run_config(args: argparse.Namespace, mode: str, workers: int, limit: int = 0) -> dict:
    """A configuration in fresh processes (``workers`` of them forming one cluster)."""
    base = [sys.executable, __file__, "--child", mode, "--folder", str(args.folder), "--size", str(args.size)]
    base += ["--backbone", args.backbone, "--limit", str(limit)]
    envs = [dict(os.environ)]
    if workers > 1:
        ports = []
        for _ in range(workers):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        envs = [
            {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
            for i in range(workers)
        ]
        base += ["--strategy", "multi-worker"]
    procs = [subprocess.Popen(base, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for e in envs]
    outs = [p.communicate() for p in procs]
    results = []
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"configuration {mode}/{workers} failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    r = dict(results[0])
    r["workers"] = workers
    r["embed_s"] = max(x["embed_s"] for x in results)
    r["load_s"] = max(x["load_s"] for x in results)
    r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in results)
    r["embed_ips"] = round(r["images"] / r["embed_s"])
    r["total_ips"] = round(r["images"] / (r["embed_s"] + r["load_s"]))
    r["same_accuracy_on_workers"] = len({x["accuracy"] for x in results}) == 1
    return r


def report(rows: list[dict]) -> list[str]:
    lines = [
        f"{'data':<10} {'workers':>7} {'images':>7} {'load s':>7} {'embed s':>8} {'embed img/s':>11} "
        f"{'load+embed img/s':>16} {'peak RSS':>9} {'test acc':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['mode']:<10} {r['workers']:>7} {r['images']:>7} {r['load_s']:>7.1f} {r['embed_s']:>8.1f} "
            f"{r['embed_ips']:>11} {r['total_ips']:>16} {r['peak_rss_mb']:>6} MB {r['accuracy']:>8.4f}"
        )
    return lines


def targets(rows: list[dict]) -> list[str]:
    def find(mode: str, workers: int, images: int) -> dict:
        return next(r for r in rows if r["mode"] == mode and r["workers"] == workers and r["images"] == images)

    n = max(r["images"] for r in rows)
    mem, streamed, two = find("in memory", 1, n), find("streamed", 1, n), find("streamed", 2, n)
    small = [r for r in rows if r["mode"] == "streamed" and r["workers"] == 1 and r["images"] < n]
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"{'PASS' if ok else 'MISS'}  {text}")

    check(streamed["peak_rss_mb"] < 2048, f"streaming {n} images: peak RSS {streamed['peak_rss_mb']} MB < 2048 MB")
    if small:
        growth = streamed["peak_rss_mb"] - small[0]["peak_rss_mb"]
        check(
            growth < 0.1 * streamed["peak_rss_mb"],
            f"streaming peak RSS flat with folder size: {small[0]['images']} images {small[0]['peak_rss_mb']} MB, "
            f"{n} images {streamed['peak_rss_mb']} MB",
        )
    ratio = streamed["total_ips"] / mem["total_ips"]
    check(
        ratio >= 0.8,
        f"streaming load+embed {streamed['total_ips']} img/s = {ratio:.0%} of in-memory {mem['total_ips']} img/s "
        "(>= 80%)",
    )
    out.append(
        f"info  extraction alone: streamed {streamed['embed_ips']} img/s (decoding included) vs in-memory "
        f"{mem['embed_ips']} img/s (decoded beforehand, {mem['load_s']:.0f} s); in-memory peak RSS "
        f"{mem['peak_rss_mb']} MB = start + {(mem['peak_rss_mb'] - mem['start_rss_mb']) / mem['decoded_mb']:.1f}x "
        f"the {mem['decoded_mb']} MB of decoded pixels"
    )
    diff = abs(two["accuracy"] - streamed["accuracy"])
    check(
        diff <= 0.01 and two["replicas"] == 2 and two["same_accuracy_on_workers"],
        f"2 workers (2 replicas) completed, test accuracy {two['accuracy']:.4f} vs 1 worker {streamed['accuracy']:.4f} "
        f"(difference {diff * 100:.2f} points <= 1)",
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--folder", type=Path, default=Path("/tmp/edgetl_bench_data"))
    p.add_argument("--size", type=int, default=48, help="images are resized to SIZE x SIZE (the backbone's input)")
    p.add_argument("--backbone", default="edgetl_cnn")
    p.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="default", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args()
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    if args.child:
        r = child(args.child, str(args.folder), args.size, args.limit, args.backbone, args.strategy)
        print(json.dumps(r))
        return 0
    generate(args.folder, args.images)
    rows = []
    for mode, workers, limit in (("off", 1, 0), ("on", 1, 0), ("on", 1, args.images // 5), ("on", 2, 0), ("off", 2, 0)):
        rows.append(run_config(args, mode, workers, limit))
        print(report(rows)[-1], flush=True)
    print(f"\n{args.backbone} at {args.size}x{args.size}, {os.cpu_count()} cores; folder {args.folder}")
    print("\n".join(report(rows)))
    print("\n".join(targets(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
