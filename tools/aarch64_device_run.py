"""The device half of tools/aarch64_check.py: every device command on one bundle, run alike
on x86 and in the arm64 userland (device install only: numpy + runtimes, no TensorFlow).

    python tools/aarch64_device_run.py BUNDLE DATA.npz OUT_DIR [--backends onnxruntime litert]
    python tools/aarch64_device_run.py BUNDLE DATA.npz OUT_DIR --resize-unchanged-inputs

Writes OUT_DIR/commands.json (each `edgetl` command line, exit code, seconds, stderr tail)
and OUT_DIR/arrays.npz (fp32 and quantized probabilities per backend x precision, and the
personalized head per backend) for aarch64_check.py to compare between the two machines.

``--resize-unchanged-inputs`` turns edgetl's LiteRT scalar fix off (every signature input
resized on every call, as ai_edge_litert's SignatureRunner does) and personalizes on LiteRT
in this process: on aarch64 it is expected to die of SIGSEGV, which proves the fix matters.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLI = "import sys; from edgetl.cli import main; sys.exit(main(sys.argv[1:]))"
PERSONALIZE = ["--epochs", "3", "--margin", "1", "--forget-margin", "1"]  # accepted whatever the guard says


def edgetl(*args: str) -> dict:
    """One `edgetl` command in a fresh interpreter, as a user runs it."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True)
    return {
        "args": list(args),
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "stdout_tail": proc.stdout[-600:],
        "stderr_tail": proc.stderr[-1200:],
    }


def command_runs(bundle: str, data: str, out: Path, configs: dict[str, list[str]]) -> list[dict]:
    """inspect, verify, predict (each backend x precision), personalize and store history
    (each backend, its own store), and a short bench."""
    runs = [edgetl("inspect", bundle), edgetl("verify", bundle, "--data", data)]
    for backend, precisions in configs.items():
        for precision in precisions:
            runs.append(edgetl("predict", bundle, data, "--backend", backend, "--precision", precision))
        store = str(out / f"store-{backend}")
        runs.append(edgetl("personalize", bundle, "--data", data, "--store", store, "--backend", backend, *PERSONALIZE))
        runs.append(edgetl("store", "history", "--store", store))
        runs.append(edgetl("predict", bundle, data, "--backend", backend, "--store", store))
    runs.append(edgetl("bench", bundle, "--runs", "5", "--data", data))
    return runs


def arrays(bundle: str, data: str, out: Path, configs: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Probabilities of every backend x precision on the data, and each personalized head."""
    from edgetl.device import Classifier

    x = np.load(data)["x"]
    result: dict[str, np.ndarray] = {}
    for backend, precisions in configs.items():
        for precision in precisions:
            clf = Classifier.open(bundle, backend=backend, precision=precision)
            result[f"probabilities/{backend}/{precision}"] = clf.predict(x).probabilities
        head = Classifier.open(bundle, backend=backend, store=out / f"store-{backend}").head
        result[f"head/{backend}/W"], result[f"head/{backend}/b"] = head.W, head.b
    return result


def crash_without_fix(bundle: str, data: str, out: Path) -> int:
    """Personalize on LiteRT with every signature input resized on every call."""
    import edgetl.device._runtimes as runtimes
    from edgetl.cli import main

    runtimes.RESIZE_UNCHANGED_INPUTS = True
    store = str(out / "store-litert-resize-unchanged")
    return main(["personalize", bundle, "--data", data, "--store", store, "--backend", "litert", *PERSONALIZE])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("data", help=".npz with x, y, class_names")
    p.add_argument("out")
    p.add_argument("--backends", nargs="+", default=["onnxruntime", "litert"])
    p.add_argument("--resize-unchanged-inputs", action="store_true", help="turn the LiteRT scalar fix off")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resize_unchanged_inputs:
        return crash_without_fix(args.bundle, args.data, out)
    from edgetl.bundle import read_bundle

    bundle = read_bundle(args.bundle)
    fmt = {"onnxruntime": "onnx", "litert": "tflite"}
    configs = {b: bundle.precisions("fused", fmt[b]) for b in args.backends}
    runs = command_runs(args.bundle, args.data, out, configs)
    (out / "commands.json").write_text(json.dumps(runs, indent=1))
    np.savez(out / "arrays.npz", **arrays(args.bundle, args.data, out, configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
