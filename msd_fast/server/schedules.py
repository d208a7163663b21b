"""Per-iteration training schedules, precomputed as arrays and indexed by the global step (as DINO does)."""
from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int, *, warmup_epochs: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """float64 ``[epochs * steps_per_epoch]``: linear warm-up from ``warmup_start`` to ``base`` over
    ``warmup_epochs`` epochs, then a half cosine from ``base`` down (or up) to ``final`` at the last step."""
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {epochs} and {steps_per_epoch}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    steps = np.arange(epochs * steps_per_epoch - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps) - 1, 1)))
    return np.concatenate((warmup, cosine))
