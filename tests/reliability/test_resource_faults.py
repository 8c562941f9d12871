"""Resource faults: a read-only store, bad calibration or training data. Each gives a clear
error, leaves the active head as it was, and writes no output."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from edgetl.cli import main
from edgetl.data import Dataset, restyle_digits
from edgetl.device._classifier import Classifier
from edgetl.device._personalizer import Personalizer
from edgetl.errors import DataError, InputError, StoreError


def _immutable(path, on: bool) -> bool:
    """chattr +i: unlike permissions, root cannot write to an immutable file or directory either."""
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def _committed_once(tmp_path, digits_bundle):
    """A store with version 1 committed from 20 restyled digits, and 20 more to train on."""
    bundle, halves = digits_bundle
    x = restyle_digits(halves.test.x[:40])
    labels = [halves.test.class_names[i] for i in halves.test.y[:40]]
    clf = Classifier.open(bundle.path, backend="onnxruntime")
    p = Personalizer(clf, tmp_path / "store", margin=1.0)
    p.add_examples(x[:20], labels[:20])
    p.train()
    assert p.commit().version == 1
    return clf, p, x, labels


def test_read_only_store_refuses_commit_and_keeps_the_active_head(tmp_path, digits_bundle):
    clf, p, x, labels = _committed_once(tmp_path, digits_bundle)
    W = clf.head.W.copy()
    p.add_examples(x[20:], labels[20:])
    p.train()
    p.store.close()  # the store becomes read-only while no connection holds it (as after an app restart)
    files = [tmp_path / "store", *(tmp_path / "store").iterdir()]
    if not all(_immutable(f, True) for f in files):
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        with pytest.raises(StoreError, match="the transaction was rolled back and nothing changed"):
            p.commit()
    finally:
        for f in files:
            _immutable(f, False)
    assert clf.head_version == 1 and p.store.active_version == 1
    np.testing.assert_array_equal(clf.head.W, W)
    np.testing.assert_array_equal(p.store.active().head.W, W)


def test_nan_or_misshapen_data_is_refused_before_anything_is_written(tmp_path, digits_bundle, source_run):
    from edgetl.host._export import export_bundle
    from edgetl.host._run import load_run

    x = np.full((4, 8, 8, 1), np.nan, np.float32)
    with pytest.raises(DataError, match="NaN"):
        Dataset(x, np.arange(4) % 2, ("a", "b"), "image")
    run = load_run(source_run[0])
    digits = Dataset(np.zeros((10, 9, 9, 1), np.uint8), np.arange(10) % 5, tuple("01234"), "image")
    with pytest.raises(InputError, match="input shape"):
        export_bundle(run, tmp_path / "wrong.edgetl", quantize=["int8"], calibration=digits)
    assert not (tmp_path / "wrong.edgetl").exists()
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(4) % 2)
    assert (
        main(
            [
                "export",
                str(source_run[0]),
                "--quantize",
                "int8",
                "--calibration",
                str(tmp_path / "nan.npz"),
                "--out",
                str(tmp_path / "nan.edgetl"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "nan.edgetl").exists()
    (tmp_path / "nan.csv").write_text("a,b,label\n1,nan,x\n2,3,y\n4,5,x\n")
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "nan.csv"),
                "--backbone",
                "edgetl_mlp",
                "--out",
                str(tmp_path / "run"),
                "--quiet",
            ]
        )
        == 2
    )
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_hostile_npz_with_valid_hashes_is_refused_without_unpickling(tmp_path, digits_bundle):
    """The bundle's author also writes its hashes: a pickled array must be refused anyway."""
    import json

    from edgetl.bundle import read_bundle, sha256_file
    from edgetl.errors import BundleError

    hostile = tmp_path / "hostile.edgetl"
    shutil.copytree(digits_bundle[0].path, hostile)
    f = hostile / "head_init.npz"
    np.savez(f, W=np.array([{"payload": "x"}], dtype=object), b=np.zeros(10), mask=np.ones(10))
    manifest = json.loads((hostile / "manifest.json").read_text())
    for a in manifest["artifacts"]:
        if a["file"] == "head_init.npz":
            a["sha256"], a["size"] = sha256_file(f), f.stat().st_size
    (hostile / "manifest.json").write_text(json.dumps(manifest))
    read_bundle(hostile)  # hashes check out...
    with pytest.raises(BundleError, match="never unpickles"):
        Classifier.open(hostile, backend="onnxruntime")  # ...but nothing is unpickled


def test_a_refusal_the_store_cannot_record_stays_a_refusal(tmp_path, digits_bundle):
    """The kernel refuses the write of a refused head's history row (chattr +i): the result is
    still the guard's refusal, says it was not recorded, and the store is unchanged."""
    from dataclasses import replace

    clf, p, x, labels = _committed_once(tmp_path, digits_bundle)
    history = p.store.history()
    p.add_examples(x[20:], labels[20:])
    p.train()
    p.candidate = replace(p.candidate, W=p.candidate.W * 0.0, b=p.candidate.b * 0.0)  # forgets everything
    p.store.close()
    files = [tmp_path / "store", *(tmp_path / "store").iterdir()]
    if not all(_immutable(f, True) for f in files):
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        result = p.commit()
    finally:
        for f in files:
            _immutable(f, False)
    assert not result.accepted and "forgets the factory classes" in result.reason
    assert "(not recorded in the store history: " in result.reason
    assert p.store.history() == history and p.store.active_version == 1
