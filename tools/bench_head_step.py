#!/usr/bin/env python
"""Per-step head training time: edgetl's whole-plan loops vs the peer.

    python tools/bench_head_step.py [--rounds 7] [--no-peer] [--json out.json]

D=256, C=10 (5 active classes), batch 16, 160 examples; one `train` call runs 10 epochs
(100 steps) or 1 epoch (10 steps); runtime threads = 1. Implementations, measured
side by side in interleaved rounds; per step = time of a whole `train` call / its steps,
median over rounds, as wall-clock and as this thread's CPU time:

* edgetl loop onnxruntime / LiteRT: edgetl.device._head_loop (one call per `train`);
* numpy reference: edgetl.bundle._head.reference_step (float64), step by step;
* onnxruntime-training 1.19.2 (the peer: AdamW, one step = module call + optimizer step),
  twice per round: tools/bench_suite.ort_training_peer (the suite's number: default
  threads, median of 200 single-step timings), and the same model, venv and step with one
  thread, timed like edgetl's calls: whole blocks of 100 and of 10 steps (wall and CPU).

Why the second: with other jobs on the 2 cores, a 3-ms call absorbs the time its process
is preempted, while the median of 70-us single steps skips it; and ort_training_peer's
default threads wait on each other when a core is taken. Same threads, same block length
and CPU time make the comparison independent of the machine's load.

Target: loop per-step time <= 0.5 x the peer's, on both backends. The suite compares
edgetl's SGD with the peer's AdamW; Adam rows are printed too (same optimizer as the peer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

D, C, ACTIVE, N, BATCH = 256, 10, 5, 160, 16
TARGET = 0.5


def build(work: Path) -> dict[str, Any]:
    """The head's models (host side, TensorFlow) and its starting weights."""
    from edgetl.device._head import HeadState
    from edgetl.host._head_graphs import head_infer_onnx
    from edgetl.host._head_loop_graphs import head_tflite_loop, head_train_loop_onnx

    rng = np.random.default_rng(0)
    W = (rng.standard_normal((D, C)) * 0.05).astype(np.float32)
    b = np.zeros(C, np.float32)
    mask = (np.arange(C) < ACTIVE).astype(np.float32)
    W[:, ACTIVE:] = 0.0
    return {
        "head": HeadState(W, b, mask, W.copy(), tuple(f"c{i}" for i in range(ACTIVE))),
        "loop_onnx": {opt: head_train_loop_onnx(D, C, opt) for opt in ("sgd", "adam")},
        "infer_onnx": head_infer_onnx(D, C),
        "loop_tflite": head_tflite_loop(W, b, mask),
    }


PEER_MODULE = 'Module(d + "/training_model.onnx", state, d + "/eval_model.onnx", "cpu")'
PEER_MODULE_1_THREAD = 'Module(d + "/training_model.onnx", state, d + "/eval_model.onnx", "cpu", session_options=so)'
PEER_BLOCKS_TAIL = """
import json
for _ in range(5): step()
out = {}
for block in (100, 10):
    wall, cpu = [], []
    for _ in range(max(5, 600 // block)):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(block): step()
        wall.append((time.perf_counter() - t0) / block)
        cpu.append((time.thread_time() - c0) / block)
    out[block] = [float(np.median(wall)) * 1e3, float(np.median(cpu)) * 1e3]
print(json.dumps(out))
"""


