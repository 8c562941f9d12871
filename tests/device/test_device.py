"""Device side: Classifier, Personalizer and HeadStore on real bundles in both runtimes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgetl.device._classifier import Classifier
from edgetl.device._head import HeadState, TrainSettings
from edgetl.device._head_loop import make_trainer
from edgetl.device._personalizer import Personalizer
from edgetl.device._store import HeadStore
from edgetl.errors import InputError, StoreError

BACKENDS = ["onnxruntime", "litert"]


@pytest.fixture(scope="module")
def user(restyled_user):
    return restyled_user


def committed_once(bundle, store, user):
    """A classifier and personalizer whose store holds one committed head (version 1)."""
    (x, y), _ = user
    clf = Classifier.open(bundle.path, backend="onnxruntime")
    p = Personalizer(clf, store)
    p.add_examples(x, y)
    p.train()
    assert p.commit().version == 1
    return clf, p


def accuracy(clf, x, labels):
    return float(np.mean(np.asarray(clf.predict(x).labels) == labels))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_classifier_predicts_one_example_and_batches(digits_bundle, backend, precision):
    bundle, halves = digits_bundle
    clf = Classifier.open(bundle.path, backend=backend, precision=precision, threads=1)
    one = clf.predict(halves.test.x[0])
    assert len(one.labels) == 1 and one.probabilities.shape == (1, 5)
    batch = clf.predict(halves.test.x[:100], top_k=2)
    assert [t[0][0] for t in batch.top_k] == batch.labels and all(t[0][1] >= t[1][1] for t in batch.top_k)
    # int8 outputs are a softmax quantized to 8 bits (step 1/256): rows sum to 1 only
    # within a few steps; float outputs within float error.
    np.testing.assert_allclose(batch.probabilities.sum(axis=1), 1.0, atol=2e-2 if precision == "int8" else 1e-4)
    expected = np.asarray([halves.test.class_names[i] for i in halves.test.y[:100]])
    assert np.mean(np.asarray(batch.labels) == expected) > 0.85


def test_backends_agree_on_probabilities(digits_bundle):
    bundle, halves = digits_bundle
    ort, lite = (Classifier.open(bundle.path, backend=b) for b in BACKENDS)
    np.testing.assert_allclose(
        ort.predict(halves.test.x[:64]).probabilities, lite.predict(halves.test.x[:64]).probabilities, atol=1e-4
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 9, 8, 1), np.float32), "must have shape"),
        (np.zeros((8, 8), np.float32), "must have shape"),
        (np.zeros((0, 8, 8, 1), np.float32), "empty batch"),
        (np.full((2, 8, 8, 1), np.nan, np.float32), "NaN or infinite"),
        (np.full((1, 8, 8, 1), np.inf, np.float32), "NaN or infinite"),
        (np.zeros((1, 8, 8, 1), bool), "must be numeric"),
        (np.zeros((1, 8, 8, 1), complex), "must be numeric"),
        ("an image", "must be numeric"),
    ],
)
def test_bad_inputs_are_refused(digits_bundle, bad, message):
    clf = Classifier.open(digits_bundle[0].path, backend="onnxruntime")
    before = bad.copy() if isinstance(bad, np.ndarray) else bad
    with pytest.raises(InputError, match=message):
        clf.predict(bad)
    if isinstance(bad, np.ndarray):
        np.testing.assert_array_equal(bad, before)  # the caller's array is untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_personalization_improves_the_new_user_and_commits(tmp_path, digits_bundle, user, backend):
    (x, y), (tx, ty) = user
    clf = Classifier.open(digits_bundle[0].path, backend=backend)
    before = accuracy(clf, tx, ty)
    p = Personalizer(clf, tmp_path / "store")
    p.add_examples(x, y)
    p.train()
    result = p.commit()
    assert result.accepted and result.version == 1 and clf.head_version == 1
    assert accuracy(clf, tx, ty) > before + 0.05
    reopened = Classifier.open(digits_bundle[0].path, backend=backend, store=tmp_path / "store")
    assert reopened.head_version == 1
    np.testing.assert_array_equal(reopened.head.W, clf.head.W)


def test_open_refuses_a_store_that_does_not_exist_unless_it_is_a_new_one(tmp_path, digits_bundle, user):
    """A typo in ``store=`` would run the factory head without a word (the CLI refuses it too):
    refused, naming the path and the two ways out; ``new_store=True`` is a first run, whose
    Personalizer creates the store; a store that exists opens as before."""
    bundle = digits_bundle[0]
    typo = tmp_path / "haeds"
    with pytest.raises(InputError, match=r"store '.*haeds' does not exist; a Personalizer creates it.*new_store=True"):
        Classifier.open(bundle.path, store=typo)
    assert not typo.exists()  # refusing wrote nothing
    first = Classifier.open(bundle.path, store=tmp_path / "heads", new_store=True)
    assert first.head_version == 0 and not (tmp_path / "heads").exists()  # opening writes nothing
    (x, y), _ = user
    assert Personalizer(first, tmp_path / "heads", margin=1.0).personalize(x, y).version == 1
    for new_store in (False, True):  # an existing store: its active head, whatever the flag
        assert Classifier.open(bundle.path, store=tmp_path / "heads", new_store=new_store).head_version == 1


def test_onnxruntime_and_litert_heads_train_to_the_same_weights(digits_bundle, user):
    (x, y), _ = user
    bundle = digits_bundle[0]
    clf = Classifier.open(bundle.path, backend="onnxruntime")
    emb = clf.embed(x)
    head = HeadState.factory(bundle)
    column = {name: i for i, name in enumerate(head.labels)}
    onehot = np.eye(head.capacity, dtype=np.float32)[[column[l] for l in y]]
    for optimizer in ("sgd", "adam"):
        settings = TrainSettings(
            epochs=5, batch_size=16, optimizer=optimizer, learning_rate=0.1 if optimizer == "sgd" else 0.01
        )
        a, _ = make_trainer(bundle, "onnxruntime").train(head, emb, onehot, settings)
        b, _ = make_trainer(bundle, "litert").train(head, emb, onehot, settings)
        # SGD: the 1e-5. Adam divides by sqrt(v) + 1e-7, which amplifies float32
        # summation-order differences between runtimes where a gradient is tiny; measured
        # 1.1e-5 after these 20 steps, so Adam gets 5e-5.
        tolerance = 1e-5 if optimizer == "sgd" else 5e-5
        assert np.abs(a.W - b.W).max() <= tolerance and np.abs(a.b - b.b).max() <= tolerance, optimizer
        assert np.abs(a.W - head.W).max() > 1e-3  # it did train


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_class_by_imprinting_then_training(tmp_path, digits_bundle, backend):
    from edgetl.data import load_digits_dataset

    zeros = load_digits_dataset((0,)).x  # digit "0": a class the bundle never saw
    _, halves = digits_bundle
    old_x, old_y = halves.test.x, np.asarray([halves.test.class_names[i] for i in halves.test.y])
    clf = Classifier.open(digits_bundle[0].path, backend=backend)
    p = Personalizer(clf, tmp_path / "store")
    p.add_class("zero", zeros[:15])

    def scores(head):
        clf.set_head(head, -1)
        return np.mean(np.asarray(clf.predict(zeros[15:]).labels) == "zero"), accuracy(clf, old_x, old_y)

    before_old = scores(clf.factory)[1]  # the factory head, before adding
    imprint_new, imprint_old = scores(p._base)  # imprinted, before any training
    clf.set_head(clf.factory, 0)
    p.train()
    result = p.commit()
    assert result.accepted, result
    assert clf.head.labels[-1] == "zero" and clf.head.mask.sum() == 6 and clf.head_version == 1
    trained_new, trained_old = scores(clf.head)
    # The issue 12 target (class-balanced training): new-class recall at least imprinting's
    # (measured 0.865 -> 0.908 on both backends) and old-class accuracy within 2 points of
    # before adding (measured 0.997 -> 0.997). Chance is 1/6.
    assert imprint_new > 0.5 and trained_new >= imprint_new, (imprint_new, trained_new)
    assert trained_old >= before_old - 0.02, (before_old, imprint_old, trained_old)
    with pytest.raises(InputError, match="already exists"):
        p.add_class("zero", zeros[:2])
    for i in range(4):  # capacity is 2 x 5 labels = 10 columns: 4 more fit, the 5th does not
        p.add_class(f"extra{i}", zeros[:2])
    with pytest.raises(InputError, match="the head is full: capacity 10"):
        p.add_class("one too many", zeros[:2])


def test_guard_rejects_a_head_that_forgets_the_factory_classes(tmp_path, digits_bundle, user):
    """Every digit labelled "5" and Adam at 0.5: the head agrees with its user on the held-out
    examples (so the mean score rises) but loses the factory classes; refused."""
    (x, _), (tx, ty) = user
    clf = Classifier.open(digits_bundle[0].path, backend="onnxruntime")
    before = accuracy(clf, tx, ty)
    p = Personalizer(clf, tmp_path / "store")  # the default margins
    head_before = clf.head
    p.add_examples(x, ["5"] * len(x))
    candidate = p.train(TrainSettings(epochs=100, optimizer="adam", learning_rate=0.5, l2=0.0))
    clf.set_head(candidate, -1)
    assert accuracy(clf, tx, ty) < before - 0.2  # it really forgot
    clf.set_head(head_before, 0)
    result = p.commit()
    assert not result.accepted and "forgets the factory classes" in result.reason
    factory = result.evidence["factory"]
    assert factory["lost"] - factory["gained"] > factory["tolerated"] and factory["p_loss"] < p.guard.alpha
    # the refusal is in the store's history with the counts behind it, and nothing else changed
    (entry,) = p.store.history()
    assert entry["action"] == "rejected" and entry["version"] == 0
    assert entry["metrics"]["guard"]["reason"] == result.reason and entry["metrics"]["examples"] == len(x)
    assert clf.head is head_before and clf.head_version == 0 and p.store.active_version == 0


def test_guard_margin_is_a_real_gate(tmp_path, digits_bundle, user):
    """A head that answers one class everywhere is refused as worse for the user (margin 0)
    and as forgetting even when the user side allows any loss (margin 1)."""
    from dataclasses import replace

    (x, y), _ = user
    clf = Classifier.open(digits_bundle[0].path, backend="onnxruntime")
    p = Personalizer(clf, tmp_path / "store")
    p.add_examples(x, y)
    p.train()
    good = p.candidate
    worse = replace(good, W=good.W * 0.0, b=good.b * 0.0)  # uniform probabilities: argmax = the first class
    p.candidate = worse
    result = p.commit(margin=0.0)
    assert not result.accepted and result.candidate_accuracy < result.active_accuracy
    assert "worse on your own examples" in result.reason
    p.candidate = worse
    opened_user_side = p.commit(margin=1.0)
    assert not opened_user_side.accepted and "forgets the factory classes" in opened_user_side.reason


def test_rollback_reset_and_history(tmp_path, digits_bundle, user):
    (x, y), _ = user
    clf = Classifier.open(digits_bundle[0].path, backend="onnxruntime")
    p = Personalizer(clf, tmp_path / "store", margin=1.0, forget_margin=1.0)  # the store's mechanics, not the guard
    p.add_examples(x[:25], y[:25])
    p.train()
    assert p.commit().version == 1
    w1 = clf.head.W.copy()
    p.add_examples(x[25:], y[25:])
    p.train()
    assert p.commit().version == 2
    assert p.rollback() == 1 and clf.head_version == 1
    np.testing.assert_array_equal(clf.head.W, w1)
    assert p.reset() == 0 and clf.head_version == 0
    np.testing.assert_array_equal(clf.head.W, clf.factory.W)
    assert p.rollback() == 1  # reset can be undone too
    actions = [h["action"] for h in p.store.history()]
    assert actions == ["commit", "commit", "rollback", "reset", "rollback"]
    assert all("time" in h for h in p.store.history())
    assert p.store.history()[0]["metrics"]["heldout_accuracy"] > 0


def test_bad_personalization_inputs_change_nothing(tmp_path, digits_bundle, user):
    (x, y), _ = user
    clf = Classifier.open(digits_bundle[0].path, backend="onnxruntime")
    p = Personalizer(clf, tmp_path / "store")
    with pytest.raises(InputError, match="unknown label"):
        p.add_examples(x[:2], ["5", "banana"])
    with pytest.raises(InputError, match="2 examples and 3 labels"):
        p.add_examples(x[:2], ["5", "6", "7"])
    with pytest.raises(InputError, match="NaN"):
        p.add_examples(np.full((1, 8, 8, 1), np.nan), ["5"])
    with pytest.raises(InputError, match="no examples yet"):
        p.train()
    with pytest.raises(InputError, match="no candidate"):
        p.commit()
    assert p.examples == 0 and clf.head_version == 0 and not (tmp_path / "store").exists()


FULL_DISK_CHILD = textwrap.dedent(
    """
    import resource, signal, sys, numpy as np
    from dataclasses import replace
    from edgetl.bundle import read_bundle
    from edgetl.device._head import HeadState
    from edgetl.device._store import HeadStore
    from edgetl.errors import StoreError
    store = HeadStore(sys.argv[2], read_bundle(sys.argv[1]))
    head = store.active().head
    # The kernel now refuses writes past 1 KB with EFBIG, as a full disk refuses them.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
    try:
        store.commit(replace(head, W=head.W + 1))
    except StoreError as exc:
        print("refused:", exc)
    """
)


def test_failed_write_refuses_commit_and_keeps_the_active_head(tmp_path, digits_bundle, user):
    bundle = digits_bundle[0]
    clf, _ = committed_once(bundle, tmp_path / "store", user)
    files_before = sorted(f.name for f in (tmp_path / "store").iterdir())
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CHILD, str(bundle.path), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "refused: cannot commit the head" in proc.stdout and "rolled back and nothing changed" in proc.stdout, (
        proc.stderr[-2000:]
    )
    store = HeadStore(tmp_path / "store", bundle)
    assert store.active_version == 1
    np.testing.assert_array_equal(store.active().head.W, clf.head.W)
    assert sorted(f.name for f in (tmp_path / "store").iterdir()) == files_before  # no partial files left


def test_store_of_another_bundle_and_corrupt_versions(tmp_path, digits_bundle, user):
    import sqlite3

    bundle = digits_bundle[0]
    committed_once(bundle, tmp_path / "store", user)
    with sqlite3.connect(tmp_path / "store" / "store.db") as db:
        owner = db.execute("SELECT value FROM meta WHERE key='bundle_id'").fetchone()[0]
        db.execute("UPDATE meta SET value=? WHERE key='bundle_id'", ("0" * 64,))
    with pytest.raises(StoreError, match="belongs to another bundle"):
        HeadStore(tmp_path / "store", bundle)
    with sqlite3.connect(tmp_path / "store" / "store.db") as db:
        db.execute("UPDATE meta SET value=? WHERE key='bundle_id'", (owner,))
        b = bytearray(db.execute("SELECT b FROM versions WHERE number=1").fetchone()[0])
        b[-2] ^= 0xFF
        db.execute("UPDATE versions SET b=? WHERE number=1", (bytes(b),))
    with pytest.raises(StoreError, match="sha256"):
        Classifier.open(bundle.path, store=tmp_path / "store")
    assert HeadStore(tmp_path / "store", bundle).reset() == 0  # the factory head is always restorable


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_embeddings_train_to_finite_weights(digits_bundle, backend):
    """A dead backbone (all-zero embeddings) once gave the bias a 1e11 step and NaN weights."""
    bundle = digits_bundle[0]
    head = HeadState.factory(bundle)
    emb = np.zeros((20, head.W.shape[0]), np.float32)
    onehot = np.eye(head.capacity, dtype=np.float32)[np.arange(20) % 5]
    trained, losses = make_trainer(bundle, backend).train(head, emb, onehot, TrainSettings(epochs=5))
    assert np.isfinite(trained.W).all() and np.isfinite(trained.b).all() and np.isfinite(losses).all()
