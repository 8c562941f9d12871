"""Microcontrollers: export --target mcu, TFLM, and the C99 head trainer compiled with the system cc.

The C code is compiled here with strict flags and called through ctypes (tools/mcu_c.py); the
MCU model runs in TFLM's own Python interpreter (the tflite-micro package).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from conftest import load_tool

import edgetl.mcu
from edgetl.errors import DependencyError, InputError

mcu_c = load_tool("mcu_c")
measure = load_tool("measure_mcu")

if mcu_c.compiler() is None:  # pragma: no cover
    pytest.skip("no C compiler (cc/gcc) on PATH", allow_module_level=True)


@pytest.fixture(scope="module")
def mcu_bundle(tmp_path_factory, digits_bundle):
    """The suite's digits bundle exported again through the CLI with --target mcu (TFLite only:
    the MCU files need no ONNX, and LiteRT trains what onnxruntime trains)."""
    import contextlib
    import io

    from edgetl.bundle import read_bundle
    from edgetl.cli import main

    bundle, halves = digits_bundle
    base = tmp_path_factory.mktemp("mcu")
    for name, part in (("train", halves.train), ("test", halves.test)):
        np.savez(base / f"{name}.npz", x=part.x, y=np.asarray(part.class_names)[part.y])
    out, printed = base / "digits_mcu.edgetl", io.StringIO()
    run = bundle.manifest.producer["run"]
    args = ["export", run, "--target", "mcu", "--format", "tflite", "--out", str(out)]
    with contextlib.redirect_stdout(printed):
        code = main([*args, "--calibration", str(base / "train.npz"), "--evaluation", str(base / "test.npz")])
    assert code == 0, printed.getvalue()
    assert "microcontroller: mcu_backbone.int8.tflite + C sources; TFLM arena" in printed.getvalue()
    return read_bundle(out), halves


@pytest.fixture(scope="module")
def head_lib(tmp_path_factory):
    return ctypes.CDLL(str(mcu_c.build(tmp_path_factory.mktemp("c"))))


def test_mcu_export_fits_the_budget_and_is_verified_in_tflm(mcu_bundle, capsys):
    from edgetl.cli import main
    from edgetl.host._export_mcu import MCU_MODEL, tflm_interpreter

    bundle, _ = mcu_bundle
    mcu = bundle.manifest.mcu
    roles = {a.file: a.role.value for a in bundle.manifest.artifacts}
    assert roles[MCU_MODEL] == "mcu_backbone"
    assert all(roles[f] == "mcu_source" for f in ("edgetl_model.c", "edgetl_model.h", "edgetl_head.c", "edgetl_head.h"))
    assert (bundle.path / "edgetl_head.c").read_bytes() == edgetl.mcu.source("edgetl_head.c")
    # The targets for the demo-like digits bundle.
    assert mcu["flash_bytes"]["total"] < 256 << 10 and mcu["arena_bytes"] < 64 << 10, mcu
    assert mcu["arena_bytes"] >= mcu["arena_bytes_measured"] > 0
    assert mcu["tflm_top1_agreement"] >= 0.99 and mcu["accuracy"] >= mcu["fp32_accuracy"] - 0.02
    check = next(c for c in bundle.manifest.checks if c.role == "mcu_backbone")
    assert check.ok and check.measure == "top1_agreement"
    model = (bundle.path / MCU_MODEL).read_bytes()
    tflm = tflm_interpreter(model, mcu["arena_bytes_measured"])  # the measured arena is enough...
    assert tflm.get_input_details(0)["dtype"] == np.int8 and tflm.get_output_details(0)["dtype"] == np.int8
    with pytest.raises(InputError, match="cannot run"):
        tflm_interpreter(model, mcu["arena_bytes_measured"] - 64)  # ...and it is the minimum
    assert main(["inspect", str(bundle.path)]) == 0
    assert f"arena {mcu['arena_bytes']:,} bytes" in capsys.readouterr().out


def test_generated_c_holds_the_model_and_quantizes_like_tflite(mcu_bundle, tmp_path):
    from edgetl.host._export_mcu import MCU_MODEL, quantize, resolver_method

    bundle, halves = mcu_bundle
    sources = (bundle.path / "edgetl_model.c",)
    lib = ctypes.CDLL(str(mcu_c.build(tmp_path, sources, include=(bundle.path,), name="model")))
    length = ctypes.c_uint.in_dll(lib, "edgetl_model_tflite_len").value
    array = (ctypes.c_ubyte * length).in_dll(lib, "edgetl_model_tflite")
    assert bytes(array) == (bundle.path / MCU_MODEL).read_bytes()
    assert ctypes.addressof(array) % 16 == 0  # TFLM reads the flatbuffer in place
    q = bundle.manifest.mcu["input_quantization"]
    raw = np.ascontiguousarray(halves.test.x[:20].reshape(20, -1), np.float32)
    raw[0, :4] = (-3.0, 1e6, 127.5, 0.49)  # clamping and rounding at the edges
    got = np.zeros_like(raw, np.int8)
    for row, out in zip(raw, got):
        lib.edgetl_quantize_input(row.ctypes.data_as(mcu_c.F32P), out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))
    np.testing.assert_array_equal(got, quantize(raw, q["scale"], q["zero_point"]))
    # EDGETL_ADD_OPS expands to one resolver call per op of the manifest (checked with g++ on a
    # stand-in resolver that has exactly those methods; TFLM itself is not built here).
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx:
        methods = " ".join(f"void {resolver_method(op)}() {{}}" for op in bundle.manifest.mcu["ops"])
        main = tmp_path / "ops.cc"
        body = "int main() { R r; EDGETL_ADD_OPS(r); }"
        main.write_text(f'#include "edgetl_model.h"\nstruct R {{ {methods} }};\n{body}\n')
        subprocess.run([cxx, "-fsyntax-only", "-Wall", "-Werror", f"-I{bundle.path}", str(main)], check=True)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_c_trainer_matches_onnxruntime_and_litert_after_100_steps(digits_bundle, head_lib, optimizer):
    parity = measure.trainer_parity(head_lib, digits_bundle[0], optimizer, steps_wanted=100)
    assert parity["steps"] == 100
    if optimizer == "sgd":
        assert parity["c_lr_relative_error"] < 1e-5
        assert parity["onnxruntime"] <= 1e-5 and parity["litert"] <= 1e-5, parity
    # Adam: the rule verify applies to the runtimes' trainers (tolerance scaled by how far the
    # weights moved, ill-conditioned elements skipped), against the float64 reference and both runtimes.
    assert parity["reference_check_ok"] and parity["onnxruntime_check_ok"] and parity["litert_check_ok"], parity


def test_c_trainer_refuses_bad_batches_and_changes_nothing(digits_bundle, head_lib):
    from edgetl.device._head import HeadState

    head = HeadState.factory(digits_bundle[0])
    c = mcu_c.CHead(head_lib, head.W, head.b, head.mask, head.anchor, "sgd")
    emb = np.ones((4, head.W.shape[0]), np.float32)
    inactive = int(np.flatnonzero(head.mask == 0)[0])
    for labels, rows in (([0, 1, inactive, 0], [0, 1, 2, 3]), ([0, 1, 99, 0], [0, 1, 2, 3]), ([0, 1, 2, 0], [0, -1])):
        assert c.step(emb, labels, rows, 0.1, 1e-3, 0.9)[0] == -1
    np.testing.assert_array_equal(c.W, head.W)
    assert c.step(emb, [0, 1, 2, 0], [0, 1, 2, 3], 0.1, 1e-3, 0.9)[0] == 0
    assert not np.array_equal(c.W, head.W)


def test_c_fit_is_deterministic_per_seed_and_learns(digits_bundle, head_lib):
    from edgetl.device._head import HeadState

    head = HeadState.factory(digits_bundle[0])
    replay = np.load(digits_bundle[0].path / "replay.npz")
    emb, labels = replay["embeddings"], (replay["labels"] + 1) % 5  # relabelled: the head must move
    heads = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 7)):
        heads[name] = mcu_c.CHead(head_lib, head.W, head.b, head.mask, head.anchor, "sgd")
        status, loss = heads[name].fit(emb, labels, seed=seed)
        assert status == 0 and loss < 0.5, loss
    np.testing.assert_array_equal(heads["a"].W, heads["b"].W)
    assert not np.array_equal(heads["a"].W, heads["c"].W)  # the seed orders the batches
    # The bundle's trainer with its default settings: the same batches (the documented
    # xorshift32 Fisher-Yates order, edgetl.bundle._head.step_plan), the same SGD step.
    from edgetl.device._head import TrainSettings
    from edgetl.device._head_loop import make_trainer

    trainer = make_trainer(digits_bundle[0], "onnxruntime")
    trained, _ = trainer.train(head, emb, np.eye(head.capacity, dtype=np.float32)[labels], TrainSettings())
    # float32 in both, summed in another order; 30 epochs of momentum SGD that move the weights
    # by up to 0.25: measured 3.5e-6 on W, 1.9e-6 on b (LiteRT's trainer: 3.4e-6).
    np.testing.assert_allclose(heads["a"].W, trained.W, rtol=0, atol=3e-5)
    np.testing.assert_allclose(heads["a"].b, trained.b, rtol=0, atol=3e-5)


def test_c_head_is_plain_c99_with_no_allocator(tmp_path):
    """Compiles under strict C99 warnings-as-errors and needs nothing but libm's float functions."""
    obj = tmp_path / "edgetl_head.o"
    src = mcu_c.source_dir() / "edgetl_head.c"
    subprocess.run([mcu_c.compiler(), *mcu_c.CFLAGS, "-c", str(src), "-o", str(obj)], check=True)
    undefined = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True).stdout.split()
    assert set(undefined) - {"U"} <= {"expf", "logf", "powf", "sqrtf"}, undefined
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx:  # firmware written in C++ compiles it as C++
        subprocess.run([cxx, "-x", "c++", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", str(src)], check=True)


def test_whole_personalization_in_c_from_tflm_embeddings(mcu_bundle, tmp_path):
    """TFLM embeddings of a restyled user's 50 digits -> tools/mcu_personalize.c (the bundle's
    edgetl_model.c and edgetl_head.c) -> predictions, against edgetl personalize."""
    bundle, halves = mcu_bundle
    accuracy = measure.c_vs_python_personalization(bundle, halves, tmp_path)
    user, test = measure.restyled_user(halves)
    (tmp_path / "factory").mkdir()
    factory = measure.c_personalize(  # no user examples: the factory head (and the replay, which it fits)
        measure.c_personalizer(bundle, tmp_path / "factory"), measure.tflm_embeddings(bundle, user[0])[:0], [],
        measure.tflm_embeddings(bundle, test[0]),
    )  # fmt: skip
    factory_accuracy = float(np.mean(np.asarray(bundle.labels)[factory] == test[1]))
    # Measured (tools/measure_mcu.py): C 0.850, edgetl personalize 0.823, factory head 0.66.
    assert accuracy["C, same examples"] >= accuracy["edgetl personalize"] - 0.01, accuracy
    assert accuracy["C, same examples"] > factory_accuracy + 0.1, (accuracy, factory_accuracy)


# ----------------------------------------------------------------------------- gates


def _tiny_tflite(fn, dtype="float32"):
    from edgetl.host._tf import tf

    t = tf()
    f = t.function(fn, input_signature=[t.TensorSpec((1, 4), getattr(t, dtype))])
    return t.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f).convert()


def test_tflm_gate_names_the_op_it_lacks_and_a_float_interface():
    """A backbone ending in top_k converts to full-integer int8 (LiteRT has the kernel), but TFLM has none."""
    from edgetl.host._convert import to_tflite
    from edgetl.host._export import QuantizeConfig
    from edgetl.host._export_mcu import check_tflm_runs
    from edgetl.host._tf import keras, tf

    k = keras()
    inputs = k.Input((4,))
    top_k = k.Model(inputs, k.layers.Lambda(lambda t: tf().math.top_k(t, 2).values)(inputs))
    calibration = np.random.default_rng(0).random((10, 4), np.float32)
    model = to_tflite(top_k, QuantizeConfig("int8", io_dtype="int8"), calibration, output_name="embedding")
    probe = np.zeros((1, 4), np.int8)
    lacking = r"cannot run the model: it has no kernel for op TOPK_V2 \(the model's ops: .*TOPK_V2"
    with pytest.raises(InputError, match=lacking):
        check_tflm_runs(model, probe)
    with pytest.raises(InputError, match="input is float32; a full-integer model needs int8"):
        check_tflm_runs(_tiny_tflite(lambda x: x + 1.0), probe)


@pytest.fixture(scope="module")
def mcu_plan(digits_bundle):
    from edgetl.host._export import padded_head, plan_export, split_model

    bundle, halves = digits_bundle
    plan = plan_export(bundle.manifest.producer["run"], quantize=["int8"], calibration=halves.train)
    backbone, classifier = split_model(plan.run.model)
    return plan, backbone, padded_head(plan, classifier)


@pytest.mark.parametrize(
    "limits, message",
    [
        (
            dict(flash_limit=20_000),
            r"needs [\d,]+ bytes of flash \(model [\d,]+, head 10,320, .*over the limit of 20,000",
        ),
        (dict(arena_limit=4096), r"tensor arena of [\d,]+ bytes, over the limit of 4,096"),
    ],
)
def test_size_gates_name_the_numbers(mcu_plan, limits, message):
    from edgetl.host._export import REPLAY_PER_CLASS, int8_embedding_tflite
    from edgetl.host._export_mcu import McuConfig, mcu_export

    with pytest.raises(InputError, match=message):
        mcu_export(*mcu_plan, McuConfig(**limits), to_int8=int8_embedding_tflite, replay_pool=REPLAY_PER_CLASS)


def test_verification_gate_refuses_runtimes_that_disagree_or_lost_accuracy(mcu_bundle, monkeypatch):
    from edgetl.host import _export_mcu as m

    bundle, halves = mcu_bundle
    model = (bundle.path / m.MCU_MODEL).read_bytes()
    head = tuple(np.load(bundle.path / "head_init.npz")[k] for k in ("W", "b", "mask"))
    check, _ = m.verify_mcu(model, (halves.test.x, halves.test.y), head, 0.99)
    assert check.ok
    shuffled = (head[0][:, [1, 2, 3, 4, 0, *range(5, head[0].shape[1])]], head[1], head[2])
    check, measured = m.verify_mcu(model, (halves.test.x, halves.test.y), shuffled, 0.99)
    assert not check.ok and check.value == 1.0 and measured["accuracy_drop"] > 0.5  # agrees, but wrong
    run = m.run_int8
    monkeypatch.setattr(
        m, "run_int8", lambda mdl, x, rt: run(mdl, x, rt) if rt == "tflm" else np.flip(run(mdl, x, rt), 1)
    )
    check, _ = m.verify_mcu(model, (halves.test.x, halves.test.y), head, None)
    assert not check.ok and check.value < 0.99


def test_targets_and_limits_are_checked_first(monkeypatch):
    import sys

    from edgetl.host._export import export
    from edgetl.host._export_mcu import McuConfig, tflm_runtime

    with pytest.raises(InputError, match=r"targets must be a list of \('mcu', 'any', .*\), received \['gpu'\]"):
        export("no/such/run", targets=["gpu"])
    with pytest.raises(InputError, match="arena_limit must be an integer >= 1, received 0"):
        McuConfig(arena_limit=0)
    monkeypatch.setitem(sys.modules, "tflite_micro", None)
    monkeypatch.setitem(sys.modules, "tflite_micro.python.tflite_micro", None)
    with pytest.raises(DependencyError, match="pip install tflite-micro"):
        tflm_runtime()


def test_cli_export_refuses_an_unknown_target_and_bad_limits(digits_bundle, tmp_path, capsys):
    from edgetl.cli import main

    run = digits_bundle[0].manifest.producer["run"]
    assert main(["export", run, "--target", "gpu", "--out", str(tmp_path / "x.edgetl")]) == 2
    assert "targets must be a list of ('mcu', 'any', 'x86-avx2', 'x86-vnni', 'arm64'), received ['gpu']" in (
        capsys.readouterr().err
    )
    assert main(["export", run, "--target", "mcu", "--mcu-arena-limit", "0", "--out", str(tmp_path / "y.edgetl")]) == 2
    assert "arena_limit must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x.edgetl").exists() and not (tmp_path / "y.edgetl").exists()
