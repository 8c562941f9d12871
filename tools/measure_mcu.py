#!/usr/bin/env python
"""The microcontroller export, measured: flash, arena, TFLM vs LiteRT, the C trainer, and a
whole personalization in C.

    python tools/measure_mcu.py [--bundle B]

``B`` is a bundle exported with ``--target mcu``; without it, the digits bundle the test
suite uses is built (edgetl_cnn pretrained on digits 0-4, transferred to 5-9, exported with
``--quantize int8 --target mcu``; about 40 s). Prints each target as PASS or MISS:

- flash (model + factory head + replay embeddings) under 256 KB and the suggested TFLM arena
  under 64 KB (from the manifest: the arena is measured in TFLM's own interpreter);
- TFLM and LiteRT running the MCU model agree on the factory head's top-1 for >= 0.99 of the
  held-out digits (the half of 5-9 the bundle was not trained on);
- the C trainer (edgetl_head.c, compiled here with the system cc) after 100 SGD steps within
  1e-5 of onnxruntime's and LiteRT's trainers (same batches), and Adam within the head's Adam
  tolerance (edgetl.device verify's rule);
- a whole personalization in C (TFLM embeddings of a restyled user's 50 digits ->
  tools/mcu_personalize.c: dequantize, balance classes, edgetl_head_fit with the replay in
  flash, predict) within 1 point of ``edgetl personalize`` (the device Personalizer,
  onnxruntime) on the rest of that user's digits: mean of 5 training seeds, trained on the
  examples the Personalizer trains on (it holds 25% out for its guard). To separate the C
  trainer from the data the C flow trains on (TFLM int8 embeddings, int8 replay from flash),
  the bundle's own trainer also runs on exactly that data.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mcu_c  # noqa: E402
from mcu_c import CHead, build  # noqa: E402

TOOLS = Path(__file__).resolve().parent
FLASH_TARGET, ARENA_TARGET = 256 << 10, 64 << 10
USER_EXAMPLES = 50


def tflm_embeddings(bundle, x: np.ndarray) -> np.ndarray:
    """int8 embeddings of raw inputs ``x`` from the bundle's MCU model in TFLM's Python interpreter."""
    from edgetl.host._export_mcu import quantize, run_int8

    mcu = bundle.manifest.mcu
    q = mcu["input_quantization"]
    model = (bundle.path / mcu["model"]).read_bytes()
    return run_int8(model, quantize(np.asarray(x, np.float32), q["scale"], q["zero_point"]), "tflm")


def c_personalizer(bundle, out_dir: Path) -> ctypes.CDLL:
    """tools/mcu_personalize.c built with the bundle's own edgetl_model.c and edgetl_head.c."""
    sources = (bundle.path / "edgetl_model.c", bundle.path / "edgetl_head.c", TOOLS / "mcu_personalize.c")
    lib = ctypes.CDLL(str(build(out_dir, sources, include=(bundle.path,), name="personalize")))
    i8, i32 = ctypes.POINTER(ctypes.c_int8), ctypes.POINTER(ctypes.c_int32)
    lib.personalize_and_predict.argtypes = [i8, i32, ctypes.c_int32, i8, ctypes.c_int32, i32, ctypes.c_uint32]
    return lib


def c_personalize(lib: ctypes.CDLL, user_q: np.ndarray, user_columns, test_q: np.ndarray, seed: int = 0) -> np.ndarray:
    """Head columns predicted for ``test_q`` after training on the user's int8 embeddings, in C."""
    i8, i32 = ctypes.POINTER(ctypes.c_int8), ctypes.POINTER(ctypes.c_int32)
    user_q, test_q = np.ascontiguousarray(user_q, np.int8), np.ascontiguousarray(test_q, np.int8)
    cols = np.ascontiguousarray(user_columns, np.int32)
    out = np.zeros(len(test_q), np.int32)
    status = lib.personalize_and_predict(
        user_q.ctypes.data_as(i8), cols.ctypes.data_as(i32), len(user_q),
        test_q.ctypes.data_as(i8), len(test_q), out.ctypes.data_as(i32), seed,
    )  # fmt: skip
    assert status == 0, status
    return out


