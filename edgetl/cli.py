"""The ``edgetl`` command line: a thin layer over the library that fails loudly.

Every failure exits non-zero: 2 for errors edgetl reports on purpose (bad input, bad
data, bad bundle: the message says what was received and what is allowed), 1 for
anything unexpected (with a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Sequence

from edgetl import __version__
from edgetl.errors import EdgeTLError, InputError


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="image folder (one subfolder per class), .npz (x, y), .csv (numeric features + label column), or builtin:digits")
    p.add_argument("--image-size", type=int, nargs="+", metavar="N", help="resize images to N (square) or H W; default: the backbone's input size, or the images' own size for edgetl_cnn")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 = grayscale, 3 = RGB (default: 3 if any image has colour)")
    p.add_argument("--label-column", default="label", help="CSV column holding the class (default: label)")


def _add_training_args(p: argparse.ArgumentParser, *, transfer: bool) -> None:
    p.add_argument("--backbone", default="edgetl_cnn", help="registered backbone (see `edgetl backbones`)" + (", a Keras model file, or an `edgetl pretrain` run directory" if transfer else ""))
    p.add_argument("--weights", help="imagenet (downloads; needs internet), a local weights file, or omit for random init")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs, restoring the best weights; 0 disables")
    p.add_argument("--class-weight", choices=("none", "balanced"), default="none")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--augment", action="store_true", help="random flip/rotation/zoom/brightness on training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--strategy", choices=("default", "mirrored", "multi-worker"), default="default", help="tf.distribute strategy; multi-worker reads the cluster from TF_CONFIG")
    p.add_argument("--cpu-devices", type=int, help="split the CPU into N logical devices (lets --strategy mirrored run without GPUs)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if transfer:
        p.add_argument("--cut-layer", help="for a model-file backbone: the layer whose output is the embedding (default: the classifier's input; see `edgetl layers MODEL`)")
        p.add_argument("--input-preprocessing", choices=("none", "0-1", "-1-1", "imagenet", "caffe"), help="what a model-file backbone expects its raw pixels turned into: 0-1 (x/255), -1-1 (x/127.5-1), imagenet (mean/std), caffe (BGR, mean); baked into the exported models")
        p.add_argument("--input-scale", type=float, help="custom preprocessing for a model file: x*SCALE+OFFSET, then (x-MEAN)/STD")
        p.add_argument("--input-offset", type=float)
        p.add_argument("--input-mean", type=float, nargs="+", metavar="M", help="per-channel mean (1 or C values)")
        p.add_argument("--input-std", type=float, nargs="+", metavar="S", help="per-channel std (1 or C values)")
        p.add_argument("--head-C", type=float, help="inverse L2 strength of the linear head (default: chosen on the validation split)")
        p.add_argument("--unsafe", action="store_true", help="allow model files with Python code (Lambda layers); only for files you trust")
        p.add_argument("--fusion", choices=("none", "concat"), default="none", help="concat: fuse a trainable task branch with the shared embedding")
        p.add_argument("--fusion-units", type=int, default=16)
        p.add_argument("--head-hidden-units", type=int, default=0, help="0 = linear softmax head; N adds Dense(N, relu)")
        p.add_argument("--fine-tune-layers", type=int, default=0, help="after the head phase, fine-tune the top N backbone layers")
        p.add_argument("--fine-tune-epochs", type=int, default=10)
        p.add_argument("--fine-tune-learning-rate", type=float, default=1e-3, help="Adam learning rate of the fine-tune phase (kept only if validation improves)")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("onnxruntime", "litert"), help="default: onnxruntime if installed, else LiteRT")
    p.add_argument("--precision", default="fp32", help="fp32, dynamic, float16, int8 or qat, as exported")
    p.add_argument("--threads", type=int, help="runtime threads (default: the runtime's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetl", description="Transfer learning from the host to the edge. Host (TensorFlow): pretrain, train, export, report, demo. Device (numpy + onnxruntime/LiteRT, no TensorFlow): predict, personalize, store, bench, verify, inspect.")
    parser.add_argument("--version", action="version", version=f"edgetl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="the whole story on scikit-learn digits, offline: transfer vs scratch, export, verify, personalize, report (about 1.5 minutes)")
    p.add_argument("--out", default="edgetl-demo", help="folder for the demo's runs and results (its own subfolders are replaced; default: edgetl-demo)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds to average over (>= 2 recommended)")

    p = sub.add_parser("pretrain", help="train a built-in backbone on a source task (all layers)")
    _add_data_args(p)
    _add_training_args(p, transfer=False)

    p = sub.add_parser("train", help="transfer a backbone to a target task: head, then optional fine-tuning")
    _add_data_args(p)
    _add_training_args(p, transfer=True)

    sub.add_parser("backbones", help="list registered backbones with input size and embedding size")

    p = sub.add_parser("layers", help="list a Keras model file's layers with output shapes; marks where edgetl cuts the embedding")
    p.add_argument("model", help="a .keras or .h5 model file (or a SavedModel directory)")
    p.add_argument("--cut-layer", help="show this layer as the cut instead of the default")
    p.add_argument("--unsafe", action="store_true", help="allow model files with Python code (Lambda layers); only for files you trust")

    p = sub.add_parser("export", help="quantize a run and export a verified bundle (TFLite + ONNX)")
    p.add_argument("run", help="run directory written by `edgetl train`")
    p.add_argument("--quantize", default="none", help="comma-separated: none,dynamic,float16,int8,qat (fp32 is always included; int8 and qat need labelled data: --calibration or the run's own)")
    p.add_argument("--format", default="tflite,onnx", help="comma-separated: tflite,onnx")
    p.add_argument("--calibration", help="labelled data like the training data (calibrates int8/qat; its test split measures accuracy); default: the run's own training data when it is unchanged")
    p.add_argument("--evaluation", help="labelled held-out data to measure every exported model's accuracy on (default: the calibration data's test split)")
    p.add_argument("--calibration-samples", type=int, default=200)
    p.add_argument("--io-dtype", choices=("float32", "int8", "uint8"), default="float32", help="input/output type of int8/qat TFLite models (ONNX stays float32)")
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--qat-learning-rate", type=float, default=1e-4)
    p.add_argument("--image-size", type=int, nargs="+", metavar="N", help="resize calibration images (default: the model's input size)")
    p.add_argument("--label-column", default="label")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--max-classes", type=int, help="head capacity for classes added on the device (default: 2x labels)")
    p.add_argument("--out", required=True, help="bundle directory to create (NAME.edgetl)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--strict", action="store_true", help="any failed check is fatal; by default a quantized format/precision that fails its gate is left out of the bundle")

    p = sub.add_parser("verify", help="re-run a bundle's parity checks in onnxruntime and LiteRT; exit 1 on failure")
    p.add_argument("bundle")
    p.add_argument("--data", help="labelled data to measure each model's accuracy on")
    p.add_argument("--label-column", default="label")

    p = sub.add_parser("inspect", help="print a bundle's manifest as a readable summary")
    p.add_argument("bundle")

    p = sub.add_parser("predict", help="classify inputs on the device runtime (no TensorFlow)")
    p.add_argument("bundle")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, .npy arrays (one example or a batch), or .npz with x")
    _add_device_args(p)
    p.add_argument("--store", help="head store: predict with its active (personalized) head")
    p.add_argument("--top-k", type=int, default=3)

    p = sub.add_parser("personalize", help="fine-tune the head on the device with labelled examples; guarded, crash-safe commit (exit 3 if the guard rejects the new head)")
    p.add_argument("bundle")
    p.add_argument("--data", required=True, help="labelled examples: image folder, .npz or .csv, as for training")
    p.add_argument("--label-column", default="label")
    p.add_argument("--store", required=True, help="head store directory (created if missing)")
    _add_device_args(p)
    p.add_argument("--add-classes", action="store_true", help="labels the head does not know become new classes (up to its capacity)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=0.1, help="for sgd relative to the embedding scale; for adam absolute (e.g. 0.01)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--l2", type=float, default=1e-3, help="pull toward the factory head")
    p.add_argument("--margin", type=float, default=0.02, help="largest drop of the guard score (held-out user examples and replay) accepted at commit")
    p.add_argument("--forget-margin", type=float, default=0.05, help="largest drop of held-out accuracy on the factory classes (replay) accepted at commit")
    p.add_argument("--holdout", type=float, default=0.25, help="share of the examples held out for the guard")

    p = sub.add_parser("bench", help="latency, throughput, size, memory, accuracy and train-step time per backend x precision")
    p.add_argument("bundle")
    p.add_argument("--data", help="labelled data to measure accuracy on")
    p.add_argument("--label-column", default="label")
    p.add_argument("--backend", choices=("onnxruntime", "litert"), help="default: every installed backend")
    p.add_argument("--threads", type=int, help="runtime threads")
    p.add_argument("--runs", type=int, default=100, help="timed batch-1 predictions per configuration")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("report", help="one self-contained HTML page for a run or a bundle (works offline)")
    p.add_argument("target", metavar="RUN|BUNDLE")
    p.add_argument("--out", help="HTML file (default: RUN/report.html or NAME.report.html beside the bundle)")
    p.add_argument("--bench", nargs="?", const="run", help="include a benchmark: a JSON file from `edgetl bench --json`, or no value to run one now (bundles)")

    p = sub.add_parser("store", help="inspect or move a head store: history, rollback, reset")
    p.add_argument("action", choices=("history", "rollback", "reset"))
    p.add_argument("--store", required=True)
    p.add_argument("--bundle", help="the store's bundle (needed only to verify it belongs to it)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse takes "-1-1" (a preset name) for an option; bind it to its flag first.
    for i in range(len(argv) - 1):
        if argv[i] == "--input-preprocessing" and argv[i + 1].startswith("-"):
            argv[i : i + 2] = [f"--input-preprocessing={argv[i + 1]}"]
            break
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help exits 0, usage errors exit 2
        return int(exc.code or 0)
    try:
        return _dispatch(args)
    except EdgeTLError as exc:
        print(f"edgetl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # unexpected: show everything, still exit non-zero
        traceback.print_exc()
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from edgetl.host.demo import run_demo

        if args.seeds < 1:
            raise InputError(f"--seeds must be at least 1, received {args.seeds}")
        run_demo(args.out, seeds=tuple(range(args.seeds)))
        return 0
    if args.command == "backbones":
        from edgetl.host.backbones import get_recipe, list_backbones

        print(f"{'name':<18} {'kind':<9} {'default input':<14} {'embedding':>9}  preprocessing")
        for name in list_backbones():
            r = get_recipe(name)
            print(f"{name:<18} {r.kind:<9} {'x'.join(map(str, r.default_input_shape)):<14} {r.embedding_size:>9}  {r.preprocessing}")
        return 0
    if args.command == "layers":
        return _layers(args)
    if args.command in ("pretrain", "train"):
        return _train(args)
    if args.command == "export":
        return _export(args)
    if args.command == "verify":
        return _verify(args)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "personalize":
        return _personalize(args)
    if args.command == "store":
        return _store(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "report":
        return _report(args)
    raise InputError(f"unknown command {args.command!r}")  # pragma: no cover - argparse refuses first


def _train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # cheap check before any training
        raise InputError(f"run directory {str(out)!r} already exists; choose another --out or pass --overwrite")
    if args.cpu_devices:
        from edgetl.host.transfer import configure_cpu_devices

        configure_cpu_devices(args.cpu_devices)
    from edgetl.host.backbones import input_shape_of
    from edgetl.host.data import Augmentation, load_dataset
    from edgetl.host.run import save_run
    from edgetl.host.transfer import TrainConfig, train_transfer

    image_size, channels = _image_size(args.image_size), args.channels
    shape = input_shape_of(args.backbone, safe_mode=not getattr(args, "unsafe", False))
    if shape is not None and len(shape) == 3:  # load images at the backbone's input size and channels
        image_size = image_size or (shape[0], shape[1])
        channels = channels or shape[2]
    data = load_dataset(args.data, image_size=image_size, channels=channels, label_column=args.label_column)
    print(f"data: {data.source}: {len(data)} examples, {data.num_classes} classes, input shape {data.input_shape}")
    common = dict(
        backbone=args.backbone, weights=args.weights, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, dropout=args.dropout, early_stopping_patience=args.patience,
        class_weight=args.class_weight, label_smoothing=args.label_smoothing,
        augmentation=Augmentation() if args.augment else None, seed=args.seed, strategy=args.strategy,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
    )
    verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
    if args.command == "pretrain":
        from edgetl.host.pretrain import pretrain

        result = pretrain(data, TrainConfig(**common), verbose=verbose)
    else:
        config = TrainConfig(
            **common, cut_layer=args.cut_layer, input_preprocessing=_preprocessing(args), head_C=args.head_C,
            fusion=args.fusion, fusion_units=args.fusion_units,
            head_hidden_units=args.head_hidden_units, fine_tune_layers=args.fine_tune_layers,
            fine_tune_epochs=args.fine_tune_epochs, fine_tune_learning_rate=args.fine_tune_learning_rate,
        )
        result = train_transfer(data, config, safe_mode=not args.unsafe, verbose=verbose)
    save_run(result, out, kind=args.command, overwrite=args.overwrite)
    for note in result.assumptions:
        print(f"assumed: {note}")
    m = result.metrics
    fit = m.get("head_fit") or {}
    if fit.get("method") == "lbfgs":
        print(f"head: L-BFGS to convergence ({fit['steps']} steps, gradient {fit['grad_norm']:.1e}, C={fit['C']:g} chosen by {fit['selection']})")
    if "fine_tune_kept" in m:
        verdict = "kept" if m["fine_tune_kept"] else "discarded (head-only was better on validation)"
        print(f"fine-tune: {verdict}" + (f"; validation accuracy {m['head_only_val_accuracy']:.4f} head-only -> {m['fine_tuned_val_accuracy']:.4f} fine-tuned" if m.get("fine_tune_validated") else "; no validation split to judge it"))
    print(f"test accuracy {m['test_accuracy']:.4f} on {m.get('test_examples', '?')} examples; trainable parameters {m.get('trainable_params_head_phase', m.get('trainable_params'))}; wrote {out}")
    return 0


def _preprocessing(args: argparse.Namespace):
    """--input-preprocessing PRESET, or a custom one from --input-scale/offset/mean/std."""
    from edgetl.host.backbones import InputPreprocessing

    custom = {k: v for k, v in (("scale", args.input_scale), ("offset", args.input_offset), ("mean", args.input_mean), ("std", args.input_std)) if v is not None}
    if custom and args.input_preprocessing:
        raise InputError(f"give --input-preprocessing {args.input_preprocessing} or custom --input-scale/offset/mean/std, not both (received {sorted(custom)})")
    return InputPreprocessing(**custom) if custom else args.input_preprocessing


def _layers(args: argparse.Namespace) -> int:
    from edgetl.host.backbones import describe_layers

    rows = describe_layers(args.model, cut_layer=args.cut_layer, safe_mode=not args.unsafe)
    print(f"{'layer':<32} {'class':<24} {'output shape':<22} {'params':>9}")
    for r in rows:
        params = "" if r["params"] is None else f"{r['params']:,}"
        print(f"{r['name']:<32} {r['class']:<24} {str(r['output_shape']):<22} {params:>9}  {r['note']}".rstrip())
    return 0


def _image_size(values: list[int] | None) -> tuple[int, int] | int | None:
    """``--image-size N`` or ``--image-size H W``."""
    if not values:
        return None
    if len(values) not in (1, 2):
        raise InputError(f"--image-size takes N or H W, received {values}")
    return (values[0], values[1]) if len(values) == 2 else values[0]


def _load_for_spec(path: str, spec: dict, label_column: str, image_size: tuple[int, int] | int | None = None, *, require_trainable: bool = True):
    """Load data the way a model's input spec expects it (image size and channels)."""
    from edgetl.host.data import load_dataset

    image = spec.get("kind") == "image"
    if image_size is None and image:
        image_size = (spec["shape"][0], spec["shape"][1])
    return load_dataset(path, image_size=image_size, channels=spec["shape"][-1] if image else None, label_column=label_column, require_trainable=require_trainable)


