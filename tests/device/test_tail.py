"""The trainable tail (issue 24): a backbone with an eligible last layer, built by the tests, exports a
tail that both runtimes train to the same weights; a user head-only cannot reach gains with
the tail, and the guard accepts it; an ineligible backbone stays head-only and says why."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import load_tool

from edgetl.bundle import _tail as T
from edgetl.errors import BundleError

# tail_bundle (tests/conftest.py, session): the built bundle's path and the guard tools' world of it.


def test_export_splits_the_dense_embedding_and_verifies_both_runtimes(tail_bundle):
    bundle = tail_bundle[1].clf.bundle
    section = bundle.manifest.extra["tail"]
    assert section["available"] and section["layer"] == "embedding_dense" and section["activation"] == "relu"
    assert (section["trunk_size"], section["embedding_size"]) == (1024, 64)
    roles = {a.role.value for a in bundle.artifacts()}
    assert {"trunk", "tail", "tail_infer", "tail_train_loop", "tail_init"} <= roles
    checks = section["checks"]
    assert checks["sgd_onnx_vs_tflite"] <= 1e-5  # issue 24's target
    assert checks["adam_onnx_vs_tflite"] <= checks["adam_tolerance"]
    assert bundle.arrays("replay", (T.REPLAY_KEY,))[T.REPLAY_KEY].shape[1:] == (1, 1024)  # [N, P, F], P = 1


# The 5-point target is on the evaluation family's mean (tools/tail_rates.py); for one user in a
# test, 3 points = 13 of the 448 test images, more than the noise between two runs of a head.
MIN_GAIN = 0.03
# Tuning-family users (the evaluation family is for tools/tail_rates.py), in the order tried. The
# bundles are seeded and rebuild bit for bit (tail_rates' conv CNN of seed 0 rebuilt: the same W1,
# b1, seam and head), so which user passes is fixed for a build. The margin: with the one-hot replay
# targets and l2 0.1 the conv bundle of seed 0 passed only at the 15th user (+3.1 points; the best
# accepted user of seeds 1 and 2: +4.7, +5.1); with the soft replay targets and l2 0.03 (the
# defaults now) it passes at the 5th (+5.1; best +5.6), seeds 1 and 2 at the 3rd and 1st (best
# accepted +8.3, +6.9), and the Dense bundle of seed 0 at the 2nd (+4.7).
USERS = [(kind, seed) for seed in (0, 1, 2) for kind in ("shift", "slant", "thin_rotate", "zoom_noise", "thick_slant")]


def _user(w, user):
    """A user (kind, seed) with 10 examples per class, and their test images."""
    from guard_rates import draw, draw_style

    kind, seed = user
    idx, y = draw(w, 10, np.random.default_rng(seed), False)
    x = draw_style(kind, w.pool_x[idx], [seed, 10, 1])
    return x, [str(v) for v in y], draw_style(kind, w.test_x, [seed, 10, 2])


def _gaining_user(w):
    """The first user whose tail the guard accepts and whose head-only candidate it beats by
    :data:`MIN_GAIN` on their test images (TensorFlow's training is not bit-reproducible across runs,
    so which kind that is may vary; that one exists is what the tests assert)."""
    from guard_rates import accuracy

    from edgetl.device import Personalizer
    from edgetl.device._tail import TailPersonalizer

    seen = []
    for kind in USERS:
        x, labels, test_x = _user(w, kind)
        w.clf.set_head(w.clf.factory, 0)
        p = Personalizer(w.clf, None)
        p.add_examples(x, labels)
        p.train()
        tp = TailPersonalizer(p)
        tail = tp.train()
        verdict = tp.decide()
        head_after = accuracy(w.clf, p.candidate, w.clf.embed(test_x), w.test_y)
        trunk = tp.runtime.trunk(test_x)
        tail_after = float(np.mean(tp.predict(tail.weights, trunk, w.clf.factory.labels) == w.test_y))
        seen.append((kind, verdict.accepted, round(head_after, 3), round(tail_after, 3)))
        if verdict.accepted and tail_after >= head_after + MIN_GAIN:
            return kind, p, tp, verdict, head_after, tail_after
    pytest.fail(f"no user gained {MIN_GAIN:.0%} with an accepted tail: {seen}")


@pytest.fixture(scope="module")
def tail_user(tail_bundle):
    return _gaining_user(tail_bundle[1])


def test_a_user_head_only_cannot_reach_gains_with_the_tail_and_the_guard_accepts_it(tail_bundle, tail_user):
    from edgetl.bundle import _contract as C
    from edgetl.device._tail import TAIL_SETTINGS, TailRuntime

    kind, p, tp, verdict, head_after, tail_after = tail_user
    assert verdict.accepted and verdict.evidence["adapt"] == "tail", verdict.reason
    assert tail_after >= head_after + MIN_GAIN, (kind, head_after, tail_after)
    # The device's own training (a weighted replay window per epoch) is what ran, and LiteRT
    # gets the same weights from it (stateless tail.tflite, same plan, same row weights).
    plan = tp.training_plan(TAIL_SETTINGS)
    assert len(tp.candidate.losses) == len(plan[C.ORDER])
    rows_per_epoch = int((plan[C.ROW_WEIGHT] > 0).sum()) // TAIL_SETTINGS.epochs
    assert rows_per_epoch < len(plan[C.TRUNK])  # a window of the replay rows, not all of them
    assert len(set(np.unique(plan[C.ROW_WEIGHT][plan[C.ROW_WEIGHT] > 0]).round(6))) > 1  # weighted
    litert = TailRuntime.from_bundle(tail_bundle[1].clf.bundle, "litert")
    settings = dict(lr=TAIL_SETTINGS.learning_rate, l2=TAIL_SETTINGS.l2, momentum=TAIL_SETTINGS.momentum)
    steps = (plan[C.TRUNK], plan[C.LABELS], "sgd", plan[C.ORDER], plan[C.ROW_WEIGHT])
    runs = [rt.train_steps(tp.start_weights(), *steps, **settings) for rt in (tp.runtime, litert)]
    assert max(float(np.abs(runs[0][k] - runs[1][k]).max()) for k in T.WEIGHTS) <= 1e-5
    assert all(np.array_equal(runs[0][k], tp.candidate.weights[k]) for k in T.WEIGHTS)  # = the candidate
    assert not np.allclose(runs[0]["W1"], tp.init["W1"])  # it trained the layer


def test_replay_rows_learn_the_active_heads_predictions_and_user_rows_their_labels(tail_bundle):
    """The tail's replay targets are the head's probabilities on those examples, as the bundle's
    own tail graph computes them from the trunk (an independent route to the numpy one), soft
    (not one-hot), and each row sums to 1; ``replay_temperature=None`` gives one-hot labels."""
    from edgetl.bundle import _contract as C
    from edgetl.device import Personalizer
    from edgetl.device._tail import TAIL_SETTINGS, TailPersonalizer
    from edgetl.errors import InputError

    w = tail_bundle[1]
    x, labels, _ = _user(w, USERS[0])
    w.clf.set_head(w.clf.factory, 0)
    p = Personalizer(w.clf, None)
    tp = TailPersonalizer(p)
    p.add_examples(x, labels)
    targets, users = tp.training_plan(TAIL_SETTINGS)[C.LABELS], len(p._split()[0])
    replay, _ = tp.replay_split()
    graph = tp.runtime.probabilities(tp.start_weights(), tp.replay_trunk[replay])
    assert np.abs(targets[users:] - graph).max() <= 1e-4
    assert (
        np.allclose(targets.sum(axis=1), 1, atol=1e-5) and ((targets[users:] > 1e-3) & (targets[users:] < 0.999)).any()
    )
    assert np.array_equal(targets[:users], p.onehot([p._labels[i] for i in p._split()[0]], p._base))
    hard = TailPersonalizer(p, replay_temperature=None).training_plan(TAIL_SETTINGS)[C.LABELS]
    assert np.array_equal(
        hard, p.onehot([*(p._labels[i] for i in p._split()[0]), *np.asarray(p.replay_labels)[replay]], p._base)
    )
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(InputError, match="replay_temperature must be a number > 0 or None"):
            TailPersonalizer(p, replay_temperature=bad)


def test_a_dropped_tail_personalizer_and_its_personalizer_are_freed_without_the_cycle_collector(tail_bundle):
    """Repeated personalizations must not hold their examples until Python's cycle collector runs:
    with it off, dropping a trained and judged tail and its Personalizer frees both; a Personalizer
    that outlives its tail embeds with the backbone again."""
    import gc
    import weakref

    from edgetl.device import Personalizer
    from edgetl.device._tail import TailPersonalizer

    w = tail_bundle[1]
    x, labels, _ = _user(w, USERS[0])
    w.clf.set_head(w.clf.factory, 0)
    gc.collect()
    gc.disable()
    try:
        p = Personalizer(w.clf, None)
        tp = TailPersonalizer(p)
        p.add_examples(x, labels)
        p.train()
        tp.train()
        tp.decide()
        refs = weakref.ref(p), weakref.ref(tp)
        del p, tp
        assert [r() for r in refs] == [None, None]
        p = Personalizer(w.clf, None)
        tail = weakref.ref(TailPersonalizer(p))
        assert tail() is None
        assert np.allclose(p._embed(x[:4]), w.clf.embed(x[:4]), atol=1e-4)
    finally:
        gc.enable()


def test_a_committed_tail_is_a_store_version_the_classifier_runs_and_a_corrupt_one_is_refused(
    tail_bundle, tail_user, tmp_path
):
    import sqlite3

    from edgetl.device import Classifier, HeadStore, Personalizer
    from edgetl.device._tail import personalize
    from edgetl.errors import StoreError

    w = tail_bundle[1]
    x, labels, test_x = _user(w, tail_user[0])
    w.clf.set_head(w.clf.factory, 0)
    store = HeadStore(tmp_path / "store", w.clf.bundle)

    class HeadTrainsCounted(Personalizer):
        head_trains = 0

        def train(self, *args, **kwargs):
            self.head_trains += 1
            return super().train(*args, **kwargs)

    p = HeadTrainsCounted(w.clf, store)
    result = personalize(p, x, labels, adapt="tail")
    assert result.accepted and result.version == 1 and result.evidence["adapt"] == "tail", result.reason
    assert p.head_trains == 0  # --adapt tail has no head candidate to compare with: none is trained
    assert store.active().head.tail["W1"].shape == (1024, 64)
    clf = Classifier.open(w.clf.bundle.path, store=tmp_path / "store")
    assert clf.head.tail is not None
    # The classifier runs trunk -> trained layer -> head: the accuracy the tail measured.
    assert float(np.mean(np.asarray(clf.predict(test_x).labels) == w.test_y)) == pytest.approx(tail_user[5], abs=0.01)
    assert store.reset() == 0 and store.active().head.tail is None  # back to the factory head
    store.close()
    with sqlite3.connect(tmp_path / "store" / "store.db") as db:  # overwrite the stored layer's bias
        db.execute("UPDATE tails SET b1 = zeroblob(length(b1)) WHERE version = 1")
    with pytest.raises(StoreError, match="tail of head version 1 fails its sha256 check"):
        HeadStore(tmp_path / "store", w.clf.bundle).verified_versions()


def test_the_export_check_refuses_a_tail_graph_that_differs_from_the_reference(tail_bundle):
    """A wrong graph (linear where the layer is relu) must fail verify_tail's checks."""
    from edgetl.host._tail_export import TailSplit, tail_files, verify_tail
    from edgetl.host._tf import keras

    bundle = tail_bundle[1].clf.bundle
    init = {k: v.astype(np.float32) for k, v in bundle.arrays("tail_init", ("W1", "b1", "mean", "inv_std")).items()}
    head = tuple(bundle.arrays("head_init", ("W", "b", "mask"))[k] for k in ("W", "b", "mask"))
    k = keras()
    inputs = k.Input((8, 8, 1))
    flat = k.layers.Flatten()(k.layers.Conv2D(16, 3, padding="same")(inputs))
    trunk = k.Model(inputs, k.layers.Reshape((1, 1024))(flat))  # [N, P, F] = [N, 1, 1024]
    honest = TailSplit(trunk, "embedding_dense", "relu", init)
    files = tail_files(TailSplit(trunk, "embedding_dense", "linear", init), head, 17)
    x = np.random.default_rng(0).uniform(0, 255, (16, 8, 8, 1)).astype(np.float32)
    checks = verify_tail(honest, files, head, x, np.zeros(16, np.int64))
    assert not checks["passed"] and any("reference" in f for f in checks["failures"]), checks


