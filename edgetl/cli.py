"""The ``edgetl`` command line: a thin layer over the library that fails loudly.

Every failure exits non-zero: 2 for errors edgetl reports on purpose (bad input, bad
data, bad bundle: the message says what was received and what is allowed), 1 for a
failed verification or anything unexpected (with a traceback), 3 when the
personalization guard rejects a new head. Defaults come from the library's dataclasses,
so the CLI and the Python API cannot drift apart. A stdout that fails (closed pipe, full
disk, I/O error) is never a traceback: a closed pipe (``edgetl store history | head -2``)
ends quietly; any other failure says that the work itself is done and only its report was
lost.

The CLI only parses: data reading, options and work are the library's (edgetl.data,
edgetl.host, edgetl.device); flags come from the config fields (edgetl._options). Each
command imports the library inside its function, on purpose: `edgetl --help` starts in
about 20 ms instead of 0.5 s (numpy and the halves), and a device command never loads the
host half.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from edgetl import __version__
from edgetl.errors import EdgeTLError, InputError, QuantizedModelLeftOut

EXIT_FAILED, EXIT_ERROR, EXIT_REJECTED = 1, 2, 3


# ----------------------------------------------------------------------------- arguments


def _add_data_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument(
        "--data",
        required=required,
        help="image folder (one subfolder per class), .npz (x, y), .csv (numeric features + label column), or "
        "builtin:digits",
    )
    p.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        metavar="N",
        help="resize images to N (square) or H W; default: the model's input size",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="1 = grayscale, 3 = RGB (default: the model's, else 3 if any image has colour)",
    )
    p.add_argument("--label-column", default="label", help="CSV column holding the class (default: label)")


def _add_training_args(p: argparse.ArgumentParser, command: str) -> None:
    """`pretrain`/`train` flags: TrainConfig's option fields (edgetl._options), then the run's own."""
    from edgetl._options import add_options
    from edgetl.host._transfer import TrainConfig

    add_options(p, TrainConfig, command)
    if command == "train":  # custom preprocessing, combined into TrainConfig.input_preprocessing
        p.add_argument(
            "--input-scale", type=float, help="custom preprocessing for a model file: x*SCALE+OFFSET, then (x-MEAN)/STD"
        )
        p.add_argument("--input-offset", type=float)
        p.add_argument("--input-mean", type=float, nargs="+", metavar="M", help="per-channel mean (1 or C values)")
        p.add_argument("--input-std", type=float, nargs="+", metavar="S", help="per-channel std (1 or C values)")
        p.add_argument(
            "--unsafe",
            action="store_true",
            help="allow model files with Python code (Lambda layers); only for files you trust",
        )
    p.add_argument(
        "--cpu-devices",
        type=int,
        help="split the CPU into N logical devices (lets --strategy mirrored run without GPUs)",
    )
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("onnxruntime", "litert", "auto"),
        help="default: onnxruntime if installed, else LiteRT; auto: the advisor's choice (edgetl bench --recommend)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        help="fp32, dynamic, float16, int8 or qat, as exported; auto: the advisor's choice",
    )
    p.add_argument("--threads", type=int, help="runtime threads (default: the runtime's choice)")
    _add_trust_arg(p)


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust",
        action="append",
        metavar="PUBKEY",
        help="refuse the bundle unless its manifest is signed by this Ed25519 public key (PEM); repeat to trust "
        "several (key rotation)",
    )


def _parser_demo(p: argparse.ArgumentParser) -> None:
    from edgetl.host._demo_source import GlyphSourceRecipe

    images = GlyphSourceRecipe().images
    p.add_argument(
        "--out",
        default="edgetl-demo",
        help="folder for the demo's runs and results (its own subfolders are replaced; default: edgetl-demo)",
    )
    p.add_argument("--seeds", type=int, default=3, help="number of seeds to average over (>= 2 recommended)")
    p.add_argument(
        "--source-images",
        type=int,
        default=images,
        help=f"synthetic glyph images to pretrain the source backbone on (default {images:,}; fewer is quicker and "
        "transfers worse); the pretrained backbone is cached per setting",
    )


def _parser_pretrain(p: argparse.ArgumentParser) -> None:
    _add_data_args(p)
    _add_training_args(p, "pretrain")


def _parser_train(p: argparse.ArgumentParser) -> None:
    _add_data_args(p)
    _add_training_args(p, "train")


def _parser_layers(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .keras or .h5 model file (or a SavedModel directory)")
    p.add_argument("--cut-layer", help="show this layer as the cut instead of the default")
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="allow model files with Python code (Lambda layers); only for files you trust",
    )


def _parser_export(p: argparse.ArgumentParser) -> None:
    """ExportOptions' and QuantizeConfig's option fields (edgetl._options), and what the CLI adds."""
    from edgetl._options import add_options
    from edgetl.host._export import ExportOptions, QuantizeConfig
    from edgetl.host._export_mcu import McuConfig

    p.add_argument("run", help="run directory written by `edgetl train` or `edgetl pretrain`")
    add_options(p, ExportOptions)
    add_options(p, QuantizeConfig)
    add_options(p, McuConfig)
    p.add_argument("--out", required=True, help="bundle directory to create (NAME.edgetl)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--sign",
        metavar="PRIVATE_KEY",
        help="sign the manifest with this Ed25519 private key (PEM, PKCS#8; see `edgetl keygen`)",
    )


def _add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document instead of text (shape in docs/integration.md, 'Command output as JSON')",
    )


def _parser_bundle_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle")
    p.add_argument("--data", help="labelled data to measure each model's accuracy on")
    p.add_argument("--label-column", default="label")
    _add_trust_arg(p)
    _add_json_arg(p)


def _parser_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle")
    _add_trust_arg(p)
    _add_json_arg(p)


def _parser_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, .npy arrays (one example or a batch), or .npz with x"
    )
    _add_device_args(p)
    p.add_argument("--store", help="head store: predict with its active (personalized) head")
    p.add_argument("--top-k", type=int, default=3)
    _add_json_arg(p)


def _parser_personalize(p: argparse.ArgumentParser) -> None:
    """`personalize` flags: the option fields of what a personalization takes (edgetl._options)."""
    from edgetl._options import add_options

    p.add_argument("bundle")
    p.add_argument(
        "--data",
        required=True,
        help="labelled examples: image folder, .npz or .csv, as for training (one class is fine)",
    )
    p.add_argument("--label-column", default="label")
    p.add_argument("--store", required=True, help="head store directory (created if missing)")
    _add_device_args(p)
    for config in _personalize_configs():
        add_options(p, config)


def _personalize_configs() -> tuple[type, type, type]:
    """What `edgetl personalize` sets: the personalization's own options, head training, the guard."""
    from edgetl.device._guard import GuardPolicy
    from edgetl.device._head import TrainSettings
    from edgetl.device._personalizer import PersonalizeOptions

    return PersonalizeOptions, TrainSettings, GuardPolicy


