"""Verify a bundle in the real runtimes, without TensorFlow: every check can fail.

For every fused and backbone artifact, its outputs on the bundle's parity inputs against
the Keras reference outputs (``parity.npz``, written at export):

- fp32: max abs difference (probabilities), relative to the embeddings' L2 norm (embeddings);
- quantized fused models: top-1 agreement with Keras, and with labelled data the accuracy
  drop against fp32 of the same format;
- quantized backbones, judged by what they are for: the factory head's top-1 agreement
  on their embeddings against the fp32 reference embeddings, and cosine similarity.

The head graphs are run by the device's own trainers (the code personalization runs):
several steps from the factory head, so that momentum and Adam's moments are in play,
against the float64 numpy reference over the same batches, on both runtimes.

A bundle with a trainable tail also gets its tail checked (:func:`tail_checks`).
A tail (``edgetl.bundle._tail``) is the backbone and head split in two, so the bundle's own
``parity.npz`` judges it, with no data of its own. Per runtime:

- ``trunk`` row: ``trunk(parity x)`` through ``tail_init.npz``'s layer and seam (float64 numpy)
  must reproduce the parity embeddings, at the fp32 backbone rule (:func:`_fp32_tolerance`);
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

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

import edgetl.device._runtimes as _runtimes
from edgetl.bundle import Bundle, Check, format_checks
from edgetl.bundle import _contract as C
from edgetl.bundle import _tail as T
from edgetl.bundle._contract import (
    BIAS,
    HEAD_INIT_MEMBERS,
    MASK,
    PARITY_EMBEDDINGS,
    PARITY_MEMBERS,
    PARITY_PROBABILITIES,
    PARITY_X,
    WEIGHTS,
)
from edgetl.bundle._head import ADAM_EPS, masked_softmax
from edgetl.device._evidence_gate import MAX_ACCURACY_DROP, MIN_COSINE, MIN_TOP1_AGREEMENT, PARITY_OK, evidence_gates
from edgetl.device._head import HeadState, ReferenceHeadTrainer, TrainSettings
from edgetl.device._head_loop import LiteRTLoopHeadTrainer, OnnxLoopHeadTrainer
from edgetl.device._runtimes import FORMAT_BACKENDS, install_hint, load_model, run_batched
from edgetl.device._tail import TailRuntime
from edgetl.errors import DependencyError

# fp32 exports must match Keras to this max abs difference on probabilities, and on
# embeddings to this times their largest magnitude (standardized embeddings reach ~10, and
# float32 reordering error is relative: MobileNetV2's measured 3.3e-4 on values up to ~8).
# Not 1e-6: converters fuse ops and reorder float sums (tf2onnx, XNNPACK in LiteRT).
FP32_TOLERANCE = 1e-4
# The head trainers must match the numpy reference to HEAD_STEP_ATOL plus HEAD_STEP_RTOL
# of how far the weights moved: float32 rounding in W - lr*update scales with the update,
# and Adam's update is ~lr per element whatever the gradient, so a fixed 1e-5 failed
# healthy heads (issue 9: 1.31e-5 on a head whose Adam step was 0.05 per element).
HEAD_STEP_ATOL = 1e-5
HEAD_STEP_RTOL = 1e-3
HEAD_STEPS = dict(epochs=3, batch_size=4)  # 8 embeddings -> 6 steps
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


@dataclass
class Report:
    """The checks of one verification; ``ok`` only when every check passed."""

    checks: list[Check] = field(default_factory=list)
    # Artifacts whose runtime is not installed here (a one-runtime device install), with how to add it.
    not_checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks], "not_checked": self.not_checked}

    def describe(self) -> str:
        skipped = "".join(f"\nnot checked: {line}" for line in self.not_checked)
        failures = "".join(f"\nfailed: {c.file} ({c.role}): {_why(c)}" for c in self.failed())
        return (
            format_checks(self.checks)
            + skipped
            + failures
            + f"\nverification {'passed' if self.ok else 'FAILED'} ({len(self.failed())} of {len(self.checks)} checks "
            "failed)"
        )


def _why(check: Check) -> str:
    """What made ``check`` fail, with the number: the accuracy drop when that was it (the
    table's agreement column can read fine while the accuracy gate failed)."""
    drop, allowed = check.extra.get("accuracy_drop"), check.extra.get("max_accuracy_drop")
    if drop is not None and allowed is not None and drop > allowed:
        return (
            f"accuracy {check.extra['accuracy']:.4f} is {drop * 100:.1f} points below fp32 of its format "
            f"(at most {allowed * 100:g} allowed)"
        )
    if check.extra.get("outcome") in ("fail", "thin"):  # the evidence gates' words, with the counts
        return f"{check.describe()}: {check.extra['gate']}"
    if check.extra.get("error"):  # a tail file that cannot be measured
        return check.extra["error"]
    inputs = f" (through {', '.join(check.extra['inputs'])})" if check.extra.get("inputs") else ""  # tail rows
    return check.describe() + (f" ({check.extra['optimizer']})" if check.extra.get("optimizer") else "") + inputs


def verify_bundle(
    bundle: Bundle, x: np.ndarray | None = None, y: np.ndarray | None = None, *, inputs: np.ndarray | None = None
) -> Report:
    """Run every check of ``bundle`` in the runtimes installed here; with labelled ``x``/``y``,
    also measure accuracy. With ``x`` and/or unlabelled ``inputs`` (an export passes its
    calibration examples), quantized models are gated on that evidence (:func:`evidence_gates`)
    instead of the 32 parity examples. A bundle with a trainable tail also gets the tail's rows
    (trunk, inference graph, SGD and Adam training graphs per runtime: :func:`tail_checks`).

    Artifacts for a runtime that is not installed (a ``device-onnxruntime`` or
    ``device-litert`` install) are listed in ``report.not_checked``, not failed.

    Returns:
        A :class:`Report`; ``report.ok`` is False if any check failed.

    Raises:
        DependencyError: neither runtime is installed.
    """

    backends = _runtimes.installed_backends()  # looked up at call time: tests simulate a one-runtime device
    if not backends:
        raise DependencyError(f"no runtime installed (onnxruntime or ai-edge-litert): {install_hint()}")
    ref = bundle.arrays("parity", PARITY_MEMBERS)
    init = bundle.arrays("head_init", HEAD_INIT_MEMBERS)
    report = Report()
    runnable = [a for a in bundle.artifacts() if FORMAT_BACKENDS.get(a.format.value) in backends]
    for missing in sorted(set(FORMAT_BACKENDS.values()) - set(backends)):
        files = sorted(a.file for a in bundle.artifacts() if FORMAT_BACKENDS.get(a.format.value) == missing)
        if files:
            report.not_checked.append(f"{len(files)} files need {missing}, not installed: {install_hint(missing)}")
    models = [_model_check(bundle, a, ref, init, x, y) for a in runnable if a.role in ("fused", "backbone")]
    models = evidence_gates(bundle, _with_accuracy_drops(models), x, y, inputs, init)
    report.checks = models + _head_checks(bundle, ref, init, backends) + tail_checks(bundle, ref, backends)
    return report


def _fp32_tolerance(reference: np.ndarray, role: Any) -> float:
    """How far an fp32 conversion may differ from Keras, element by element.

    Probabilities: FP32_TOLERANCE. Embeddings: FP32_TOLERANCE times the typical L2 norm of
    an example's embedding, because float32 rounding in each output grows with the size of
    the whole vectors it is computed from (|fl(x.y) - x.y| <= n eps |x||y|), not with the
    output's own value. Scaled by the largest element instead, a random-weight MobileNetV2
    at 224x224 failed at 8.0e-4 (limit 5.1e-4) while its relative L2 error was ~5e-6; a real
    conversion bug (a scale, swapped channels) is orders of magnitude above either limit
    (tests/device/test_verify_gates.py).
    """
    if role == "fused":
        return FP32_TOLERANCE
    norm = float(np.median(np.linalg.norm(reference.reshape(len(reference), -1), axis=1)))
    return FP32_TOLERANCE * max(1.0, norm, float(np.max(np.abs(reference))))


def _model_check(
    bundle: Bundle,
    a: Any,
    ref: dict[str, np.ndarray],
    init: dict[str, np.ndarray],
    x: np.ndarray | None,
    y: np.ndarray | None,
) -> Check:
    model = load_model(bundle.path / a.file, a.format.value)
    key = PARITY_PROBABILITIES if a.role == "fused" else PARITY_EMBEDDINGS
    out = model(ref[PARITY_X])
    base = dict(file=a.file, role=a.role.value, format=a.format.value, precision=a.precision.value)
    extra: dict[str, Any] = {}
    if x is not None and y is not None and a.role == "fused":
        extra["accuracy"] = float(np.mean(run_batched(model, x.astype(np.float32)).argmax(1) == y))
    p = a.precision.value
    if p == "fp32":
        diff = float(np.max(np.abs(out - ref[key])))
        return Check(
            **base,
            ok=diff <= (tolerance := _fp32_tolerance(ref[key], a.role)),
            measure="max_abs_diff",
            value=diff,
            limit=tolerance,
            extra=extra,
        )
    if a.role == "fused":
        agree = float(np.mean(out.argmax(1) == ref[key].argmax(1)))
        return Check(
            **base,
            ok=agree >= MIN_TOP1_AGREEMENT[p],
            measure="top1_agreement",
            value=agree,
            limit=MIN_TOP1_AGREEMENT[p],
            extra=extra,
        )
    return _backbone_check(
        base, out, ref, init, p
    )  # a quantized backbone: does the factory head still see what it saw?


def _backbone_check(
    base: dict[str, str], out: np.ndarray, ref: dict[str, np.ndarray], init: dict[str, np.ndarray], precision: str
) -> Check:
    head = lambda e: masked_softmax(e.astype(np.float64) @ init[WEIGHTS] + init[BIAS], init[MASK]).argmax(1)  # noqa: E731
    agree = float(np.mean(head(out) == head(ref[PARITY_EMBEDDINGS])))
    norms = np.linalg.norm(out, axis=1) * np.linalg.norm(ref[PARITY_EMBEDDINGS], axis=1)
    cosine = float(np.mean(np.sum(out * ref[PARITY_EMBEDDINGS], axis=1) / np.maximum(norms, 1e-12)))
    min_cosine = MIN_COSINE[precision]
    ok = agree >= MIN_TOP1_AGREEMENT[precision] and (min_cosine is None or cosine >= min_cosine)
    extra = {"head_top1_agreement": agree, "min_agreement": MIN_TOP1_AGREEMENT[precision]}
    return Check(**base, ok=ok, measure="cosine", value=cosine, limit=min_cosine, extra=extra)


def _with_accuracy_drops(checks: list[Check]) -> list[Check]:
    """With labelled data: each fused model's accuracy drop against fp32 of its format;
    a quantized model that loses more than MAX_ACCURACY_DROP fails."""
    fp32 = {c.format: c.extra["accuracy"] for c in checks if c.precision == "fp32" and "accuracy" in c.extra}
    out = []
    for c in checks:
        if "accuracy" in c.extra and c.format in fp32:
            drop = fp32[c.format] - c.extra["accuracy"]
            extra = {**c.extra, "accuracy_drop": drop}
            ok = c.ok
            if c.precision != "fp32":  # the fixed limit, unless evidence_gates decides on the paired evidence
                extra["max_accuracy_drop"] = MAX_ACCURACY_DROP[c.precision]
                extra[PARITY_OK] = ok  # the parity verdict alone, which thin evidence keeps
                ok = ok and drop <= MAX_ACCURACY_DROP[c.precision]
            c = replace(c, ok=ok, extra=extra)
        out.append(c)
    return out


def _head_trainers(bundle: Bundle, backends: tuple[str, ...]) -> list[tuple[Any, str, str, dict[str, str]]]:
    """Every way the bundle's head can be trained in ``backends``: (trainer, role, infer file, {optimizer: file}).

    Only the loop graphs: the one-step graphs older bundles also carry are never run, so not checked."""

    out = []
    version = bundle.manifest.schema_version  # how the graphs take the SGD learning rate
    infer = bundle.artifacts("head_infer", "onnx") if "onnxruntime" in backends else []
    loop = bundle.artifacts("head_train_loop", "onnx")
    if infer and loop:
        files = {a.optimizer: bundle.path / a.file for a in loop}
        trainer = OnnxLoopHeadTrainer(files, bundle.path / infer[0].file, schema_version=version)
        out.append((trainer, "head_train_loop", infer[0].file, {a.optimizer: a.file for a in loop}))
    for a in bundle.artifacts("head", "tflite") if "litert" in backends else []:
        if "train_steps" in a.extra.get("signatures", []):
            trainer = LiteRTLoopHeadTrainer(bundle.path / a.file, schema_version=version)
            out.append((trainer, "head", a.file, {"sgd": a.file, "adam": a.file}))
    return out


def _head_checks(
    bundle: Bundle, ref: dict[str, np.ndarray], init: dict[str, np.ndarray], backends: tuple[str, ...]
) -> list[Check]:
    """The head graphs, run by the trainers personalization uses (a whole step plan per call),
    against the float64 reference over the same batches."""

    head = HeadState.factory(bundle)
    emb = ref[PARITY_EMBEDDINGS][:8].astype(np.float32)
    n_active = int(init[MASK].sum())
    onehot = np.eye(head.capacity, dtype=np.float32)[np.arange(len(emb)) % n_active]
    want_probs = np.zeros((len(emb), head.capacity))
    want_probs[:, :n_active] = ref[PARITY_PROBABILITIES][:8]  # inactive classes must get exactly 0
    out, inferred = [], set()
    for trainer, role, infer_file, train_files in _head_trainers(bundle, backends):
        fmt = "onnx" if trainer.backend == "onnxruntime" else "tflite"
        if (infer_file, fmt) not in inferred:
            inferred.add((infer_file, fmt))
            diff = float(np.max(np.abs(trainer.probabilities(head, emb) - want_probs)))
            infer_role = "head_infer" if fmt == "onnx" else "head"
            out.append(
                Check(
                    infer_file,
                    infer_role,
                    fmt,
                    "fp32",
                    diff <= FP32_TOLERANCE,
                    "max_abs_diff",
                    diff,
                    FP32_TOLERANCE,
                    {"signature": "infer"},
                )
            )
        for opt, file in train_files.items():
            settings = TrainSettings(optimizer=opt, learning_rate=0.05, l2=0.01, **HEAD_STEPS)
            got, _ = trainer.train(head, emb, onehot, settings)
            reference = ReferenceHeadTrainer()
            want, _ = reference.train(head, emb, onehot, settings)
            check = _train_check(file, role, fmt, opt, head, got, want, emb, reference.min_abs_gradient)
            check.extra["trainer"] = type(trainer).__name__
            out.append(check)
    return out


def _train_check(
    file: str,
    role: str,
    fmt: str,
    opt: str,
    start: Any,
    got: Any,
    want: Any,
    emb: np.ndarray,
    min_abs_gradient: dict[str, np.ndarray],
) -> Check:
    """Trained weights against the reference, within a tolerance that scales with how far
    they moved (see HEAD_STEP_RTOL).

    SGD: every weight, and the trained heads' probabilities, must agree.

    Adam divides by sqrt(v) + eps, so its update carries the *relative* float32 error of
    each gradient: where a gradient is a small sum of larger terms that cancel, any two
    implementations (float32 vs float64, another summation order) move that weight by up
    to lr x (that relative error) per step, and the runtimes are as right as the reference.
    Weights whose gradient came near eps (1e-7) in some step are left out (counted); a
    gradient of exactly 0 (inactive classes) is exact on both sides and stays in. Of the
    rest, the 99th percentile of the difference is judged: a wrong graph (another beta,
    a missing bias correction) moves nearly every weight (tests/device/test_verify_gates.py),
    cancellation moves a few.
    """
    moved = max(float(np.max(np.abs(want.W - start.W))), float(np.max(np.abs(want.b - start.b))))
    tolerance = HEAD_STEP_ATOL + HEAD_STEP_RTOL * moved
    diffs, skipped = [], 0
    for key, g, w in ((WEIGHTS, got.W, want.W), (BIAS, got.b, want.b)):
        d = np.abs(g - w).ravel()
        if opt == "adam":
            ill = ((min_abs_gradient[key] < 100 * ADAM_EPS) & (min_abs_gradient[key] > 0)).ravel()
            skipped += int(ill.sum())
            d = d[~ill]
        diffs.append(d)
    d = np.concatenate(diffs)
    extra: dict[str, Any] = {
        "optimizer": opt,
        "steps": HEAD_STEPS["epochs"] * -(-len(emb) // HEAD_STEPS["batch_size"]),
        "max_abs_diff_all": float(d.max()) if d.size else 0.0,
    }
    if opt == "sgd":
        diff = float(d.max()) if d.size else 0.0
        probs = lambda h: masked_softmax(emb.astype(np.float64) @ h.W + h.b, h.mask)  # noqa: E731
        extra["probabilities_max_abs_diff"] = float(np.max(np.abs(probs(got) - probs(want))))
        ok = diff <= tolerance and extra["probabilities_max_abs_diff"] <= FP32_TOLERANCE
        return Check(file, role, fmt, "fp32", ok, "max_abs_diff", diff, tolerance, extra)
    diff = float(np.percentile(d, 99)) if d.size else 0.0
    extra["ill_conditioned_elements_skipped"] = skipped
    return Check(file, role, fmt, "fp32", diff <= tolerance, "p99_abs_diff", diff, tolerance, extra)


def tail_train_tolerance(moved: float, floor: float) -> float:
    """The head's rule (``HEAD_STEP_ATOL + HEAD_STEP_RTOL`` x how far the weights moved) plus
    :data:`FLOOR_FACTOR` x the float32 floor: export's and verify's limit for trained tails."""
    return HEAD_STEP_ATOL + HEAD_STEP_RTOL * moved + FLOOR_FACTOR * floor


def tail_reference(
    runtime: Any, weights: dict, trunk: np.ndarray, onehot: np.ndarray, opt: str, lr: float
) -> tuple[dict, float, float]:
    """The float64 reference of the tail check's steps (:data:`TAIL_CHECK_STEPS` at ``lr``), the
    float32 floor (the same steps in numpy float32, against it) and the limit a runtime's trained
    weights must meet (:func:`tail_train_tolerance`): export's check and verify's rows."""
    steps = dict(lr=lr, **TAIL_CHECK_STEPS)
    want = runtime.reference(weights, trunk, onehot, opt, **steps)
    floor = weights_difference(runtime.reference(weights, trunk, onehot, opt, **steps, dtype=np.float32), want, opt)
    moved = max(float(np.abs(want[w] - weights[w]).max()) for w in T.WEIGHTS)
    return want, floor, tail_train_tolerance(moved, floor)


def weights_difference(got: dict, want: dict, optimizer: str) -> float:
    """Max (SGD) or 99th percentile (Adam: its update carries float32's relative error of each
    gradient, see :func:`_train_check`) of the four tail tensors' differences."""
    d = np.concatenate([np.abs(np.asarray(got[w], np.float64) - want[w]).ravel() for w in T.WEIGHTS])
    return float(d.max() if optimizer == "sgd" else np.percentile(d, 99))


def tail_checks(bundle: Bundle, ref: dict[str, np.ndarray], backends: tuple[str, ...]) -> list[Check]:
    """The tail's rows for every runtime in ``backends`` (none for a bundle without a tail)."""
    section = bundle.manifest.extra.get("tail") or {}
    if not section.get("available"):
        return []
    positions = int(section.get("positions", 1))
    weights = {k: np.asarray(v, np.float32) for k, v in bundle.arrays("tail_init", C.TAIL_INIT_MEMBERS).items()}
    weights.update(bundle.arrays("head_init", C.HEAD_INIT_MEMBERS))
    n_active = int(weights[C.MASK].sum())
    want_probs = np.zeros((len(ref[C.PARITY_X]), weights[C.WEIGHTS].shape[1]))
    want_probs[:, :n_active] = ref[C.PARITY_PROBABILITIES]  # inactive classes must get exactly 0
    onehot = np.eye(want_probs.shape[1], dtype=np.float32)[ref[C.PARITY_PROBABILITIES].argmax(1)]
    limit = _fp32_tolerance(ref[C.PARITY_EMBEDDINGS], "backbone")
    out = []
    for backend in backends:
        runtime = TailRuntime.from_bundle(bundle, backend)
        fmt = runtime.fmt
        trunk_file = C.TRUNK_FILE.format(precision="fp32", format=fmt)
        infer = (T.INFER_FILE, "tail_infer") if fmt == "onnx" else (T.TFLITE_FILE, "tail")
        trunk = runtime.trunk(ref[C.PARITY_X])
        extra = {"inputs": [trunk_file, T.INIT_FILE], "compared_with": "parity embeddings"}
        expected = (len(trunk), positions, weights[C.TAIL_W].shape[0])
        if trunk.shape != expected:  # another model's trunk: nothing after it can run
            extra["error"] = f"{trunk_file} gives trunk activations of shape {trunk.shape}, the tail takes {expected}"
            out.append(Check(trunk_file, C.TRUNK, fmt, "fp32", False, "max_abs_diff", float("nan"), limit, extra))
            continue
        z = T.forward(weights, trunk, runtime.activation)["z"]
        diff = float(np.max(np.abs(z - ref[C.PARITY_EMBEDDINGS])))
        out.append(Check(trunk_file, C.TRUNK, fmt, "fp32", diff <= limit, "max_abs_diff", diff, limit, extra))
        diff = float(np.max(np.abs(runtime.probabilities(weights, trunk) - want_probs)))
        extra = {"inputs": [trunk_file, *infer[:1], T.INIT_FILE, C.HEAD_INIT_NPZ_FILE], "signature": "infer"}
        out.append(Check(*infer, fmt, "fp32", diff <= FP32_TOLERANCE, "max_abs_diff", diff, FP32_TOLERANCE, extra))
        out += [_tail_train_check(runtime, weights, trunk, onehot, opt, trunk_file) for opt in TAIL_CHECK_RATES]
    return out


def _tail_train_check(
    runtime: Any, weights: dict, trunk: np.ndarray, onehot: np.ndarray, opt: str, trunk_file: str
) -> Check:
    """One optimizer's training graph against the float64 reference on the same plan."""
    got = runtime.train_plan(weights, trunk, onehot, opt, lr=TAIL_CHECK_RATES[opt], **TAIL_CHECK_STEPS)
    want, floor, limit = tail_reference(runtime, weights, trunk, onehot, opt, TAIL_CHECK_RATES[opt])
    diff = weights_difference(got, want, opt)
    file, role = (
        (T.TRAIN_FILE.format(optimizer=opt), "tail_train_loop") if runtime.fmt == "onnx" else (T.TFLITE_FILE, "tail")
    )
    extra = {
        C.OPTIMIZER: opt,
        "steps": int(len(np.asarray(got[C.LOSSES]).ravel())),
        "float32_floor": floor,
        "inputs": [trunk_file, file, T.INIT_FILE, C.HEAD_INIT_NPZ_FILE],
    }
    if runtime.fmt == "tflite":
        extra["signature"] = f"train_steps_{opt}"
    measure = "max_abs_diff" if opt == "sgd" else "p99_abs_diff"
    return Check(file, role, runtime.fmt, "fp32", diff <= limit, measure, diff, limit, extra)