def _export(args: argparse.Namespace) -> int:
    from edgetl.host.export import QuantizeConfig, export_bundle
    from edgetl.host.run import load_run

    if Path(args.out).exists() and not args.overwrite:  # cheap check before loading anything
        raise InputError(f"output {args.out!r} already exists; choose another --out or pass --overwrite")
    run = load_run(args.run)
    configs = [QuantizeConfig(mode=m.strip(), calibration_samples=args.calibration_samples, qat_epochs=args.qat_epochs, qat_learning_rate=args.qat_learning_rate, io_dtype=args.io_dtype if m.strip() in ('int8', 'qat') else 'float32') for m in args.quantize.split(",") if m.strip()]
    calibration = evaluation = None
    if args.calibration:
        calibration = _load_for_spec(args.calibration, run.input_spec, args.label_column, _image_size(args.image_size))
    if args.evaluation:
        evaluation = _load_for_spec(args.evaluation, run.input_spec, args.label_column, _image_size(args.image_size))
    result = export_bundle(run, args.out, quantize=configs, formats=[f.strip() for f in args.format.split(",")], calibration=calibration, evaluation=evaluation, opset=args.opset, max_classes=args.max_classes, overwrite=args.overwrite, strict=args.strict)
    print(f"data: {result.manifest['data'].get('calibration')}")
    print(result.describe())
    if not result.ok:
        print(f"no bundle written: {len(result.fatal)} check(s) failed" + ("" if args.strict else " (fp32 models and head graphs must pass)"))
        return 1
    print(f"wrote {result.bundle.path} in {result.timings['export_seconds']:.1f}s" + (f"; {len(result.omitted)} quantized configuration(s) left out" if result.omitted else ""))
    return 0


