"""``DINOLoss``: the DINO loss module (center buffer, teacher-temperature schedule, center EMA) on the fused op.

A drop-in replacement for ``DINOLoss`` of facebookresearch/dino: same constructor defaults, the same ``center``
buffer (shape ``[1, out_dim]``, so DINO checkpoints load), ``forward(student_output, teacher_output, epoch)``.
Optionally DINOv2's Sinkhorn-Knopp centering replaces the EMA center (:func:`sinkhorn_knopp_center`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from typing import Optional, Union

from ..checks import check_positive_int
from ..ops.dino_head_loss import LastLayerInput, dino_head_loss
from ..ops.dino_loss import dino_loss


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                          n_epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature, as DINO: linear from ``warmup_teacher_temp`` to ``teacher_temp`` over
    ``warmup_teacher_temp_epochs`` epochs, then constant; float64 ``[n_epochs]``."""
    if not 0 <= warmup_teacher_temp_epochs <= n_epochs:
        raise ValueError(f"warmup_teacher_temp_epochs must be in [0, n_epochs={n_epochs}], "
                         f"got {warmup_teacher_temp_epochs}")
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
    return np.concatenate((warmup, np.full(n_epochs - warmup_teacher_temp_epochs, float(teacher_temp))))


def _all_samples_logsumexp(values: torch.Tensor) -> torch.Tensor:
    """``log Σ_rows exp(values)`` per column of ``[N, K]``, over the rows of every process when
    ``torch.distributed`` is initialised."""
    column_max = values.amax(dim=0)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(column_max, op=dist.ReduceOp.MAX)
    sums = torch.exp(values - column_max).sum(dim=0)
    if distributed:
        dist.all_reduce(sums)
    return column_max + torch.log(sums)


