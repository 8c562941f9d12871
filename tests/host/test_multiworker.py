"""Training across processes (issue 13): two workers on 127.0.0.1 with ``TF_CONFIG`` train one
run with MultiWorkerMirroredStrategy; both finish, only the chief writes the run, the work is
shared (2 replicas, each worker embeds half of every step), and the result matches one worker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edgetl.cli import main
from edgetl.data import load_digits_dataset

# Each test starts three TensorFlow processes (one worker alone, then a cluster of two): minutes on 2 cores.
pytestmark = pytest.mark.slow

WORKER_TIMEOUT = 300  # seconds; a worker left alone waits for its peer forever, so both are killed then


def write_digits_folder(root):
    d = load_digits_dataset((5, 6, 7, 8, 9))
    for i, (x, y) in enumerate(zip(d.x, d.y)):
        folder = root / d.class_names[y]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[..., 0], "L").save(folder / f"{i:05d}.png")
    return root


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_cluster(args, cache, workers=2):
    """Run ``edgetl ARGS`` as ``workers`` processes of one cluster; return their (exit code, output)."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(workers)]}
    procs = []
    for index in range(workers):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            "EDGETL_CACHE_DIR": str(cache),
            "TF_USE_LEGACY_KERAS": "1",
        }
        cmd = [sys.executable, "-m", "edgetl.cli", *map(str, args)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        return [(p.wait(timeout=WORKER_TIMEOUT), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp("multiworker") / "digits")


def test_two_workers_train_what_one_worker_trains(tmp_path, folder, monkeypatch):
    args = ["train", "--data", folder, "--backbone", "edgetl_cnn", "--streaming", "on", "--quiet", "--out"]
    monkeypatch.setenv("EDGETL_CACHE_DIR", str(tmp_path / "cache_single"))
    assert main([*map(str, args), str(tmp_path / "single")]) == 0

    results = run_cluster([*args, tmp_path / "cluster", "--strategy", "multi-worker"], tmp_path / "cache_cluster")
    for code, output in results:
        assert code == 0, output
    # The chief (worker 0) wrote the run; worker 1 wrote nothing next to it.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("cluster", ".cluster"))) == ["cluster"]
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    cluster = json.loads((tmp_path / "cluster" / "metrics.json").read_text())
    assert cluster["replicas"] == 2 and single["replicas"] == 1
    assert abs(cluster["test_accuracy"] - single["test_accuracy"]) <= 0.01
    assert cluster["test_accuracy"] > 0.8 and cluster["test_examples"] == single["test_examples"]
    # Each worker embedded its share and the shares were gathered in order: every row is the
    # embedding one process computes for that file.
    np.testing.assert_allclose(
        np.load(tmp_path / "cluster" / "embeddings.npy"), np.load(tmp_path / "single" / "embeddings.npy"), atol=1e-5
    )
    assert json.loads((tmp_path / "cluster" / "config.json").read_text())["config"]["strategy"] == "multi-worker"


def test_two_workers_train_an_adam_head_with_synchronized_gradients(tmp_path, folder, monkeypatch):
    """A hidden-layer head is trained by Keras under the strategy: every step's gradient is
    all-reduced across the workers (each gets half of the global batch)."""
    args = ["train", "--data", folder, "--backbone", "edgetl_cnn", "--head-hidden-units", "16", "--epochs", "8"]
    args += ["--quiet", "--out"]
    monkeypatch.setenv("EDGETL_CACHE_DIR", str(tmp_path / "cache"))
    assert main([*map(str, args), str(tmp_path / "single")]) == 0
    results = run_cluster([*args, tmp_path / "cluster", "--strategy", "multi-worker"], tmp_path / "cache")
    for code, output in results:
        assert code == 0, output
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    cluster = json.loads((tmp_path / "cluster" / "metrics.json").read_text())
    assert cluster["replicas"] == 2 and cluster["head_fit"]["method"] == "adam"
    assert cluster["head_fit"]["epochs"] == single["head_fit"]["epochs"]
    assert abs(cluster["test_accuracy"] - single["test_accuracy"]) <= 0.01


def _users_model(keras_module):
    """A user's small digits classifier, written with ``keras_module`` (tf_keras or Keras 3)."""
    L = keras_module.layers
    return keras_module.Sequential(
        [
            keras_module.Input((8, 8, 1)),
            L.Rescaling(1 / 255.0),
            L.Conv2D(8, 3, activation="relu"),
            L.Flatten(),
            L.Dense(16, activation="relu"),
            L.Dense(5, activation="softmax"),
        ]
    )


@pytest.mark.parametrize("saved_by", ["tf_keras", "keras3"])
def test_two_workers_train_from_a_users_model_file(tmp_path, folder, saved_by):
    """A backbone given as a model file (read for its input shape before training) used to
    initialize TensorFlow's context before the strategy existed: "Collective ops must be
    configured at program startup" on both workers. A Keras 3 file (what ``model.save`` writes
    under TensorFlow 2.16+) is rebuilt in tf_keras by each worker, after the strategy exists."""
    if saved_by == "keras3":
        import keras as keras_module

        assert keras_module.__version__.startswith("3.")
    else:
        import tf_keras as keras_module

    _users_model(keras_module).save(tmp_path / "users_model.keras")
    args = ["train", "--data", folder, "--backbone", tmp_path / "users_model.keras", "--quiet", "--out"]
    results = run_cluster([*args, tmp_path / "cluster", "--strategy", "multi-worker"], tmp_path / "cache")
    for code, output in results:
        assert code == 0, output
        assert "Traceback" not in output
    assert "wrote" in results[0][1] and "wrote" not in results[1][1]  # only the chief writes
    metrics = json.loads((tmp_path / "cluster" / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["test_accuracy"] > 0.5