def _print_checks(report: dict) -> None:
    from edgetl.device.verify import format_checks

    print(format_checks(report["checks"]))


def _verify(args: argparse.Namespace) -> int:
    from edgetl.bundle import read_bundle
    from edgetl.device.verify import verify_bundle

    bundle = read_bundle(args.bundle)
    x = y = None
    if args.data:
        data = _load_for_spec(args.data, bundle.input_spec, args.label_column)
        if list(data.class_names) != bundle.labels:
            raise InputError(f"--data classes {list(data.class_names)} differ from the bundle's labels {bundle.labels}")
        x, y = data.x, data.y
    report = verify_bundle(bundle, x, y)
    _print_checks(report)
    print("verification passed" if report["ok"] else "verification FAILED")
    return 0 if report["ok"] else 1


def _inspect(args: argparse.Namespace) -> int:
    from edgetl.bundle import read_bundle

    b = read_bundle(args.bundle)
    m = b.manifest
    spec = m["input_spec"]
    print(f"bundle {m['name']} (schema {m['schema_version']}) at {b.path}")
    print(f"  labels ({len(m['labels'])}): {', '.join(m['labels'])}")
    print(f"  input: {spec['shape']} {spec['dtype']} {spec.get('layout', '')}; {spec.get('preprocessing', '')}")
    print(f"  embedding size {m['embedding_size']}; head {m['head'].get('kind')} with capacity {m['head']['max_classes']} classes")
    print(f"  {'file':<26} {'role':<11} {'format':<7} {'precision':<9} {'bytes':>10}  sha256")
    for a in m["artifacts"]:
        print(f"  {a['file']:<26} {a['role']:<11} {a['format']:<7} {a['precision']:<9} {a['size']:>10,}  {a['sha256'][:12]}")
    parity = m.get("parity")
    if parity:
        print(f"  parity at export: {'passed' if parity['ok'] else 'FAILED'} ({len(parity['checks'])} checks)")
    print(f"  produced by {', '.join(f'{k} {v}' for k, v in m.get('producer', {}).items() if k != 'run')}")
    return 0


