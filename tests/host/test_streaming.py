"""Streamed data (issue 13): image folders and .npz read lazily give exactly what in-memory
loading gives (pixels, split, trained head), the automatic switch decides by memory, and the
on-disk embedding cache is reused, and invalidated when the backbone or a file changes."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from edgetl.cli import main
from edgetl.data import (
    ImageFiles,
    LazyArray,
    MappedArray,
    choose_streaming,
    conform_images,
    load_dataset,
    load_digits_dataset,
    stratified_split,
)
from edgetl.errors import InputError
from edgetl.host._transfer import TrainConfig, train_transfer


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own embedding cache (never the user's)."""
    monkeypatch.setenv("EDGETL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_digits_folder(root, classes=(5, 6, 7, 8, 9)):
    """Digits as PNG files: a third resized to 9x10, a fifth saved as RGB (mixed sizes and modes)."""
    d = load_digits_dataset(classes)
    for i, (x, y) in enumerate(zip(d.x, d.y)):
        folder = root / d.class_names[y]
        folder.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(x[..., 0], "L")
        if i % 3 == 0:
            im = im.resize((10, 9))
        if i % 5 == 0:
            im = im.convert("RGB")
        im.save(folder / f"{i:05d}.png")
    return root


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp("stream") / "digits")


def load_both(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_dataset(path, streaming="off", **kw), load_dataset(path, streaming="on", **kw)


def test_streamed_folder_has_the_in_memory_pixels_split_and_warnings(tmp_path):
    root = tmp_path / "imgs"
    for ci, name in enumerate(("cat", "dog", "owl")):
        (root / name).mkdir(parents=True)
        for j, (size, mode) in enumerate((((20, 10), "L"), ((16, 16), "RGB"), ((8, 12), "RGB"), ((20, 10), "L"))):
            arr = np.random.default_rng(ci * 10 + j).integers(0, 256, (size[1], size[0], 3), np.uint8)
            Image.fromarray(arr).convert(mode).save(root / name / f"{j}.{'png' if j % 2 else 'jpg'}")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "owl" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning) as in_memory_warnings:
        mem = load_dataset(root, streaming="off")
    with pytest.warns(UserWarning) as streamed_warnings:
        lazy = load_dataset(root, streaming="on")
    assert sorted(str(w.message) for w in streamed_warnings) == sorted(str(w.message) for w in in_memory_warnings)
    assert isinstance(lazy.x, ImageFiles) and lazy.streamed and not mem.streamed
    assert lazy.x.shape == mem.x.shape == (12, 10, 20, 3) and lazy.class_names == mem.class_names
    np.testing.assert_array_equal(np.asarray(lazy.x), mem.x)  # the same decoder, bit for bit
    np.testing.assert_array_equal(lazy.y, mem.y)
    for part in ("train", "val", "test"):
        a, b = getattr(stratified_split(mem, seed=3), part), getattr(stratified_split(lazy, seed=3), part)
        np.testing.assert_array_equal(np.asarray(b.x), a.x)
        np.testing.assert_array_equal(b.y, a.y)
    for shape in ((7, 9, 1), (12, 12, 3)):  # conformed as read: the in-memory steps, image by image
        (cm, notes_m), (cl, notes_l) = conform_images(mem, shape), conform_images(lazy, shape)
        assert notes_l == notes_m and isinstance(cl.x, ImageFiles)
        np.testing.assert_array_equal(np.asarray(cl.x), cm.x)
    assert lazy.record()["load"]["streaming"] == "on" and mem.record()["load"]["streaming"] == "off"
    # Indexing reads only what is asked, in the order asked; astype stays lazy.
    np.testing.assert_array_equal(lazy.x[[5, 0, 5]], mem.x[[5, 0, 5]])
    assert isinstance(lazy.x.astype(np.float32), LazyArray) and lazy.x.astype(np.float32)[2:4].dtype == np.float32
    with pytest.raises(InputError, match="streaming must be one of"):
        load_dataset(root, streaming="maybe")


