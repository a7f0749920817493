"""Command-line options that can also come from a TOML file and environment variables.

Each role's options are one dataclass whose fields carry their help text. :func:`parse_options` builds an
argparse parser from it and merges, in increasing priority: field defaults < ``--config FILE`` (TOML, keys are the
field names, dashes or underscores) < environment variables ``SWARMTRAIN_<FIELD>`` < command-line flags. Any bad
value raises :class:`OptionsError` naming the option and where it came from.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import typing
from typing import Any, Mapping, Optional, Sequence, TypeVar

T = TypeVar("T")
ENV_PREFIX = "SWARMTRAIN_"


class OptionsError(ValueError):
    """A bad option value, config file or environment variable (the CLI exits with code 2)."""


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with help text (``short`` adds a short flag, ``choices`` restricts values)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of the dataclass ``cls`` (defaults are left unset so that sources can merge)."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with any of these options (keys as below)")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.metadata.get("hidden"):
            continue
        kind = _base_type(hints[field.name])
        flags = [f"--{field.name.replace('_', '-')}"] + ([field.metadata["short"]] if "short" in field.metadata else [])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        env = ENV_PREFIX + field.name.upper()
        help_text = f"{field.metadata.get('help', '')} [default: {_show(default)}; env {env}]"
        if kind is bool:
            parser.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is list:
            parser.add_argument(*flags, dest=field.name, nargs="+", default=None, metavar="VALUE", help=help_text)
        else:
            parser.add_argument(
                *flags, dest=field.name, default=None, metavar=field.name.upper(), help=help_text,
                choices=field.metadata.get("choices"),
            )


def build_options(
    cls: type[T], namespace: argparse.Namespace, env: Mapping[str, str] = os.environ
) -> T:
    """Merge defaults < TOML (--config) < environment < flags into an instance of ``cls``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, tuple[Any, str]] = {}
    config_path = getattr(namespace, "config", None) or env.get(ENV_PREFIX + "CONFIG")
    if config_path:
        for key, value in _read_toml(config_path).items():
            name = key.replace("-", "_")
            if name not in names:
                raise OptionsError(f"unknown option {key!r} in config file {config_path}")
            values[name] = (value, f"config file {config_path}")
    for name in names:
        if ENV_PREFIX + name.upper() in env:
            values[name] = (env[ENV_PREFIX + name.upper()], f"environment variable {ENV_PREFIX + name.upper()}")
        flag_value = getattr(namespace, name, None)
        if flag_value is not None:
            values[name] = (flag_value, f"--{name.replace('_', '-')}")
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in values:
            raw, source = values[field.name]
            kwargs[field.name] = _convert(raw, hints[field.name], field, source)
    if config_path and "config" in names:
        kwargs["config"] = config_path
    return cls(**kwargs)


def parse_options(cls: type[T], argv: Optional[Sequence[str]], prog: str, description: str) -> T:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_options(parser, cls)
    return build_options(cls, parser.parse_args(argv))


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise OptionsError(f"config file {path!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise OptionsError(f"config file {path!r} is not valid TOML: {e}") from None
    except OSError as e:
        raise OptionsError(f"cannot read config file {path!r}: {e}") from None


def _base_type(hint: Any) -> type:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return list
    if origin is dict:
        return dict
    return hint


def _convert(raw: Any, hint: Any, field: dataclasses.Field, source: str) -> Any:
    kind = _base_type(hint)
    name = f"--{field.name.replace('_', '-')}"
    try:
        if raw is None:
            return None
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if kind is list:
            items = raw if isinstance(raw, (list, tuple)) else str(raw).replace(",", " ").split()
            out = []
            for item in items:  # "text,image" and "text image" both work
                out.extend(part for part in str(item).split(",") if part)
            return out
        if kind is dict:
            if not isinstance(raw, dict):
                raise ValueError("expected a TOML table")
            return raw
        if kind is int:
            if isinstance(raw, float) or isinstance(raw, bool):
                raise ValueError("expected an integer")
            return int(raw)
        if kind is float:
            value = float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError("expected a finite number")
            return value
        value = str(raw)
        choices = field.metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value
    except (TypeError, ValueError) as e:
        raise OptionsError(f"bad value {raw!r} for {name} (from {source}): {e}") from None


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)