def _read_inputs(paths: list[str], spec: dict) -> tuple["np.ndarray", list[str]]:
    """Examples from image files, .npy or .npz (x), shaped as the bundle's input spec."""
    import numpy as np

    shape = tuple(spec["shape"])
    arrays, names = [], []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise InputError(f"input {raw!r} does not exist")
        if path.suffix.lower() in (".npy", ".npz"):
            try:
                data = np.load(path, allow_pickle=False)
                arr = data["x"] if path.suffix.lower() == ".npz" else data
            except (OSError, ValueError, KeyError) as exc:
                raise InputError(f"cannot read {raw!r} as an array ({exc}); .npz inputs need an array 'x'") from None
            arr = arr[None] if arr.shape == shape else arr
            arrays.append(arr)
            names += [f"{path.name}[{i}]" for i in range(len(arr))] if len(arr) > 1 else [path.name]
        else:
            try:
                from PIL import Image
            except ImportError:
                raise InputError('reading image files needs Pillow: pip install pillow (or pass .npy arrays)') from None
            try:
                with Image.open(path) as im:
                    im = im.convert("L" if shape[-1] == 1 else "RGB").resize((shape[1], shape[0]), Image.BILINEAR)
                    arrays.append(np.asarray(im, dtype=np.uint8).reshape(1, *shape))
            except OSError as exc:
                raise InputError(f"cannot read {raw!r} as an image ({exc})") from None
            names.append(path.name)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise InputError(f"inputs have different shapes {sorted(shapes)}; the bundle takes {shape}")
    return np.concatenate(arrays), names


