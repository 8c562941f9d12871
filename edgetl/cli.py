"""The ``edgetl`` command line: a thin layer over the library that fails loudly.

Every failure exits non-zero: 2 for errors edgetl reports on purpose (bad input, bad
data, bad bundle: the message says what was received and what is allowed), 1 for
anything unexpected (with a traceback).
"""

from __future__ import annotations

import argparse
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
        p.add_argument("--cut-layer", help="for a model-file backbone: the layer whose output is the embedding (default: the layer feeding the classifier)")
        p.add_argument("--unsafe", action="store_true", help="allow model files with Python code (Lambda layers); only for files you trust")
        p.add_argument("--fusion", choices=("none", "concat"), default="none", help="concat: fuse a trainable task branch with the shared embedding")
        p.add_argument("--fusion-units", type=int, default=16)
        p.add_argument("--head-hidden-units", type=int, default=0, help="0 = linear softmax head; N adds Dense(N, relu)")
        p.add_argument("--fine-tune-layers", type=int, default=0, help="after the head phase, fine-tune the top N backbone layers")
        p.add_argument("--fine-tune-epochs", type=int, default=10)
        p.add_argument("--fine-tune-learning-rate", type=float, default=1e-5)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetl", description="Transfer learning from the host to the edge: pretrain, train, export, verify, inspect, demo.")
    parser.add_argument("--version", action="version", version=f"edgetl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="the whole story on scikit-learn digits, offline (about a minute)")
    p.add_argument("--out", default="edgetl-demo", help="folder for the demo's runs and results (its own subfolders are replaced; default: edgetl-demo)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds to average over (>= 2 recommended)")

    p = sub.add_parser("pretrain", help="train a built-in backbone on a source task (all layers)")
    _add_data_args(p)
    _add_training_args(p, transfer=False)

    p = sub.add_parser("train", help="transfer a backbone to a target task: head, then optional fine-tuning")
    _add_data_args(p)
    _add_training_args(p, transfer=True)

    sub.add_parser("backbones", help="list registered backbones with input size and embedding size")

    p = sub.add_parser("export", help="quantize a run and export a verified bundle (TFLite + ONNX)")
    p.add_argument("run", help="run directory written by `edgetl train`")
    p.add_argument("--quantize", default="none", help="comma-separated: none,dynamic,float16,int8,qat (fp32 is always included; int8 and qat need --calibration)")
    p.add_argument("--format", default="tflite,onnx", help="comma-separated: tflite,onnx")
    p.add_argument("--calibration", help="labelled data like the training data (needed for int8; its test split measures accuracy)")
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

    p = sub.add_parser("verify", help="re-run a bundle's parity checks in onnxruntime and LiteRT; exit 1 on failure")
    p.add_argument("bundle")
    p.add_argument("--data", help="labelled data to measure each model's accuracy on")
    p.add_argument("--label-column", default="label")

    p = sub.add_parser("inspect", help="print a bundle's manifest as a readable summary")
    p.add_argument("bundle")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
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
    if args.command in ("pretrain", "train"):
        return _train(args)
    if args.command == "export":
        return _export(args)
    if args.command == "verify":
        return _verify(args)
    if args.command == "inspect":
        return _inspect(args)
    raise InputError(f"unknown command {args.command!r}")  # pragma: no cover - argparse refuses first


def _train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # cheap check before any training
        raise InputError(f"run directory {str(out)!r} already exists; choose another --out or pass --overwrite")
    if args.cpu_devices:
        from edgetl.host.transfer import configure_cpu_devices

        configure_cpu_devices(args.cpu_devices)
    from edgetl.host.backbones import get_recipe, list_backbones
    from edgetl.host.data import Augmentation, load_dataset
    from edgetl.host.run import save_run
    from edgetl.host.transfer import TrainConfig, train_transfer

    image_size = _image_size(args.image_size)
    if image_size is None and args.backbone.lower() in list_backbones("image") and args.backbone.lower() != "edgetl_cnn":
        image_size = get_recipe(args.backbone).default_input_shape[:2]
    data = load_dataset(args.data, image_size=image_size, channels=args.channels, label_column=args.label_column)
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
            **common, cut_layer=args.cut_layer, fusion=args.fusion, fusion_units=args.fusion_units,
            head_hidden_units=args.head_hidden_units, fine_tune_layers=args.fine_tune_layers,
            fine_tune_epochs=args.fine_tune_epochs, fine_tune_learning_rate=args.fine_tune_learning_rate,
        )
        result = train_transfer(data, config, safe_mode=not args.unsafe, verbose=verbose)
    save_run(result, out, kind=args.command, overwrite=args.overwrite)
    m = result.metrics
    print(f"test accuracy {m['test_accuracy']:.4f} on {m.get('test_examples', '?')} examples; trainable parameters {m.get('trainable_params_head_phase', m.get('trainable_params'))}; wrote {out}")
    return 0


def _image_size(values: list[int] | None) -> tuple[int, int] | int | None:
    """``--image-size N`` or ``--image-size H W``."""
    if not values:
        return None
    if len(values) not in (1, 2):
        raise InputError(f"--image-size takes N or H W, received {values}")
    return (values[0], values[1]) if len(values) == 2 else values[0]


def _load_for_spec(path: str, spec: dict, label_column: str, image_size: tuple[int, int] | int | None = None):
    """Load data the way a model's input spec expects it (image size and channels)."""
    from edgetl.host.data import load_dataset

    image = spec.get("kind") == "image"
    if image_size is None and image:
        image_size = (spec["shape"][0], spec["shape"][1])
    return load_dataset(path, image_size=image_size, channels=spec["shape"][-1] if image else None, label_column=label_column)


def _export(args: argparse.Namespace) -> int:
    from edgetl.host.export import QuantizeConfig, export_bundle
    from edgetl.host.run import load_run

    run = load_run(args.run)
    configs = [QuantizeConfig(mode=m.strip(), calibration_samples=args.calibration_samples, qat_epochs=args.qat_epochs, qat_learning_rate=args.qat_learning_rate, io_dtype=args.io_dtype if m.strip() in ('int8', 'qat') else 'float32') for m in args.quantize.split(",") if m.strip()]
    calibration = None
    if args.calibration:
        calibration = _load_for_spec(args.calibration, run.input_spec, args.label_column, _image_size(args.image_size))
    bundle, report = export_bundle(run, args.out, quantize=configs, formats=[f.strip() for f in args.format.split(",")], calibration=calibration, opset=args.opset, max_classes=args.max_classes, overwrite=args.overwrite)
    _print_checks(report)
    print(f"wrote {bundle.path} in {report['export_seconds']:.1f}s")
    return 0 if report["ok"] else 1


def _print_checks(report: dict) -> None:
    print(f"{'file':<26} {'role':<11} {'check':<34} {'accuracy':>8}  ok")
    for c in report["checks"]:
        if "max_abs_diff" in c:
            what = f"max|diff| {c['max_abs_diff']:.2e} <= {c['tolerance']:.0e}"
        elif "top1_agreement" in c:
            what = f"top-1 agreement {c['top1_agreement']:.3f} >= {c['min_agreement']}"
        else:
            what = f"relative error {c['relative_error']:.2e}"
        acc = f"{c['accuracy']:.4f}" if "accuracy" in c else ""
        print(f"{c['file']:<26} {c['role']:<11} {what:<34} {acc:>8}  {'yes' if c['ok'] else 'NO'}")


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
