"""Verify a bundle's trainable tail in the runtimes installed here (part of ``edgetl verify``).

A tail (``edgetl.bundle._tail``) is the backbone and head split in two, so the bundle's own
``parity.npz`` judges it, with no data of its own. Per runtime:

- ``trunk`` row: ``trunk(parity x)`` through ``tail_init.npz``'s layer and seam (float64 numpy)
  must reproduce the parity embeddings, at the fp32 backbone rule (edgetl.device._verify);
- ``tail_infer`` / ``tail`` row: the inference graph on those trunk activations, with tail_init's
  W1, b1, mean, inv_std and head_init's W, b, mask, must reproduce the parity probabilities at the
  fp32 fused rule (FP32_TOLERANCE: stricter than export's split check, which allows 1e-3 of the
  largest embedding, and the same rule as the fused model the tail stands in for);
- one row per optimizer: the training loop graphs (ONNX) or ``train_steps_*`` signatures (LiteRT),
  run by :class:`TailRuntime` from the factory tail over the export check's steps
  (:data:`TAIL_CHECK_STEPS`: 8 steps, momentum and Adam's moments in play) on those activations,
  with one-hot targets of the parity predictions, against ``reference_train`` in float64, with
  export's rule (:func:`tail_train_tolerance`, recomputed here, not read from the manifest:
  an edited manifest must not loosen it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgetl.bundle import Bundle, Check
from edgetl.bundle import _contract as C
from edgetl.bundle import _tail as T

# How export's tail check trains (edgetl.host._tail_export; verify repeats it on the bundle's files):
# 2 epochs of batch 8 on the 32 parity rows, at rates that move the weights.
TAIL_CHECK_STEPS = dict(l2=1e-3, epochs=2, batch=8)
TAIL_CHECK_RATES = {"sgd": 0.1, "adam": 0.01}
# Every check against the float64 reference also allows FLOOR_FACTOR x the precision floor: how
# far the same math in float32 numpy lands from float64 on this model and data. Some models
# leave float32 no better: the demo's backbone (bias 1 before a standardization with inv_std up
# to 3,400 on 600 source images) puts z's float32 error at ~4e-4, and numpy float32, onnxruntime
# and LiteRT all landed 1.4e-5 from the reference probabilities and 1.07e-4 (Adam, 99th
# percentile) from its weights, within 1% of each other. The factor covers the runtimes' other
# summation orders; a wrong graph (tests/device/test_tail.py) misses by the whole step.
FLOOR_FACTOR = 4.0


def tail_train_tolerance(moved: float, floor: float) -> float:
    """The head's rule (``HEAD_STEP_ATOL + HEAD_STEP_RTOL`` x how far the weights moved) plus
    :data:`FLOOR_FACTOR` x the float32 floor: export's and verify's limit for trained tails."""
    from edgetl.device._verify import HEAD_STEP_ATOL, HEAD_STEP_RTOL

    return HEAD_STEP_ATOL + HEAD_STEP_RTOL * moved + FLOOR_FACTOR * floor


def weights_difference(got: dict, want: dict, optimizer: str) -> float:
    """Max (SGD) or 99th percentile (Adam: its update carries float32's relative error of each
    gradient, see edgetl.device._verify._train_check) of the four tail tensors' differences."""
    d = np.concatenate([np.abs(np.asarray(got[w], np.float64) - want[w]).ravel() for w in T.WEIGHTS])
    return float(d.max() if optimizer == "sgd" else np.percentile(d, 99))


def tail_checks(bundle: Bundle, ref: dict[str, np.ndarray], backends: tuple[str, ...]) -> list[Check]:
    """The tail's rows for every runtime in ``backends`` (none for a bundle without a tail)."""
    from edgetl.device._tail import TailRuntime
    from edgetl.device._verify import FP32_TOLERANCE, _fp32_tolerance

    if not (bundle.manifest.extra.get("tail") or {}).get("available"):
        return []
    weights = {k: np.asarray(v, np.float32) for k, v in bundle.arrays("tail_init", C.TAIL_INIT_MEMBERS).items()}
    weights.update(bundle.arrays("head_init", C.HEAD_INIT_MEMBERS))
    n_active = int(weights[C.MASK].sum())
    want_probs = np.zeros((len(ref[C.PARITY_X]), weights[C.WEIGHTS].shape[1]))
    want_probs[:, :n_active] = ref[C.PARITY_PROBABILITIES]  # inactive classes must get exactly 0
    onehot = np.eye(want_probs.shape[1], dtype=np.float32)[ref[C.PARITY_PROBABILITIES].argmax(1)]
    out = []
    for backend in backends:
        runtime = TailRuntime.from_bundle(bundle, backend)
        fmt = runtime.fmt
        trunk_file = C.TRUNK_FILE.format(precision="fp32", format=fmt)
        infer = (T.INFER_FILE, "tail_infer") if fmt == "onnx" else (T.TFLITE_FILE, "tail")
        trunk = runtime.trunk(ref[C.PARITY_X])
        z = T.forward(weights, trunk, runtime.activation)["z"]
        diff = float(np.max(np.abs(z - ref[C.PARITY_EMBEDDINGS])))
        limit = _fp32_tolerance(ref[C.PARITY_EMBEDDINGS], "backbone")
        extra = {"inputs": [trunk_file, T.INIT_FILE], "compared_with": "parity embeddings"}
        out.append(Check(trunk_file, C.TRUNK, fmt, "fp32", diff <= limit, "max_abs_diff", diff, limit, extra))
        diff = float(np.max(np.abs(runtime.probabilities(weights, trunk) - want_probs)))
        extra = {"inputs": [trunk_file, *infer[:1], T.INIT_FILE, "head_init.npz"], "signature": "infer"}
        out.append(Check(*infer, fmt, "fp32", diff <= FP32_TOLERANCE, "max_abs_diff", diff, FP32_TOLERANCE, extra))
        out += [_train_check(runtime, weights, trunk, onehot, opt, trunk_file) for opt in TAIL_CHECK_RATES]
    return out


def _train_check(
    runtime: Any, weights: dict, trunk: np.ndarray, onehot: np.ndarray, opt: str, trunk_file: str
) -> Check:
    """One optimizer's training graph against the float64 reference on the same plan."""
    steps = dict(lr=TAIL_CHECK_RATES[opt], **TAIL_CHECK_STEPS)
    got = runtime.train_plan(weights, trunk, onehot, opt, **steps)
    want = runtime.reference(weights, trunk, onehot, opt, **steps)
    floor = weights_difference(runtime.reference(weights, trunk, onehot, opt, **steps, dtype=np.float32), want, opt)
    moved = max(float(np.abs(want[w] - weights[w]).max()) for w in T.WEIGHTS)
    limit = tail_train_tolerance(moved, floor)
    diff = weights_difference(got, want, opt)
    file, role = (
        (T.TRAIN_FILE.format(optimizer=opt), "tail_train_loop") if runtime.fmt == "onnx" else (T.TFLITE_FILE, "tail")
    )
    extra = {
        "optimizer": opt,
        "steps": int(len(np.asarray(got[C.LOSSES]).ravel())),
        "float32_floor": floor,
        "inputs": [trunk_file, file, T.INIT_FILE, "head_init.npz"],
    }
    if runtime.fmt == "tflite":
        extra["signature"] = f"train_steps_{opt}"
    measure = "max_abs_diff" if opt == "sgd" else "p99_abs_diff"
    return Check(file, role, runtime.fmt, "fp32", diff <= limit, measure, diff, limit, extra)
