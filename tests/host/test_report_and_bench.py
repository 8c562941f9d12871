"""`edgetl bench` output structure and `edgetl report` rendered in headless Chromium."""

from __future__ import annotations

import json

import pytest

from edgetl.cli import main


@pytest.fixture(scope="module")
def bench_json(digits_bundle):
    from edgetl.bundle import read_bundle
    from edgetl.device._bench import bench_bundle

    bundle, halves = digits_bundle
    return bench_bundle(read_bundle(bundle.path), data=(halves.test.x, halves.test.y), runs=10, warmup=2)


def test_bench_structure(bench_json, digits_bundle):
    rows = bench_json["rows"]
    assert {(r["backend"], r["precision"]) for r in rows} == {
        (b, p) for b in ("onnxruntime", "litert") for p in ("fp32", "int8")
    }
    for r in rows:
        assert set(r["latency_ms"]) == {50, 90, 99} and r["latency_ms"][50] <= r["latency_ms"][99]
        assert r["size_bytes"] > 0 and r["throughput_examples_per_s"] > 0 and r["peak_rss_mb"] > 10
        assert r["sdk_overhead_ratio_p50"] > 0 and r["train_step_ms"] > 0
        assert 0.8 < r["accuracy"] <= 1.0


def test_bench_cli_json_and_table(digits_bundle, capsys):
    bundle = digits_bundle[0]
    assert main(["bench", str(bundle.path), "--backend", "litert", "--runs", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in result["rows"]] == ["litert", "litert"]
    assert main(["bench", str(bundle.path), "--backend", "onnxruntime", "--runs", "5"]) == 0
    assert "SDK/raw" in capsys.readouterr().out
    assert main(["bench", str(bundle.path), "--runs", "2"]) == 2


def test_report_renders_in_headless_chromium(tmp_path, digits_bundle, bench_json, chromium):
    from edgetl.host._report import write_report

    path = write_report(digits_bundle[0].path, tmp_path / "report.html", bench=json.loads(json.dumps(bench_json)))
    page = path.read_text()
    assert "<script" not in page and "http" not in page.replace("charset", "")  # self-contained, offline
    dom = chromium.dom(path, tmp_path)
    for table in ("metrics", "config", "artifacts", "parity", "bench"):
        assert f'id="{table}"' in dom, table
    # confusion matrix and latency-vs-size plot; the head was fitted by L-BFGS (one history
    # point), so there are no training curves to show
    assert chromium.image_states(path, tmp_path) == ["ok", "ok"]
    pixels = chromium.screenshot(path, tmp_path)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # not blank: text, tables, plots


def test_report_of_a_run_and_refusals(tmp_path, source_run, capsys):
    assert main(["report", str(source_run[0]), "--out", str(tmp_path / "run.html")]) == 0
    page = (tmp_path / "run.html").read_text()
    assert 'id="metrics"' in page and page.count("<img") == 2
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