@torch.no_grad()
def sinkhorn_knopp_center(teacher: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """The center ``c: [K]`` (float32) for which ``softmax((t - c) / τ_t)`` are DINOv2's Sinkhorn-Knopp targets.

    DINOv2 alternates normalising ``Q = exp(t / τ_t)`` per prototype ``k`` (over all samples of all processes) and
    per sample (over ``k``), ending with the per-sample step. The prototype steps multiply into one factor
    ``R_k``, so the targets are ``softmax_k(t / τ_t + log R_k)``, i.e. the center ``c = -τ_t · log R_k``: the fused
    :func:`~msd_fast.dino_loss` then gives DINOv2's loss. Computed in the log domain, stable for any logits.

    Args:
        teacher: ``[N, K]`` teacher logits (all teacher views of the batch), any float dtype.
        teacher_temp: ``τ_t`` > 0.
        n_iterations: Sinkhorn-Knopp iterations (DINOv2: 3).
    """
    check_positive_int(n_iterations, "n_iterations")
    logits = teacher.to(torch.float32) / teacher_temp
    log_prototype_scale = torch.zeros(logits.shape[1], dtype=torch.float32, device=logits.device)
    log_sample_scale = torch.zeros(logits.shape[0], 1, dtype=torch.float32, device=logits.device)
    for _ in range(n_iterations):
        log_prototype_scale -= _all_samples_logsumexp(logits + log_prototype_scale + log_sample_scale)
        log_sample_scale = -torch.logsumexp(logits + log_prototype_scale, dim=1, keepdim=True)
    return -teacher_temp * log_prototype_scale


class DINOLoss(nn.Module):
    """DINO self-distillation loss with an EMA center of the teacher outputs.

    Args:
        out_dim: ``K``, the projection head's output size.
        n_student_views, n_teacher_views: ``Vs`` (global + local crops/masked views) and ``Vt`` (global views).
        student_temp: ``τ_s``.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: the teacher temperature schedule
            (see :func:`teacher_temp_schedule`).
        n_epochs: length of the schedule; ``forward`` accepts ``0 <= epoch < n_epochs``.
        center_momentum: ``m`` of ``center <- m * center + (1 - m) * batch_center``.
        centering: ``"ema"`` (DINO: the EMA center buffer) or ``"sinkhorn_knopp"`` (DINOv2: each batch's teacher
            targets from :func:`sinkhorn_knopp_center`; the buffer stays untouched).
        sinkhorn_iterations: iterations of Sinkhorn-Knopp centering.
        chunk_samples: samples per chunk of the fused head + loss (see :func:`~msd_fast.dino_head_loss`).
        backend: passed to :func:`~msd_fast.dino_loss` (and :func:`~msd_fast.dino_head_loss`).

    ``forward`` takes the heads' logits, or their last layers' inputs (:class:`LastLayerInput`): then the last
    layer runs fused with the loss (:func:`~msd_fast.dino_head_loss`) and the logits are never stored whole. The
    ``center`` buffer is float32 ``[1, out_dim]``.
    """

    def __init__(self, out_dim: int, n_student_views: int, n_teacher_views: int, *, student_temp: float = 0.1,
                 warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
                 n_epochs: int, center_momentum: float = 0.9, centering: str = "ema", sinkhorn_iterations: int = 3,
                 chunk_samples: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        self.out_dim = check_positive_int(out_dim, "out_dim")
        self.n_student_views = check_positive_int(n_student_views, "n_student_views")
        self.n_teacher_views = check_positive_int(n_teacher_views, "n_teacher_views")
        check_positive_int(n_epochs, "n_epochs")
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum!r}")
        if centering not in ("ema", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn_knopp', got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iterations = check_positive_int(sinkhorn_iterations, "sinkhorn_iterations")
        self.chunk_samples = None if chunk_samples is None else check_positive_int(chunk_samples, "chunk_samples")
        self.backend = backend
        self.teacher_temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp,
                                                           warmup_teacher_temp_epochs, n_epochs)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: Union[torch.Tensor, LastLayerInput],
                teacher_output: Union[torch.Tensor, LastLayerInput], epoch: int) -> torch.Tensor:
        """Loss of ``student_output [Vs*B, K]`` against ``teacher_output [Vt*B, K]`` (view-major logits, or both
        heads' :class:`LastLayerInput` for the fused head + loss) at ``epoch``'s teacher temperature and the current
        center (EMA centering: then updates the center with the teacher logits)."""
        if not 0 <= epoch < len(self.teacher_temp_schedule):
            raise IndexError(f"epoch must be in [0, {len(self.teacher_temp_schedule)}), got {epoch}")
        fused = isinstance(student_output, LastLayerInput)
        if fused != isinstance(teacher_output, LastLayerInput):
            raise TypeError("student_output and teacher_output must both be logits or both LastLayerInput")
        teacher_temp = float(self.teacher_temp_schedule[epoch])
        if fused:
            return self._fused_forward(student_output, teacher_output, teacher_temp)
        if self.centering == "ema":
            center = self.center.view(-1)
        else:
            center = sinkhorn_knopp_center(teacher_output, teacher_temp, self.sinkhorn_iterations)
        loss = dino_loss(student_output, teacher_output, center, n_student_views=self.n_student_views,
                         n_teacher_views=self.n_teacher_views, student_temp=self.student_temp,
                         teacher_temp=teacher_temp, backend=self.backend)
        if self.centering == "ema":
            self.update_center(teacher_output)
        return loss

    def _fused_forward(self, student: LastLayerInput, teacher: LastLayerInput, teacher_temp: float) -> torch.Tensor:
        if self.centering == "ema":
            center = self.center.view(-1)
        else:  # Sinkhorn-Knopp needs every teacher logit at once: only the student's are never stored
            with torch.no_grad():
                teacher_logits = teacher.features @ teacher.weight.to(teacher.features.dtype).T
            center = sinkhorn_knopp_center(teacher_logits, teacher_temp, self.sinkhorn_iterations)
            del teacher_logits
        loss, teacher_sum = dino_head_loss(student.features, teacher.features, student.weight, teacher.weight, center,
                                           n_student_views=self.n_student_views,
                                           n_teacher_views=self.n_teacher_views, student_temp=self.student_temp,
                                           teacher_temp=teacher_temp, chunk_samples=self.chunk_samples,
                                           backend=self.backend)
        if self.centering == "ema":
            self.update_center_from_sum(teacher_sum, teacher.features.shape[0])
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """``center <- m·center + (1-m)·mean of teacher_output's rows``; the mean is over all processes when
        ``torch.distributed`` is initialised (every process must pass the same number of rows), accumulated in
        float32."""
        self.update_center_from_sum(teacher_output.sum(dim=0, dtype=torch.float32), teacher_output.shape[0])

    @torch.no_grad()
    def update_center_from_sum(self, teacher_sum: torch.Tensor, rows: int) -> None:
        """:meth:`update_center` from the float32 column sums ``[K]`` of ``rows`` teacher logits."""
        batch_center = teacher_sum.view(1, -1).clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            rows *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center / rows, alpha=1 - self.center_momentum)
