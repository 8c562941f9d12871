"""CLI options come from the config dataclasses' field metadata (edgetl._options): every
option field is a flag with its help, parsed values become the same config the Python API
builds, and a field that is neither an option nor marked API-only fails here. No training:
these run in well under a second."""

from __future__ import annotations

import argparse

import pytest

from edgetl._options import cli_fields, flag_of, option_values
from edgetl.cli import build_parser, main, parse_args
from edgetl.device import GuardPolicy, TrainSettings
from edgetl.device._personalizer import PersonalizeOptions
from edgetl.errors import InputError
from edgetl.host import Augmentation, ExportOptions, QuantizeConfig, TrainConfig
from edgetl.host._export import quantize_configs
from edgetl.host._export_mcu import McuConfig

# Fields the Python API takes but no command exposes (each for a reason the field's docs give).
API_ONLY = {
    TrainConfig: {"standardize_embeddings", "head_solver", "cache_embeddings"},
    ExportOptions: {"name", "mcu"},  # name: from --out; mcu: McuConfig's own options
    QuantizeConfig: {"mode"},  # from --quantize (one config per mode)
    McuConfig: {"replay_per_class"},
    TrainSettings: {"momentum", "seed"},  # the contract's momentum; the seed fixes the batch order clients reproduce
    GuardPolicy: set(),
    PersonalizeOptions: set(),
}
PERSONALIZE = [PersonalizeOptions, TrainSettings, GuardPolicy]
COMMANDS = {
    "train": [TrainConfig],
    "pretrain": [TrainConfig],
    "export": [ExportOptions, QuantizeConfig, McuConfig],
    "personalize": PERSONALIZE,
}


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("cls", list(API_ONLY))
def test_every_field_is_an_option_or_api_only(cls):
    from dataclasses import fields

    options = {f.name for f, _ in cli_fields(cls)}
    undecided = {f.name for f in fields(cls)} - options - API_ONLY[cls]
    assert not undecided, f"{cls.__name__}: give these fields option(...) or list them in API_ONLY: {undecided}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_option_field_is_a_flag_with_its_help(command):
    help_text = "".join(_subparser(command).format_help().split())  # argparse wraps lines (and at hyphens)
    actions = {a.dest: a for a in _subparser(command)._actions}
    for cls in COMMANDS[command]:
        for f, spec in cli_fields(cls, command):
            assert flag_of(f) in actions[f.name].option_strings, (command, f.name)
            if spec["help"]:
                assert "".join(spec["help"].replace("%(default)s", str(f.default)).split()) in help_text
    train_only = {f.name for f, spec in cli_fields(TrainConfig) if spec["commands"] == ("train",)}
    assert train_only and (train_only <= set(actions)) == (command == "train")


def test_train_flags_build_the_config_the_api_builds():
    args = parse_args(
        ["train", "--data", "d", "--out", "o", "--patience", "3", "--augment", "--no-embedding-cache", "--head-C",
         "2", "--streaming", "on", "--input-preprocessing", "-1-1", "--epochs", "7"]
    )  # fmt: skip
    config = TrainConfig(**option_values(TrainConfig, args, "train"))
    assert config == TrainConfig(
        early_stopping_patience=3,
        augmentation=Augmentation(),
        embedding_cache=False,
        head_C=2.0,
        streaming="on",
        input_preprocessing="-1-1",
        epochs=7,
    )
    defaults = parse_args(["pretrain", "--data", "d", "--out", "o"])
    assert TrainConfig(**option_values(TrainConfig, defaults, "pretrain")) == TrainConfig()


def test_export_flags_build_the_options_the_api_builds():
    args = parse_args(
        ["export", "run", "--out", "o.edgetl", "--quantize", "int8, qat", "--format", "onnx", "--target", "mcu",
         "--bundle-version", "7", "--image-size", "32", "24", "--io-dtype", "int8", "--qat-epochs", "3", "--strict"]
    )  # fmt: skip
    options = ExportOptions(**option_values(ExportOptions, args))
    assert options == ExportOptions(
        quantize=("int8", "qat"), formats=("onnx",), targets=("mcu",), version="7", image_size=(32, 24), strict=True
    )
    configs = quantize_configs([q.mode for q in options.quantize], **option_values(QuantizeConfig, args))
    assert configs == [
        QuantizeConfig("int8", io_dtype="int8", qat_epochs=3),
        QuantizeConfig("qat", io_dtype="int8", qat_epochs=3),
    ]
    assert McuConfig(**option_values(McuConfig, args)) == McuConfig()  # KB on the command line, bytes in the config
    small = parse_args(["export", "run", "--out", "o", "--mcu-flash-limit", "64", "--mcu-arena-limit", "32"])
    assert McuConfig(**option_values(McuConfig, small)) == McuConfig(flash_limit=64 << 10, arena_limit=32 << 10)
    defaults = parse_args(["export", "run", "--out", "o.edgetl"])
    assert ExportOptions(**option_values(ExportOptions, defaults)) == ExportOptions()
    # integer I/O only where it exists: the float presets keep float32
    assert quantize_configs(["none", "int8"], io_dtype="uint8")[0].io_dtype == "float32"