def test_the_automatic_switch_decides_by_available_memory(digits_folder, monkeypatch):
    stream, reason = choose_streaming("auto", 1 << 30, available=4 << 30)  # 5 GB peak > half of 4 GB
    assert stream and "streamed from disk" in reason and "4.0 GB available" in reason
    stream, reason = choose_streaming("auto", 100 << 20, available=4 << 30)
    assert not stream and "loaded into memory" in reason
    assert choose_streaming("on", 1, available=1 << 40)[0] and not choose_streaming("off", 1 << 40, available=1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not load_dataset(digits_folder, streaming="auto").streamed  # 0.2 MB: memory
        monkeypatch.setattr("edgetl.data.available_memory", lambda: 1 << 20)  # a machine with 1 MB free
        auto = load_dataset(digits_folder, streaming="auto")
    assert auto.streamed and "streamed from disk" in auto.loading


def test_npz_is_memory_mapped_with_the_same_fingerprint(tmp_path):
    d = load_digits_dataset((0, 1, 2))
    np.savez(tmp_path / "images.npz", x=d.x[..., 0], y=d.y)  # rank 3: a channel is added
    np.savez(tmp_path / "features.npz", x=d.x.reshape(len(d.x), -1).astype(np.float32), y=d.y)
    np.savez_compressed(tmp_path / "compressed.npz", x=d.x, y=d.y)
    for name in ("images", "features"):
        mem, lazy = load_both(tmp_path / f"{name}.npz")
        assert lazy.fingerprint() == mem.fingerprint()  # the same bytes hashed, without loading them
        np.testing.assert_array_equal(np.asarray(lazy.x), mem.x)
        assert stratified_split(lazy).test.x.shape == stratified_split(mem).test.x.shape
    assert isinstance(load_both(tmp_path / "images.npz")[1].x, MappedArray)
    assert isinstance(load_both(tmp_path / "features.npz")[1].x, np.memmap)
    compressed = load_both(tmp_path / "compressed.npz")[1]
    assert not compressed.streamed and "uncompressed" in compressed.loading  # cannot be mapped: said why


def test_streamed_batches_equal_in_memory_batches(digits_folder):
    from edgetl.host._tf_data import Augmentation, to_tf_dataset

    mem, lazy = load_both(digits_folder)
    for kw in ({"shuffle": True, "seed": 4}, {"augmentation": Augmentation()}):
        a = list(to_tf_dataset(mem.x, mem.y, num_classes=5, batch_size=64, **kw).take(3))
        b = list(to_tf_dataset(lazy.x, lazy.y, num_classes=5, batch_size=64, **kw).take(3))
        for (xa, ya), (xb, yb) in zip(a, b):
            np.testing.assert_array_equal(yb.numpy(), ya.numpy())
            if "augmentation" not in kw:  # random transforms: the same images go in, the labels say so
                np.testing.assert_array_equal(xb.numpy(), xa.numpy())


def test_streaming_and_in_memory_train_the_same_head(digits_folder):
    mem, lazy = load_both(digits_folder)
    for config in (
        TrainConfig(backbone="edgetl_cnn"),
        TrainConfig(backbone="edgetl_cnn", head_hidden_units=16, epochs=4),
    ):
        a, b = train_transfer(mem, config), train_transfer(lazy, config)
        assert b.metrics["data_streamed"] and "data_streamed" not in a.metrics
        assert b.metrics["test_examples"] == a.metrics["test_examples"] > 100
        assert b.metrics["test_accuracy"] == a.metrics["test_accuracy"] > 0.6
        for wa, wb in zip(a.transfer.head.get_weights(), b.transfer.head.get_weights()):
            np.testing.assert_array_equal(wb, wa)  # one process: the same numbers, bit for bit


def test_streaming_off_decodes_streamed_data_and_configs_validate(digits_folder):
    _, lazy = load_both(digits_folder)
    result = train_transfer(lazy, TrainConfig(backbone="edgetl_cnn", streaming="off"))
    assert "data_streamed" not in result.metrics and result.data["load"]["streaming"] == "off"
    with pytest.raises(InputError, match="streaming must be one of"):
        TrainConfig(streaming="sometimes")
    with pytest.raises(InputError, match="embedding_cache must be"):
        TrainConfig(embedding_cache="yes")
    old = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("streaming", "embedding_cache")}
    assert TrainConfig.from_dict(old) == TrainConfig()  # runs from before streaming load as they were


def _cache_entries(cache):
    return sorted(p.stem for p in (cache / "embeddings").glob("*.npy"))