def _parser_bench(p: argparse.ArgumentParser) -> None:
    _parser_bundle_data(p)
    p.add_argument(
        "--backend", choices=("onnxruntime", "litert", "auto"), help="default (or auto): every installed backend"
    )
    p.add_argument("--threads", type=int, help="runtime threads")
    p.add_argument("--runs", type=int, default=100, help="timed batch-1 predictions per configuration")
    p.add_argument(
        "--recommend",
        action="store_true",
        help="measure every backend x precision here and recommend the fastest within --budget of fp32 (cached)",
    )
    p.add_argument(
        "--budget", type=float, default=0.01, help="accuracy the recommendation may lose against fp32 (0.01 = 1 point)"
    )
    p.add_argument("--refresh", action="store_true", help="measure again instead of using the cached recommendation")


def _parser_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RUN|BUNDLE")
    p.add_argument("--out", help="HTML file (default: RUN/report.html or NAME.report.html beside the bundle)")
    p.add_argument(
        "--bench",
        nargs="?",
        const="run",
        help="include a benchmark: a JSON file from `edgetl bench --json`, or no value to run one now (bundles)",
    )


def _parser_store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action", choices=("history", "verify", "rollback", "reset", "examples", "migrate", "forget", "trust")
    )
    p.add_argument(
        "target", nargs="?", metavar="BUNDLE|PUBKEY", help="migrate: the new bundle; trust: a public key (PEM)"
    )
    p.add_argument("--store", required=True)
    p.add_argument("--bundle", help="the store's bundle (needed only to verify it belongs to it)")
    p.add_argument("--label", help="forget: the class whose examples (and every head trained on them) are destroyed")
    p.add_argument("--all", action="store_true", help="forget: every kept example and every personalized head")
    p.add_argument("--backend", choices=("onnxruntime", "litert"), help="migrate: the runtime that retrains the head")
    _add_trust_arg(p)
    _add_json_arg(p)  # history, examples


