"""The precision/backend advisor on bundles whose speed and accuracy the test controls.

Real bundles (tests/conftest.py's digits bundle) with some ONNX models rewritten and the
manifest re-hashed (write_bundle): "slowed" models compute the same outputs plus a heavy
side branch multiplied by zero (about 25M extra multiply-adds per example: 30x the digits
CNN), "swapped" models return the classes in another order (fast and wrong).
"""

from __future__ import annotations

import json

import pytest
from bundle_edits import rebuilt, slowed, swapped

from edgetl.bundle import read_bundle, write_bundle
from edgetl.cli import main
from edgetl.device import Classifier
from edgetl.device._advisor import advise


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "advisor"


def test_int8_slower_than_fp32_is_not_recommended(tmp_path, digits_bundle, private_cache):
    bundle = rebuilt(
        digits_bundle[0],
        tmp_path / "slow_int8.edgetl",
        {"model.int8.onnx": slowed, "backbone.int8.onnx": slowed},
    )
    advice = advise(bundle, budget=1.0, runs=15)  # every configuration within budget: speed decides
    by = {(c.backend, c.precision): c for c in advice.candidates}
    assert by[("onnxruntime", "int8")].latency_ms > 5 * by[("onnxruntime", "fp32")].latency_ms, advice.describe()
    assert (advice.backend, advice.precision) != ("onnxruntime", "int8")
    assert advice.choose(backend="onnxruntime") == ("onnxruntime", "fp32")
    fastest = min(advice.candidates, key=lambda c: c.latency_ms)
    assert (advice.backend, advice.precision) == (fastest.backend, fastest.precision)
    clf = Classifier.open(bundle.path, backend="onnxruntime", precision="auto")  # default budget: measured now
    assert clf.precision == "fp32" and not clf.advice.cached
    again = Classifier.open(bundle.path, backend="onnxruntime", precision="auto")
    assert again.precision == "fp32" and again.advice.cached  # and re-used


def test_the_accuracy_budget_is_respected(tmp_path, digits_bundle):
    """int8 ONNX fast but with its classes swapped, fp32 ONNX slowed: within one point, the
    advisor keeps the slow accurate model; with the budget at 100 points, speed wins."""
    classes = len(digits_bundle[0].labels)
    bundle = rebuilt(
        digits_bundle[0],
        tmp_path / "fast_wrong_int8.edgetl",
        {
            "model.int8.onnx": lambda b: swapped(b, classes),
            "model.fp32.onnx": slowed,
            "backbone.fp32.onnx": slowed,
        },
    )
    test = digits_bundle[1].test
    data = (test.x[:120], test.y[:120])
    strict = advise(bundle, data=data, budget=0.01, runs=10)
    by = {(c.backend, c.precision): c for c in strict.candidates}
    assert by[("onnxruntime", "int8")].accuracy < 0.5 and by[("onnxruntime", "fp32")].accuracy > 0.9
    assert by[("onnxruntime", "int8")].latency_ms < by[("onnxruntime", "fp32")].latency_ms
    assert not by[("onnxruntime", "int8")].within_budget and by[("onnxruntime", "fp32")].within_budget
    assert (strict.backend, strict.precision) != ("onnxruntime", "int8")
    assert strict.choose(backend="onnxruntime") == ("onnxruntime", "fp32")
    loose = advise(bundle, data=data, budget=1.0, runs=10)
    assert loose.choose(backend="onnxruntime") == ("onnxruntime", "int8")


def test_measurements_are_cached_refreshed_and_keyed_by_the_bundle(tmp_path, digits_bundle, private_cache):
    bundle = digits_bundle[0]
    first = advise(bundle, runs=5)
    assert not first.cached and len(list(private_cache.glob("*.json"))) == 1
    again = advise(bundle, runs=5)
    assert again.cached and again.candidates == first.candidates and again.key == first.key
    fresh = advise(bundle, runs=5, refresh=True)
    assert not fresh.cached and fresh.key == first.key
    (private_cache / f"{first.key}.json").write_text("{ damaged")
    assert not advise(bundle, runs=5).cached  # a damaged entry is measured again and replaced
    assert advise(bundle, runs=5).cached
    other = rebuilt(bundle, tmp_path / "other.edgetl", {})
    other_manifest = json.loads((other.path / "manifest.json").read_text())
    other_manifest["version"] = "2"
    other = write_bundle(
        tmp_path / "other2.edgetl", other_manifest, {a.file: other.path / a.file for a in other.manifest.artifacts}
    )
    assert advise(read_bundle(other.path), runs=5).key != first.key  # another bundle, another measurement
    assert advise(bundle, budget=0.05, runs=5).key != first.key  # other settings too
    with pytest.raises(Exception, match="budget must be in"):
        advise(bundle, budget=2.0)


def test_bench_recommend_prints_the_decision_and_its_numbers(digits_bundle, capsys):
    assert main(["bench", str(digits_bundle[0].path), "--recommend", "--runs", "5"]) == 0
    out = capsys.readouterr().out
    assert "recommended:" in out and "<- recommended" in out and "p50 ms" in out