def python_personalize(
    bundle, user: tuple, test: tuple, seed: int, precision: str = "fp32"
) -> tuple[float, np.ndarray, str]:
    """What ``edgetl personalize`` trains (the device Personalizer with the ``precision``
    backbone, training seed ``seed``; onnxruntime, or LiteRT for a TFLite-only bundle: both train the same weights): the
    candidate head's accuracy on ``test``, the user examples it trained on (it holds 25% out for
    its guard), and the guard's verdict."""
    from edgetl.device import Classifier, Personalizer
    from edgetl.device._head import TrainSettings

    backend = "onnxruntime" if bundle.manifest.find("fused", "onnx") else "litert"
    clf = Classifier.open(bundle.path, backend=backend, precision=precision)
    personalizer = Personalizer(clf, None, settings=TrainSettings(seed=seed))
    personalizer.add_examples(*user)
    candidate = personalizer.train()
    verdict = personalizer.decide().reason
    active = np.flatnonzero(candidate.mask > 0)
    probs = clf.head_runtime.probabilities(candidate, clf.embed(test[0]))[:, active]
    accuracy = float(np.mean(np.asarray(candidate.labels)[probs.argmax(1)] == test[1]))
    return accuracy, personalizer._split()[0], verdict


def trainer_parity(lib: ctypes.CDLL, bundle, optimizer: str, steps_wanted: int = 100) -> dict[str, float]:
    """Max |C - runtime| of W and b after the same ``steps_wanted`` steps, per runtime (and the
    verify-rule check for Adam)."""
    from edgetl.device._head import (
        HeadState,
        ReferenceHeadTrainer,
        TrainSettings,
        batches,
        effective_learning_rate,
    )
    from edgetl.device._head_loop import make_trainer
    from edgetl.device._verify import _train_check

    head = HeadState.factory(bundle)
    replay = np.load(bundle.path / "replay.npz")
    rng = np.random.default_rng(0)
    emb = replay["embeddings"][:64].astype(np.float32)
    emb = emb + rng.normal(0, 0.5, emb.shape).astype(np.float32)  # not the factory head's optimum
    labels = (replay["labels"][:64] + 1) % len(bundle.labels)  # relabelled: the weights must move
    onehot = np.eye(head.capacity, dtype=np.float32)[labels]
    settings = TrainSettings(epochs=steps_wanted // 4, batch_size=16, optimizer=optimizer,
                             learning_rate=0.1 if optimizer == "sgd" else 0.01)  # fmt: skip
    plan = batches(len(emb), settings)
    c = CHead(lib, head.W, head.b, head.mask, head.anchor, optimizer)
    lr = effective_learning_rate(settings, emb)
    for rows in plan:
        assert c.step(emb, labels, rows, lr, settings.l2, settings.momentum)[0] == 0
    out = {"steps": len(plan)}
    if optimizer == "sgd":
        out["c_lr_relative_error"] = abs(c.sgd_learning_rate(settings.learning_rate, emb) / lr - 1)
    reference = ReferenceHeadTrainer()
    want, _ = reference.train(head, emb, onehot, settings)
    got_c = type(head)(c.W, c.b, head.mask, head.anchor, head.labels)
    out["reference_check_ok"] = _train_check("c", "c", "c", optimizer, head, got_c, want, emb,
                                             reference.min_abs_gradient).ok  # fmt: skip
    for backend in ("onnxruntime", "litert"):
        got, _ = make_trainer(bundle, backend).train(head, emb, onehot, settings)
        out[backend] = max(float(np.abs(c.W - got.W).max()), float(np.abs(c.b - got.b).max()))
        out[f"{backend}_check_ok"] = _train_check("c", "c", "c", optimizer, head, got_c, got, emb,
                                                  reference.min_abs_gradient).ok  # fmt: skip
    return out


