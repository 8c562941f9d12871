from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgetl.data import Dataset, load_dataset, sample_shots, stratified_split
from edgetl.errors import DataError, InputError
from edgetl.host._tf_data import Augmentation, to_tf_dataset


def _write_image(path, size, mode, value):
    arr = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value, dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """Three classes, mixed formats, sizes and colour modes, plus a broken file and a note."""
    root = tmp_path / "imgs"
    for ci, name in enumerate(("cat", "dog", "owl")):
        d = root / name
        d.mkdir(parents=True)
        _write_image(d / "a.png", (20, 10), "L", 10 + ci)
        _write_image(d / "b.jpg", (16, 16), "RGB", 100 + ci)
        _write_image(d / "c.bmp", (8, 12), "RGB", 200 + ci)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "owl" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_resizes_mixed_files_and_skips_broken_with_warning(image_folder):
    with pytest.warns(UserWarning) as record:
        ds = load_dataset(image_folder, image_size=(12, 14))
    messages = " ".join(str(w.message) for w in record)
    assert "broken.png" in messages and "notes.txt" in messages
    assert ds.class_names == ("cat", "dog", "owl")
    assert ds.kind == "image" and ds.x.dtype == np.uint8
    assert ds.x.shape == (9, 12, 14, 3)  # colour present -> RGB
    assert ds.class_counts() == {"cat": 3, "dog": 3, "owl": 3}
    with pytest.warns(UserWarning):
        gray = load_dataset(image_folder, image_size=8, channels=1)
    assert gray.x.shape == (9, 8, 8, 1)


def test_data_warnings_point_at_the_callers_line(image_folder):
    """A Python user sees each skipped file at their own call, not at a line inside
    edgetl/data.py followed by edgetl's source (in memory and streamed alike)."""
    for streaming in ("off", "on"):
        with pytest.warns(UserWarning) as record:
            load_dataset(image_folder, streaming=streaming)  # mixed sizes warn too
        assert len(record) >= 3 and {w.filename for w in record} == {__file__}, [w.filename for w in record]


def test_image_folder_default_size_is_first_image(image_folder):
    with pytest.warns(UserWarning):
        ds = load_dataset(image_folder)
    assert ds.x.shape[1:3] == (10, 20)  # cat/a.png is 20 wide, 10 high


def test_one_class_is_an_error(tmp_path):
    d = tmp_path / "one" / "only"
    d.mkdir(parents=True)
    _write_image(d / "a.png", (8, 8), "L", 1)
    with pytest.raises(DataError, match="at least two classes"):
        load_dataset(tmp_path / "one")


