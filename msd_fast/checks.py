"""Checks shared by every command, run before any work starts (see also :mod:`msd_fast.cli.paths` for ``--out``)."""
from __future__ import annotations

import argparse

import torch


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


def check_command(args: argparse.Namespace) -> None:
    """The checks every command shares: its ``--device`` exists here."""
    if isinstance(getattr(args, "device", None), str):
        resolve_device(args.device)
