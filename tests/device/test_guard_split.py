"""The guard split: factory examples the head was never fitted on, shipped in replay.npz so the
device's guard judges forgetting where a candidate can gain as well as lose (before, it judged
on training examples the factory head had memorized: tools/guard_memorized.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetl.errors import BundleError


def _replay(bundle_path):
    with np.load(bundle_path / "replay.npz") as z:
        return {k: z[k] for k in z.files}


def _rows(x) -> set[bytes]:
    return {np.asarray(r, np.float32).tobytes() for r in x}


def _run_and_splits(tail_bundle):
    from guard_rates import digit_halves

    from edgetl.host._run import load_run

    run = load_run(tail_bundle[0].parent / "tail_target_dense0")  # tools/tail_rates.build_tail_bundle's run
    return run, run.config.split(digit_halves().train)


def test_the_bundle_ships_the_runs_guard_split_and_the_guard_judges_only_on_it(tail_bundle):
    from edgetl.device import Personalizer
    from edgetl.device._tail import TailPersonalizer

    path, w = tail_bundle
    run, splits = _run_and_splits(tail_bundle)
    assert run.config.guard_fraction == 0.1 and run.metrics["guard_examples"] == len(splits.guard) > 0
    replay = _replay(path)
    flag = replay["guard"]
    entry = next(a for a in json.loads((path / "manifest.json").read_text())["artifacts"] if a["role"] == "replay")
    assert flag.dtype == np.bool_ and entry["guard_examples"] == int(flag.sum()) == len(splits.guard)
    # The flagged rows are the guard split's examples (their embeddings, by the device's own
    # backbone), and none of the head's training examples (train and val: the head fits both).
    guard_emb = w.clf.embed(splits.guard.x)
    flagged = replay["embeddings"][flag]
    nearest = np.abs(flagged[:, None, :] - guard_emb[None]).max(axis=2).min(axis=1)
    assert nearest.max() < 1e-4
    fitted = w.clf.embed(np.concatenate([splits.train.x, splits.val.x]))
    assert np.abs(flagged[:, None, :] - fitted[None]).max(axis=2).min(axis=1).min() > 1e-3
    assert not _rows(splits.guard.x) & _rows(np.concatenate([splits.train.x, splits.val.x]))

    w.clf.set_head(w.clf.factory, 0)
    p = Personalizer(w.clf, None)
    train, held = p._replay_split()
    assert np.array_equal(held, np.flatnonzero(flag)) and not flag[train].any()
    assert np.bincount(replay["labels"][train]).tolist() == [10] * 5  # replay_per_class of each class
    _, parts = p._replay_parts()
    memorized = parts["memorized"]  # the fitted rows the candidate does not train on
    assert not flag[memorized].any() and not np.intersect1d(memorized, train).size
    assert len(train) + len(memorized) == int((~flag).sum())
    tp = TailPersonalizer(p)
    tail_train, tail_held = tp.replay_split()
    assert np.array_equal(tail_held, held) and not flag[tail_train].any()
    assert tp.held_out()["factory"][1] == [p.replay_labels[i] for i in held]
    tail_memorized = tp.held_out_trunk()["memorized"]
    assert len(tail_memorized[1]) == int((~flag).sum()) - len(tail_train)  # the tail trains on 40 per class
    # The guard's factory part is exactly the guard rows; the memorized part the other untrained rows.
    x, y = w.pool_x[:50], [str(v) for v in w.pool_y[:50]]
    p.add_examples(x, y)
    p.train()
    evidence = p.decide().evidence
    assert evidence["factory"]["n"] == int(flag.sum()) and evidence["memorized"]["n"] == len(memorized)
    assert set(p.decide().candidate_scores) == {"user", "replay"}  # the memorized part is evidence, not a score


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "guard": a["guard"].astype(np.int64)}, "guard must be .* booleans"),
        (lambda a: {**a, "guard": a["guard"][:-1]}, "guard must be .* booleans"),
        (lambda a: {**a, "guard": np.ones_like(a["guard"])}, "guard rows, the manifest declares"),
        (lambda a: {k: v for k, v in a.items() if k != "guard"}, "guard"),
    ],
    ids=["int-flags", "short", "all-flagged", "missing"],
)
def test_guard_flags_that_disagree_with_the_manifest_are_refused(tail_bundle, tmp_path, change, message):
    from bundle_edits import npz_edited, rebuilt

    from edgetl.bundle import read_bundle
    from edgetl.device import Classifier, Personalizer

    bundle = rebuilt(read_bundle(tail_bundle[0]), tmp_path / "edited.edgetl", {"replay.npz": npz_edited(change)})
    clf = Classifier.open(bundle.path)
    with pytest.raises(BundleError, match=message):
        Personalizer(clf, None)


def test_a_bundle_without_guard_rows_keeps_the_every_other_rule(tail_bundle, tmp_path):
    """A bundle exported before the guard split (no ``guard`` member, no manifest field): every
    other replay row of a class, up to replay_per_class, trains; the rest judge."""
    from bundle_edits import npz_edited, rebuilt

    from edgetl.bundle import read_bundle
    from edgetl.device import Classifier, Personalizer

    def drop(a):
        return {k: v for k, v in a.items() if k != "guard"}

    bundle = rebuilt(
        read_bundle(tail_bundle[0]),
        tmp_path / "old.edgetl",
        {"replay.npz": npz_edited(drop)},
        {"replay.npz": lambda entry: entry.pop("guard_examples")},
    )
    p = Personalizer(Classifier.open(bundle.path), None)
    assert p.replay_guard is None
    train, held = p._replay_split()
    labels = np.asarray(p.replay_labels)
    for name in sorted(set(p.replay_labels)):
        idx = np.flatnonzero(labels == name)
        assert np.array_equal(np.intersect1d(train, idx), idx[0::2][:10])
    assert len(train) + len(held) == len(labels) and not np.intersect1d(train, held).size


def test_export_ships_guard_rows_only_when_the_run_held_exactly_them_out(tail_bundle):
    from guard_rates import digit_halves

    from edgetl.host._export import _guard_split
    from edgetl.host._transfer import TrainConfig

    run, splits = _run_and_splits(tail_bundle)
    rows, said = _guard_split(run, splits)
    assert rows is not None and len(rows[1]) == len(splits.guard) and "never trained on" in said
    # Other data than training's (its own guard split, which the run never held out): none.
    other = run.config.split(digit_halves().test)
    rows, said = _guard_split(run, other)
    assert rows is None and "not the one the run held out" in said
    # A run that recorded no guard split (trained before it, or on a Splits given directly): none.
    run.metrics.pop("guard_sha256")
    rows, said = _guard_split(run, splits)
    assert rows is None and "held out no guard split" in said
    # A run recorded before the guard split re-splits exactly as it trained: guard_fraction 0.
    config = TrainConfig(backbone="x").to_dict()
    config.pop("guard_fraction")
    assert TrainConfig.from_dict(config).guard_fraction == 0.0


def test_a_run_on_images_of_another_size_ships_its_guard_split(source_run, digits_target, tmp_path):
    """Training resizes 16x16 images to the backbone's 8x8 before it records the guard split, as
    export's reload of the run's own data is resized before it re-splits: the fingerprints agree
    and the bundle has guard rows (recorded on the raw images, they never matched)."""
    from edgetl.data import load_dataset
    from edgetl.host._export import export_bundle
    from edgetl.host._run import save_run
    from edgetl.host._transfer import TrainConfig, train_transfer

    big = np.kron(np.asarray(digits_target.x), np.ones((1, 2, 2, 1), np.uint8))  # 8x8 -> 16x16, same digits
    names = np.asarray([digits_target.class_names[i] for i in digits_target.y])
    np.savez(tmp_path / "big.npz", x=big, y=names)
    data = load_dataset(tmp_path / "big.npz")
    assert data.input_shape[:2] == (16, 16)
    with pytest.warns(UserWarning, match="fit backbone"):
        result = train_transfer(data, TrainConfig(backbone=str(source_run[0]), epochs=5, test_fraction=0.0))
    run = save_run(result, tmp_path / "run")
    bundle = export_bundle(run, tmp_path / "big.edgetl", quantize=["none"]).bundle
    entry = next(a for a in bundle.manifest.artifacts if a.role.value == "replay")
    assert entry.extra["guard_examples"] == result.metrics["guard_examples"] > 0
    assert "never trained on" in bundle.manifest.data["guard"]
