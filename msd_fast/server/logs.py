"""Training metrics: a JSON-lines log (one record per line, flushed as written) and a loss-curve PNG."""
from __future__ import annotations

import json
import os
import time

from ..atomic import save_figure


class MetricsLog:
    """Append-only JSONL: ``write(event=..., **values)`` adds ``{"time": ..., "event": ..., ...}``. Created 0600,
    like every other file of a run."""

    def __init__(self, path: str, *, append: bool):
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        fd = os.open(path, flags, 0o600)
        os.fchmod(fd, 0o600)  # a log created by an older version keeps its mode otherwise
        self._handle = os.fdopen(fd, "a" if append else "w", buffering=1)

    def write(self, **record) -> None:
        self._handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def close(self) -> None:
        self._handle.close()


def read_log(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def step_losses(records: list[dict]) -> tuple[list[int], list[float]]:
    """``(steps, losses)`` of the step records, in step order; a step logged twice (an epoch replayed after a
    resume) keeps its last value."""
    latest = {r["step"]: r["loss"] for r in records if r.get("event") == "step"}
    steps = sorted(latest)
    return steps, [latest[s] for s in steps]


def plot_loss_curve(log_path: str, png_path: str) -> None:
    """Write the loss curve (step losses and per-epoch means) of a training log to ``png_path`` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    steps, losses = step_losses(records)
    epochs = {r["epoch"]: r["loss"] for r in records if r.get("event") == "epoch"}
    steps_per_epoch = next((r["steps_per_epoch"] for r in records if r.get("event") == "start"), 1)
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    axis.plot(steps, losses, lw=0.8, alpha=0.6, label="step")
    if epochs:
        axis.plot([(e + 1) * steps_per_epoch - 1 for e in sorted(epochs)], [epochs[e] for e in sorted(epochs)],
                  "o-", lw=1.5, label="epoch mean")
    axis.set_xlabel("step")
    axis.set_ylabel("DINO loss")
    axis.set_title("masked sampling distillation")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, png_path)
