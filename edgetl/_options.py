"""Command-line options declared on the config fields they set (stdlib only).

A config dataclass (``TrainConfig``, ``ExportOptions``, ``QuantizeConfig``) marks each field
a command exposes with :func:`option`: its flag (when it differs from the field's name),
help text and argparse settings live next to the field and its default, so the CLI, the
Python API and ``--help`` cannot drift apart. ``edgetl.cli`` turns them into arguments
(:func:`add_options`) and parsed arguments back into the config's keywords
(:func:`option_values`) or the config itself (:func:`build_config`).

    >>> @dataclass(frozen=True)
    ... class Config:
    ...     early_stopping_patience: int = option(5, flag="--patience", help="epochs without improvement")
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable, Iterator, Sequence, TypeVar

from edgetl.errors import InputError

T = TypeVar("T")

CLI = "edgetl.cli"  # the metadata key


def option(
    default: Any = MISSING,
    *,
    help: str | None = None,
    flag: str | None = None,
    commands: Sequence[str] | None = None,
    cli_default: Any = MISSING,
    to_config: Callable[[Any], Any] | None = None,
    **argparse_settings: Any,
) -> Any:
    """A dataclass field with a command-line option.

    Args:
        default: the field's default (also the option's, unless ``cli_default``).
        help: the option's help text.
        flag: the option's name; default ``--`` + the field name with ``-`` for ``_``.
        commands: the commands that take it (default: every command built from the class).
        cli_default: what argparse stores when the option is absent, when it differs from
            the field's default (e.g. ``"none"`` for a comma-separated list).
        to_config: turns the parsed value into the field's value (e.g. splits a list).
        **argparse_settings: ``type``, ``choices``, ``nargs``, ``metavar``, ``action``. A
            bool field is a ``store_true`` flag; an int or float default sets ``type``.
    """
    meta = {
        CLI: {
            "help": help,
            "flag": flag,
            "commands": tuple(commands) if commands is not None else None,
            "cli_default": cli_default,
            "to_config": to_config,
            "argparse": argparse_settings,
        }
    }
    return field(default=default, metadata=meta)


def cli_fields(cls: type, command: str | None = None) -> Iterator[tuple[Field, dict[str, Any]]]:
    """The fields of ``cls`` that ``command`` exposes, with their option settings, in field order."""
    for f in fields(cls):
        spec = f.metadata.get(CLI)
        if spec is not None and (command is None or spec["commands"] is None or command in spec["commands"]):
            yield f, spec


def flag_of(f: Field) -> str:
    return f.metadata[CLI]["flag"] or "--" + f.name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls: type, command: str | None = None) -> None:
    """One argument per option field of ``cls`` for ``command``; its value lands in ``args.<field name>``."""
    for f, spec in cli_fields(cls, command):
        settings = dict(spec["argparse"])
        default = f.default if spec["cli_default"] is MISSING else spec["cli_default"]
        if isinstance(default, bool) and "action" not in settings:
            settings["action"] = "store_false" if default else "store_true"
        elif type(default) in (int, float) and "type" not in settings and "action" not in settings:
            settings["type"] = type(default)
        flag = flag_of(f)
        if "action" not in settings and "choices" not in settings:  # named after the flag, as argparse would
            settings.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        parser.add_argument(flag, dest=f.name, default=default, help=spec["help"], **settings)


def option_values(cls: type, args: argparse.Namespace, command: str | None = None) -> dict[str, Any]:
    """The config keywords of ``cls`` given on the command line (``to_config`` applied)."""
    out = {}
    for f, spec in cli_fields(cls, command):
        value = getattr(args, f.name)
        out[f.name] = spec["to_config"](value) if spec["to_config"] is not None else value
    return out


def build_config(cls: type[T], args: argparse.Namespace, command: str | None = None, **values: Any) -> T:
    """``cls`` built from the command line (``values`` set fields the CLI computes itself).

    The config checks its values; when it refuses one whose flag is not spelled like the
    field (``--holdout`` sets ``holdout_fraction``), the message names the flag as well, so a
    user reads the word they typed.
    """
    try:
        return cls(**{**option_values(cls, args, command), **values})
    except InputError as exc:
        renamed = [
            f"{flag_of(f)} sets {f.name}"
            for f, _ in cli_fields(cls, command)
            if flag_of(f) != "--" + f.name.replace("_", "-") and f.name in str(exc)
        ]
        if renamed:
            exc.args = (f"{exc} ({'; '.join(renamed)})", *exc.args[1:])
        raise


def comma_list(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``: how the CLI spells a list."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(v.strip() for v in items if v.strip())