def test_export_options_one_object_or_keywords():
    assert ExportOptions.of(None, quantize=["int8"], formats=["onnx"]) == ExportOptions(
        quantize=("int8",), formats=("onnx",)
    )
    base = ExportOptions(strict=True, opset=13)
    assert ExportOptions.of(base, opset=17) == ExportOptions(strict=True, opset=17)
    assert ExportOptions(quantize="int8").quantize == (QuantizeConfig("int8"),)  # one preset for a list
    with pytest.raises(InputError, match=r"unknown export option\(s\) \['quantise'\]"):
        ExportOptions.of(None, quantise=["int8"])
    for bad, message in (
        ({"formats": ["coreml"]}, "formats must be a non-empty subset"),
        ({"formats": []}, "formats must be a non-empty subset"),
        ({"opset": 9}, "opset must be in 13..21"),
        ({"targets": ["gpu"]}, "targets must be a list of"),
        ({"quantize": ["int4"]}, "quantize mode must be one of"),
    ):
        with pytest.raises(InputError, match=message):
            ExportOptions(**bad)
    with pytest.raises(InputError, match="options must be an ExportOptions"):
        ExportOptions.of({"strict": True})


PERSONALIZE_ARGS = ["personalize", "b.edgetl", "--data", "d", "--store", "s"]


def test_personalize_flags_build_the_configs_the_api_builds():
    """Every flag README types keeps its name; the values land in the library's dataclasses."""
    args = parse_args(
        [*PERSONALIZE_ARGS, "--no-keep-examples", "--add-classes", "--adapt", "auto", "--holdout", "0.4",
         "--epochs", "9", "--batch-size", "4", "--learning-rate", "0.01", "--optimizer", "adam", "--l2", "0.5",
         "--alpha", "0.1", "--forget-margin", "0.02", "--margin", "1", "--mislabel", "warn"]
    )  # fmt: skip
    assert PersonalizeOptions(**option_values(PersonalizeOptions, args)) == PersonalizeOptions(
        keep_examples=False, add_classes=True, adapt="auto", holdout_fraction=0.4
    )
    assert TrainSettings(**option_values(TrainSettings, args)) == TrainSettings(
        epochs=9, batch_size=4, learning_rate=0.01, optimizer="adam", l2=0.5
    )
    assert GuardPolicy(**option_values(GuardPolicy, args)) == GuardPolicy(
        alpha=0.1, forget_tolerance=0.02, user_tolerance=1.0, mislabel="warn"
    )


def test_personalize_defaults_are_the_dataclass_defaults():
    args = parse_args(PERSONALIZE_ARGS)
    for cls in PERSONALIZE:
        assert cls(**option_values(cls, args)) == cls(), cls.__name__
    # the numbers behind them, so a default changed in one place shows here
    assert (args.holdout_fraction, args.epochs, args.user_tolerance, args.forget_tolerance, args.alpha) == (
        PersonalizeOptions.holdout_fraction,
        TrainSettings.epochs,
        GuardPolicy.user_tolerance,
        GuardPolicy.forget_tolerance,
        GuardPolicy.alpha,
    )
    assert args.keep_examples is True and args.add_classes is False and args.adapt == "head"


@pytest.mark.parametrize("cls", PERSONALIZE)
def test_a_field_added_to_a_personalize_config_becomes_a_flag(cls, monkeypatch):
    """The personalize parser is built from the dataclasses, not written out: a subclass with
    one more option field, put where the CLI looks, gives `personalize` one more flag."""
    from dataclasses import dataclass

    from edgetl._options import option

    module = __import__(cls.__module__, fromlist=[cls.__name__])

    @dataclass(frozen=True)
    class Extended(cls):
        warmup_steps: int = option(3, help="an option field added for this test")

    monkeypatch.setattr(module, cls.__name__, Extended)
    help_text = _subparser("personalize").format_help()
    assert "--warmup-steps" in help_text and "an option field added for this test" in help_text
    assert parse_args(PERSONALIZE_ARGS).warmup_steps == 3
    args = parse_args([*PERSONALIZE_ARGS, "--warmup-steps", "7"])
    assert option_values(Extended, args)["warmup_steps"] == 7


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--epochs", "0"], ["epochs=0", "must be a positive integer"]),
        (["--epochs", "two"], ["--epochs", "'two'", "invalid int value"]),
        (["--optimizer", "rmsprop"], ["--optimizer", "'rmsprop'", "choose from", "sgd", "adam"]),
        (["--adapt", "sideways"], ["--adapt", "'sideways'", "choose from", "head", "tail", "auto"]),
        (["--mislabel", "ignore"], ["--mislabel", "'ignore'", "choose from", "refuse", "warn", "off"]),
        (["--learning-rate", "50"], ["received 50.0", "must be in (0, 10)"]),
        (["--holdout", "1.5"], ["received 1.5", "must be in [0, 1)", "(--holdout sets holdout_fraction)"]),
        (["--margin", "-0.1"], ["received -0.1", "must be in [0, 1]", "(--margin sets user_tolerance)"]),
        (["--forget-margin", "2"], ["received 2.0", "must be in [0, 1]", "(--forget-margin sets forget_tolerance)"]),
        (["--alpha", "1"], ["received 1.0", "alpha must be in (0, 1)"]),
    ],
)
def test_personalize_refuses_a_bad_value_naming_what_it_received_and_allows(flags, said, capsys):
    """Checked before the bundle is opened (there is none here): exit 2 and one line saying
    what was received and what is allowed, naming the flag typed when the field differs."""
    assert main([*PERSONALIZE_ARGS, *flags]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse prints its usage above
    assert last.startswith("edgetl personalize: error: ") and all(part in last for part in said), err
    assert "Traceback" not in err