def _parser_keygen(p: argparse.ArgumentParser) -> None:
    p.add_argument("--private", required=True, metavar="FILE", help="private key to write (PEM, PKCS#8, mode 0600)")
    p.add_argument(
        "--public",
        required=True,
        metavar="FILE",
        help="public key to write (PEM, SubjectPublicKeyInfo): give it to devices (--trust)",
    )
    p.add_argument("--overwrite", action="store_true")


# ----------------------------------------------------------------------------- commands


def _run_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from edgetl.host import run_demo
    from edgetl.host._demo import SOURCE

    if args.seeds < 1:
        raise InputError(f"--seeds must be at least 1, received {args.seeds}")
    if args.source_images < 200:
        raise InputError(f"--source-images must be at least 200, received {args.source_images}")
    run_demo(args.out, seeds=tuple(range(args.seeds)), source=replace(SOURCE, images=args.source_images))
    return 0


def _run_backbones(args: argparse.Namespace) -> int:
    from edgetl.host import get_recipe, list_backbones

    print(f"{'name':<18} {'kind':<9} {'default input':<14} {'embedding':>9}  preprocessing")
    for name in list_backbones():
        r = get_recipe(name)
        print(
            f"{name:<18} {r.kind:<9} {'x'.join(map(str, r.default_input_shape)):<14} {r.embedding_size:>9}  "
            f"{r.preprocessing}"
        )
    return 0


def _run_layers(args: argparse.Namespace) -> int:
    from edgetl.host import describe_layers

    rows = describe_layers(args.model, cut_layer=args.cut_layer, safe_mode=not args.unsafe)
    print(f"{'layer':<32} {'class':<24} {'output shape':<22} {'params':>9}")
    for r in rows:
        params = "" if r["params"] is None else f"{r['params']:,}"
        print(f"{r['name']:<32} {r['class']:<24} {str(r['output_shape']):<22} {params:>9}  {r['note']}".rstrip())
    return 0


def _run_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # cheap check before any training
        raise InputError(f"run directory {str(out)!r} already exists; choose another --out or pass --overwrite")
    from edgetl import host
    from edgetl._options import build_config
    from edgetl.data import image_size_arg, load_for_shape

    if args.cpu_devices:
        host.configure_cpu_devices(args.cpu_devices)
    if getattr(args, "strategy", None) == "multi-worker":
        # Before anything touches TensorFlow's context (reading the backbone file's input
        # shape does): collective ops must be configured at program startup.
        from edgetl.host._transfer import make_strategy

        make_strategy("multi-worker")
    safe_mode = not getattr(args, "unsafe", False)
    computed = {"input_preprocessing": _preprocessing(args)} if args.command == "train" else {}
    config = build_config(host.TrainConfig, args, args.command, **computed)
    # The data at the backbone's input size and channels (files and runs report theirs).
    data = load_for_shape(
        args.data,
        host.input_shape_of(args.backbone, safe_mode=safe_mode),
        image_size=image_size_arg(args.image_size),
        channels=args.channels,
        label_column=args.label_column,
        streaming=config.streaming if args.command == "train" else "off",  # pretrain trains on arrays in memory
    )
    if args.command == "train" and config.streaming != "off":
        print(f"data: {data.loading}")
    print(f"data: {data.source}: {len(data)} examples, {data.num_classes} classes, input shape {data.input_shape}")
    if args.command == "pretrain":
        result = host.pretrain(data, config, verbose=0, progress=not args.quiet)
    else:
        result = host.train(data, config, safe_mode=safe_mode, verbose=0, progress=not args.quiet)
    host.save_run(result, out, kind=args.command, overwrite=args.overwrite)
    for line in result.describe():
        print(line)
    from edgetl.host._run import is_chief

    if config.strategy != "multi-worker" or is_chief():
        print(f"wrote {out}")
    else:
        print(f"worker done; the chief writes {out}")
    return 0


