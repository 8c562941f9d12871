"""Personalization that survives model updates: kept examples, migration, forgetting, trust.

Bundles are real (tests/conftest.py: digits 5-9 from a pretrained edgetl_cnn): the same run
exported again as version 2 has the same backbone; a run on edgetl_cnn pretrained with another
seed has a different one.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_tool

from edgetl.cli import main
from edgetl.device import Classifier, HeadStore, Personalizer, migrate
from edgetl.errors import BundleError, InputError, StoreError

BACKENDS = ["onnxruntime", "litert"]


@pytest.fixture(scope="module")
def user(restyled_user):
    return restyled_user


@pytest.fixture(scope="module")
def bundles(lifecycle_bundles):
    return lifecycle_bundles


def accuracy(clf, x, labels):
    return float(np.mean(np.asarray(clf.predict(x).labels) == labels))


def personalized_store(path, bundle, user, *, keep=True, backend="onnxruntime"):
    (x, y), _ = user
    clf = Classifier.open(bundle.path, backend=backend)
    p = Personalizer(clf, path, keep_examples=keep, margin=1.0)
    assert p.personalize(x, y).accepted
    return clf, p


def test_committed_examples_are_kept_raw_and_listed(tmp_path, digits_bundle, user, capsys):
    bundle, _ = digits_bundle
    (x, y), _ = user
    personalized_store(tmp_path / "s", bundle, user)
    kept, labels = HeadStore(tmp_path / "s", bundle).kept_examples()
    assert kept.dtype == np.uint8 and kept.shape[1:] == (8, 8, 1) and sorted(labels) == sorted(y.tolist())
    order = np.argsort(np.asarray(labels), kind="stable")
    np.testing.assert_array_equal(np.sort(kept.reshape(len(kept), -1), axis=0), np.sort(x.reshape(len(x), -1), axis=0))
    assert main(["store", "examples", "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "50" not in out.splitlines()[0] and "total" in out and len(order) == 50
    personalized_store(tmp_path / "none", bundle, user, keep=False)
    assert HeadStore(tmp_path / "none", bundle).kept_examples()[1] == []


def test_same_backbone_carries_the_head_over_unchanged(tmp_path, digits_bundle, bundles, user):
    bundle, _ = digits_bundle
    same, _ = bundles
    clf, _ = personalized_store(tmp_path / "s", bundle, user)
    result = migrate(HeadStore(tmp_path / "s", bundle), same)
    assert result.kind == "carried_over" and result.version == 2
    moved = HeadStore(tmp_path / "s", same).active()
    np.testing.assert_array_equal(moved.head.W, clf.head.W)
    history = HeadStore(tmp_path / "s", same).history()
    assert history[-1]["action"] == "migrate" and history[-1]["to_bundle"] == same.name
    with pytest.raises(StoreError, match="belongs to another bundle"):
        HeadStore(tmp_path / "s", bundle)  # the store now belongs to the new bundle


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_backbone_retrains_from_kept_examples(tmp_path, digits_bundle, bundles, user, backend):
    """Target (issue 12): within 2 points of personalizing the new bundle from scratch."""
    bundle, _ = digits_bundle
    _, other = bundles
    (x, y), (tx, ty) = user
    personalized_store(tmp_path / "s", bundle, user, backend=backend)
    result = migrate(HeadStore(tmp_path / "s", bundle), other, backend=backend, margin=1.0)
    assert result.kind == "retrained", result.reason
    migrated = Classifier.open(other.path, backend=backend, store=tmp_path / "s")
    assert migrated.head_version == result.version
    fresh_clf, _ = personalized_store(tmp_path / "fresh", other, user, backend=backend)
    gap = accuracy(fresh_clf, tx, ty) - accuracy(migrated, tx, ty)
    print(
        f"\n{backend}: migrated {accuracy(migrated, tx, ty):.3f}, personalized from scratch "
        f"{accuracy(fresh_clf, tx, ty):.3f}"
    )
    assert gap <= 0.02, gap
    assert accuracy(migrated, tx, ty) > accuracy(Classifier.open(other.path, backend=backend), tx, ty)


def test_migration_without_kept_examples_activates_the_new_factory_head(tmp_path, digits_bundle, bundles, user):
    bundle, _ = digits_bundle
    _, other = bundles
    personalized_store(tmp_path / "s", bundle, user, keep=False)
    result = migrate(HeadStore(tmp_path / "s", bundle), other)
    assert result.kind == "factory" and result.version == 0 and "no kept examples" in result.reason
    assert HeadStore(tmp_path / "s", other).active().number == 0


def test_migration_to_a_bundle_of_another_input_shape_changes_nothing(tmp_path, digits_bundle, user):
    """Kept 8x8 examples cannot feed a 32x32x3 bundle: a clear error, the store untouched."""

    from edgetl import host

    bundle, _ = digits_bundle
    personalized_store(tmp_path / "s", bundle, user)
    before = HeadStore(tmp_path / "s", bundle).history()
    um = load_tool("user_models")
    x, y = um.digit_images((5, 6, 7, 8, 9), 32, 3, seed=0, per_class=20)
    data = host.Dataset(x, y, tuple("56789"), "image")
    run = host.save_run(host.train(data, host.TrainConfig(backbone="edgetl_cnn")), tmp_path / "rgb_run")
    rgb = host.export_bundle(run, tmp_path / "rgb.edgetl", calibration=data).bundle
    with pytest.raises(InputError, match="must have shape"):
        migrate(HeadStore(tmp_path / "s", bundle), rgb)
    assert HeadStore(tmp_path / "s", bundle).history() == before
    assert HeadStore(tmp_path / "s", bundle).active().number == 1


def test_forget_all_keeps_only_the_factory_head(tmp_path, digits_bundle, user, capsys):
    bundle, _ = digits_bundle
    (x, _), _ = user
    personalized_store(tmp_path / "s", bundle, user)
    assert main(["store", "forget", "--all", "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "forgot everything personal" in out and "head version(s) [1] destroyed" in out
    assert main(["store", "forget", "--all", "--store", str(tmp_path / "s")]) == 0  # again: nothing left
    assert "0 kept example(s) destroyed, no head version to destroy" in capsys.readouterr().out
    store = HeadStore(tmp_path / "s", bundle)
    assert store.active().number == 0 and store.verified_versions() == {} and store.kept_examples()[1] == []
    assert store.history()[0]["removed"] and store.history()[0]["metrics"]["example_labels"][0] == "<forgotten>"
    blob = b"".join(f.read_bytes() for f in (tmp_path / "s").rglob("*") if f.is_file())
    assert not any(im.tobytes() in blob for im in x)
    assert main(["store", "forget", "--store", str(tmp_path / "s")]) == 2  # neither --label nor --all


def test_a_store_that_trusts_a_key_migrates_only_to_bundles_it_signed(tmp_path, digits_bundle, bundles, user):
    import shutil

    from edgetl.bundle import generate_keypair, sign_bundle

    bundle, _ = digits_bundle
    same, _ = bundles
    generate_keypair(tmp_path / "vendor.pem", tmp_path / "vendor.pub")
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
    personalized_store(tmp_path / "s", bundle, user)
    HeadStore(tmp_path / "s", bundle).set_trust([tmp_path / "vendor.pub"])
    unsigned = tmp_path / "unsigned.edgetl"
    shutil.copytree(same.path, unsigned)
    from edgetl.bundle import read_bundle

    with pytest.raises(BundleError, match="not signed|unsigned|no manifest.sig"):
        migrate(HeadStore(tmp_path / "s", bundle), read_bundle(unsigned))
    wrong = tmp_path / "wrong.edgetl"
    shutil.copytree(same.path, wrong)
    sign_bundle(wrong, tmp_path / "other.pem")
    with pytest.raises(BundleError, match="does not trust.*rotated its signing key"):
        migrate(HeadStore(tmp_path / "s", bundle), read_bundle(wrong))
    assert HeadStore(tmp_path / "s", bundle).active().number == 1  # nothing moved
    good = tmp_path / "good.edgetl"
    shutil.copytree(same.path, good)
    sign_bundle(good, tmp_path / "vendor.pem")
    assert migrate(HeadStore(tmp_path / "s", bundle), read_bundle(good)).kind == "carried_over"


def test_a_manifest_swapped_after_reading_cannot_borrow_its_signature(tmp_path, digits_bundle, bundles, user):
    """The signature is checked on the manifest bytes the bundle was parsed from: a signed
    manifest.json (and its manifest.sig) put in place after read_bundle parsed an unsigned
    one does not make the parsed bundle trusted."""
    import shutil

    from edgetl.bundle import generate_keypair, read_bundle, sign_bundle

    bundle, _ = digits_bundle
    same, other = bundles
    generate_keypair(tmp_path / "vendor.pem", tmp_path / "vendor.pub")
    personalized_store(tmp_path / "s", bundle, user)
    HeadStore(tmp_path / "s", bundle).set_trust([tmp_path / "vendor.pub"])
    signed = tmp_path / "signed.edgetl"
    shutil.copytree(same.path, signed)
    sign_bundle(signed, tmp_path / "vendor.pem")
    forged = tmp_path / "forged.edgetl"
    shutil.copytree(other.path, forged)
    parsed = read_bundle(forged)  # unsigned: the bundle the store would move to
    for name in ("manifest.json", "manifest.sig"):  # the swap, after parsing
        shutil.copy(signed / name, forged / name)
    with pytest.raises(BundleError, match="changed after signing"):
        migrate(HeadStore(tmp_path / "s", bundle), parsed)
    assert HeadStore(tmp_path / "s", bundle).active().number == 1  # nothing moved
    assert migrate(HeadStore(tmp_path / "s", bundle), read_bundle(signed)).kind == "carried_over"


def test_a_corrupt_kept_example_stops_migration_and_loses_nothing(tmp_path, digits_bundle, bundles, user):
    import sqlite3

    bundle, _ = digits_bundle
    _, other = bundles
    personalized_store(tmp_path / "s", bundle, user)
    with sqlite3.connect(tmp_path / "s" / "store.db") as db:
        x = bytearray(db.execute("SELECT x FROM examples WHERE seq=3").fetchone()[0])
        x[5] ^= 0xFF
        db.execute("UPDATE examples SET x=? WHERE seq=3", (bytes(x),))
    before = HeadStore(tmp_path / "s", bundle).history()
    with pytest.raises(StoreError, match="kept example 3 .* sha256"):
        migrate(HeadStore(tmp_path / "s", bundle), other)
    assert HeadStore(tmp_path / "s", bundle).history() == before
    assert HeadStore(tmp_path / "s", bundle).active_version == 1