def test_class_left_without_examples_is_an_error(tmp_path):
    root = tmp_path / "data"
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    _write_image(root / "good" / "a.png", (8, 8), "L", 1)
    (root / "bad" / "x.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="x.png"):
        with pytest.raises(DataError, match="'bad'"):
            load_dataset(root)


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    f = tmp_path / "data.parquet"
    f.write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.parquet'"):
        load_dataset(f)


def test_npz_images_and_features(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, size=(12, 6, 6), dtype=np.uint8)
    y = np.array(["b", "a"] * 6)
    np.savez(tmp_path / "img.npz", x=x, y=y)
    ds = load_dataset(tmp_path / "img.npz")
    assert ds.kind == "image" and ds.x.shape == (12, 6, 6, 1)
    assert ds.class_names == ("a", "b") and ds.y[0] == 1
    np.savez(
        tmp_path / "feat.npz",
        x=np.ones((6, 3), np.float64),
        y=np.array([0, 1, 2] * 2),
        class_names=np.array(["x", "y", "z"]),
    )
    feats = load_dataset(tmp_path / "feat.npz")
    assert feats.kind == "features" and feats.x.dtype == np.float32 and feats.class_names == ("x", "y", "z")


def test_npz_without_y_and_corrupt_npz(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.ones((4, 2)))
    with pytest.raises(DataError, match=r"lacks array\(s\) \['y'\]"):
        load_dataset(tmp_path / "bad.npz")
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(tmp_path / "trunc.npz")


def test_csv_features_and_label_column(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("ax,ay,gesture\n0.1,0.2,wave\n0.3,0.1,tap\n1,2,wave\n\n5,6,tap\n")
    ds = load_dataset(f, label_column="gesture")
    assert ds.kind == "features" and ds.x.shape == (4, 2)
    assert ds.class_names == ("tap", "wave")
    with pytest.raises(DataError, match=r"no label column 'label'.*\['ax', 'ay', 'gesture'\]"):
        load_dataset(f)


def test_csv_numeric_labels_sort_numerically_and_bad_cells_are_errors(tmp_path):
    f = tmp_path / "n.csv"
    f.write_text("v,label\n1,10\n2,2\n3,10\n4,2\n")
    assert load_dataset(f).class_names == ("2", "10")
    bad = tmp_path / "bad.csv"
    bad.write_text("v,label\n1,a\noops,b\n")
    with pytest.raises(DataError, match=r"bad.csv:3: column 'v' must be numeric, received 'oops'"):
        load_dataset(bad)
    nan = tmp_path / "nan.csv"
    nan.write_text("v,label\nnan,a\n1,b\n")
    with pytest.raises(DataError, match="NaN"):
        load_dataset(nan)


def test_stratified_split_is_deterministic_disjoint_and_stratified(digits_target):
    a = stratified_split(digits_target, val_fraction=0.1, test_fraction=0.2, seed=3)
    b = stratified_split(digits_target, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert np.array_equal(a.test.x, b.test.x) and np.array_equal(a.train.y, b.train.y)
    assert len(a.train) + len(a.val) + len(a.test) == len(digits_target)
    for part in (a.train, a.val, a.test):
        counts = np.bincount(part.y, minlength=5)
        assert counts.min() > 0 and counts.max() - counts.min() <= max(2, 0.1 * counts.max())
    c = stratified_split(digits_target, seed=4)
    assert not np.array_equal(a.test.x, c.test.x)
    with pytest.raises(InputError, match="below 1"):
        stratified_split(digits_target, val_fraction=0.5, test_fraction=0.5)


def test_guard_split_is_held_out_of_training_and_leaves_val_and_test_as_they_were(digits_target):
    from edgetl.data import GUARD_MAX_PER_CLASS

    old = stratified_split(digits_target, val_fraction=0.1, test_fraction=0.2, seed=3)
    new = stratified_split(digits_target, val_fraction=0.1, test_fraction=0.2, guard_fraction=0.1, seed=3)
    assert old.guard is None and set(old.parts()) == {"train", "val", "test"}
    # val and test are the same examples; guard and the new train are the old train, disjoint
    for name in ("val", "test"):
        assert np.array_equal(getattr(old, name).x, getattr(new, name).x)
    old_rows = {r.tobytes() for r in old.train.x}
    guard_rows, train_rows = [{r.tobytes() for r in d.x} for d in (new.guard, new.train)]
    assert guard_rows | train_rows == old_rows and not guard_rows & train_rows
    counts = np.bincount(new.guard.y, minlength=5)
    per_class = np.bincount(digits_target.y, minlength=5)
    assert np.array_equal(counts, np.round(per_class * 0.1).astype(int)), (counts, per_class)
    # capped per class: a large dataset gives up at most GUARD_MAX_PER_CLASS of a class
    big = Dataset(
        np.repeat(digits_target.x, 8, axis=0), np.repeat(digits_target.y, 8), digits_target.class_names, "image"
    )
    capped = stratified_split(big, val_fraction=0.0, test_fraction=0.0, guard_fraction=0.5)
    assert np.bincount(capped.guard.y).max() == GUARD_MAX_PER_CLASS
    # a class of one example keeps it for training
    tiny = Dataset(digits_target.x[:2], np.array([0, 1]), ["a", "b"], "image")
    assert len(stratified_split(tiny, guard_fraction=0.5).train) == 2
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(InputError, match=r"guard_fraction must be a number in \[0, 1\)"):
            stratified_split(digits_target, guard_fraction=bad)
    with pytest.raises(InputError, match="val_fraction \\+ test_fraction \\+ guard_fraction must be below 1"):
        stratified_split(digits_target, val_fraction=0.4, test_fraction=0.4, guard_fraction=0.2)


def test_sample_shots(digits_target):
    s = sample_shots(digits_target, 3, seed=1)
    assert np.bincount(s.y).tolist() == [3] * 5


def test_augmentation_only_changes_training_batches():
    x = np.random.default_rng(0).integers(0, 255, size=(8, 16, 16, 3)).astype(np.uint8)
    y = np.arange(8) % 2
    plain = next(iter(to_tf_dataset(x, y, num_classes=2, batch_size=8)))[0].numpy()
    augmented = next(iter(to_tf_dataset(x, y, num_classes=2, batch_size=8, augmentation=Augmentation())))[0].numpy()
    assert np.array_equal(plain, x.astype(np.float32))
    assert not np.allclose(augmented, plain)
    layers = Augmentation().build()
    assert np.array_equal(layers(x.astype(np.float32), training=False).numpy(), x.astype(np.float32))
    with pytest.raises(InputError, match="flip"):
        Augmentation(flip="diagonal")


def test_dataset_validates_itself():
    with pytest.raises(DataError, match="differ in length"):
        Dataset(np.zeros((2, 3), np.float32), np.zeros(3, np.int64), ("a", "b"), "features")
    with pytest.raises(DataError, match="rank 4"):
        Dataset(np.zeros((2, 3), np.float32), np.zeros(2, np.int64), ("a", "b"), "image")


def test_an_empty_split_is_conformed_to_the_models_input(digits_target):
    """`--test-fraction 0` on images of another size: the empty test split is resized too (it
    raised numpy's "need at least one array to stack")."""
    from edgetl.data import conform_images

    big = Dataset(np.zeros((0, 16, 16, 1), np.uint8), np.zeros(0, np.int64), digits_target.class_names, "image")
    out, notes = conform_images(big, (8, 8, 1))
    assert out.x.shape == (0, 8, 8, 1) and out.x.dtype == np.uint8 and notes == ["images resized from 16x16 to 8x8"]
