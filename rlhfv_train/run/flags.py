"""Command-line flags generated from a config dataclass, so that a new trainer option is one field.

A field declared with `option(default, help)` becomes `--field-name` (underscores as dashes) with the field's type
and default; a bool that defaults to False becomes a switch `--field-name`, one that defaults to True the switch
`--no-field-name`; a `tuple[int, ...]` (or float, str) takes one or more values. Fields declared without `option` (e.g. `stop_after`, a test hook) have no flag. Metadata:
  flag      the flag's name when it is not the field's, e.g. "--judge-model"
  short     a one-letter alias, e.g. "-k"
  choices   the allowed values (argparse checks them)
  unset     the flag's default is None, and the config's value is decided from the other flags (e.g. a preset or
            the embedded tiny model); the field's own default applies when nothing decides it
  exclusive the name of a group of flags of which at most one may be given
  interval  the values allowed, as a mathematician writes them: "(0, inf)", "[0, 1]", "(0, inf]" (check_values; a
            float option without one must be finite, NaN is never allowed)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

from .cli import HelpFormatter

_TYPES = {"int": int, "float": float, "str": str}


def option(default: Any, help: str, **metadata) -> Any:
    """A config field with a command-line flag (see the module docstring for `metadata`)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _value_type(field: dataclasses.Field) -> tuple[type | None, str | None]:
    """(int / float / str from the field's annotation, `x | None` included, or None for a bool; "+" for a tuple of
    them, else None)."""
    annotation = field.type.__name__ if isinstance(field.type, type) else str(field.type)
    names = [part.strip() for part in annotation.split("|") if part.strip() != "None"]
    if names == ["bool"]:
        return None, None
    nargs = None
    if len(names) == 1 and names[0].startswith("tuple[") and names[0].endswith(", ...]"):
        names, nargs = [names[0][len("tuple["):-len(", ...]")]], "+"
    if len(names) != 1 or names[0] not in _TYPES:
        raise TypeError(f"{field.name}: option() fields are int, float, str or bool (optionally | None), or a "
                        f"tuple[int, ...] of them, got {field.type!r}")
    return _TYPES[names[0]], nargs


def flag_fields(config_class) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_class) if "help" in f.metadata]


def flag_name(field: dataclasses.Field) -> str:
    if "flag" in field.metadata:
        return field.metadata["flag"]
    name = field.name.replace("_", "-")
    return f"--no-{name}" if _value_type(field)[0] is None and field.default is True else f"--{name}"


def add_flags(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per option() field of `config_class`, in declaration order."""
    groups: dict[str, Any] = {}
    for field in flag_fields(config_class):
        meta = field.metadata
        target = parser
        if "exclusive" in meta:
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["exclusive"]]
        names = [meta["short"], flag_name(field)] if "short" in meta else [flag_name(field)]
        kwargs: dict[str, Any] = {"dest": field.name, "help": meta["help"]}
        value_type, nargs = _value_type(field)
        if value_type is None:
            kwargs.update(action="store_false" if field.default is True else "store_true")
        else:
            kwargs.update(type=value_type, default=None if meta.get("unset") else field.default)
            if nargs:
                kwargs["nargs"] = nargs
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
        target.add_argument(*names, **kwargs)


def build_parser(config_class, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_flags(parser, config_class)
    return parser


def given_values(config_class, args: argparse.Namespace) -> dict:
    """The config values the command line sets: every flag's value, except `unset` flags left out (None), which
    the caller decides (or leaves to the field's default)."""
    values = {}
    for field in flag_fields(config_class):
        value = getattr(args, field.name)
        if not (field.metadata.get("unset") and value is None):
            values[field.name] = value
    return values


def _within(value, interval: str) -> bool:
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below  # NaN compares false: never within


def check_values(config) -> None:
    """Refuses an option value outside its field's `interval`, or a float option that is NaN or infinite where its
    interval does not admit it (a diverging learning rate, a NaN clipping norm): ValueError naming the flag."""
    for field in flag_fields(type(config)):
        value = getattr(config, field.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        interval = field.metadata.get("interval")
        if interval is not None and not _within(value, interval):
            raise ValueError(f"{flag_name(field)} must be in {interval}, got {value!r}")
        if interval is None and isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag_name(field)} must be a finite number, got {value!r}")
