"""A store holding a personalized tail (issue 24) through migration and rollback: to a bundle
with the same backbone and tail files the tail carries over and predictions run through it; to
one without tail files the store keeps head-only and says so once; rollback brings the
previous version's tail back. The bundles are the session's (tests/conftest.py)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
from bundle_edits import without_tail

from edgetl.bundle import read_bundle
from edgetl.cli import main
from edgetl.device import Classifier, GuardPolicy, HeadStore, Personalizer, migrate
from edgetl.device._tail import personalize
from edgetl.errors import StoreError

OPEN = GuardPolicy(forget_tolerance=1.0, user_tolerance=1.0, mislabel="off")  # commits whatever trains
USERS = (("thick_slant", 0), ("shift", 1))  # two commits, each by another user style, 10 per class


def _user_examples(w, kind: str, seed: int):
    from guard_rates import draw, draw_style

    idx, y = draw(w, 10, np.random.default_rng(seed), False)
    return draw_style(kind, w.pool_x[idx], [seed, 10, 1]), [str(v) for v in y]


@pytest.fixture(scope="module")
def tail_store(tail_bundle, tmp_path_factory):
    """A store with two tail versions (guard opened: this is about the store, not the verdict),
    examples kept; and what each version predicted on test images when it was committed."""
    path, w = tail_bundle
    store = tmp_path_factory.mktemp("tail_store") / "store"
    test_x = w.test_x[::4]
    seen = {}
    for kind, seed in USERS:
        clf = Classifier.open(path, store=store, new_store=True)  # the first commit creates it
        x, labels = _user_examples(w, kind, seed)
        result = personalize(Personalizer(clf, store, guard=OPEN), x, labels, adapt="tail")
        assert result.accepted and result.evidence["adapt"] == "tail", result.reason
        seen[result.version] = (clf.head.tail["W1"].copy(), clf.predict(test_x).probabilities)
    assert sorted(seen) == [1, 2] and not np.array_equal(seen[1][0], seen[2][0])
    return store, test_x, seen


def test_the_public_personalizer_trains_the_tail(tail_bundle, digits_bundle, tmp_path):
    """`Personalizer.personalize(..., adapt=...)`: the tail from the public API, as the CLI's
    --adapt (it was reachable only through the private edgetl.device._tail); a typo is refused,
    and a bundle without a tail personalizes the head and says why in the evidence."""
    from edgetl.errors import InputError

    path, w = tail_bundle
    x, labels = _user_examples(w, "thick_slant", 0)
    clf = Classifier.open(path, store=tmp_path / "s", new_store=True)
    with pytest.raises(InputError, match="adapt must be one of .*received 'tial'"):
        Personalizer(clf, tmp_path / "s").personalize(x, labels, adapt="tial")
    result = Personalizer(clf, tmp_path / "s", guard=OPEN).personalize(x, labels, adapt="tail")
    assert result.accepted and result.evidence["adapt"] == "tail" and clf.head.tail is not None, result.reason
    assert HeadStore(tmp_path / "s", read_bundle(path)).active().head.tail is not None
    bundle, halves = digits_bundle
    head_only = Classifier.open(bundle.path)
    verdict = Personalizer(head_only, None).personalize(
        halves.test.x[:40], [halves.test.class_names[i] for i in halves.test.y[:40]], adapt="auto", commit=False
    )
    assert verdict.evidence["adapt"] == "head" and "Flatten" in verdict.evidence["tail_unavailable"]


def _copy(tail_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tail_store[0], store)
    return store


def test_rollback_restores_the_previous_versions_tail(tail_bundle, tail_store, tmp_path):
    test_x, seen = tail_store[1], tail_store[2]
    store_dir = _copy(tail_store, tmp_path)
    bundle = read_bundle(tail_bundle[0])
    store = HeadStore(store_dir, bundle)
    assert store.active().number == 2
    assert store.rollback() == 1
    np.testing.assert_array_equal(store.active().head.tail["W1"], seen[1][0])
    clf = Classifier.open(bundle.path, store=store_dir)
    assert clf.head_version == 1
    np.testing.assert_allclose(clf.predict(test_x).probabilities, seen[1][1], atol=1e-6)
    assert store.reset() == 0 and Classifier.open(bundle.path, store=store_dir).head.tail is None
    assert store.rollback() == 1 and store.active().head.tail is not None  # undoing the reset brings it back


def test_store_history_says_which_versions_trained_the_tail(tail_store, tmp_path, capsys):
    """A user reading `store history` sees which commits trained the tail (the guard's evidence
    records it; the text showed only the head's scores)."""
    store_dir = _copy(tail_store, tmp_path)
    assert main(["store", "history", "--store", str(store_dir)]) == 0
    commits = [line for line in capsys.readouterr().out.splitlines() if "commit " in line]
    assert len(commits) == 2 and all(line.endswith('"adapt": "tail"}') for line in commits), commits


def test_a_tail_carries_over_to_a_bundle_with_the_same_tail_and_predictions_use_it(
    tail_bundle, tail_store, tail_migration_bundles, tmp_path
):
    test_x, seen = tail_store[1], tail_store[2]
    store_dir = _copy(tail_store, tmp_path)
    with_tail, _ = tail_migration_bundles
    result = migrate(HeadStore(store_dir, read_bundle(tail_bundle[0])), with_tail)
    assert result.kind == "carried_over" and "tail" not in result.reason, result.describe()
    moved = HeadStore(store_dir, with_tail).active()
    assert moved.number == 3
    np.testing.assert_array_equal(moved.head.tail["W1"], seen[2][0])
    clf = Classifier.open(with_tail.path, store=store_dir)
    assert clf.head_version == 3 and clf.head.tail is not None
    carried = clf.predict(test_x)
    np.testing.assert_allclose(carried.probabilities, seen[2][1], atol=1e-6)  # as on the old bundle
    clf.set_head(replace(clf.head, tail=None), 3)  # the same head without its layer predicts otherwise
    assert not np.allclose(clf.predict(test_x).probabilities, carried.probabilities, atol=1e-3)


def test_a_bundle_without_tail_files_keeps_head_only_and_says_so_once(
    tail_bundle, tail_store, tail_migration_bundles, tmp_path, capsys
):
    test_x = tail_store[1]
    store_dir = _copy(tail_store, tmp_path)
    _, head_only = tail_migration_bundles
    assert main(["store", "migrate", "--store", str(store_dir), str(head_only.path)]) == 0
    out = capsys.readouterr().out
    said = "head only: the personalized tail layer does not carry over (bundle 'head_only_v2' has no trainable tail"
    assert out.count(said) == 1 and out.count("does not carry over") == 1, out
    assert "it was exported before tails existed" in out
    store = HeadStore(store_dir, head_only)
    assert store.active().head.tail is None and store.history()[-1]["reason"].count(said) == 1
    assert out.startswith(("retrained:", "factory:")), out  # rebuilt from the kept examples, or the factory head
    clf = Classifier.open(head_only.path, store=store_dir)
    assert clf.head.tail is None and len(clf.predict(test_x).labels) == len(test_x)
    with pytest.raises(StoreError, match="nothing to roll back to"):
        store.rollback()  # the old bundle's versions (and their tails) cannot run with the new one


def test_the_same_bundle_with_its_tail_files_taken_out_rebuilds_head_only_and_says_so_once(
    tail_bundle, tail_store, tmp_path, capsys
):
    """The store's own bundle with its tail files taken out (a vendor shipping it smaller) has the
    same identity (backbone and factory head), so `store migrate` said "unchanged" and every
    prediction then failed on a missing tail_init. Now: opening it with the store names the way
    out, and the migration rebuilds a head-only version, said once."""
    from edgetl.device._store import bundle_identity
    from edgetl.errors import BundleError

    path, w = tail_bundle
    tail = {"available": False, "reason": "tail files left out of this build"}
    slim = without_tail(path, tmp_path / "slim.edgetl", tail=tail)
    assert bundle_identity(slim) == bundle_identity(read_bundle(path))
    store_dir = _copy(tail_store, tmp_path)
    with pytest.raises(BundleError, match="head version 2 trained the backbone's last layer .* store migrate"):
        Classifier.open(slim.path, store=store_dir)
    assert main(["store", "migrate", "--store", str(store_dir), str(slim.path)]) == 0
    out = capsys.readouterr().out
    assert out.count("head only: the personalized tail layer does not carry over") == 1, out
    assert "tail files left out of this build" in out and out.startswith(("retrained:", "factory:")), out
    clf = Classifier.open(slim.path, store=store_dir)  # the rebuilt head, or the factory's if the guard refused it
    assert clf.head.tail is None and len(clf.predict(w.test_x[:4]).labels) == 4


def test_the_migration_note_says_why_a_tail_stays_behind(tail_bundle, tail_migration_bundles, digits_bundle):
    """Nothing to say without a tail; a bundle without one, named with its manifest's reason;
    a bundle with a tail the migration does not carry to (another backbone: retrained head-only)."""
    from edgetl.device import HeadState
    from edgetl.device._lifecycle import _tail_dropped

    with_tail, head_only = tail_migration_bundles
    factory = HeadState.factory(with_tail)
    tailed = replace(factory, tail={"W1": np.zeros((1024, 64), np.float32), "b1": np.zeros(64, np.float32)})
    assert _tail_dropped(None, head_only) == _tail_dropped(factory, head_only) == ""
    assert _tail_dropped(tailed, head_only) == (
        "bundle 'head_only_v2' has no trainable tail (it was exported before tails existed)"
    )
    assert "(the embedding comes from Flatten" in _tail_dropped(tailed, digits_bundle[0])  # its manifest's reason
    assert "another backbone, labels or head shape" in _tail_dropped(tailed, with_tail)


def _broken_bundles(path, tmp_path):
    """The tail bundle with ``tail.tflite`` truncated, with ``trunk.fp32.onnx`` deleted, and with
    ``tail.tflite`` left in the directory but dropped from a re-hashed manifest (every listed hash
    valid, so only the tail's own lookup can refuse it)."""
    import json

    from edgetl.bundle import write_bundle

    truncated, deleted = tmp_path / "truncated.edgetl", tmp_path / "deleted.edgetl"
    for copy in (truncated, deleted):
        shutil.copytree(path, copy)
    (truncated / "tail.tflite").write_bytes((path / "tail.tflite").read_bytes()[:100])
    (deleted / "trunk.fp32.onnx").unlink()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["file"] != "tail.tflite"]
    files = {a["file"]: (path / a["file"]).read_bytes() for a in manifest["artifacts"]}
    unlisted = write_bundle(tmp_path / "unlisted.edgetl", manifest, files).path
    shutil.copy(path / "tail.tflite", unlisted / "tail.tflite")
    return [
        (truncated, "litert", "artifact 'tail.tflite' is 100 bytes, the manifest says"),
        (deleted, "onnxruntime", "artifact 'trunk.fp32.onnx' listed in the manifest is missing"),
        (unlisted, "litert", "its manifest does not list tail.tflite (role tail); files the manifest does not list"),
    ]


