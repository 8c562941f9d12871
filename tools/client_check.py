"""Run the integration guide's JavaScript and C++ clients on a bundle and compare them with edgetl.

The clients are the code blocks of docs/integration.md marked ``<!-- edgetl-test: node -->``
and ``<!-- edgetl-test: cpp -->``, extracted as written: the JavaScript runs in Node with
onnxruntime-node, the C++ is compiled with g++ against the ``libonnxruntime.so`` of the
onnxruntime wheel (headers from tools/client_deps.py). Each client predicts with the fused
model (fp32 and int8) and trains the head (one call, and one step per call); edgetl predicts
with ``edgetl predict --json`` and trains with its device trainer (onnxruntime, the bundle's
default settings). Printed: top-1 agreement and the largest probability difference per
precision, and the largest weight difference after training.

Usage: ``python tools/client_check.py BUNDLE [--clients node cpp] [--work DIR]``; the inputs are
the bundle's ``parity.npz`` (predict: all of them; train: the same inputs labelled with the
fused model's top-1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import client_deps  # noqa: E402  (a sibling script of tools/)

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "integration.md"
CLIENTS = {"node": ("js", "edgetl_client.js"), "cpp": ("cpp", "edgetl_client.cpp")}
PRECISIONS = ("fp32", "int8")
_EDGETL: dict[tuple, object] = {}  # edgetl's results, computed once per bundle and inputs


def guide_code(client: str, guide: Path = GUIDE) -> str:
    """The guide's code blocks for ``client`` ("node" or "cpp"), in order, joined as one file."""
    language, _ = CLIENTS[client]
    marker = re.compile(rf"<!-- edgetl-test: {client} -->\n```{language}\n(.*?)^```", re.S | re.M)
    blocks = marker.findall(guide.read_text(encoding="utf-8"))
    if not blocks:
        raise ValueError(f"{guide} has no ```{language} block marked <!-- edgetl-test: {client} -->")
    return "\n".join(blocks)


def build_node(work: Path) -> list[str]:
    """The guide's JavaScript as ``edgetl_client.js`` in ``work``, with onnxruntime-node beside it."""
    node = client_deps.ensure_node()
    prefix = client_deps.node_prefix()
    work.mkdir(parents=True, exist_ok=True)
    (work / CLIENTS["node"][1]).write_text(guide_code("node"), encoding="utf-8")
    link = work / "node_modules"
    if not link.exists():
        link.symlink_to(prefix / "node_modules", target_is_directory=True)
    return [node, str(work / CLIENTS["node"][1])]


def wheel_library() -> Path:
    """The ``libonnxruntime.so`` the onnxruntime Python wheel ships."""
    import onnxruntime

    found = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so*"))
    if not found:
        raise client_deps.ClientDepsError("the onnxruntime wheel has no capi/libonnxruntime.so*")
    return found[0]


def build_cpp(work: Path) -> list[str]:
    """The guide's C++ compiled as ``edgetl_client`` in ``work`` (reused while the code is the same)."""
    compiler = client_deps.ensure_cpp_toolchain()
    includes = client_deps.cpp_include_dirs()
    library = wheel_library()
    libdir = client_deps.cache_dir() / "cpp-build" / "lib"
    libdir.mkdir(parents=True, exist_ok=True)
    for name in ("libonnxruntime.so", "libonnxruntime.so.1"):  # the link name and the library's soname
        (libdir / name).unlink(missing_ok=True)
        (libdir / name).symlink_to(library)
    work.mkdir(parents=True, exist_ok=True)
    source = work / CLIENTS["cpp"][1]
    source.write_text(guide_code("cpp"), encoding="utf-8")
    binary = work / "edgetl_client"
    flags = ["-std=c++17", "-O1", "-Wall", "-Werror", *[f"-I{d}" for d in includes]]
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + str(library).encode()).hexdigest()
    cached = client_deps.cache_dir() / "cpp-build" / key / "edgetl_client"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        link = [f"-L{libdir}", "-lonnxruntime", f"-Wl,-rpath,{libdir}", "-lcrypto"]
        cmd = [compiler, *flags, str(source), *link, "-o", str(cached)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"the guide's C++ does not compile:\n{done.stderr[-4000:]}")
    shutil.copy2(cached, binary)
    return [str(binary)]