def test_the_export_check_allows_float32s_own_error_and_still_refuses_a_wrong_graph(tail_bundle):
    """A model float32 cannot follow closely (the demo's backbone on 600 source images: a bias of 1
    before a standardization with inv_std in the thousands) passes with the right graph, because
    numpy in float32 lands as far from the float64 reference as the runtimes do, and the wrong
    graph (linear where the layer is relu) is still refused on the same model."""
    from edgetl.host._tail_export import INFER_TOLERANCE, TailSplit, tail_files, verify_tail
    from edgetl.host._tf import keras

    bundle = tail_bundle[1].clf.bundle
    head = tuple(bundle.arrays("head_init", ("W", "b", "mask"))[k] for k in ("W", "b", "mask"))
    k = keras()
    inputs = k.Input((8, 8, 1))
    flat = k.layers.Flatten()(k.layers.Conv2D(16, 3, padding="same")(inputs))
    trunk = k.Model(inputs, k.layers.Reshape((1, 1024))(flat))
    x = np.random.default_rng(0).uniform(0, 255, (16, 8, 8, 1)).astype(np.float32)
    a = trunk.predict(x, verbose=0)[:, 0]
    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(1024, 64)) / np.abs(a).max() / 32
    w1[:, :32] *= 1e-3  # half the units: 1 + ~1e-4 (ill-conditioned); the others cross 0 (relu matters)
    b1 = np.where(np.arange(64) < 32, 1.0, 0.0)
    e = np.maximum(a @ w1 + b1, 0)
    init = {"W1": w1, "b1": b1, "mean": e.mean(axis=0), "inv_std": 1 / (e.std(axis=0) + 1e-12)}
    init = {key: v.astype(np.float32) for key, v in init.items()}
    assert init["inv_std"][:32].min() > 1e3
    y = np.arange(16) % 4

    honest = TailSplit(trunk, "embedding_dense", "relu", init)
    checks = verify_tail(honest, tail_files(honest, head, 17), head, x, y)
    assert checks["passed"], checks["failures"]
    # The floor was needed: float32 itself misses the reference by more than the plain tolerance.
    assert checks["infer_float32_floor"] > INFER_TOLERANCE or checks["adam_float32_floor"] > 1e-4, checks
    wrong = tail_files(TailSplit(trunk, "embedding_dense", "linear", init), head, 17)
    checks = verify_tail(honest, wrong, head, x, y)
    assert not checks["passed"] and any("reference" in f for f in checks["failures"]), checks


