"""`edgetl bench` output structure and `edgetl report` rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from edgetl.cli import main

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium; installed here when missing (root + Debian registry), else skip."""
    exe = shutil.which("chromium")
    if exe is None and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            capture_output=True,
            timeout=900,
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed and could not be installed with apt-get")
    return exe


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
    user_dir = tempfile.mkdtemp()
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for table in ("metrics", "config", "artifacts", "parity", "bench"):
        assert f'id="{table}"' in dom, table
    assert dom.count("<img") == 3  # curves, confusion matrix, latency-vs-size plot
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={user_dir}",
            "--window-size=1200,1600",
            f"--screenshot={shot}",
            path.as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # not blank: text, tables, plots


def test_report_of_a_run_and_refusals(tmp_path, source_run, capsys):
    assert main(["report", str(source_run[0]), "--out", str(tmp_path / "run.html")]) == 0
    page = (tmp_path / "run.html").read_text()
    assert 'id="metrics"' in page and page.count("<img") == 2
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