def run_client(cmd: list[str], *args: str | Path) -> str:
    """Run a client; its stdout, or a RuntimeError with its stderr."""
    done = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[-1]).name} {' '.join(map(str, args))} exited {done.returncode}: {done.stderr}")
    return done.stdout


@dataclass(frozen=True)
class Inputs:
    """Files the clients read: raw float32 pixels to predict, pixels and label names to train on."""

    predict: Path
    predict_npy: Path
    train: Path
    train_labels: Path
    x_train: np.ndarray
    labels: tuple[str, ...]


def write_inputs(work: Path, x_predict: np.ndarray, x_train: np.ndarray, labels: list[str]) -> Inputs:
    work.mkdir(parents=True, exist_ok=True)
    x_predict, x_train = (np.ascontiguousarray(a, "<f4") for a in (x_predict, x_train))
    x_predict.tofile(work / "predict.f32")
    np.save(work / "predict.npy", x_predict)
    x_train.tofile(work / "train.f32")
    (work / "train_labels.txt").write_text("".join(f"{name}\n" for name in labels), encoding="utf-8")
    return Inputs(
        work / "predict.f32",
        work / "predict.npy",
        work / "train.f32",
        work / "train_labels.txt",
        x_train,
        tuple(labels),
    )


def edgetl_probabilities(bundle: Path, npy: Path, precision: str, labels: list[str]) -> np.ndarray:
    """``edgetl predict --json`` on onnxruntime, as [n, labels] probabilities in label order."""
    exe = Path(sys.executable).parent / "edgetl"
    base = (
        [str(exe)]
        if exe.is_file()
        else [sys.executable, "-c", "import sys; from edgetl.cli import main; sys.exit(main())"]
    )
    cmd = [*base, "predict", str(bundle), str(npy), "--json", "--backend", "onnxruntime"]
    cmd += ["--precision", precision, "--top-k", str(len(labels))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"edgetl predict exited {done.returncode}: {done.stderr}")
    doc = json.loads(done.stdout)
    column = {name: j for j, name in enumerate(labels)}
    probs = np.zeros((len(doc["predictions"]), len(labels)))
    for i, prediction in enumerate(doc["predictions"]):
        for item in prediction["top_k"]:
            probs[i, column[item["label"]]] = item["probability"]
    return probs