def test_a_tail_that_fails_its_checks_leaves_the_bundle_head_only_unless_strict(tail_bundle, tmp_path, monkeypatch):
    """Nobody asks for the tail: files that fail their checks (here a real wrong graph, linear where
    the layer is relu) are left out with a warning and the reason in the manifest; the export of
    everything else goes on. With strict, it is an export error."""
    from guard_rates import digit_halves

    import edgetl.host._tail_export as tail_export
    from edgetl.errors import TailLeftOut
    from edgetl.host._export import export_bundle

    real = tail_export.tail_files
    monkeypatch.setattr(tail_export, "tail_files", lambda split, *a: real(replace(split, activation="linear"), *a))
    run, data = tail_bundle[0].parent / "tail_target_dense0", digit_halves().train
    with pytest.warns(TailLeftOut, match="the trainable tail failed its checks: tail sgd in onnx differs"):
        result = export_bundle(run, tmp_path / "b.edgetl", quantize=["none"], calibration=data)
    section = result.bundle.manifest.extra["tail"]
    assert result.ok and section["available"] is False and "failed its checks" in section["reason"]
    assert not [a for a in result.bundle.artifacts() if a.role.value.startswith(("tail", "trunk"))]
    with pytest.raises(BundleError, match="the trainable tail failed its checks"):
        export_bundle(run, tmp_path / "s.edgetl", quantize=["none"], calibration=data, strict=True)
    assert not (tmp_path / "s.edgetl").exists()