def test_a_bundle_with_missing_truncated_or_unlisted_tail_files_is_refused_naming_the_file(
    tail_bundle, tail_store, tmp_path, capsys
):
    """Personalizing the tail, or predicting with a stored tail, on a broken copy of the bundle: a
    clear error naming the file, exit 2, and the store (two tail versions) exactly as it was."""
    path, w = tail_bundle
    store_dir = _copy(tail_store, tmp_path)
    x, labels = _user_examples(w, "shift", 3)
    names = sorted(set(labels))
    np.savez(tmp_path / "u.npz", x=x, y=[names.index(v) for v in labels], class_names=np.array(names))
    np.save(tmp_path / "batch.npy", w.test_x[:4])

    def state():
        store = HeadStore(store_dir, read_bundle(path))
        try:
            return store.active().number, len(store.history()), store.active().head.tail["W1"].tobytes()
        finally:
            store.close()

    before = state()
    for bundle, backend, said in _broken_bundles(path, tmp_path):
        b, store = str(bundle), ("--store", str(store_dir), "--backend", backend)
        for argv in (
            ["personalize", b, "--data", str(tmp_path / "u.npz"), "--adapt", "tail", *store],
            ["predict", b, str(tmp_path / "batch.npy"), *store],
        ):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert said in err and "Traceback" not in err, (argv, err)
        assert state() == before, bundle