def test_embedding_cache_is_reused_and_invalidated_by_a_changed_file_or_backbone(tmp_path, private_cache):
    from edgetl.host._run import load_run

    root = write_digits_folder(tmp_path / "digits", classes=(0, 1, 2))
    train = ["train", "--data", str(root), "--backbone", "edgetl_cnn", "--streaming", "on", "--quiet", "--out"]
    assert main([*train, str(tmp_path / "first")]) == 0
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    (entry,) = first["embedding_cache"]
    assert not entry["reused"] and _cache_entries(private_cache) == [entry["key"]]
    run = load_run(tmp_path / "first")
    cached, meta = run.embeddings()  # linked into the run for export
    assert meta["key"] == entry["key"] and cached.shape == (entry["rows"], 256)

    # Reused for real: an entry altered on disk changes what the next run sees.
    store = private_cache / "embeddings" / f"{entry['key']}.npy"
    poisoned = np.load(store) * 2.0
    np.save(store, poisoned)
    assert main([*train, str(tmp_path / "second")]) == 0
    second = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert second["embedding_cache"][0]["reused"] and second["embedding_cache"][0]["key"] == entry["key"]
    assert second["embedding_scale_mean_abs"] == pytest.approx(2 * first["embedding_scale_mean_abs"], rel=1e-4)

    # One file changes: another key, embeddings computed again, that file's row is its new image's.
    changed = sorted((root / "1").iterdir())[0]
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(changed)
    assert main([*train, str(tmp_path / "third")]) == 0
    third = json.loads((tmp_path / "third" / "metrics.json").read_text())
    assert not third["embedding_cache"][0]["reused"] and third["embedding_cache"][0]["key"] != entry["key"]
    assert third["embedding_scale_mean_abs"] == pytest.approx(first["embedding_scale_mean_abs"], rel=0.05)
    lazy = load_dataset(root, streaming="on")
    row = lazy.x.paths.index(f"1/{changed.name}")
    fresh = load_run(tmp_path / "third")
    backbone = fresh.model.get_layer("features").layers[1]  # the frozen backbone inside features
    expected = backbone.predict(lazy.x[[row]].astype(np.float32), verbose=0)[0]
    np.testing.assert_allclose(fresh.embeddings()[0][row], expected, rtol=1e-5, atol=1e-6)
    assert load_run(tmp_path / "first").training_data()[0] is None  # the first run's data changed

    # Another backbone (other random weights): another key.
    assert main([*train, str(tmp_path / "fourth"), "--seed", "1"]) == 0
    fourth = json.loads((tmp_path / "fourth" / "metrics.json").read_text())
    assert not fourth["embedding_cache"][0]["reused"] and len(_cache_entries(private_cache)) == 3

    # --no-embedding-cache: nothing stored, nothing linked.
    assert main([*train, str(tmp_path / "fifth"), "--no-embedding-cache"]) == 0
    assert len(_cache_entries(private_cache)) == 3 and not (tmp_path / "fifth" / "embeddings.npy").exists()
    assert json.loads((tmp_path / "fifth" / "config.json").read_text())["config"]["embedding_cache"] is False


def test_export_reads_a_streamed_runs_data_and_embeddings(tmp_path, digits_folder, monkeypatch):
    from edgetl.host import _export
    from edgetl.host._run import load_run, save_run

    _, lazy = load_both(digits_folder)
    out = save_run(train_transfer(lazy, TrainConfig(backbone="edgetl_cnn")), tmp_path / "run")
    monkeypatch.setattr(_export, "STREAMED_EVALUATION_LIMIT", 50)
    plan = _export.plan_export(load_run(out), quantize=["int8"])
    data = plan.data
    assert "verified, streamed" in data.source["calibration"] and "embedding cache" in data.source["embeddings"]
    assert isinstance(data.train[0], LazyArray) and isinstance(data.test[0], np.ndarray)
    assert len(data.test[0]) == 50 and "50 of 179" in data.source["evaluation_sample"]
    assert data.calibration_x.dtype == np.float32 and len(data.calibration_x) == min(len(data.train[0]), 200)
    backbone, _ = _export.split_model(plan.run.model)
    index = np.arange(0, len(data.train[0]), 97)
    np.testing.assert_allclose(
        data.embeddings_of("train", index), backbone.predict(data.train[0][index], verbose=0), atol=1e-4
    )
    np.testing.assert_allclose(
        data.embeddings_of("test", [0, 7]), backbone.predict(data.test[0][[0, 7]], verbose=0), atol=1e-4
    )