def digits_halves():
    from edgetl.data import load_digits_dataset, stratified_split

    return stratified_split(load_digits_dataset((5, 6, 7, 8, 9)), val_fraction=0.0, test_fraction=0.5, seed=0)


def build_bundle(out: Path):
    """The suite's digits bundle (tests/conftest.py), exported with --target mcu."""
    from edgetl import host
    from edgetl.data import load_digits_dataset

    source = host.pretrain(load_digits_dataset((0, 1, 2, 3, 4)), host.TrainConfig(backbone="edgetl_cnn", epochs=15))
    source_run = host.save_run(source, out / "source", kind="pretrain")
    halves = digits_halves()
    config = host.TrainConfig(
        backbone=str(source_run), epochs=60, learning_rate=1e-2, val_fraction=0.1, test_fraction=0.0
    )
    run = host.save_run(host.train(halves.train, config), out / "target")
    result = host.export_bundle(
        run, out / "digits.edgetl", quantize=["int8"], calibration=halves.train, evaluation=halves.test,
        targets=["mcu"],
    )  # fmt: skip
    assert result.ok, result.describe()
    return result.bundle


def restyled_user(halves) -> tuple[tuple, tuple]:
    """tests/conftest.py's restyled_user: 50 restyled digits to personalize with, the rest to test."""
    from edgetl.data import restyle_digits

    x = restyle_digits(halves.test.x)
    labels = np.asarray([halves.test.class_names[i] for i in halves.test.y])
    order = np.random.default_rng(0).permutation(len(x))
    return (x[order[:USER_EXAMPLES]], labels[order[:USER_EXAMPLES]]), (
        x[order[USER_EXAMPLES:]],
        labels[order[USER_EXAMPLES:]],
    )


SEEDS = 5


