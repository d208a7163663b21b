"""Command-line flags from a dataclass: one ``--snake-case`` flag per field, its default and help from the field
(``field(metadata={"help": ..., "choices": ..., "positional": True})``); booleans get ``--x/--no-x``."""
from __future__ import annotations

import argparse
import dataclasses

_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float,
          "Optional[str]": str}


def flag(default, help: str, **extra):
    """A dataclass field that becomes a flag: its default, help text and argparse extras (``choices``, ...)."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        extra = dict(f.metadata)
        help_text = extra.pop("help", "")
        if extra.pop("positional", False):
            parser.add_argument(f.name, nargs="+", help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        if str(f.type) == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        parser.add_argument(flag, type=_TYPES[str(f.type)], default=f.default,
                            help=f"{help_text} (default: {f.default})".strip(), **extra)


def dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
