"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True`` (no pickled
code runs). They hold the key's public fingerprint, never the key."""
from __future__ import annotations

import torch

from ..atomic import atomic_write

CHECKPOINT_FORMAT = "msd_fast.pretrain-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` (tensors and plain Python values) to ``path`` atomically; an older file stays intact until
    the new one is complete."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; ``ValueError`` naming the file if it is not one."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises several types for foreign/corrupt files
        raise ValueError(f"{path} is not a readable msd_fast checkpoint ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an msd_fast pretraining checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {state.get('version')!r}")
    return state