def test_the_export_cost_tools_skipped_tail_step_is_one_export_takes(tail_bundle, tmp_path, monkeypatch):
    """tools/tail_export_cost.py (README: what the tail adds to the demo's export) times export with
    its tail step replaced by a stub; the stub must give what export takes (it once handed back a
    list where export reads a dict: the README's command failed with an AttributeError)."""
    from guard_rates import digit_halves

    from edgetl.host import _export

    monkeypatch.setattr(_export, "tail_step", load_tool("tail_export_cost").skipped_tail_step)
    run = tail_bundle[0].parent / "tail_target_dense0"
    result = _export.export_bundle(run, tmp_path / "b.edgetl", quantize=["none"], calibration=digit_halves().train)
    assert result.ok and result.bundle.manifest.extra["tail"]["reason"] == "skipped (timing)"
    assert not [a for a in result.bundle.artifacts() if a.role.value.startswith(("tail", "trunk"))]


def test_a_backbone_without_a_dense_last_layer_stays_head_only_and_says_why(digits_bundle):
    from edgetl.device import Classifier, Personalizer
    from edgetl.device._tail import TailPersonalizer

    bundle = digits_bundle[0]
    section = bundle.manifest.extra["tail"]
    assert section["available"] is False and "Flatten" in section["reason"]
    assert not [a for a in bundle.artifacts() if a.role.value.startswith(("tail", "trunk"))]
    clf = Classifier.open(bundle.path)
    with pytest.raises(BundleError, match="no trainable tail: .*Flatten"):
        TailPersonalizer(Personalizer(clf, None))
    from edgetl.device._tail import personalize

    halves = digits_bundle[1]
    x, y = np.asarray(halves.train.x)[:40], [halves.train.class_names[i] for i in halves.train.y[:40]]
    result = personalize(Personalizer(clf, None), x, y, adapt="auto", commit=False)
    assert result.evidence["adapt"] == "head" and "Flatten" in result.evidence["tail_unavailable"]


