"""The bookkeeping of a pretraining run, apart from the training itself: the progress bar, the JSON-lines log, the
per-epoch checkpoint and loss curve (main process only), and the test of the end that every process holds the same
weights. Nothing in here changes what is trained."""
from __future__ import annotations

import hashlib
import os
import time
from typing import Optional

from torch import nn

from . import distributed
from .checkpoint import save_checkpoint
from .config import PretrainConfig
from .logs import MetricsLog, plot_loss_curve

LOG_NAME = "log.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"


def weight_digest(model: nn.Module) -> int:
    """A 52-bit digest of every parameter's bytes (exact as a float64): equal digests mean identical weights."""
    digest = hashlib.blake2b(digest_size=8)
    for param in model.parameters():
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 12


class StepTimer:
    """``images_per_s`` of the ``steps`` steps between :meth:`start` and :meth:`stop` (``batch_size`` global images
    each); :meth:`stop` follows a read of their losses, so the device has finished them."""

    def __init__(self, batch_size: int):
        self.batch_size, self._tick = batch_size, 0.0

    def start(self) -> None:
        self._tick = time.perf_counter()

    def stop(self, steps: int = 1) -> float:
        return steps * self.batch_size / (time.perf_counter() - self._tick)


class RunRecorder:
    """Records one run. On the main process: ``log.jsonl`` (start, step, epoch and end events; appended to on
    ``--resume``), a tqdm bar with ``config.progress``, and after every epoch the checkpoint and ``loss_curve.png``
    in ``config.out``. Other processes record nothing but take part in :meth:`end`'s weight comparison."""

    def __init__(self, config: PretrainConfig, info: distributed.ProcessInfo, steps_per_epoch: int,
                 start_epoch: int, checkpoint_path: str):
        self.config, self.info, self.steps_per_epoch = config, info, steps_per_epoch
        self.checkpoint_path = checkpoint_path
        self.log: Optional[MetricsLog] = (MetricsLog(os.path.join(config.out, LOG_NAME), append=config.resume)
                                          if info.is_main else None)
        self.bar = self._progress_bar(start_epoch) if config.progress and info.is_main else None
        self._epoch_started = 0.0

    def _progress_bar(self, start_epoch: int):
        from tqdm.auto import tqdm

        total = self.config.epochs * self.steps_per_epoch
        return tqdm(total=total, initial=start_epoch * self.steps_per_epoch, desc="pretrain", unit="step",
                    disable=None, dynamic_ncols=True)

    def start(self, **facts) -> None:
        """The ``start`` event: what the run is about to train on, and ``steps_per_epoch`` (for the loss curve)."""
        if self.log is not None:
            self.log.write(event="start", steps_per_epoch=self.steps_per_epoch, **facts)

    def start_epoch(self) -> None:
        self._epoch_started = time.perf_counter()

    def logs(self, step: int, last_of_epoch: bool) -> bool:
        """Whether ``step`` is logged: every ``log_every`` steps and the last step of each epoch."""
        return last_of_epoch or step % self.config.log_every == 0

    def tick(self) -> None:
        """One finished step whose loss is not read yet: the bar moves on."""
        if self.bar is not None:
            self.bar.update(1)

    def step(self, *, epoch: int, step: int, last_of_epoch: bool, loss: float, lr: float, weight_decay: float,
             momentum: float, images_per_s: float) -> None:
        """A logged step (see :meth:`logs`), whose loss has been read: the bar and a ``step`` event;
        ``images_per_s`` is over the steps since the last logged one."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
        if self.log is not None:
            self.log.write(event="step", epoch=epoch, step=step, loss=loss, lr=lr, weight_decay=weight_decay,
                           momentum=momentum, images_per_s=images_per_s)

    def epoch_timing(self) -> dict:
        """``seconds`` and global ``images_per_s`` of the epoch since :meth:`start_epoch`."""
        seconds = time.perf_counter() - self._epoch_started
        return {"seconds": seconds, "images_per_s": self.steps_per_epoch * self.config.batch_size / seconds}

    def end_epoch(self, record: dict, state: dict) -> None:
        """Main process: write the checkpoint ``state`` (atomically), the ``epoch`` event and the loss curve."""
        save_checkpoint(state, self.checkpoint_path)
        self.log.write(event="epoch", **record)
        plot_loss_curve(self.log.path, os.path.join(self.config.out, LOSS_CURVE_NAME))

    def end(self, student: nn.Module, history: list) -> dict:
        """Close the bar and the log; the run's summary, with ``ranks_identical``: every process ends with the same
        student weights (compared by :func:`weight_digest`)."""
        if self.bar is not None:
            self.bar.close()
        digests = distributed.gather_floats(float(weight_digest(student)), self.info)
        config = self.config
        summary = {"epochs": config.epochs, "steps": config.epochs * self.steps_per_epoch, "history": history,
                   "checkpoint": self.checkpoint_path, "processes": self.info.world_size,
                   "ranks_identical": len(set(digests)) == 1}
        if self.log is not None:
            self.log.write(event="end", ranks_identical=summary["ranks_identical"],
                           final_loss=history[-1]["loss"] if history else None)
            self.log.close()
        return summary