def _preprocessing(args: argparse.Namespace) -> Any:
    """--input-preprocessing PRESET, or a custom one from --input-scale/offset/mean/std."""
    from edgetl.host import InputPreprocessing

    custom = {
        k: v
        for k, v in (
            ("scale", args.input_scale),
            ("offset", args.input_offset),
            ("mean", args.input_mean),
            ("std", args.input_std),
        )
        if v is not None
    }
    if custom and args.input_preprocessing:
        raise InputError(
            f"give --input-preprocessing {args.input_preprocessing} or custom --input-scale/offset/mean/std, not both "
            f"(received {sorted(custom)})"
        )
    return InputPreprocessing(**custom) if custom else args.input_preprocessing


def _labelled_data(path: str | None, bundle: Any, label_column: str) -> tuple[Any, Any]:
    """(x, y) of ``--data`` for a bundle, its classes checked against the bundle's labels."""
    if not path:
        return None, None
    from edgetl.data import load_for_spec

    data = load_for_spec(path, bundle.input_spec, label_column, labels=bundle.labels)
    return data.x, data.y


def _run_export(args: argparse.Namespace) -> int:
    from edgetl import host
    from edgetl._options import build_config, option_values
    from edgetl.host._export import quantize_configs

    options = build_config(host.ExportOptions, args)
    quantize = quantize_configs([q.mode for q in options.quantize], **option_values(host.QuantizeConfig, args))
    mcu = None
    if "mcu" in options.targets:
        from edgetl.host._export_mcu import McuConfig

        mcu = build_config(McuConfig, args)
    signer = _private_key(args.sign) if args.sign else None
    with warnings.catch_warnings():  # the left-out files are printed below with the report
        warnings.simplefilter("ignore", QuantizedModelLeftOut)
        result = host.export_bundle(
            args.run, args.out, options, quantize=quantize, mcu=mcu, overwrite=args.overwrite, sign=signer
        )
    source = result.manifest["data"].get("calibration")
    print(f"data: {f'--calibration {args.calibration}' if source == 'given' else source}")
    print(result.describe())
    if not result.ok:
        print(
            f"no bundle written: {len(result.fatal)} check(s) failed"
            + ("" if args.strict else " (fp32 models and head graphs must pass)")
        )
        return EXIT_FAILED
    signed = f"; signed by key {result.signer}" if result.signer else ""
    print(
        f"wrote {result.bundle.path} in {result.timings['export_seconds']:.1f}s{signed}"
        + (f"; {len(result.omitted)} quantized configuration(s) left out" if result.omitted else "")
    )
    mcu_section = result.bundle.manifest.mcu
    if mcu_section:
        print(
            f"microcontroller: {mcu_section['model']} + C sources; TFLM arena {mcu_section['arena_bytes']:,} bytes, "
            f"flash {mcu_section['flash_bytes']['total']:,} bytes (edgetl_model.h, edgetl_head.h; "
            "docs/integration.md)"
        )
    return 0


def _private_key(path: str) -> Any:
    """The signing key; an encrypted one's passphrase from $EDGETL_KEY_PASSPHRASE, else asked
    on the terminal (a script without either gets an error saying so, not a hang)."""
    import getpass

    from edgetl.bundle import load_private_key

    try:
        return load_private_key(path)
    except InputError as exc:
        if "passphrase" not in str(exc):
            raise
    passphrase = os.environ.get("EDGETL_KEY_PASSPHRASE")
    if passphrase is None:
        if not sys.stdin.isatty():
            raise InputError(
                f"private key file {path!r} is encrypted and there is no terminal to ask for its passphrase: "
                "set EDGETL_KEY_PASSPHRASE"
            )
        passphrase = getpass.getpass(f"passphrase for {path}: ")
    return load_private_key(path, passphrase)


def _open_bundle(args: argparse.Namespace) -> Any:
    from edgetl.bundle import read_bundle

    return read_bundle(args.bundle, trust=args.trust)


def _run_verify(args: argparse.Namespace) -> int:
    from edgetl.device import verify_bundle

    bundle = _open_bundle(args)
    x, y = _labelled_data(args.data, bundle, args.label_column)
    report = verify_bundle(bundle, x, y)
    print(json.dumps(report.to_json(), indent=1) if args.json else report.describe())
    return 0 if report.ok else EXIT_FAILED