def test_personalize_cli_adapt_says_once_when_the_bundle_has_no_tail(tmp_path, digits_bundle, capsys):
    from edgetl.cli import main

    bundle, halves = digits_bundle
    np.savez(
        tmp_path / "u.npz", x=halves.test.x[:40], y=halves.test.y[:40], class_names=np.array(halves.test.class_names)
    )
    args = ["personalize", str(bundle.path), "--data", str(tmp_path / "u.npz"), "--store", str(tmp_path / "s")]
    for adapt in ("auto", "tail"):  # asked for the tail outright too: the head, said once, no error
        assert main([*args, "--adapt", adapt]) in (0, 3)  # the guard's verdict on the head
        out = capsys.readouterr().out
        assert out.count("head only: this bundle has no trainable tail (the embedding comes from Flatten") == 1, out
        assert out.count("tail") == 1 and "guard: " in out, out
    assert main([*args, "--adapt", "sideways"]) == 2  # argparse refuses a value outside head|tail|auto
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_inspect_says_whether_the_bundle_has_a_tail_and_why_not(tail_bundle, digits_bundle, capsys):
    """A user deciding on --adapt reads `edgetl inspect`: the layer a tail trains, or why there is none."""
    from edgetl.cli import main

    assert main(["inspect", str(tail_bundle[0])]) == 0
    out = capsys.readouterr().out
    assert "trainable tail: layer 'embedding_dense' (relu, trunk 1 x 1024 -> 64): personalize --adapt tail|auto" in out
    assert main(["inspect", str(digits_bundle[0].path)]) == 0
    out = capsys.readouterr().out
    assert "trainable tail: none, the head trains alone (the embedding comes from Flatten" in out, out


def test_personalize_cli_adapt_tail_commits_a_tail_version(tmp_path, tail_bundle, tail_user, capsys):
    from edgetl.cli import main
    from edgetl.device import HeadStore

    w = tail_bundle[1]
    x, labels, _ = _user(w, tail_user[0])
    names = sorted(set(labels))
    np.savez(tmp_path / "u.npz", x=x, y=np.asarray([names.index(v) for v in labels]), class_names=np.array(names))
    args = ["personalize", str(tail_bundle[0]), "--data", str(tmp_path / "u.npz"), "--store", str(tmp_path / "s")]
    assert main([*args, "--adapt", "tail"]) == 0
    assert "adapt tail: judged the tail" in capsys.readouterr().out
    assert HeadStore(tmp_path / "s", w.clf.bundle).active().head.tail is not None


# ----------------------------------------------------------------------------- the pooled 1x1 convolution


@pytest.fixture(scope="module")
def conv_tail_bundle(tmp_path_factory):
    """A user CNN ending like MobileNetV2: 1x1 Conv2D (no bias) -> BatchNormalization -> ReLU6 ->
    global average pooling (tools/tail_rates.py's ``embedding="conv"``), built here."""
    tool = load_tool("tail_rates")
    path = tool.build_tail_bundle(tmp_path_factory.mktemp("conv_tail"), embedding="conv")
    from guard_rates import world

    return path, world(path)


