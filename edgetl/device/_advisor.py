"""Choose the backend and precision by measuring them on this device, not by assumption.

int8 is not always faster: on an AVX-512 x86 CPU a small CNN ran 4.3x slower in
onnxruntime int8 than fp32 and MobileNetV3Small 3x slower in LiteRT int8 (bench/). So
:func:`advise` times every installed backend x exported precision of a bundle on the
machine it runs on (batch 1, interleaved rounds, median), takes each configuration's
accuracy from held-out data (``data``), else from the accuracies measured at export
(the manifest), else from top-1 agreement with Keras, and recommends the fastest
configuration within ``budget`` of the best fp32 accuracy. The result is cached on the
device, keyed by the bundle's manifest hash, the runtime versions, the CPU and the
settings, and re-used until ``refresh=True``.

    >>> advice = advise(read_bundle("digits.edgetl"))
    >>> advice.backend, advice.precision
    ('litert', 'fp32')
    >>> Classifier.open("digits.edgetl", backend="auto", precision="auto")
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._atomic import replace_file
from edgetl.bundle import Bundle
from edgetl.device._runtimes import BACKEND_FORMATS, install_hint, installed_backends, load_model
from edgetl.errors import InputError

DEFAULT_BUDGET = 0.01  # one point of accuracy
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Candidate:
    """One measured configuration."""

    backend: str
    precision: str
    latency_ms: float  # median batch-1 latency of the fused model (Classifier.predict's work)
    accuracy: float | None
    accuracy_source: str  # "data", "manifest" or "agreement" (top-1 agreement with Keras)
    within_budget: bool


@dataclass(frozen=True)
class Advice:
    """The recommended configuration and the measurements behind it."""

    backend: str
    precision: str
    budget: float
    candidates: tuple[Candidate, ...]
    key: str
    measured_at: str
    cached: bool = False
    machine: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"{'backend':<12} {'precision':<9} {'p50 ms':>8} {'accuracy':>9}  {'source':<9} within budget"]
        for c in sorted(self.candidates, key=lambda c: c.latency_ms):
            acc = f"{c.accuracy:.4f}" if c.accuracy is not None else ""
            mark = "  <- recommended" if (c.backend, c.precision) == (self.backend, self.precision) else ""
            lines.append(
                f"{c.backend:<12} {c.precision:<9} {c.latency_ms:>8.3f} {acc:>9}  {c.accuracy_source:<9} "
                f"{'yes' if c.within_budget else 'no'}{mark}"
            )
        how = "cached measurement" if self.cached else "measured now"
        lines.append(
            f"recommended: {self.backend} {self.precision}, the fastest configuration within {self.budget * 100:g} "
            f"point(s) of the best fp32 accuracy ({how}, {self.measured_at}, {self.machine.get('cpu', '?')})"
        )
        return "\n".join(lines)

    def choose(self, backend: str | None = None, precision: str | None = None) -> tuple[str, str]:
        """The recommendation, restricted to a fixed backend or precision when given."""
        pool = [
            c
            for c in self.candidates
            if (backend in (None, "auto") or c.backend == backend)
            and (precision in (None, "auto") or c.precision == precision)
        ]
        if not pool:
            have = sorted({(c.backend, c.precision) for c in self.candidates})
            raise InputError(
                f"no measured configuration has backend={backend!r} precision={precision!r}; measured: {have}"
            )
        eligible = [c for c in pool if c.within_budget] or pool
        best = min(eligible, key=lambda c: c.latency_ms)
        return best.backend, best.precision

    def to_json(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Advice":
        candidates = tuple(Candidate(**c) for c in obj["candidates"])
        fields_ = {k: obj[k] for k in ("backend", "precision", "budget", "key", "measured_at", "machine")}
        return cls(**fields_, candidates=candidates, cached=True)


def cache_dir() -> Path:
    """Where measurements are kept: ``EDGETL_CACHE_DIR``, else ``~/.cache/edgetl/advisor``."""
    env = os.environ.get("EDGETL_CACHE_DIR")
    return Path(env) / "advisor" if env else Path.home() / ".cache" / "edgetl" / "advisor"


def machine() -> dict[str, Any]:
    """What the measurement depends on besides the bundle: CPU, runtimes and their versions."""

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        # x86 names its CPU in "model name"; aarch64 kernels have no such line: a board's
        # "Model" (Raspberry Pi), else the core's part number, so two ARM boards differ.
        name = fields.get("model name") or fields.get("Model")
        part = fields.get("CPU part") and f"{platform.machine()} part {fields['CPU part']}"
        cpu = name or part or cpu
    versions = {}
    for dist in ("onnxruntime", "ai-edge-litert", "numpy"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "runtimes": versions}


def _key(
    bundle: Bundle, budget: float, threads: int | None, data: tuple[np.ndarray, np.ndarray] | None, mach: dict[str, Any]
) -> str:
    h = hashlib.sha256((bundle.path / "manifest.json").read_bytes())
    h.update(json.dumps([budget, threads, mach], sort_keys=True).encode())
    if data is not None:
        h.update(np.ascontiguousarray(data[0]).tobytes())
        h.update(np.ascontiguousarray(data[1]).tobytes())
    return h.hexdigest()[:24]


def advise(
    bundle: Bundle,
    *,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    budget: float = DEFAULT_BUDGET,
    threads: int | None = None,
    runs: int = 30,
    refresh: bool = False,
    use_cache: bool = True,
) -> Advice:
    """Measure (or load the cached measurement of) every installed backend x precision.

    Args:
        bundle: a verified bundle.
        data: labelled held-out inputs ``(x, y)`` to measure accuracy on (default: the
            accuracies measured at export, from the manifest).
        budget: largest accuracy loss against the best fp32 configuration (0..1).
        threads: runtime threads, as the application will run them.
        runs: timed batch-1 predictions per configuration (in interleaved rounds).
        refresh: measure again even when a cached measurement exists.
        use_cache: read and write the cache at all.

    Raises:
        InputError: a budget outside [0, 1], no runtime installed.
    """
    if not 0 <= budget <= 1:
        raise InputError(f"budget must be in [0, 1] (a fraction of accuracy), received {budget}")
    mach = machine()
    key = _key(bundle, budget, threads, data, mach)
    path = cache_dir() / f"{key}.json"
    if use_cache and not refresh and path.is_file():
        try:
            return Advice.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is measured again and replaced
    candidates = _measure(bundle, data, threads, runs)
    advice = _decide(candidates, budget, key, mach)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, json.dumps(advice.to_json(), indent=1).encode())
    return advice


def _configurations(bundle: Bundle) -> list[tuple[str, str]]:
    out = []
    for backend in installed_backends():
        out += [
            (backend, p)
            for p in bundle.precisions("fused", BACKEND_FORMATS[backend])
            if p in bundle.precisions("backbone", BACKEND_FORMATS[backend])
        ]
    if not out:
        raise InputError(
            f"no runtime installed for the bundle's models ({bundle.precisions('fused')}): {install_hint()}"
        )
    return out


def _measure(
    bundle: Bundle, data: tuple[np.ndarray, np.ndarray] | None, threads: int | None, runs: int
) -> list[dict[str, Any]]:
    """Batch-1 latency of every configuration's fused model (what ``Classifier.predict`` runs
    with the factory head; its own overhead is the same for every configuration), timed in
    interleaved rounds so that a noisy neighbour slows all of them alike, and each one's
    accuracy."""
    one = bundle.arrays("parity", ("x",))["x"][:1].astype(np.float32)
    models = {
        (b, p): load_model(bundle.artifact("fused", BACKEND_FORMATS[b], p), BACKEND_FORMATS[b], threads=threads)
        for b, p in _configurations(bundle)
    }
    times: dict[tuple[str, str], list[float]] = {cfg: [] for cfg in models}
    for model in models.values():
        for _ in range(5):
            model(one)
    for _ in range(runs):
        for cfg, model in models.items():
            t0 = time.perf_counter()
            model(one)
            times[cfg].append(time.perf_counter() - t0)
    return [
        {
            "backend": b,
            "precision": p,
            "latency_ms": float(np.median(times[(b, p)]) * 1e3),
            **_accuracy(bundle, b, p, models[(b, p)], data),
        }
        for b, p in models
    ]


def _accuracy(
    bundle: Bundle, backend: str, precision: str, model: Any, data: tuple[np.ndarray, np.ndarray] | None
) -> dict[str, Any]:
    if data is not None:
        pred = np.asarray(model(np.asarray(data[0], np.float32))).argmax(axis=1)
        return {"accuracy": float(np.mean(pred == np.asarray(data[1]))), "accuracy_source": "data"}
    fmt = BACKEND_FORMATS[backend]
    check = next(
        (c for c in bundle.manifest.checks if c.role == "fused" and c.format == fmt and c.precision == precision),
        None,
    )
    if check is not None and "accuracy" in check.extra:
        return {"accuracy": float(check.extra["accuracy"]), "accuracy_source": "manifest"}
    if check is not None and check.measure == "top1_agreement":
        return {"accuracy": check.value, "accuracy_source": "agreement"}
    return {"accuracy": 1.0 if precision == "fp32" else None, "accuracy_source": "agreement"}


def _decide(measured: list[dict[str, Any]], budget: float, key: str, mach: dict[str, Any]) -> Advice:
    fp32 = [m["accuracy"] for m in measured if m["precision"] == "fp32" and m["accuracy"] is not None]
    floor = (max(fp32) if fp32 else max((m["accuracy"] or 0.0) for m in measured)) - budget - 1e-12
    candidates = tuple(
        Candidate(**m, within_budget=m["accuracy"] is not None and m["accuracy"] >= floor) for m in measured
    )
    eligible = [c for c in candidates if c.within_budget] or [c for c in candidates if c.precision == "fp32"]
    best = min(eligible, key=lambda c: c.latency_ms)
    return Advice(
        best.backend,
        best.precision,
        budget,
        candidates,
        key,
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        False,
        mach,
    )
