"""Settings declared once, as dataclass fields: what every config of msd_fast (pretraining, the fine-tuning recipe,
FedAvg, the demo, each command) is made of. Library code declares its settings here; :mod:`msd_fast.cli.flags`
turns them into command-line flags.

* :func:`flag` declares a field with its default and help text (and, where needed, ``choices``, ``required``,
  ``positional``, ``parse`` for a custom value type, ``exclusive`` for a mutually exclusive group,
  ``default_text`` describing a ``None`` default, ``deprecated`` aliases).
* :func:`compose` adds the settings of other dataclasses to a config (:class:`Part`: which fields, renamed and with
  other defaults where the composing config needs them) -- one argument group each in ``--help`` -- and
  :func:`build_part` builds the composed dataclass back from the config, so its own ``__post_init__`` checks the
  values (its messages then name the composing config's flags).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Callable, Optional


def flag(default, help: str, **extra):
    """A dataclass field that becomes a flag: its default, help text and extras (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def flag_name(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def quick_flag(sizes: str):
    """The one smoke-test switch every command that has one declares (``--quick``; ``--fast`` is its deprecated
    alias), ``sizes`` saying what it shrinks."""
    return flag(False, f"smoke-test sizes: {sizes}", deprecated=("--fast",))


@dataclasses.dataclass(frozen=True)
class Part:
    """The settings of dataclass ``source`` that a composing config takes as its own fields.

    ``include`` (default: every field) less ``exclude``; ``rename`` maps a source field to the composing config's
    field (its flag); ``defaults``, ``helps`` and ``default_texts`` replace the source's default, help text and
    description of the default of a field. ``title`` heads the argument group in ``--help``.
    """

    source: type
    title: str
    include: Optional[tuple] = None
    exclude: tuple = ()
    rename: dict = dataclasses.field(default_factory=dict)
    defaults: dict = dataclasses.field(default_factory=dict)
    helps: dict = dataclasses.field(default_factory=dict)
    default_texts: dict = dataclasses.field(default_factory=dict)

    def names(self) -> dict:
        """``{source field: composing config's field}`` of the settings taken, in the source's order."""
        fields = [f.name for f in dataclasses.fields(self.source)]
        unknown = set(self.include or ()) | set(self.exclude) | set(self.rename) | set(self.defaults) | \
            set(self.helps) | set(self.default_texts)
        if unknown - set(fields):
            raise TypeError(f"{self.source.__name__} has no field(s) {sorted(unknown - set(fields))}")
        return {name: self.rename.get(name, name) for name in fields
                if (self.include is None or name in self.include) and name not in self.exclude}

    def rename_message(self, message: str) -> str:
        """A message of the source naming its settings (``lr must ...``, ``--batch-size must ...``) with the
        composing config's flags instead (``--finetune-lr must ...``, ``--pretrain-batch-size must ...``)."""
        names = self.names()

        def flag_of(found: re.Match) -> str:
            name = found[1].replace("-", "_")
            return flag_name(names[name]) if name in names else found[0]
        message = re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", flag_of, message)
        bare = re.match(r"([a-z][a-z0-9_]*)\b", message)
        if bare and bare[1] in names:
            message = flag_name(names[bare[1]]) + message[bare.end():]
        return message


def compose(*parts: Part) -> Callable[[type], type]:
    """Class decorator, applied *below* ``@dataclasses.dataclass``: add every part's settings as fields of the class
    (after its own), with the part's defaults and help text, grouped under the part's title in ``--help``."""
    def decorate(cls: type) -> type:
        if dataclasses.is_dataclass(cls):
            raise TypeError(f"@compose must come below @dataclasses.dataclass on {cls.__name__}")
        annotations = cls.__dict__.get("__annotations__")
        if annotations is None:
            annotations = {}
            cls.__annotations__ = annotations
        for part in parts:
            hints = typing.get_type_hints(part.source)
            source_fields = {f.name: f for f in dataclasses.fields(part.source)}
            for name, own in part.names().items():
                if own in annotations:
                    raise TypeError(f"{cls.__name__}.{own} is declared twice (own field and {part.source.__name__})")
                field = source_fields[name]
                metadata = {**field.metadata, "group": part.title, "help": part.helps.get(name, field.metadata.get(
                    "help", ""))}
                if name in part.defaults:
                    metadata.pop("default_text", None)
                if name in part.default_texts:
                    metadata["default_text"] = part.default_texts[name]
                if "exclusive" in metadata:
                    metadata["exclusive"] = f"{part.title}: {metadata['exclusive']}"
                annotations[own] = hints[name]
                default = part.defaults.get(name, field.default)
                if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
                    setattr(cls, own, dataclasses.field(default_factory=field.default_factory, metadata=metadata))
                else:
                    setattr(cls, own, dataclasses.field(default=default, metadata=metadata))
        cls.__parts__ = tuple(getattr(cls, "__parts__", ())) + parts
        return cls
    return decorate


def build_part(config, source: type, **changes):
    """The ``source`` dataclass that ``config`` composes, from ``config``'s values (``changes`` override them); a
    ``ValueError`` of its checks names ``config``'s flags."""
    part = next((p for p in getattr(type(config), "__parts__", ()) if p.source is source), None)
    if part is None:
        raise TypeError(f"{type(config).__name__} does not compose {source.__name__}")
    values = {name: getattr(config, own) for name, own in part.names().items()}
    try:
        return source(**(values | changes))
    except ValueError as error:
        raise ValueError(part.rename_message(str(error))) from error


def check_required(config) -> None:
    """Refuse a config built in Python without a ``required`` setting (on the command line argparse does it)."""
    for f in dataclasses.fields(config):
        if f.metadata.get("required") and getattr(config, f.name) is None:
            raise ValueError(f"{flag_name(f.name)} is required")
