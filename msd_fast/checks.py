"""Checks shared by every command, run before any work starts (see also :mod:`msd_fast.cli.paths` for ``--out``),
and :func:`require`, the one way a settings dataclass refuses a value, naming its flag."""
from __future__ import annotations

from typing import Any, Callable

import torch


def is_positive_int(value: Any) -> bool:
    """An ``int`` >= 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def require(config: Any, name: str, valid: Callable[[Any], bool], requirement: str) -> None:
    """A ``ValueError`` ``--name must be <requirement>, got <value>`` unless ``valid(config.name)`` (comparisons
    with NaN are false: NaN never passes)."""
    value = getattr(config, name)
    if not valid(value):
        raise ValueError(f"--{name.replace('_', '-')} must be {requirement}, got {value}")


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """``auto`` (a GPU when one is visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a device that exists
    here; anything else is a ``ValueError`` naming ``flag``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag}: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {name}: no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def check_command(config: Any) -> None:
    """The checks every command shares: its ``--device`` (when it has one) exists here."""
    if isinstance(getattr(config, "device", None), str):
        resolve_device(config.device)