@pytest.mark.slow  # the device-only venv of tests/device/test_device_install.py (~25 s when it is not built yet)
def test_the_tail_in_a_device_only_install_on_both_backends(tail_bundle, tmp_path):
    """A device-only install (no TensorFlow) personalizes the tail and `auto` on onnxruntime and
    LiteRT, predicts with each store, and rolls back and forgets tail versions, as a user types it;
    the two backends' tails predict the same probabilities."""
    import json
    import os
    import subprocess

    from test_device_install import _device_venv

    py = _device_venv()
    assert subprocess.run([str(py), "-c", "import tensorflow"], capture_output=True).returncode != 0
    path, w = tail_bundle
    x, labels = _user_examples(w, "thick_slant", 0)
    names = sorted(set(labels))
    np.savez(tmp_path / "u.npz", x=x, y=[names.index(v) for v in labels], class_names=np.array(names))
    np.save(tmp_path / "batch.npy", w.test_x[:8])
    env = {**os.environ, "PYTHONPATH": ""}

    def edgetl(*args: str) -> str:
        proc = subprocess.run([str(py.parent / "edgetl"), *args], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stdout, proc.stderr[-2000:])
        return proc.stdout

    opened = ("--margin", "1", "--forget-margin", "1", "--mislabel", "off")  # commits whatever trains
    for adapt in ("tail", "auto"):
        for backend in ("onnxruntime", "litert"):
            out = edgetl("personalize", str(path), "--data", "u.npz", "--store", f"{adapt}_{backend}",
                         "--adapt", adapt, "--backend", backend, *opened)  # fmt: skip
            assert f"adapt {adapt}: judged the " in out and "committed; active version 1" in out, out

    def probabilities(store: str | None) -> np.ndarray:
        stored = ("--store", store) if store else ()
        doc = json.loads(edgetl("predict", str(path), "batch.npy", "--json", "--top-k", str(len(names)), *stored))
        return np.array([[dict((t["label"], t["probability"]) for t in p["top_k"])[n] for n in names]
                         for p in doc["predictions"]])  # fmt: skip

    tails = [probabilities(f"tail_{backend}") for backend in ("onnxruntime", "litert")]
    np.testing.assert_allclose(tails[0], tails[1], atol=1e-5)  # the same weights from both runtimes
    assert not np.allclose(tails[0], probabilities(None), atol=1e-3)  # and not the factory head's
    assert "with a trained tail layer: [1]" in edgetl("store", "verify", "--store", "tail_litert")
    assert "v1    commit" in edgetl("store", "history", "--store", "tail_litert")
    assert "active version 0" in edgetl("store", "rollback", "--store", "tail_onnxruntime")
    np.testing.assert_allclose(probabilities("tail_onnxruntime"), probabilities(None), atol=1e-6)
    assert "head version(s) [1] destroyed; active version 0" in edgetl(
        "store", "forget", "--store", "tail_litert", "--all"
    )
    np.testing.assert_allclose(probabilities("tail_litert"), probabilities(None), atol=1e-6)