def edgetl_trained_head(bundle: Path, x_train: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """edgetl's device trainer (onnxruntime) on the fp32 backbone's embeddings, the bundle's defaults."""
    from edgetl.device import Classifier
    from edgetl.device._head import HeadState, TrainSettings
    from edgetl.device._head_loop import make_trainer

    clf = Classifier.open(bundle, backend="onnxruntime", precision="fp32")
    head = HeadState.factory(clf.bundle)
    columns = [clf.bundle.labels.index(name) for name in names]
    onehot = np.eye(head.capacity, dtype=np.float32)[columns]
    defaults = json.loads((Path(bundle) / "manifest.json").read_text())["head"]
    fields = ("optimizer", "learning_rate", "l2", "momentum", "epochs", "batch_size", "seed")
    settings = TrainSettings(**{k: defaults[k] for k in fields})
    trained, _ = make_trainer(clf.bundle, "onnxruntime").train(head, clf.embed(x_train), onehot, settings)
    return {"W": trained.W, "b": trained.b}


def compare_predictions(bundle: Path, client: str, cmd: list[str], inputs: Inputs) -> dict:
    """Top-1 agreement and probability differences of the client's fused-model predictions."""
    labels = json.loads((bundle / "manifest.json").read_text())["labels"]
    report: dict = {}
    for precision in PRECISIONS:
        lines = run_client(cmd, bundle, "predict", precision, inputs.predict).splitlines()
        rows = [json.loads(line) for line in lines]
        ours = np.array([row["probabilities"] for row in rows])
        key = ("predict", bundle, inputs.predict_npy, precision)
        if key not in _EDGETL:  # edgetl's side is the same for every client
            _EDGETL[key] = edgetl_probabilities(bundle, inputs.predict_npy, precision, labels)
        theirs = _EDGETL[key]
        if ours.shape != theirs.shape:
            raise RuntimeError(f"{client} {precision}: {ours.shape} probabilities, edgetl {theirs.shape}")
        report[precision] = {
            "inputs": len(rows),
            "top1_agreement": float(np.mean(ours.argmax(1) == theirs.argmax(1))),
            "labels_agree": all(row["label"] == labels[j] for row, j in zip(rows, ours.argmax(1))),
            "max_abs_probability_diff": float(np.abs(ours - theirs).max()),
        }
    return report


def compare_training(bundle: Path, client: str, cmd: list[str], inputs: Inputs, work: Path) -> dict:
    """Weight differences after the client's training (one call; one step per call) and edgetl's."""
    key = ("train", bundle, inputs.train)
    if key not in _EDGETL:
        _EDGETL[key] = edgetl_trained_head(bundle, inputs.x_train, inputs.labels)
    expected = _EDGETL[key]
    factory_W = np.fromfile(bundle / "head_init.W.bin", "<f4").reshape(expected["W"].shape)
    report: dict = {}
    for mode, extra in (("one_call", ()), ("stepwise", ("--stepwise",))):
        out = work / f"{client}_{bundle.parent.name}_{mode}"
        run_client(cmd, bundle, "train", inputs.train, inputs.train_labels, out, *extra)
        got = {k: np.fromfile(f"{out}.{k}.bin", "<f4").reshape(expected[k].shape) for k in ("W", "b")}
        report[mode] = {
            "examples": len(inputs.labels),
            **{f"max_abs_{k}_diff": float(np.abs(got[k] - expected[k]).max()) for k in ("W", "b")},
            "max_abs_W_change_from_factory": float(np.abs(expected["W"] - factory_W).max()),
        }
    return report


def with_defaults(bundle: Path, dest: Path, **head: object) -> Path:
    """A copy of ``bundle`` whose manifest records other training defaults (e.g. Adam)."""
    copy = dest / bundle.name
    if not copy.exists():
        shutil.copytree(bundle, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["head"].update(head)
        (copy / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return copy


ADAM = {"optimizer": "adam", "learning_rate": 0.01}


def compare(bundle: Path, client: str, cmd: list[str], inputs: Inputs, work: Path) -> dict:
    """Agreement figures of one client with edgetl on ``inputs``: predictions, then training with
    the bundle's defaults (SGD) and with its defaults switched to Adam (a copy of the bundle)."""
    adam = with_defaults(bundle, work / "adam-defaults", **ADAM)
    return {
        **compare_predictions(bundle, client, cmd, inputs),
        "train_sgd": compare_training(bundle, client, cmd, inputs, work),
        "train_adam": compare_training(adam, client, cmd, inputs, work),
    }


def build(client: str, work: Path) -> list[str]:
    """The command that runs ``client`` (built from the guide in ``work``)."""
    return build_node(work) if client == "node" else build_cpp(work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--clients", nargs="+", choices=sorted(CLIENTS), default=sorted(CLIENTS))
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    parity = np.load(args.bundle / "parity.npz")
    labels = json.loads((args.bundle / "manifest.json").read_text())["labels"]
    names = [labels[j] for j in parity["probabilities"].argmax(1)]
    with tempfile.TemporaryDirectory(prefix="edgetl-clients-") as tmp:
        work = args.work or Path(tmp)
        inputs = write_inputs(work, parity["x"], parity["x"], names)
        for client in args.clients:
            cmd = build(client, work / client)
            print(json.dumps({"client": client, **compare(args.bundle, client, cmd, inputs, work)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