def peer_blocks(d: int, c: int) -> dict[int, tuple[float, float]] | None:
    """The peer with one thread, timed like edgetl's calls: ms/step (wall, thread CPU)
    over blocks of 100 and 10 consecutive steps.

    Same model, step and venv as tools/bench_suite.ort_training_peer (which must have run
    first); only the session options (1 intra-op and 1 inter-op thread, as edgetl's runtimes
    here) and the timing differ. None if the venv is missing or the script fails.
    """
    import subprocess

    from bench_suite import PEER_SCRIPT

    py = Path(tempfile.gettempdir()) / "edgetl_ort_training_venv" / "bin" / "python"
    if not py.exists() or PEER_MODULE not in PEER_SCRIPT:
        return None
    setup = PEER_SCRIPT.split("for _ in range(5): step()")[0].replace(PEER_MODULE, PEER_MODULE_1_THREAD)
    one_thread = (
        "import onnxruntime as ort\n"
        "so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1\n"
    )
    setup = setup.replace("module = ", one_thread + "module = ", 1)
    out = subprocess.run(
        [str(py), "-c", setup + PEER_BLOCKS_TAIL, str(d), str(c)], capture_output=True, text=True, timeout=600
    )
    if out.returncode:
        print(f"peer blocks failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return {int(k): (v[0], v[1]) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def measure(models: dict[str, Any], rounds: int, peer: bool) -> dict[str, Any]:
    from bench_suite import ort_training_peer

    from edgetl.bundle._head import initial_state, reference_step
    from edgetl.device._head import TrainSettings, batches, effective_learning_rate
    from edgetl.device._head_loop import LiteRTLoopHeadTrainer, OnnxLoopHeadTrainer

    head = models["head"]
    rng = np.random.default_rng(1)
    emb = rng.random((N, D), dtype=np.float32)
    onehot = np.eye(C, dtype=np.float32)[np.arange(N) % ACTIVE]
    trainers = {
        "edgetl loop onnxruntime": OnnxLoopHeadTrainer(models["loop_onnx"], models["infer_onnx"], threads=1),
        "edgetl loop LiteRT": LiteRTLoopHeadTrainer(models["loop_tflite"], threads=1),
    }

    def numpy_train(settings: TrainSettings) -> None:
        state = initial_state(head.W, head.b, settings.optimizer)
        lr = effective_learning_rate(settings, emb)
        for idx in batches(N, settings):
            state, _ = reference_step(
                state,
                emb[idx],
                onehot[idx],
                head.mask,
                head.anchor,
                optimizer=settings.optimizer,
                lr=lr,
                l2=settings.l2,
                momentum=settings.momentum,
            )

    cases: list[tuple[str, str, int, Callable[[], Any]]] = []
    for epochs in (10, 1):
        for opt in ("sgd", "adam"):
            settings = TrainSettings(epochs=epochs, batch_size=BATCH, optimizer=opt)
            steps = len(batches(N, settings))
            for name, trainer in trainers.items():
                cases.append((name, opt, steps, lambda t=trainer, s=settings: t.train(head, emb, onehot, s)))
            if epochs == 10:
                cases.append(("numpy reference (float64)", opt, steps, lambda s=settings: numpy_train(s)))
    for _, _, _, fn in cases:  # warm-up: sessions, arenas, interpreter allocation
        fn()
    wall: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    cpu: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    suite_peer: list[float] = []
    block_peer: dict[int, list[tuple[float, float]]] = {100: [], 10: []}
    peer_note = "skipped (--no-peer)"
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for i, (_, _, steps, fn) in enumerate(cases):
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            wall[i].append((time.perf_counter() - t0) * 1e3 / steps)
            cpu[i].append((time.thread_time() - c0) * 1e3 / steps)
        if peer:
            ms, peer_note = ort_training_peer(D, C)
            if ms is not None:
                suite_peer.append(ms)
            for k, v in (peer_blocks(D, C) or {}).items():
                block_peer[k].append(v)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    load.append(os.getloadavg()[0])
    peer_suite = float(np.median(suite_peer)) if suite_peer else None
    peer_wall = {k: float(np.median([w for w, _ in v])) for k, v in block_peer.items() if v}
    peer_cpu = {k: float(np.median([c for _, c in v])) for k, v in block_peer.items() if v}

    def ratio(x: float, y: float | None) -> float | None:
        return x / y if y else None

    rows = []
    for i, (name, opt, steps, _) in enumerate(cases):
        w, c = float(np.median(wall[i])), float(np.median(cpu[i]))
        rows.append(
            {
                "implementation": name,
                "optimizer": opt,
                "steps_per_call": steps,
                "wall_ms_per_step": w,
                "cpu_ms_per_step": c,
                "wall_over_suite_peer": ratio(w, peer_suite),
                "wall_over_peer": ratio(w, peer_wall.get(steps)),
                "cpu_over_peer": ratio(c, peer_cpu.get(steps)),
            }
        )
    verdicts = {}
    for backend in ("onnxruntime", "LiteRT"):
        for opt in ("sgd", "adam"):
            row = next(
                r
                for r in rows
                if r["implementation"] == f"edgetl loop {backend}"
                and r["optimizer"] == opt
                and r["steps_per_call"] == 100
            )
            verdicts[f"{backend}/{opt}"] = {
                key: None if row[key] is None else ("PASS" if row[key] <= TARGET else "MISS")
                for key in ("wall_over_suite_peer", "wall_over_peer", "cpu_over_peer")
            }
    return {
        "config": {
            "D": D,
            "C": C,
            "active_classes": ACTIVE,
            "examples": N,
            "batch": BATCH,
            "threads": 1,
            "rounds": rounds,
        },
        "peer": {
            "note": peer_note,
            "suite_ms_per_step": peer_suite,
            "suite_rounds": suite_peer,
            "one_thread_blocks_wall_ms_per_step": peer_wall,
            "one_thread_blocks_cpu_ms_per_step": peer_cpu,
            "one_thread_blocks_rounds": {k: v for k, v in block_peer.items()},
        },
        "load_average_1min": {"start": load[0], "end": load[1]},
        "rows": rows,
        "target": f"loop ms/step <= {TARGET} x peer ms/step",
        "verdicts": verdicts,
    }


def table(res: dict[str, Any]) -> str:
    """The results as a Markdown table plus the verdicts."""
    peer = res["peer"]

    def f(x: float | None, digits: int = 2) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    lines = [
        f"Head train step, D={D}, C={C} ({ACTIVE} active), batch {BATCH}, {N} examples, runtime threads 1; medians of"
        f" {res['config']['rounds']} interleaved rounds (1-min load average {res['load_average_1min']['start']:.1f} ->"
        f" {res['load_average_1min']['end']:.1f} on {os.cpu_count()} cores).",
        "Ratios: wall / suite peer (bench_suite.ort_training_peer: default threads, median of single steps);"
        " wall and CPU / peer with 1 thread timed over blocks of the same number of steps.",
        "",
        "| implementation | optimizer | steps/call | wall ms/step | CPU ms/step | wall/suite peer | wall/peer"
        " | CPU/peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['implementation']} | {r['optimizer']} | {r['steps_per_call']} | {r['wall_ms_per_step']:.4f} |"
            f" {r['cpu_ms_per_step']:.4f} | {f(r['wall_over_suite_peer'])} | {f(r['wall_over_peer'])} |"
            f" {f(r['cpu_over_peer'])} |"
        )
    lines.append(f"| peer, suite protocol | adamw | 1 | {f(peer['suite_ms_per_step'], 4)} | | 1.00 | | |")
    for k in sorted(peer["one_thread_blocks_wall_ms_per_step"], reverse=True):
        w, c = peer["one_thread_blocks_wall_ms_per_step"][k], peer["one_thread_blocks_cpu_ms_per_step"][k]
        lines.append(f"| peer, 1 thread, blocks of {k} | adamw | {k} | {w:.4f} | {c:.4f} | | 1.00 | 1.00 |")
    lines += [
        "",
        f"Peer: {peer['note']}. Per round (ms/step): suite {', '.join(f(x, 4) for x in peer['suite_rounds']) or '-'}",
    ]
    for k, v in sorted(peer["one_thread_blocks_rounds"].items(), reverse=True):
        lines[-1] += f"; 1 thread x{k} wall {', '.join(f(w, 4) for w, _ in v) or '-'}"
    lines.append(f"Target: {res['target']} at 100 steps per call (wall/suite peer, wall/peer, CPU/peer):")
    for key, v in res["verdicts"].items():
        lines.append(
            f"  {key}: {v['wall_over_suite_peer'] or '-'}, {v['wall_over_peer'] or '-'}, {v['cpu_over_peer'] or '-'}"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = build(Path(tmp))
        res = measure(models, args.rounds, not args.no_peer)
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
