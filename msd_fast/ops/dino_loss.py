"""DINO self-distillation loss, fused: checks, reference, custom op with autograd, backend dispatch.

Contract (DINO, Caron et al. 2021). Student logits ``s: [Vs*B, K]`` and teacher logits ``t: [Vt*B, K]`` are
view-major (rows ``v*B .. v*B+B-1`` are view ``v``); student view ``u < Vt`` holds the same samples as teacher view
``u``. With center ``c: [K]``, temperatures ``τ_s``, ``τ_t``::

    q_v   = softmax((t_v - c) / τ_t)          (a constant: teacher and center get no gradient)
    log p_u = log_softmax(s_u / τ_s)
    loss  = 1/n_pairs · Σ_{v<Vt} Σ_{u<Vs, u≠v} mean_b Σ_k -q_v[b,k] · log p_u[b,k]
    n_pairs = Vt·Vs - min(Vt, Vs)            (= Vt·Vs - Vt in DINO, where Vs >= Vt)

Per student row ``(u, b)`` with ``z = s_u[b] / τ_s``, target ``T = Σ_{v<Vt, v≠u} q_v[b]`` and
``m_u = Σ_k T_k`` (the number of teacher views ``v ≠ u``), the row's term is ``m_u·LSE(z) - <T, z>``; hence::

    ∂loss/∂s_u[b] = (m_u · softmax(z) - T) / (τ_s · n_pairs · B)

The fused kernels compute the loss and this gradient in two streaming passes over the logits (statistics, then the
gradient) and return the gradient from the forward, so the backward only scales it by ``grad_output``.
"""
from __future__ import annotations

import torch

from ..backends import kernels_for, resolve_backend
from ..checks import check_dim, check_dtype, check_positive_int, check_same_device, check_tensor

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OP_NAME = "dino_loss"


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is accumulated and returned in: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pair_count(n_student_views: int, n_teacher_views: int) -> int:
    """Number of (teacher view v, student view u) pairs with ``u != v``: ``Vt·Vs - min(Vt, Vs)``."""
    return n_teacher_views * n_student_views - min(n_teacher_views, n_student_views)


def dino_loss_reference(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_student_views: int,
                        n_teacher_views: int, student_temp: float, teacher_temp: float) -> torch.Tensor:
    """The eager DINO formulation (one softmax/log-softmax per view, one product per pair); the ground truth.

    Computes in float32 (float64 for float64 logits), as DINO does under autocast; differentiable w.r.t.
    ``student`` through PyTorch autograd (gradcheck-able in float64). Returns a 0-d tensor of that dtype.
    """
    dtype = accumulate_dtype(student.dtype)
    student_views = (student.to(dtype) / student_temp).chunk(n_student_views)
    teacher_probs = torch.softmax((teacher.to(dtype) - center.to(dtype)) / teacher_temp, dim=-1).detach()
    total = student.new_zeros((), dtype=dtype)
    for v, q in enumerate(teacher_probs.chunk(n_teacher_views)):
        for u, logits in enumerate(student_views):
            if u == v:
                continue
            total = total + torch.sum(-q * torch.log_softmax(logits, dim=-1), dim=-1).mean()
    return total / pair_count(n_student_views, n_teacher_views)


@torch.compiler.assume_constant_result
def _resolved_backend(backend: str, device_type: str) -> str:
    # Backend availability is a property of the process, so torch.compile may bake the answer into the graph.
    return resolve_backend(backend, torch.device(device_type), OP_NAME)