def _predict(args: argparse.Namespace) -> int:
    from edgetl.device.classifier import Classifier

    clf = Classifier.open(args.bundle, backend=args.backend, precision=args.precision, store=args.store, threads=args.threads)
    x, names = _read_inputs(args.inputs, clf.bundle.input_spec)
    result = clf.predict(x, top_k=args.top_k)
    print(f"# backend {clf.backend}, precision {clf.precision}, head version {result.head_version}")
    for name, top in zip(names, result.top_k):
        print(f"{name}\t" + "\t".join(f"{label} {p:.4f}" for label, p in top))
    return 0


def _personalize(args: argparse.Namespace) -> int:
    from edgetl.device.classifier import Classifier
    from edgetl.device.head import TrainSettings
    from edgetl.device.personalizer import Personalizer

    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate, optimizer=args.optimizer, l2=args.l2)
    clf = Classifier.open(args.bundle, backend=args.backend, precision=args.precision, threads=args.threads)
    data = _load_for_spec(args.data, clf.bundle.input_spec, args.label_column, require_trainable=False)
    labels = [data.class_names[i] for i in data.y]
    p = Personalizer(clf, args.store, holdout_fraction=args.holdout, margin=args.margin, forget_margin=args.forget_margin, settings=settings)
    new = sorted(set(labels) - set(clf.head.labels))
    if new and not args.add_classes:
        raise InputError(f"labels {new} are not classes of the head {list(clf.head.labels)}; pass --add-classes to add them")
    for name in new:
        p.add_class(name, data.x[[l == name for l in labels]])
    known = [i for i, l in enumerate(labels) if l not in new]
    if known:
        p.add_examples(data.x[known], [labels[i] for i in known])
    p.train()
    result = p.commit()
    print(f"{len(labels)} examples ({len(new)} new classes), backend {clf.backend}: held-out accuracy {result.candidate_accuracy:.4f} (active head {result.active_accuracy:.4f})")
    print(f"{result.reason}; active version {result.version}")
    return 0 if result.accepted else 3  # 3: the guard rejected the new head (documented in --help)


