"""DINO head last layer + loss, fused: the ``[V*B, K]`` logits are never stored whole.

Contract. Student features ``x_s: [Vs*B, D]`` and teacher features ``x_t: [Vt*B, D]`` are the view-major inputs of
the heads' last layers (DINO: the L2-normalised bottleneck features); ``W_s, W_t: [K, D]`` are those layers'
weights (DINO: the weight-normalised ``g * v / |v|``). The loss is :func:`~msd_fast.dino_loss` of the logits
``s = x_s W_s^T`` and ``t = x_t W_t^T`` with center ``c: [K]``; the op also returns ``Σ_rows t`` (``[K]``, float32;
float64 for float64 features), from which the EMA center is updated: the teacher logits are not needed afterwards
either.

How. The loss couples the views of one sample, so the batch is cut into chunks of samples (every view of each):
per chunk, ``s_c = x_s[c] W_s^T`` and ``t_c = x_t[c] W_t^T`` (the vendor GEMM, in the features' dtype), the fused
DINO loss kernel of the chosen backend on that chunk (loss and ``∂loss/∂s_c`` in two streaming passes over K),
then ``∂x_s[c] = ∂s_c W_s`` and ``∂W_s += ∂s_c^T x_s[c]`` (accumulated in float32; float64 for float64), and the
chunk is freed. This is the DINO counterpart of a fused linear + cross-entropy (Liger-Kernel's row chunks).
Gradients are computed in the forward, so the backward only scales them by ``grad_output``; the teacher gets none.

Chunking over K as well would bound memory further but needs the GEMMs twice (statistics, then gradient): about
1.4x the FLOPs at 2 + 10 views. Sample chunks alone keep the peak at ``(2 Vs + Vt) · b · K`` values for ``b``
samples, against ``(Vs + Vt) · B · K`` logits (plus their gradient and softmax temporaries) unfused.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..checks import check_dim, check_dtype, check_positive_int, check_same_device, check_tensor
from .dino_loss import (LOGIT_DTYPES, _dino_loss, _resolved_backend, accumulate_dtype, check_temperatures,
                        check_view_rows, dino_loss_reference, is_unit_cpu_gradient)

# By default a chunk's student and teacher logits and student logit gradient take at most this fraction of the
# bytes of the whole float32 logits that the unfused path holds (the target: a peak of at most 0.25x those).
CHUNK_FRACTION = 0.2


class LastLayerInput(NamedTuple):
    """A DINO head's output before its last linear layer: ``features [M, D]`` and that layer's ``weight [K, D]``
    (logits ``features @ weight.T``). Passed to :class:`~msd_fast.DINOLoss` in place of logits, it selects the
    fused head + loss."""

    features: torch.Tensor
    weight: torch.Tensor


def dino_head_loss_reference(student_features: torch.Tensor, teacher_features: torch.Tensor,
                             student_weight: torch.Tensor, teacher_weight: torch.Tensor, center: torch.Tensor,
                             n_student_views: int, n_teacher_views: int, student_temp: float,
                             teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused ground truth: whole logits by ``F.linear``, then :func:`dino_loss_reference`; returns ``(loss,
    Σ_rows teacher logits)``. Differentiable w.r.t. the student features and weight through PyTorch autograd."""
    dtype = student_features.dtype
    student = torch.nn.functional.linear(student_features, student_weight.to(dtype))
    with torch.no_grad():
        teacher = torch.nn.functional.linear(teacher_features, teacher_weight.to(dtype))
    loss = dino_loss_reference(student, teacher, center, n_student_views, n_teacher_views, student_temp,
                               teacher_temp)
    return loss, teacher.sum(dim=0, dtype=accumulate_dtype(dtype))