@torch.library.custom_op("msd_fast::dino_loss", mutates_args=())
def _dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_student_views: int,
               n_teacher_views: int, student_temp: float, teacher_temp: float, compute_grad: bool,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused kernel call: ``(loss, grad_student)``; the gradient is for ``grad_output = 1`` (``[0]`` if not
    ``compute_grad``)."""
    center = center.to(accumulate_dtype(student.dtype)).contiguous()
    return kernels_for(backend).dino_loss(student.contiguous(), teacher.contiguous(), center, n_student_views,
                                          n_teacher_views, student_temp, teacher_temp, compute_grad)


@_dino_loss.register_fake
def _(student, teacher, center, n_student_views, n_teacher_views, student_temp, teacher_temp, compute_grad, backend):
    loss = student.new_empty((), dtype=accumulate_dtype(student.dtype))
    return loss, student.new_empty(student.shape if compute_grad else (0,))


def is_unit_cpu_gradient(grad_loss: torch.Tensor) -> bool:
    """Whether ``grad_loss`` is known to be 1 without a device sync: a CPU tensor in eager code (so a backward that
    saved its gradient for ``grad_output = 1`` may skip scaling it); False on GPUs and under ``torch.compile``."""
    return not torch.compiler.is_compiling() and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0


def _setup_context(ctx, inputs, output):
    ctx.compute_grad = inputs[7]
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd builds a zero [Vs*B, K] "gradient" of the gradient output
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_of_gradient):
    # The forward already holds ∂loss/∂student; scale it in place (as Liger-Kernel does) so that the backward
    # allocates nothing, and skip the pass over it when grad_loss is 1 (checked in eager CPU code only, where reading
    # it costs no device synchronisation). A graph kept with retain_graph=True cannot be backpropagated twice.
    if not ctx.compute_grad or grad_loss is None:
        return (None,) * 9
    if getattr(ctx, "gradient_consumed", False):
        raise RuntimeError("dino_loss: backward ran twice through one graph; its saved gradient is scaled in place, "
                           "so call the loss again instead of using retain_graph=True")
    ctx.gradient_consumed = True
    (grad_student,) = ctx.saved_tensors
    return (grad_student if is_unit_cpu_gradient(grad_loss) else grad_student.mul_(grad_loss),) + (None,) * 8


_dino_loss.register_autograd(_backward, setup_context=_setup_context)


def check_view_rows(student: torch.Tensor, teacher: torch.Tensor, n_student_views: int, n_teacher_views: int,
                    what: str = "K") -> int:
    """Check that 2-D view-major ``student [Vs*B, n]`` and ``teacher [Vt*B, n]`` share ``B >= 1`` and ``n >= 1``
    columns (called ``what`` in messages) and that the views form a pair; returns ``B``."""
    check_positive_int(n_student_views, "n_student_views")
    check_positive_int(n_teacher_views, "n_teacher_views")
    if student.shape[0] % n_student_views:
        raise ValueError(f"student has {student.shape[0]} rows, not a multiple of n_student_views={n_student_views}")
    if teacher.shape[0] % n_teacher_views:
        raise ValueError(f"teacher has {teacher.shape[0]} rows, not a multiple of n_teacher_views={n_teacher_views}")
    batch = student.shape[0] // n_student_views
    if batch == 0 or teacher.shape[0] // n_teacher_views != batch:
        raise ValueError(f"student ({student.shape[0]} rows / {n_student_views} views) and teacher "
                         f"({teacher.shape[0]} rows / {n_teacher_views} views) must have the same batch size >= 1")
    if student.shape[1] == 0 or teacher.shape[1] != student.shape[1]:
        raise ValueError(f"student and teacher must have the same {what} >= 1 columns, got {student.shape[1]} and "
                         f"{teacher.shape[1]}")
    if pair_count(n_student_views, n_teacher_views) == 0:
        raise ValueError("one student view and one teacher view form no (teacher view, other student view) pair")
    return batch


def check_temperatures(student_temp: float, teacher_temp: float) -> None:
    """Raise ``ValueError`` unless both temperatures are positive finite numbers."""
    for name, temp in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not 0 < temp < float("inf"):
            raise ValueError(f"{name} must be a positive finite number, got {temp!r}")


def check_dino_arguments(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_student_views: int,
                         n_teacher_views: int, student_temp: float, teacher_temp: float) -> None:
    """Raise a clear ``TypeError``/``ValueError`` naming the argument when a :func:`dino_loss` input is invalid."""
    for name, tensor in (("student", student), ("teacher", teacher), ("center", center)):
        check_tensor(tensor, name)
        check_dtype(tensor, LOGIT_DTYPES, name)
    check_dim(student, 2, "student", "[n_student_views * B, K]")
    check_dim(teacher, 2, "teacher", "[n_teacher_views * B, K]")
    check_same_device(teacher, student, "teacher", "student")
    check_same_device(center, student, "center", "student")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher must have the student's dtype {student.dtype}, got {teacher.dtype}")
    check_view_rows(student, teacher, n_student_views, n_teacher_views)
    if tuple(center.shape) != (student.shape[1],):
        raise ValueError(f"center must have shape ({student.shape[1]},), got {tuple(center.shape)}")
    check_temperatures(student_temp, teacher_temp)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, *, n_student_views: int,
              n_teacher_views: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
              backend: str = "auto") -> torch.Tensor:
    """DINO cross-entropy between the centered, sharpened teacher softmax and the student softmax.

    Args:
        student: ``[n_student_views * B, K]`` logits, view-major; float16, bfloat16, float32 or float64; finite.
        teacher: ``[n_teacher_views * B, K]`` logits of the same dtype and device, view-major; the first
            ``n_teacher_views`` student views are the teacher's views. Gets no gradient.
        center: ``[K]`` teacher center (any float dtype, used in float32; float64 for float64 logits).
        n_student_views, n_teacher_views: ``Vs`` and ``Vt``; they must form at least one pair ``u != v``.
        student_temp, teacher_temp: ``τ_s``, ``τ_t`` > 0.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        0-d loss (float32; float64 for float64 logits), differentiable w.r.t. ``student`` only; the gradient has
        the student's dtype. See the module docstring for the formula and its gradient.
    """
    check_dino_arguments(student, teacher, center, n_student_views, n_teacher_views, student_temp, teacher_temp)
    name = _resolved_backend(backend, student.device.type)
    if name == "reference":
        return dino_loss_reference(student, teacher, center, n_student_views, n_teacher_views, student_temp,
                                   teacher_temp)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    loss, _ = _dino_loss(student, teacher, center, n_student_views, n_teacher_views, float(student_temp),
                         float(teacher_temp), compute_grad, name)
    return loss