def _bench(args: argparse.Namespace) -> int:
    from edgetl.bundle import read_bundle
    from edgetl.device.bench import bench_bundle, format_table, to_json

    bundle = read_bundle(args.bundle)
    if args.runs < 5:
        raise InputError(f"--runs must be at least 5 for percentiles, received {args.runs}")
    data = None
    if args.data:
        ds = _load_for_spec(args.data, bundle.input_spec, args.label_column)
        if list(ds.class_names) != bundle.labels:
            raise InputError(f"--data classes {list(ds.class_names)} differ from the bundle's labels {bundle.labels}")
        data = (ds.x, ds.y)
    result = bench_bundle(bundle, data=data, backends=(args.backend,) if args.backend else None, threads=args.threads, runs=args.runs)
    print(to_json(result) if args.json else format_table(result))
    return 0


def _report(args: argparse.Namespace) -> int:
    from edgetl.host.report import write_report

    bench = None
    if args.bench == "run":
        from edgetl.bundle import read_bundle
        from edgetl.device.bench import bench_bundle

        bench = bench_bundle(read_bundle(args.target), runs=30)
    elif args.bench:
        try:
            bench = json.loads(Path(args.bench).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"--bench {args.bench!r} is not a JSON file from `edgetl bench --json` ({exc})") from None
    print(f"wrote {write_report(args.target, args.out, bench=bench)}")
    return 0


def _store(args: argparse.Namespace) -> int:
    from edgetl.device.store import HeadStore

    bundle = None
    if args.bundle:
        from edgetl.bundle import read_bundle

        bundle = read_bundle(args.bundle)
    store = HeadStore(args.store, bundle)
    if args.action == "rollback":
        print(f"active version {store.rollback()}")
    elif args.action == "reset":
        print(f"active version {store.reset()} (factory head)")
    else:
        print(f"active version {store.active_version}")
        for h in store.history():
            extra = h.get("metrics") or ({"from": h["from"]} if "from" in h else {})
            print(f"{h['time']}  v{h['version']:<4} {h['action']:<9} {json.dumps(extra)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