def default_chunk_samples(batch: int, n_student_views: int, n_teacher_views: int, dtype: torch.dtype) -> int:
    """The most samples per chunk whose logits ``[(Vs + Vt) * b, K]`` and student gradient ``[Vs * b, K]`` in
    ``dtype`` take at most :data:`CHUNK_FRACTION` of the float32 logits ``[(Vs + Vt) * B, K]``; at least 1."""
    per_sample = (2 * n_student_views + n_teacher_views) * torch.finfo(dtype).bits // 8
    whole = (n_student_views + n_teacher_views) * batch * 4
    return max(1, min(batch, int(CHUNK_FRACTION * whole // per_sample)))


def _rows(features: torch.Tensor, n_views: int, first: int, last: int) -> torch.Tensor:
    """Rows of samples ``[first, last)`` of every view of view-major ``features [V*B, D]``: ``[V*(last-first), D]``,
    contiguous."""
    return features.view(n_views, -1, features.shape[1])[:, first:last].reshape(-1, features.shape[1])


class _FusedHeadLoss(torch.autograd.Function):
    """Chunked last layer + DINO loss; see the module docstring. Inputs are contiguous and of one compute dtype,
    except the weights (any float dtype, cast per call)."""

    @staticmethod
    def forward(ctx, student_features, teacher_features, student_weight, teacher_weight, center, n_student_views,
                n_teacher_views, student_temp, teacher_temp, chunk_samples, backend):
        dtype = student_features.dtype
        batch = student_features.shape[0] // n_student_views
        want_features = ctx.needs_input_grad[0]
        want_weight = ctx.needs_input_grad[2]
        compute_grad = want_features or want_weight
        w_s, w_t = student_weight.detach().to(dtype), teacher_weight.detach().to(dtype)
        center = center.detach().to(accumulate_dtype(dtype)).contiguous()
        loss = torch.zeros((), dtype=accumulate_dtype(dtype), device=student_features.device)
        teacher_sum = torch.zeros(w_t.shape[0], dtype=loss.dtype, device=student_features.device)
        grad_features = torch.empty_like(student_features) if want_features else None
        grad_weight = None  # float32 (float64) [K, D], made by the first chunk
        for first in range(0, batch, chunk_samples):
            last = min(first + chunk_samples, batch)
            scale = (last - first) / batch  # the kernel normalises by the chunk's batch, the loss by the whole one
            x_s = _rows(student_features.detach(), n_student_views, first, last)
            student_logits = x_s @ w_s.T
            teacher_logits = _rows(teacher_features.detach(), n_teacher_views, first, last) @ w_t.T
            teacher_sum += teacher_logits.sum(dim=0, dtype=teacher_sum.dtype)
            chunk_loss, grad_logits = _dino_loss(student_logits, teacher_logits, center, n_student_views,
                                                 n_teacher_views, student_temp, teacher_temp, compute_grad, backend)
            del student_logits, teacher_logits
            loss += chunk_loss * scale
            if want_features:
                grad_rows = (grad_logits @ w_s).mul_(scale)
                grad_features.view(n_student_views, batch, -1)[:, first:last] = grad_rows.view(
                    n_student_views, last - first, -1)
            if want_weight:
                if dtype != loss.dtype:  # half precision: the GEMM in it, the sum over chunks in float32
                    chunk_grad = grad_logits.T @ x_s
                    grad_weight = (chunk_grad.to(loss.dtype).mul_(scale) if grad_weight is None
                                   else grad_weight.add_(chunk_grad, alpha=scale))
                elif grad_weight is None:  # beta=0: the GEMM writes the result without zero-filling it first
                    grad_weight = torch.addmm(x_s.new_zeros(()), grad_logits.T, x_s, beta=0, alpha=scale)
                else:
                    grad_weight.addmm_(grad_logits.T, x_s, alpha=scale)
            del grad_logits
        # Kept on ctx, not saved for backward: the backward hands them over with no other reference left, so
        # autograd's gradient accumulation takes the [K, D] weight gradient as it is instead of copying it.
        ctx.gradients = (grad_features, grad_weight)
        ctx.mark_non_differentiable(teacher_sum)
        return loss, teacher_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_teacher_sum):
        # As dino_loss: scale the gradients in place, skipping the scale when grad_loss is 1 (read in eager CPU code
        # only, where that costs no device synchronisation).
        if ctx.gradients is None:
            raise RuntimeError("dino_head_loss: backward ran twice through one graph; its gradients are handed over "
                               "and scaled in place, so call the loss again instead of using retain_graph=True")
        grads, ctx.gradients = ctx.gradients, None
        if not is_unit_cpu_gradient(grad_loss):
            grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return grads[0], None, grads[1], None, None, None, None, None, None, None, None


def check_head_arguments(student_features: torch.Tensor, teacher_features: torch.Tensor,
                         student_weight: torch.Tensor, teacher_weight: torch.Tensor, center: torch.Tensor,
                         n_student_views: int, n_teacher_views: int, student_temp: float, teacher_temp: float,
                         chunk_samples: Optional[int]) -> None:
    """Raise a clear ``TypeError``/``ValueError`` naming the argument when a :func:`dino_head_loss` input is
    invalid."""
    tensors = (("student_features", student_features), ("teacher_features", teacher_features),
               ("student_weight", student_weight), ("teacher_weight", teacher_weight), ("center", center))
    for name, tensor in tensors:
        check_tensor(tensor, name)
        check_dtype(tensor, LOGIT_DTYPES, name)
        check_same_device(tensor, student_features, name, "student_features")
    check_dim(student_features, 2, "student_features", "[n_student_views * B, D]")
    check_dim(teacher_features, 2, "teacher_features", "[n_teacher_views * B, D]")
    check_dim(student_weight, 2, "student_weight", "[K, D]")
    check_dim(teacher_weight, 2, "teacher_weight", "[K, D]")
    if teacher_features.dtype != student_features.dtype:
        raise TypeError(f"teacher_features must have student_features' dtype {student_features.dtype}, got "
                        f"{teacher_features.dtype}")
    check_view_rows(student_features, teacher_features, n_student_views, n_teacher_views, what="D")
    width = student_features.shape[1]
    out_dim = student_weight.shape[0]
    for name, weight in (("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        if weight.shape[1] != width or weight.shape[0] != out_dim or out_dim == 0:
            raise ValueError(f"{name} must have shape (K, {width}) with K >= 1 the same for both heads, got "
                             f"{tuple(weight.shape)}")
    if tuple(center.shape) != (out_dim,):
        raise ValueError(f"center must have shape ({out_dim},), got {tuple(center.shape)}")
    check_temperatures(student_temp, teacher_temp)
    if chunk_samples is not None:
        check_positive_int(chunk_samples, "chunk_samples")


def dino_head_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, student_weight: torch.Tensor,
                   teacher_weight: torch.Tensor, center: torch.Tensor, *, n_student_views: int,
                   n_teacher_views: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                   chunk_samples: Optional[int] = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """DINO loss of the logits ``features @ weight.T`` of student and teacher heads, never storing them whole.

    Args:
        student_features: ``[n_student_views * B, D]``, view-major; float16, bfloat16, float32 or float64. The
            logits are computed in this dtype (pass the autocast dtype for mixed precision).
        teacher_features: ``[n_teacher_views * B, D]``, same dtype and device. Gets no gradient.
        student_weight, teacher_weight: ``[K, D]`` last-layer weights, any float dtype (cast to the features'
            dtype); the student's gets a gradient (accumulated in float32, or float64), the teacher's none.
        center: ``[K]`` teacher center.
        n_student_views, n_teacher_views, student_temp, teacher_temp: as :func:`~msd_fast.dino_loss`.
        chunk_samples: samples per chunk; memory grows with it, and the time the weights are read (once per
            chunk) shrinks. Default :func:`default_chunk_samples` (B = 64, 2 + 10 views: 13 in bfloat16, 6 in
            float32).
        backend: the loss kernel's, as :func:`~msd_fast.dino_loss`; ``"reference"`` is the unfused
            :func:`dino_head_loss_reference`.

    Returns:
        ``(loss, teacher_logit_sum)``: the 0-d loss (float32; float64 for float64 features), differentiable w.r.t.
        ``student_features`` and ``student_weight``, and the ``[K]`` column sums of the teacher logits (float32;
        float64 for float64 features).
    """
    check_head_arguments(student_features, teacher_features, student_weight, teacher_weight, center,
                         n_student_views, n_teacher_views, student_temp, teacher_temp, chunk_samples)
    name = _resolved_backend(backend, student_features.device.type)
    if name == "reference":
        return dino_head_loss_reference(student_features, teacher_features, student_weight, teacher_weight, center,
                                        n_student_views, n_teacher_views, student_temp, teacher_temp)
    batch = student_features.shape[0] // n_student_views
    chunk = chunk_samples or default_chunk_samples(batch, n_student_views, n_teacher_views, student_features.dtype)
    if not torch.is_grad_enabled():  # then no gradient is computed either
        student_features, student_weight = student_features.detach(), student_weight.detach()
    return _FusedHeadLoss.apply(student_features.contiguous(), teacher_features.detach().contiguous(),
                                student_weight, teacher_weight.detach(), center, n_student_views, n_teacher_views,
                                float(student_temp), float(teacher_temp), chunk, name)
