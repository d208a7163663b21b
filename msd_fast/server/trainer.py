"""Server-side pretraining by masked sampling distillation (MS-DINO), read top to bottom like DINO's loop:

per step: draw global and local masked views (:func:`~msd_fast.sample_views`), student on all views, EMA teacher on
the global views (both through the fused :func:`~msd_fast.masked_gather` inside ``forward_views``),
:class:`~msd_fast.DINOLoss`, AdamW with precomputed lr / weight-decay / momentum schedules, gradient clipping,
last-layer freezing, teacher EMA. The server only ever reads shards: no key is needed or opened.

Reading order: :meth:`Pretraining.train_step` (one step: :class:`~msd_fast.server.views.Views` -> student and
teacher forward -> loss -> :meth:`~Pretraining.optimize` -> :meth:`~Pretraining.update_teacher`),
:meth:`~Pretraining.train_epoch` (its batches and the epoch's record), :meth:`~Pretraining.run` (resume, epochs);
the bookkeeping (bar, log, checkpoints, loss curve) is :class:`~msd_fast.server.recorder.RunRecorder`'s.

Reproducibility: data order, initial weights, views, augmentation and dropout each have their own seeded stream
(:mod:`~msd_fast.server.seeds`, derived from ``(seed, step, rank)``), and a checkpoint is written after every
epoch, so ``--resume`` after a crash gives the weights of an uninterrupted run. Under ``torchrun`` every process
draws the *global* batch's views and keeps its slice, BatchNorm statistics and the teacher center are all-reduced,
and DDP averages gradients: N processes compute what one process with the global batch computes.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .dino import DINOLoss
from ..ops.dino_head_loss import LastLayerInput
from ..protocol.encryption import EncryptionSpec
from ..protocol.shards import ShardMetadata
from . import distributed
from .augment import commuting_augmentation
from .checkpoint import load_checkpoint
from .config import PretrainConfig
from .data import ShardDataset, epoch_batches, steps_per_epoch
from .model import DINOHead, MaskedSamplingNet, create_backbone
from .optim import KeyInvariantAdamW
from .monitor import collapse_signals
from .recorder import RunRecorder, StepTimer
from .schedules import cosine_schedule
from .seeds import SEED_AUGMENT, SEED_DROP_PATH, SEED_INIT, derived_seed
from .views import Views, draw_views

CHECKPOINT_NAME = "checkpoint.pt"
SIGNAL_SAMPLE = 512  # items of the shards the collapse signals are measured on, evenly spaced


def build_networks(config: PretrainConfig, meta: ShardMetadata, input_stats: tuple[float, float]):
    """Student and teacher :class:`MaskedSamplingNet` for data of geometry ``meta`` (teacher: same weights, no
    stochastic depth, no gradients), with compiled features under ``config.compile``."""
    token_mode = meta.mode == "token"
    overrides = config.model_overrides()
    if token_mode:
        dim = meta.item_shape[1]
        if overrides.setdefault("embed_dim", dim) != dim:
            raise ValueError(f"embed_dim {overrides['embed_dim']} differs from the token shards' D = {dim}")
    torch.manual_seed(derived_seed(config.seed, SEED_INIT))

    def network(drop_path: float) -> MaskedSamplingNet:
        backbone = create_backbone(config.arch, image_size=meta.image_size, patch_size=meta.patch_size,
                                   in_chans=meta.channels, token_mode=token_mode, drop_path_rate=drop_path,
                                   **overrides)
        head = DINOHead(backbone.embed_dim, config.out_dim, use_bn=config.use_bn_in_head,
                        norm_last_layer=config.norm_last_layer, n_layers=config.head_layers,
                        hidden_dim=config.head_hidden_dim, bottleneck_dim=config.head_bottleneck_dim)
        if token_mode:  # tokens arrive embedded: the patch embedding is never used
            backbone.patch_embed.requires_grad_(False)
        return MaskedSamplingNet(backbone, head, token_mode=token_mode, input_mean=input_stats[0],
                                 input_std=input_stats[1], compiled=config.compile)

    student = network(config.drop_path)
    teacher = network(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


EMBED_WEIGHT = "backbone.patch_embed.proj.weight"


def parameter_groups(model: nn.Module, rowwise_embed: bool) -> list[dict]:
    """DINO's groups: biases and 1-D (norm) parameters without weight decay (``decayed`` marks the others). With
    ``rowwise_embed`` the patch-embedding weight gets its own group with a row-shared second moment
    (:class:`~msd_fast.server.optim.KeyInvariantAdamW`)."""
    regularized, plain, embed = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.dim() == 1:
            plain.append(param)
        else:
            (embed if rowwise_embed and name == EMBED_WEIGHT else regularized).append(param)
    groups = [{"params": regularized, "decayed": True}, {"params": plain, "weight_decay": 0.0, "decayed": False}]
    if embed:
        groups.append({"params": embed, "decayed": True, "rowwise": True})
    return groups


def build_loss(config: PretrainConfig) -> DINOLoss:
    """The run's :class:`DINOLoss`: each student view against every teacher (global) view but itself."""
    return DINOLoss(config.out_dim, config.global_views + config.local_views, config.global_views,
                    student_temp=config.student_temp, warmup_teacher_temp=config.warmup_teacher_temp,
                    teacher_temp=config.teacher_temp, warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs,
                    n_epochs=config.epochs, center_momentum=config.center_momentum, centering=config.centering)