def test_export_splits_a_pooled_1x1_convolution_with_batchnorm_and_relu6(conv_tail_bundle):
    bundle = conv_tail_bundle[1].clf.bundle
    section = bundle.manifest.extra["tail"]
    assert section["available"], section.get("reason")
    assert (section["layer"], section["activation"]) == ("embedding_conv", "relu6")
    assert (section["positions"], section["trunk_size"], section["embedding_size"]) == (16, 64, 64)  # 4x4 map
    checks = section["checks"]
    assert checks["sgd_onnx_vs_tflite"] <= 1e-5 and checks["adam_onnx_vs_tflite"] <= checks["adam_tolerance"]
    assert max(checks["sgd_onnx_vs_reference"], checks["sgd_tflite_vs_reference"]) <= checks["sgd_tolerance"]
    assert bundle.arrays("replay", (T.REPLAY_KEY,))[T.REPLAY_KEY].shape[1:] == (16, 64)
    # The files' interfaces are the contract's, in order (what docs/integration.md tabulates).
    import onnxruntime as ort

    from edgetl.bundle import _contract as C
    from edgetl.device._runtimes import litert_interpreter

    for opt in C.OPTIMIZERS:
        session = ort.InferenceSession(str(bundle.path / C.TAIL_TRAIN_LOOP_FILE.format(optimizer=opt)))
        assert [i.name for i in session.get_inputs()] == list(C.TAIL_LOOP_INPUTS[opt])
        assert [o.name for o in session.get_outputs()] == list(C.TAIL_LOOP_OUTPUTS[opt])
    signatures = litert_interpreter(bundle.path / C.TAIL_TFLITE_FILE, allocate=False).get_signature_list()
    assert {k: set(v["inputs"]) for k, v in signatures.items()} == {
        k: set(v) for k, v in C.TAIL_TFLITE_SIGNATURES.items()
    }


def _conv_backbone(stride: int = 1):
    """conv -> 1x1 conv -> BN (moving statistics far from 0/1, so an unfolded BN shows) -> ReLU6 -> pooling."""
    from edgetl.host._tf import keras

    k = keras()
    inputs = k.Input((6, 6, 3))
    x = k.layers.Conv2D(8, 3, padding="same", activation="relu")(k.layers.Rescaling(0.1)(inputs))
    x = k.layers.BatchNormalization()(k.layers.Conv2D(12, 1, strides=stride, use_bias=False, name="last_1x1")(x))
    model = k.Model(inputs, k.layers.GlobalAveragePooling2D()(k.layers.ReLU(6.0)(x)))
    bn = model.layers[-3]
    rng = np.random.default_rng(0)
    bn.set_weights([rng.uniform(0.5, 2, 12), rng.normal(4, 2, 12), rng.normal(0.5, 1, 12), rng.uniform(0.2, 3, 12)])
    return model, rng.uniform(0, 40, (16, 6, 6, 3)).astype(np.float32)


def test_split_check_refuses_a_split_that_does_not_reproduce_the_backbone():
    from dataclasses import replace

    from edgetl.host._tail_export import check_split, find_tail

    model, x = _conv_backbone()
    split = find_tail(model, x)
    assert not isinstance(split, str), split
    assert (split.positions, split.activation, split.init["W1"].shape) == (36, "relu6", (8, 12))
    assert check_split(split, model, x) is None
    unfolded = model.get_layer("last_1x1").get_weights()[0].reshape(8, 12)  # the BatchNorm left out
    broken = replace(split, init={**split.init, "W1": unfolded, "b1": np.zeros(12, np.float32)})
    assert "does not reproduce the backbone" in check_split(broken, model, x)
    assert "does not reproduce" in check_split(replace(split, activation="relu"), model, x)  # the cap at 6 matters
    strided, x = _conv_backbone(stride=2)
    assert "not a 1x1, stride-1" in find_tail(strided, x)