def _run_inspect(args: argparse.Namespace) -> int:
    bundle = _open_bundle(args)
    if args.json:
        doc = {"path": str(bundle.path), "signer": bundle.signer, "manifest": bundle.manifest.to_json()}
        print(json.dumps(doc, indent=1))
        return 0
    print(bundle.manifest.describe(str(bundle.path)))
    if bundle.signer:
        print(f"  signed by trusted key {bundle.signer}")
    return 0


def _classifier(args: argparse.Namespace, store: str | None = None) -> Any:
    from edgetl.device import Classifier

    return Classifier.open(
        args.bundle, backend=args.backend, precision=args.precision, store=store, threads=args.threads, trust=args.trust
    )


def _run_predict(args: argparse.Namespace) -> int:
    if args.store is not None and not Path(args.store).exists():  # never a silent fallback to the factory head
        raise InputError(
            f"store {args.store!r} does not exist; `edgetl personalize` creates it. Omit --store for the factory head"
        )
    from edgetl.data import read_inputs

    clf = _classifier(args, args.store)
    x, names = read_inputs(args.inputs, clf.input_shape)
    result = clf.predict(x, top_k=args.top_k)
    if args.json:
        doc = {
            "bundle": str(clf.bundle.path),
            "backend": clf.backend,
            "precision": clf.precision,
            "chosen_by_advisor": bool(clf.advice),
            "head_version": result.head_version,
            "predictions": [
                {"input": name, "top_k": [{"label": label, "probability": float(p)} for label, p in top]}
                for name, top in zip(names, result.top_k)
            ],
        }
        print(json.dumps(doc, indent=1))
        return 0
    chosen = " (chosen by the advisor: edgetl bench --recommend)" if clf.advice else ""
    print(f"# backend {clf.backend}, precision {clf.precision}{chosen}, head version {result.head_version}")
    for name, top in zip(names, result.top_k):
        print(f"{name}\t" + "\t".join(f"{label} {p:.4f}" for label, p in top))
    return 0


def _run_personalize(args: argparse.Namespace) -> int:
    from edgetl._options import build_config
    from edgetl.data import load_for_spec
    from edgetl.device import Personalizer

    options, settings, guard = (build_config(config, args) for config in _personalize_configs())
    clf = _classifier(args)
    data = load_for_spec(args.data, clf.bundle.input_spec, args.label_column, require_trainable=False)
    labels = [data.class_names[i] for i in data.y]
    p = Personalizer(
        clf,
        args.store,
        keep_examples=options.keep_examples,
        holdout_fraction=options.holdout_fraction,
        guard=guard,
        settings=settings,
    )
    from edgetl.device._tail import personalize

    known = set(clf.head.labels)
    result = personalize(p, data.x, labels, adapt=options.adapt, add_classes=options.add_classes)
    new = sorted(set(labels) - known)
    if "tail_unavailable" in result.evidence:
        print(f"head only: this bundle has no trainable tail ({result.evidence['tail_unavailable']})")
    elif options.adapt != "head":
        print(
            f"adapt {options.adapt}: judged the {result.evidence['adapt']}"
            + (f" ({result.evidence['auto']})" if "auto" in result.evidence else "")
        )
    print(
        f"{len(labels)} examples ({len(new)} new classes), backend {clf.backend}: held-out accuracy "
        f"{result.candidate_accuracy:.4f} (active head {result.active_accuracy:.4f})"
    )
    verdict, _, evidence = result.reason.partition(": ")  # "committed: <the counts behind it>"
    print(f"guard: {evidence}")
    print(f"{verdict}; active version {result.version}")
    return 0 if result.accepted else EXIT_REJECTED


