"""Command-line flags from the settings dataclasses (:mod:`msd_fast.settings`): :func:`add_dataclass_arguments`
turns a config into flags (one ``--snake-case`` flag per field, its default in the help; booleans get
``--x/--no-x``; composed parts in their own argument groups); :func:`dataclass_from_args` builds the config from the
parsed flags. Also the value types that only the command line parses (``S``/``HxW`` image sizes, integer lists).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any

from ..settings import flag_name

_PARSERS = {int: int, float: float, str: str}


# ---- value types ---------------------------------------------------------------------------------------------------

def image_size(text: str):
    """``S`` or ``HxW`` -> int or (H, W) (range checks are the config's, with :func:`~msd_fast.data.convert.check_image_size`)."""
    height, sep, width = text.lower().partition("x")
    try:
        return (int(height), int(width)) if sep else int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S or HxW (e.g. 64 or 64x96), got {text!r}") from None


def pixel_stats(text: str):
    """``V`` or ``V1,V2,V3`` (pixel units) -> a float or a list of floats (one per channel)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or one per channel (e.g. 127.5 or 120,115,110), "
                                         f"got {text!r}") from None
    return values[0] if len(values) == 1 else values


def int_list(text: str) -> tuple:
    """``1,10,100`` -> (1, 10, 100): positive integers."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# ---- composition ---------------------------------------------------------------------------------------------------

# ---- argparse ------------------------------------------------------------------------------------------------------

class DeprecatedAlias(argparse.Action):
    """A deprecated spelling of a boolean switch: sets it and prints one warning line naming the new flag."""

    def __init__(self, option_strings, dest, canonical: str, **kwargs):
        self.canonical = canonical
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.canonical}", file=sys.stderr)
        setattr(namespace, self.dest, True)


def _value_type(hint) -> Any:
    """``Optional[X]`` -> ``X``; other hints as they are."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def default_text(field: dataclasses.Field) -> str:
    """How ``--help`` shows a field's default: its ``default_text``, else the value (sequences comma-separated)."""
    if "default_text" in field.metadata:
        return field.metadata["default_text"]
    default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    if isinstance(default, (tuple, list)):
        return ",".join(map(str, default))
    return "none" if default is None else str(default)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of ``cls`` (composed parts in their own argument groups)."""
    hints = typing.get_type_hints(cls)
    groups: dict = {}
    exclusive: dict = {}
    for f in dataclasses.fields(cls):
        extra = dict(f.metadata)
        text = extra.pop("help", "").replace("%", "%%")
        title = extra.pop("group", None)
        if title is not None and title not in groups:
            groups[title] = parser.add_argument_group(title)
        container = groups[title] if title is not None else parser
        group_name = extra.pop("exclusive", None)
        if group_name is not None:
            if group_name not in exclusive:
                exclusive[group_name] = container.add_mutually_exclusive_group()
            container = exclusive[group_name]
        deprecated = extra.pop("deprecated", ())
        parse = extra.pop("parse", None)
        extra.pop("default_text", None)
        if extra.pop("positional", False):
            parser.add_argument(f.name, nargs="+", help=text, **extra)
            continue
        option = flag_name(f.name)
        value_type = _value_type(hints[f.name])
        if extra.get("required"):
            text = f"{text} (required)"
        if value_type is bool and parse is None:
            container.add_argument(option, action=argparse.BooleanOptionalAction, default=f.default,
                                   help=f"{text} (default: %(default)s)", **extra)
            for alias in deprecated:
                container.add_argument(alias, dest=f.name, action=DeprecatedAlias, canonical=option,
                                       help=f"deprecated alias of {option}")
            continue
        if parse is None and value_type not in _PARSERS:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {hints[f.name]!r} (give parse=...)")
        if not extra.get("required"):
            text = f"{text} (default: {default_text(f).replace('%', '%%')})"
        container.add_argument(option, type=parse or _PARSERS[value_type], default=f.default, help=text.strip(),
                               **extra)


def dataclass_from_args(cls, args: argparse.Namespace):
    """``cls`` from the parsed flags (its ``__post_init__`` checks them)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