def schedules(config: PretrainConfig, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step ``(lr, weight decay, teacher momentum)``, each ``[epochs * steps_per_epoch]``: the lr scaled by
    batch / 256 with a linear warm-up, all three cosine (DINO)."""
    steps = (config.epochs, steps_per_epoch)
    lr = cosine_schedule(config.lr * config.batch_size / 256.0, config.min_lr, *steps,
                         warmup_epochs=config.warmup_epochs)
    return (lr, cosine_schedule(config.weight_decay, config.weight_decay_end, *steps),
            cosine_schedule(config.momentum_teacher, 1.0, *steps))


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in PretrainConfig.RUNTIME_ONLY}


# ---- one step, reusable by any loop that runs MS-DINO (the server's, FedAvg-DINO's clients') -------------------

def distillation_step(student: nn.Module, teacher: MaskedSamplingNet, loss_fn: DINOLoss,
                      optimizer: torch.optim.Optimizer, inputs: torch.Tensor, views: Views, config: PretrainConfig, *,
                      num_tokens: int, epoch: int, step: int, lr: float, weight_decay: float, momentum: float,
                      student_inputs: Optional[torch.Tensor] = None, bf16: bool = False) -> torch.Tensor:
    """One MS-DINO update; returns the loss as a 0-d tensor on the device, unread (reading it would make the host
    wait for the step: :func:`read_losses` reads and checks many at once): the scheduled ``lr``/``weight_decay`` ->
    student (a :class:`MaskedSamplingNet` or its DDP wrapper) on ``student_inputs`` (default ``inputs``, ``[B, ...]``)
    and every view -> teacher targets -> :class:`~msd_fast.DINOLoss` at ``epoch`` -> :func:`optimize` ->
    :func:`ema_update` with ``momentum``. ``views`` are on the inputs' device, over ``num_tokens`` patch tokens;
    ``step`` is kept for callers' messages."""
    network = getattr(student, "module", student)  # the network under a DDP wrapper
    set_schedules(optimizer, lr, weight_decay)
    logits = not config.fused_head  # fused: the heads' last layers run inside the loss
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
        student_out = student(inputs if student_inputs is None else student_inputs, views.all, last_layer=logits)
        teacher_out = teacher_targets(teacher, inputs, views, config, num_tokens)
    loss = loss_fn(student_out, teacher_out, epoch)
    optimize(network, optimizer, loss, config, epoch)
    ema_update(teacher, network, momentum)
    return loss.detach()


def read_losses(losses: list, first_step: int) -> list:
    """The values of ``losses`` (0-d tensors of consecutive steps from ``first_step``) with one device sync; raise
    ``FloatingPointError`` naming the first step whose loss is not finite."""
    values = torch.stack(losses).tolist() if losses else []
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is {value} at step {first_step + offset}; lower --lr or raise "
                                     f"--clip-grad")
    return values


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set the step's learning rate, and its weight decay on the groups marked ``decayed``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group["decayed"]:
            group["weight_decay"] = weight_decay


@torch.no_grad()
def teacher_targets(teacher: MaskedSamplingNet, inputs: torch.Tensor, views: Views, config: PretrainConfig,
                    num_tokens: int) -> Union[torch.Tensor, LastLayerInput]:
    """The teacher's outputs ``[global_views * B, out_dim]`` (with ``fused_head``: its last layer's input): on the
    global views, or with ``teacher_views="all"`` on every token, repeated once per global view."""
    logits = not config.fused_head
    if config.teacher_views == "global":
        return teacher(inputs, [views.global_views], last_layer=logits)
    every = teacher.all_tokens(inputs.shape[0], num_tokens, inputs.device)
    out = teacher(inputs, [every], last_layer=logits)
    if logits:
        return out.repeat(config.global_views, 1)
    return LastLayerInput(out.features.repeat(config.global_views, 1), out.weight)