def _run_bench(args: argparse.Namespace) -> int:
    from edgetl.device import advise, bench_bundle
    from edgetl.device._bench import format_table, to_json

    if args.runs < 5:
        raise InputError(f"--runs must be at least 5 for percentiles, received {args.runs}")
    bundle = _open_bundle(args)
    x, y = _labelled_data(args.data, bundle, args.label_column)
    data = (x, y) if x is not None else None
    if args.recommend:
        advice = advise(
            bundle, data=data, budget=args.budget, threads=args.threads, runs=args.runs, refresh=args.refresh
        )
        print(json.dumps(advice.to_json(), indent=2) if args.json else advice.describe())
        return 0
    backends = (args.backend,) if args.backend not in (None, "auto") else None
    result = bench_bundle(bundle, data=data, backends=backends, threads=args.threads, runs=args.runs)
    print(to_json(result) if args.json else format_table(result))
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from edgetl.host import write_report

    bench = None
    if args.bench == "run":
        from edgetl.bundle import read_bundle
        from edgetl.device import bench_bundle

        bench = bench_bundle(read_bundle(args.target), runs=30)
    elif args.bench:
        try:
            bench = json.loads(Path(args.bench).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"--bench {args.bench!r} is not a JSON file from `edgetl bench --json` ({exc})") from None
    print(f"wrote {write_report(args.target, args.out, bench=bench)}")
    return 0


def _run_store(args: argparse.Namespace) -> int:
    from edgetl.device import HeadStore

    if args.target is not None and args.action not in ("migrate", "trust"):  # a stray word is not ignored
        raise InputError(
            f"store {args.action} takes no BUNDLE|PUBKEY argument, received {args.target!r} (only migrate and trust do)"
        )
    bundle = None
    if args.bundle:
        from edgetl.bundle import read_bundle

        bundle = read_bundle(args.bundle, trust=args.trust)
    store = HeadStore(args.store, bundle)
    action = STORE_ACTIONS[args.action]
    return action(store, args)


def _store_history(store: Any, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({"active_version": store.active_version, "history": store.history()}, indent=1))
        return 0
    print(f"active version {store.active_version}")
    for h in store.history():
        metrics = dict(h.get("metrics") or {})
        guard = metrics.pop("guard", None)  # the counts behind the decision: printed as its reason
        extra = metrics or {k: h[k] for k in ("from", "kind", "versions_removed", "key_ids") if k in h}
        if "adapt" in (guard or {}):  # personalize --adapt tail|auto: what was trained and judged
            extra["adapt"] = guard["adapt"]
        reason = (guard or {}).get("reason") or h.get("reason") or metrics.get("reason")
        line = f"{h['time']}  v{h['version']:<4} {h['action']:<9} {json.dumps(extra)}"
        print(f"{line}\n{'':>28}reason: {reason}" if reason else line)
    return 0


def _store_verify(store: Any, args: argparse.Namespace) -> int:
    versions = store.verified_versions()  # SQLite's integrity check, then every version's sha256
    x, labels = store.kept_examples()  # every example's sha256
    print(f"active version {store.active_version}; stack {store.rollback_stack()}")
    tails = sorted(n for n, head in versions.items() if head.tail is not None)
    print(f"versions {sorted(versions)} verified" + (f" (with a trained tail layer: {tails})" if tails else ""))
    counts = {label: labels.count(label) for label in sorted(set(labels))}
    print(f"{len(labels)} kept examples verified: {json.dumps(counts)}")
    return 0


def _store_rollback(store: Any, args: argparse.Namespace) -> int:
    print(f"active version {store.rollback()}")
    return 0


def _store_reset(store: Any, args: argparse.Namespace) -> int:
    print(f"active version {store.reset()} (factory head)")
    return 0


def _store_examples(store: Any, args: argparse.Namespace) -> int:
    summary = store.example_summary()
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    if not summary["examples"]:
        print("no kept examples")
        return 0
    for label, info in summary["classes"].items():
        print(f"{label:<24} {info['count']:>6} examples {info['bytes']:>10,} bytes")
    print(f"total {summary['total_bytes']:,} bytes of a {summary['budget_bytes']:,}-byte budget")
    return 0


def _store_migrate(store: Any, args: argparse.Namespace) -> int:
    from edgetl.bundle import read_bundle
    from edgetl.device import migrate

    if not args.target:
        raise InputError("store migrate needs the new bundle: edgetl store migrate --store S NEW.edgetl")
    new = read_bundle(args.target, trust=args.trust)
    print(migrate(store, new, backend=args.backend, trust=args.trust).describe())
    return 0