def c_vs_python_personalization(bundle, halves, work: Path) -> dict[str, float]:
    """Mean accuracy over :data:`SEEDS` training seeds on the restyled user's test digits:
    ``edgetl personalize`` (fp32 backbone, the default, and the int8 one), the C flow trained on
    the same user examples, and on all of them."""
    user, test = restyled_user(halves)
    column = {name: i for i, name in enumerate(bundle.labels)}
    lib = c_personalizer(bundle, work)
    user_q, test_q = tflm_embeddings(bundle, user[0]), tflm_embeddings(bundle, test[0])
    runs: dict[str, list[float]] = {
        "edgetl personalize": [],
        "edgetl personalize --precision int8": [],
        "C, same examples": [],
        "C, all examples": [],
    }
    for seed in range(SEEDS):
        accuracy, trained, verdict = python_personalize(bundle, user, test, seed)
        runs["edgetl personalize"].append(accuracy)
        runs["edgetl personalize --precision int8"].append(python_personalize(bundle, user, test, seed, "int8")[0])
        for name, rows in (("C, same examples", trained), ("C, all examples", np.arange(len(user_q)))):
            predicted = c_personalize(lib, user_q[rows], [column[l] for l in user[1][rows]], test_q, seed)
            runs[name].append(float(np.mean(np.asarray(bundle.labels)[predicted] == test[1])))
        columns = [column[l] for l in user[1][trained]]
        runs.setdefault("runtime trainer on the C flow's data", []).append(
            runtime_on_c_data(bundle, lib, user_q[trained], columns, test_q, test[1], seed)
        )
        print(f"  seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in runs.items()) + f"; guard: {verdict}")
    return {k: float(np.mean(v)) for k, v in runs.items()}


def runtime_on_c_data(bundle, lib, user_q, user_columns, test_q, test_labels, seed: int) -> float:
    """The bundle's own trainer (numpy batch order) on exactly what tools/mcu_personalize.c trains
    on: dequantized TFLM user embeddings, the replay embeddings from edgetl_model.c's flash
    arrays, the same cyclic class balancing. Separates the C trainer from the C flow's data."""
    from edgetl.device._head import HeadState, TrainSettings
    from edgetl.device._head_loop import make_trainer

    mcu = bundle.manifest.mcu
    scale, zero = mcu["embedding_quantization"]["scale"], mcu["embedding_quantization"]["zero_point"]
    n, d = mcu["replay_examples"], bundle.manifest.embedding_size
    replay = np.ctypeslib.as_array((ctypes.c_int8 * (n * d)).in_dll(lib, "edgetl_replay_embeddings")).reshape(n, d)
    replay_labels = np.ctypeslib.as_array((ctypes.c_int32 * n).in_dll(lib, "edgetl_replay_labels"))
    emb = scale * (np.concatenate([user_q, replay]).astype(np.float32) - zero)
    labels = np.concatenate([np.asarray(user_columns, np.int64), replay_labels])
    counts = np.bincount(labels)
    extra = [np.resize(np.flatnonzero(labels == c), counts.max() - counts[c]) for c in np.flatnonzero(counts)]
    rows = np.concatenate([np.arange(len(labels)), *extra])
    head = HeadState.factory(bundle)
    backend = "onnxruntime" if bundle.manifest.find("fused", "onnx") else "litert"
    trainer = make_trainer(bundle, backend)
    onehot = np.eye(head.capacity, dtype=np.float32)[labels[rows]]
    trained, _ = trainer.train(head, emb[rows].astype(np.float32), onehot, TrainSettings(seed=seed))
    test_emb = (scale * (test_q.astype(np.float32) - zero)).astype(np.float32)
    predicted = trainer.probabilities(trained, test_emb)[:, : len(bundle.labels)].argmax(1)
    return float(np.mean(np.asarray(bundle.labels)[predicted] == test_labels))


CORTEX_M4 = ("-std=c99", "-Os", "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16",
             "-ffunction-sections", "-fdata-sections", "-Wall", "-Werror")  # fmt: skip
M4_MAIN = """#include <stdint.h>
#include "edgetl_model.h"
int personalize_and_predict(const int8_t *, const int32_t *, int32_t, const int8_t *, int32_t, int32_t *, uint32_t);
static int8_t user[4 * EDGETL_EMBEDDING_SIZE], test[EDGETL_EMBEDDING_SIZE];
static int32_t labels[4], predicted[1];
int main(void) { return personalize_and_predict(user, labels, 4, test, 1, predicted, 0u) + edgetl_model_tflite[0]; }
"""


def cortex_m4_sizes(bundle, work: Path) -> str:
    """Code and data sizes for a Cortex-M4F (arm-none-eabi-gcc -Os, newlib's libm): the trainer
    alone, and tools/mcu_personalize.c linked with the bundle's sources (the model array
    included; TFLM itself is not built). Empty when that compiler is not installed."""
    import shutil
    import subprocess

    gcc = shutil.which("arm-none-eabi-gcc")
    if gcc is None:
        return "Cortex-M4 sizes: not measured (no arm-none-eabi-gcc; apt-get install gcc-arm-none-eabi)"
    src = Path(mcu_c.source_dir())
    (work / "main_m4.c").write_text(M4_MAIN)
    head_obj, elf = work / "edgetl_head_m4.o", work / "personalize_m4.elf"
    subprocess.run([gcc, *CORTEX_M4, "-c", str(src / "edgetl_head.c"), "-o", str(head_obj)], check=True)
    sources = [work / "main_m4.c", TOOLS / "mcu_personalize.c", bundle.path / "edgetl_head.c",
               bundle.path / "edgetl_model.c"]  # fmt: skip
    subprocess.run([gcc, *CORTEX_M4, "-DMAX_USER_EXAMPLES=50", f"-I{bundle.path}", *map(str, sources),
                    "--specs=nosys.specs", "-Wl,--gc-sections", "-lm", "-o", str(elf)],
                   check=True, capture_output=True)  # fmt: skip
    size = lambda f: subprocess.run(["arm-none-eabi-size", str(f)], capture_output=True, text=True).stdout
    head_text = int(size(head_obj).splitlines()[1].split()[0])
    text, data, bss = (int(v) for v in size(elf).splitlines()[1].split()[:3])
    return (
        f"Cortex-M4F (arm-none-eabi-gcc -Os): edgetl_head.c {head_text:,} bytes of code; the whole C flow linked "
        f"with the model array, libm and newlib: flash {text + data:,} bytes, static RAM {data + bss:,} bytes "
        "(50 user examples; TFLM's own code and arena not included)"
    )


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", help="a digits 5-9 bundle exported with --target mcu (default: build one)")
    args = parser.parse_args(argv)
    from edgetl.bundle import read_bundle

    print(f"CPU: {cpu_name()}")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        bundle = read_bundle(args.bundle) if args.bundle else build_bundle(work)
        mcu = bundle.manifest.mcu
        if mcu is None:
            raise SystemExit(f"{bundle.path} has no MCU export: export it with --target mcu")
        flash, arena = mcu["flash_bytes"], mcu["arena_bytes"]
        print(f"flash {flash['total']:,} bytes {flash} < {FLASH_TARGET:,}: {verdict(flash['total'] < FLASH_TARGET)}")
        print(f"arena {arena:,} bytes (measured {mcu['arena_bytes_measured']:,}) < {ARENA_TARGET:,}: "
              f"{verdict(arena < ARENA_TARGET)}")  # fmt: skip
        print(cortex_m4_sizes(bundle, work))
        halves = digits_halves()
        from edgetl.host._export_mcu import MIN_TFLM_AGREEMENT, io_quantization, quantize, run_int8

        model = (bundle.path / mcu["model"]).read_bytes()
        q = quantize(halves.test.x.astype(np.float32), *io_quantization(model)[0])
        tflm, litert = run_int8(model, q, "tflm"), run_int8(model, q, "litert")
        head = np.load(bundle.path / "head_init.npz")
        s, z = io_quantization(model)[1]
        top1 = lambda e: (s * (e.astype(np.float64) - z) @ head["W"] + head["b"] - 1e9 * (1 - head["mask"])).argmax(1)
        agreement = float(np.mean(top1(tflm) == top1(litert)))
        print(
            f"TFLM vs LiteRT top-1 agreement on {len(q)} held-out digits: {agreement:.4f} >= {MIN_TFLM_AGREEMENT}: "
            f"{verdict(agreement >= MIN_TFLM_AGREEMENT)} (accuracy {np.mean(top1(tflm) == halves.test.y):.4f})"
        )
        lib = ctypes.CDLL(str(build(work)))
        for optimizer in ("sgd", "adam"):
            p = trainer_parity(lib, bundle, optimizer)
            ok = p["onnxruntime"] <= 1e-5 if optimizer == "sgd" else p["onnxruntime_check_ok"]
            print(
                f"C trainer vs runtimes after {p['steps']} {optimizer} steps: max|diff| onnxruntime "
                f"{p['onnxruntime']:.2e}, LiteRT {p['litert']:.2e}; verify rule vs float64 reference "
                f"{'ok' if p['reference_check_ok'] else 'FAILED'}: {verdict(ok)}"
            )
        acc = c_vs_python_personalization(bundle, halves, work)
        gap = acc["C, same examples"] - acc["edgetl personalize"]
        print(
            f"personalization on a restyled user ({USER_EXAMPLES} examples), mean accuracy on its other "
            f"{len(halves.test.y) - USER_EXAMPLES} digits: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items())
        )
        print(
            f"C (TFLM int8 embeddings) vs edgetl personalize on the same examples: {gap * 100:+.2f} points, "
            f"within 1 point: {verdict(abs(gap) <= 0.01)}"
        )
        same = acc["C, same examples"] - acc["runtime trainer on the C flow's data"]
        print(
            f"C trainer vs the bundle's runtime trainer on the C flow's data: {same * 100:+.2f} points, "
            f"within 1 point: {verdict(abs(same) <= 0.01)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