def test_conv_tail_both_runtimes_train_the_same_weights_with_sgd_and_adam(conv_tail_bundle):
    from edgetl.device import Personalizer
    from edgetl.device._tail import TailPersonalizer, TailRuntime

    w = conv_tail_bundle[1]
    x, labels, _ = _user(w, USERS[0])
    w.clf.set_head(w.clf.factory, 0)
    p = Personalizer(w.clf, None)
    p.add_examples(x, labels)
    tp = TailPersonalizer(p)
    litert = TailRuntime.from_bundle(w.clf.bundle, "litert")
    trunk, onehot = tp.user_trunk(), p.onehot(labels, p._base)
    assert np.abs(litert.trunk(x) - trunk).max() <= 1e-4
    for optimizer, lr, tolerance in (
        ("sgd", 0.3, 1e-5),
        ("adam", 1e-2, w.clf.bundle.manifest.extra["tail"]["checks"]["adam_tolerance"]),
    ):
        runs = [
            rt.train_plan(tp.start_weights(), trunk, onehot, optimizer, lr=lr, l2=0.1, epochs=3, batch=16)
            for rt in (tp.runtime, litert)
        ]
        assert max(float(np.abs(runs[0][k] - runs[1][k]).max()) for k in T.WEIGHTS) <= tolerance, optimizer
        assert not np.allclose(runs[0]["W1"], tp.init["W1"])


def test_a_user_head_only_cannot_reach_gains_with_the_conv_tail_and_the_guard_accepts_it(conv_tail_bundle):
    kind, p, tp, verdict, head_after, tail_after = _gaining_user(conv_tail_bundle[1])
    assert verdict.accepted and verdict.evidence["adapt"] == "tail", verdict.reason
    assert tail_after >= head_after + MIN_GAIN, (kind, head_after, tail_after)
    assert tp.candidate.weights["W1"].shape == (64, 64) and not np.allclose(tp.candidate.weights["W1"], tp.init["W1"])


def test_tail_rates_says_when_a_mean_rests_on_a_few_users():
    """tools/tail_rates.py's spread line: a mean carried by two users (heads the guard refused)
    shows a small median and a wide interval; the same mean spread evenly, a point interval."""
    spread = load_tool("tail_rates").spread
    carried = spread([0.01] * 20 + [0.45, 0.45])
    assert "median +1.0 points" in carried and "largest +45.0" in carried
    low, high = (float(v) for v in carried.split("[")[1].split("]")[0].split(", "))
    assert low < 5.0 < high and high - low > 5  # mean +5.0: the interval says it could be far less
    assert "[+5.0, +5.0]" in spread([0.05] * 22) and "worse for 0" in spread([0.05] * 22)
    assert "better for 1, worse for 1" in spread([0.1, -0.1, 0.0])


def test_tail_rates_unseen_guard_simulation_judges_on_the_digits_it_is_given(tail_bundle):
    """tools/tail_rates.py --guard-factory unseen: both the head's and the tail's guard judge
    forgetting on the factory digits handed to them (not replay.npz's held-out half), the user's
    held-out part is untouched, and the truth is the other half of the test digits."""
    from edgetl.device import Personalizer
    from edgetl.device._tail import TailPersonalizer

    tool, w = load_tool("tail_rates"), tail_bundle[1]
    x, labels, _ = _user(w, ("blur", 0))
    w.clf.set_head(w.clf.factory, 0)
    p = Personalizer(w.clf, None)
    p.add_examples(x, labels)
    tp = TailPersonalizer(p)
    user_before = p._held_out()["user"]
    tool.unseen_guard(p, tp, w.test_x[0::2], w.test_y[0::2])
    factory, trunk = p._held_out()["factory"], tp.held_out_trunk()["factory"]
    assert factory[1] == [str(v) for v in w.test_y[0::2]] and trunk[1] == factory[1]
    np.testing.assert_allclose(factory[0], w.factory_emb[0::2], atol=1e-5)
    assert trunk[0].shape[0] == len(w.test_x[0::2]) and tp.held_out()["factory"][1] == factory[1]
    assert p._held_out()["user"][1] == user_before[1]
    p.train()
    tp.train()
    assert p.decide().evidence["factory"]["n"] == len(factory[1]) == tp.decide().evidence["factory"]["n"]
    r = tool.run_user(w, "blur", 10, 0, guard_factory="unseen")
    assert 0 <= r["user_tail"] <= 1 and r["factory_before"] == pytest.approx(
        np.mean(np.asarray(p._predict(w.clf.factory, w.factory_emb[1::2])[0]) == w.test_y[1::2])
    )
    with pytest.raises(ValueError, match="guard_factory must be one of"):
        tool.run_user(w, "blur", 10, 0, guard_factory="test")