def _store_forget(store: Any, args: argparse.Namespace) -> int:
    if bool(args.label) == bool(args.all):
        raise InputError("store forget takes exactly one of --label L or --all")
    done = store.forget(None if args.all else args.label)
    what = "everything personal" if args.all else f"class {args.label!r}"
    heads = f"head version(s) {done['versions']} destroyed" if done["versions"] else "no head version to destroy"
    print(f"forgot {what}: {done['examples']} kept example(s) destroyed, {heads}; active version {done['active']}")
    return 0


def _store_trust(store: Any, args: argparse.Namespace) -> int:
    keys = [args.target, *(args.trust or [])] if args.target else list(args.trust or [])
    if not keys:
        raise InputError("store trust needs a public key: edgetl store trust --store S vendor.pub")
    print(f"bundles this store migrates to must be signed by key(s) {', '.join(store.set_trust(keys))}")
    return 0


STORE_ACTIONS = {
    "history": _store_history,
    "verify": _store_verify,
    "rollback": _store_rollback,
    "reset": _store_reset,
    "examples": _store_examples,
    "migrate": _store_migrate,
    "forget": _store_forget,
    "trust": _store_trust,
}


def _run_keygen(args: argparse.Namespace) -> int:
    from edgetl.bundle import generate_keypair

    kid = generate_keypair(args.private, args.public, overwrite=args.overwrite)
    print(f"wrote {args.private} (keep it secret) and {args.public} (give it to devices: --trust); key id {kid}")
    return 0