def optimize(student: MaskedSamplingNet, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
             config: PretrainConfig, epoch: int) -> None:
    """Backward, gradient clipping, last-layer freezing (the first ``freeze_last_layer`` epochs), AdamW step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.clip_grad > 0:
        nn.utils.clip_grad_norm_(student.parameters(), config.clip_grad)
    if epoch < config.freeze_last_layer:
        for param in student.head.last_layer.parameters():
            param.grad = None
    optimizer.step()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter."""
    teacher_params = list(teacher.parameters())
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, [p.detach() for p in student.parameters()], alpha=1.0 - momentum)


class Pretraining:
    """One pretraining run: networks, optimiser, schedules and state; :meth:`run` trains to the last epoch.

    ``monitor(teacher, epoch) -> dict`` (optional, main process) is called after every epoch; its values are
    logged with the epoch's collapse signals (:func:`~msd_fast.server.monitor.collapse_signals`). The demo uses
    it for a k-NN accuracy on labelled images that the simulated clients hold."""

    def __init__(self, config: PretrainConfig, monitor: Optional[Callable[[MaskedSamplingNet, int], dict]] = None):
        self.config, self.monitor = config, monitor
        self.info = distributed.setup(config.device)
        self.data = ShardDataset.open(config.shards)
        meta = self.data.metadata
        self.num_tokens = meta.item_shape[0] if meta.mode == "token" else (
            (meta.image_size[0] // meta.patch_size) * (meta.image_size[1] // meta.patch_size))
        if config.batch_size % self.info.world_size:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {self.info.world_size} "
                             f"processes")
        self.local_batch = config.batch_size // self.info.world_size
        self.steps_per_epoch = steps_per_epoch(len(self.data), config.batch_size)
        self.student, self.teacher = build_networks(config, self.data.metadata, self.data.input_stats())
        self.student.to(self.info.device)
        self.teacher.to(self.info.device)
        self.student_ddp = (DistributedDataParallel(self.student, device_ids=[self.info.device.index]
                                                    if self.info.device.type == "cuda" else None)
                            if self.info.distributed else self.student)
        self.loss = build_loss(config).to(self.info.device)
        self.optimizer = KeyInvariantAdamW(parameter_groups(self.student, config.embed_optimizer == "rowwise"))
        self.lr, self.wd, self.momentum = schedules(config, self.steps_per_epoch)
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and self.info.device.type == "cuda")
        self.start_epoch, self.history = 0, []
        self.checkpoint_path = os.path.join(config.out, CHECKPOINT_NAME)

    # ---- state -------------------------------------------------------------------------------------------------
    def state(self, epoch: int) -> dict:
        return {"epoch": epoch, "config": dataclasses.asdict(self.config), "student": self.student.state_dict(),
                "teacher": self.teacher.state_dict(), "optimizer": self.optimizer.state_dict(),
                "dino_loss": self.loss.state_dict(), "data": self.data.metadata.geometry(),
                "data_sizes": self.data.sizes, "history": self.history,
                "input_stats": [float(self.student.input_mean), float(self.student.input_std)]}

    def restore(self, state: dict) -> None:
        mine, saved = _comparable(dataclasses.asdict(self.config)), _comparable(state["config"])
        # A setting added after the checkpoint was written ran as its default then (e.g. fused_head, compile).
        defaults = {field.name: field.default for field in dataclasses.fields(PretrainConfig)}
        differing = sorted(k for k in mine if mine[k] != saved.get(k, defaults[k]))
        if differing:
            raise ValueError(f"--resume: {self.checkpoint_path} was written with different settings "
                             f"({', '.join(differing)}); resume with the same settings or use a new --out folder")
        if state["data"] != self.data.metadata.geometry() or state["data_sizes"] != self.data.sizes:
            raise ValueError(f"--resume: {self.checkpoint_path} was trained on other shards")
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["dino_loss"])
        self.start_epoch, self.history = state["epoch"], list(state["history"])

    # ---- one step: views -> student and teacher forward -> loss -> backward -> optimizer -> EMA ----------------
    def train_step(self, inputs: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """One optimisation step on this process's ``inputs`` (its slice of the global batch); returns the loss, a 0-d
        tensor not yet read (see :func:`read_losses`)."""
        torch.manual_seed(derived_seed(self.config.seed, SEED_DROP_PATH, step, self.info.rank))
        return distillation_step(self.student_ddp, self.teacher, self.loss, self.optimizer, inputs, self.views(step),
                                 self.config, num_tokens=self.num_tokens, epoch=epoch, step=step,
                                 lr=float(self.lr[step]), weight_decay=float(self.wd[step]),
                                 momentum=float(self.momentum[step]), student_inputs=self.augment(inputs, step),
                                 bf16=self.bf16)

    def views(self, step: int) -> Views:
        """This process's slice of the global batch's masked views of ``step``."""
        return draw_views(self.config, self.num_tokens, step, self.info.rank * self.local_batch, self.local_batch,
                          self.info.device)

    def augment(self, inputs: torch.Tensor, step: int) -> torch.Tensor:
        """The student's inputs: contrast about mid-grey and Gaussian noise, which commute with the encryption
        (:mod:`~msd_fast.server.augment`); token shards and zero strengths pass through unchanged."""
        config = self.config
        if self.data.metadata.mode == "token" or (config.contrast == 0 and config.noise == 0):
            return inputs
        generator = torch.Generator().manual_seed(derived_seed(config.seed, SEED_AUGMENT, step))
        midgrey, value_range = EncryptionSpec.from_metadata(self.data.metadata.encryption).ciphertext_units()
        return commuting_augmentation(inputs, contrast=config.contrast, noise=config.noise, midgrey=midgrey,
                                      value_range=value_range, generator=generator, global_batch=config.batch_size,
                                      first=self.info.rank * self.local_batch)

    # ---- one epoch: its batches, then its record ------------------------------------------------------------------
    def train_epoch(self, epoch: int, recorder: RunRecorder) -> dict:
        """Every step of ``epoch``; returns the epoch's record (mean loss, timing; on the main process also the
        collapse signals and the monitor's values)."""
        config, info = self.config, self.info
        timer, losses, unread = StepTimer(config.batch_size), [], []
        recorder.start_epoch()
        timer.start()
        for i, batch in enumerate(epoch_batches(len(self.data), config.batch_size, epoch, config.seed)):
            step = epoch * self.steps_per_epoch + i
            mine = batch[info.rank * self.local_batch:(info.rank + 1) * self.local_batch]
            unread.append(self.train_step(self.data.take(mine).to(info.device, non_blocking=True), epoch, step))
            last_of_epoch = i == self.steps_per_epoch - 1
            if not recorder.logs(step, last_of_epoch):  # the host runs ahead of the device until a logged step
                recorder.tick()
                continue
            losses += read_losses(unread, step - len(unread) + 1)
            recorder.step(epoch=epoch, step=step, last_of_epoch=last_of_epoch, loss=losses[-1],
                          lr=float(self.lr[step]), weight_decay=float(self.wd[step]),
                          momentum=float(self.momentum[step]), images_per_s=timer.stop(len(unread)))
            unread = []
            timer.start()
        record = {"epoch": epoch, "loss": float(np.mean(losses)), **recorder.epoch_timing()}
        if info.is_main:
            record.update(self.epoch_signals(epoch))
        return record

    def epoch_signals(self, epoch: int) -> dict:
        """Collapse signals of the teacher on a fixed sample of the shards, plus the monitor's values."""
        picks = torch.linspace(0, len(self.data) - 1, min(len(self.data), SIGNAL_SAMPLE)).round().long().unique()
        inputs = self.data.take(picks).to(self.info.device)
        signals = collapse_signals(self.teacher, inputs, self.loss.center,
                                   float(self.loss.teacher_temp_schedule[epoch]))
        if self.monitor is not None:
            signals.update(self.monitor(self.teacher, epoch))
        return signals

    # ---- the run: resume, epochs, bookkeeping ---------------------------------------------------------------------
    def run(self) -> dict:
        config, info = self.config, self.info
        if info.is_main:
            os.makedirs(config.out, exist_ok=True)
        if config.resume and os.path.exists(self.checkpoint_path):
            self.restore(load_checkpoint(self.checkpoint_path, map_location=info.device))
        recorder = RunRecorder(config, info, self.steps_per_epoch, self.start_epoch, self.checkpoint_path)
        recorder.start(resumed_at_epoch=self.start_epoch, processes=info.world_size, device=str(info.device),
                       items=len(self.data), key_fingerprint=self.data.metadata.key_fingerprint)
        self.student.train()
        self.teacher.train()
        for epoch in range(self.start_epoch, config.epochs):
            self.history.append(self.train_epoch(epoch, recorder))
            if info.is_main:
                recorder.end_epoch(self.history[-1], self.state(epoch + 1))
        return recorder.end(self.student, self.history)


def pretrain(config: PretrainConfig, monitor: Optional[Callable[[MaskedSamplingNet, int], dict]] = None) -> dict:
    """Run (or resume) pretraining; returns a summary (per-epoch loss, speed and collapse signals, checkpoint path).
    Call it once per process (``torchrun`` sets the process group up through the environment). ``monitor``: see
    :class:`Pretraining`."""
    run = Pretraining(config, monitor)
    try:
        return run.run()
    finally:
        distributed.teardown()