# name -> (help, add the arguments, run). The order is the order of `edgetl --help`.
COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None] | None, Callable[[argparse.Namespace], int]]
] = {
    "demo": (
        "the whole story offline: pretrain on synthetic glyphs, transfer to handwritten digits vs from scratch, "
        "export, verify, personalize, migrate, report (2-3 minutes the first time, less once the pretrained backbone "
        "is cached)",
        _parser_demo,
        _run_demo,
    ),
    "pretrain": ("train a built-in backbone on a source task (all layers)", _parser_pretrain, _run_train),
    "train": (
        "transfer a backbone to a target task: head fitted to convergence, then optional fine-tuning",
        _parser_train,
        _run_train,
    ),
    "backbones": ("list registered backbones with input size and embedding size", None, _run_backbones),
    "layers": (
        "list a Keras model file's layers with output shapes; marks where edgetl cuts the embedding",
        _parser_layers,
        _run_layers,
    ),
    "export": (
        "quantize a run and export a verified bundle (TFLite + ONNX); exit 1 when verification fails",
        _parser_export,
        _run_export,
    ),
    "keygen": ("make an Ed25519 key pair for signing bundles (PEM files)", _parser_keygen, _run_keygen),
    "verify": (
        "re-run a bundle's checks in onnxruntime and LiteRT (those installed); exit 1 on failure",
        _parser_bundle_data,
        _run_verify,
    ),
    "inspect": ("print a bundle's manifest as a readable summary", _parser_inspect, _run_inspect),
    "predict": ("classify inputs on the device runtime (no TensorFlow)", _parser_predict, _run_predict),
    "personalize": (
        "fine-tune the head on the device with labelled examples; guarded, crash-safe commit (exit 3 if the guard "
        "rejects the new head)",
        _parser_personalize,
        _run_personalize,
    ),
    "bench": (
        "latency, throughput, size, memory, accuracy and train-step time per backend x precision",
        _parser_bench,
        _run_bench,
    ),
    "report": ("one self-contained HTML page for a run or a bundle (works offline)", _parser_report, _run_report),
    "store": (
        "a head store: history, verify, rollback, reset, examples (kept), migrate (to a new bundle), forget, trust",
        _parser_store,
        _run_store,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetl",
        description="Transfer learning from the host to the edge. Host (TensorFlow): pretrain, train, layers, export, "
        "report, demo. Device (numpy + onnxruntime/LiteRT, no TensorFlow): predict, personalize, store, "
        "bench, verify, inspect.",
    )
    parser.add_argument("--version", action="version", version=f"edgetl {__version__}")
    parser.add_argument(
        "--verbose", action="store_true", help="show third-party logs (TensorFlow, converters, runtimes)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Global options work after the command too (`edgetl inspect B --verbose`); SUPPRESS
        # keeps the value given before the command when it is not repeated after it.
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if add_arguments is not None:
            add_arguments(p)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse takes "-1-1" (a preset name) for an option; bind it to its flag first.
    for i in range(len(argv) - 1):
        if argv[i] == "--input-preprocessing" and argv[i + 1].startswith("-"):
            argv[i : i + 2] = [f"--input-preprocessing={argv[i + 1]}"]
            break
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse binds `store`'s optional TARGET before it sees options, so in `store migrate
    # --store S NEW` NEW is left over: it is the target.
    if args.command == "store" and args.target is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.target, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class ReportError(EdgeTLError):
    """Writing the command's report to stdout failed; what the command did before is done."""

    def __init__(self, exc: OSError) -> None:
        self.pipe_closed = exc.errno == errno.EPIPE
        super().__init__(
            f"the report could not be written to stdout ({exc.strerror or exc}); everything the command did before "
            "that is done (store changes are committed: `edgetl store history` shows them)"
        )


class _Stdout:
    """``sys.stdout`` whose failures become a :class:`ReportError`, never a traceback."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._guard(self._stream.write, text)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _guard(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as exc:
            # fd 1 -> /dev/null: the interpreter's final flush of the unwritten report then
            # fails nowhere (it would print "Exception ignored ... BrokenPipeError").
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass
            raise ReportError(exc) from None


# Library messages name the Python argument and its flag: "overwrite=True (--overwrite)",
# "cut_layer=NAME (--cut-layer)", "safe_mode=False / --unsafe", "image_size / --image-size".
_PYTHON_SPELLING = re.compile(
    r"\b[a-z_]+=(?P<value>[\w.]+) \((?P<flag>--[\w-]+(?: [A-Z]+)?)\)|\b[a-z_]+(?:=[\w.]+)? / (?P<slash>--[\w-]+)"
)


def cli_spelling(text: str) -> str:
    """``text`` as a command-line user reads it: the flag only ("pass --overwrite"), with the
    placeholder the Python spelling gave it when the flag has none ("--cut-layer NAME")."""

    def flag(m: re.Match) -> str:
        if m["slash"]:
            return m["slash"]
        placeholder = m["value"].isupper() and " " not in m["flag"]
        return f"{m['flag']} {m['value']}" if placeholder else m["flag"]

    return _PYTHON_SPELLING.sub(flag, text)


def _say(text: str) -> None:
    """Write an error message to stderr; a failing stderr is not worth a traceback either."""
    try:
        print(cli_spelling(text), file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


SKIPS_SHOWN = 10  # skipped files listed one by one; the rest are counted
# edgetl.data.SKIPPED_SUMMARY, matched here without importing the data module (numpy) for every command
SKIPPED_COUNT = re.compile(r"skipped \d+ file\(s\) that are not readable images$")


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Library warnings as edgetl's own one-line messages on stderr (no source line). Of the
    files a folder's loading skips, the first SKIPS_SHOWN are listed; the loader's count of them
    (said where the data is loaded) then tells how many were not."""
    seen = 0

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        nonlocal seen
        text = str(message)
        if text.startswith("skipping "):
            seen += 1
            if seen > SKIPS_SHOWN:
                return
        elif SKIPPED_COUNT.search(text):  # a folder loaded: its count closes its list
            text += f" ({seen - SKIPS_SHOWN} not listed)" if seen > SKIPS_SHOWN else ""
            seen = 0
        print(f"edgetl: warning: {cli_spelling(text)}", file=sys.stderr)

    with warnings.catch_warnings():  # restores showwarning; the filters (quiet third parties) stay
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help exits 0, usage errors exit 2
        return int(exc.code or 0)
    from edgetl._quiet import set_verbose

    set_verbose(args.verbose)
    stdout, sys.stdout = sys.stdout, _Stdout(sys.stdout)
    try:
        with _warnings_as_lines():
            code = COMMANDS[args.command][2](args)
        sys.stdout.flush()  # a failing stdout fails here, inside the handlers below
        return code
    except ReportError as exc:
        if exc.pipe_closed:  # the reader closed the pipe (`| head -2`): it wanted no more
            return 0
        _say(f"edgetl {args.command}: error: {exc}")
        return EXIT_ERROR
    except EdgeTLError as exc:
        _say(f"edgetl {args.command}: error: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception:  # unexpected: show everything, still exit non-zero
        traceback.print_exc()
        return EXIT_FAILED
    finally:
        sys.stdout = stdout


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
