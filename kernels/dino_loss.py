"""Triton kernel of the DINO distillation loss (contract: ``msd_fast/ops/dino_loss.py``, ``csrc/cpu/dino_loss.cpp``).

One program per student row ``(u, b)`` (``grid = (Vs*B,)``), Liger-Kernel style: it streams its row and the ``Vt``
teacher rows of sample ``b`` in ``BLOCK_K`` column chunks, twice.

* Pass 1 (online softmax): per teacher view the running max ``M_v`` and sum ``S_v`` of ``exp(y_v - M_v)``; for the
  student row the running max ``m`` and sum of ``exp(z - m)``; and per teacher view
  ``D_v = Σ_k exp(y_v - M_v) · (m - z_k)``, a sum of non-negative terms kept exact for unbounded logits by rescaling
  with ``M_v`` and shifting by ``(m_new - m_old) · S_v``. Row loss ``= Σ_{v≠u} D_v / S_v + m_u · log(sum)``.
* Pass 2 (only when the gradient is wanted, i.e. inside the forward): ``grad = scale · (m_u · softmax(z) -
  Σ_{v≠u} q_v)`` stored in the logits' dtype, so the backward is a scale by ``grad_output``.

The teacher statistics are recomputed by each of the ``Vs`` programs of a sample (cheap next to the memory traffic,
and the sample's teacher rows are read from L2); extra memory is the gradient plus ``Vs*B`` row losses.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _dino_loss_kernel(student_ptr, teacher_ptr, center_ptr, grad_ptr, row_loss_ptr, batch, n_cols,
                      inv_student_temp, inv_teacher_temp, grad_scale,
                      TEACHER_VIEWS: tl.constexpr, TEACHER_VIEWS_POW2: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                      ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    u = row // batch
    b = row % batch
    views = tl.arange(0, TEACHER_VIEWS_POW2)
    view_exists = views < TEACHER_VIEWS
    is_target = view_exists & (views != u)
    teacher_rows = teacher_ptr + ((views.to(tl.int64) * batch + b) * n_cols)[:, None]
    student_row = student_ptr + row * n_cols

    teacher_max = tl.full([TEACHER_VIEWS_POW2], float("-inf"), ACC_DTYPE)
    teacher_sum = tl.zeros([TEACHER_VIEWS_POW2], ACC_DTYPE)
    pair_sum = tl.zeros([TEACHER_VIEWS_POW2], ACC_DTYPE)
    student_max = tl.full([], float("-inf"), ACC_DTYPE)
    student_sum = tl.zeros([], ACC_DTYPE)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        in_row = cols < n_cols
        # 1. Teacher views: online max/sum of exp(y_v - M_v); a larger max rescales the sum (and D_v below).
        y = _teacher_logits(teacher_rows, center_ptr, cols, in_row, view_exists, inv_teacher_temp, ACC_DTYPE)
        new_teacher_max = tl.maximum(teacher_max, tl.max(y, axis=1))
        rescale = tl.exp(teacher_max - new_teacher_max)
        teacher_sum_before = teacher_sum * rescale
        teacher_exp = tl.exp(y - new_teacher_max[:, None])
        teacher_sum = teacher_sum_before + tl.sum(teacher_exp, axis=1)
        teacher_max = new_teacher_max

        # 2. Student row: online max/sum of exp(z - m); a larger m shifts every earlier (m - z) term.
        z = _student_logits(student_row, cols, in_row, inv_student_temp, ACC_DTYPE)
        new_student_max = tl.maximum(student_max, tl.max(z, axis=0))
        shift = tl.where(student_max == float("-inf"), 0.0, new_student_max - student_max)
        student_sum = student_sum * tl.exp(-shift) + tl.sum(tl.exp(z - new_student_max), axis=0)
        distance = tl.where(in_row, new_student_max - z, 0.0)
        # 3. D_v = sum_k exp(y_v - M_v) * (m - z_k): rescaled, shifted by (m_new - m_old) * S_v, plus this chunk.
        pair_sum = pair_sum * rescale + shift * teacher_sum_before + tl.sum(teacher_exp * distance[None, :], axis=1)
        student_max = new_student_max

    # 4. Row loss = count * log(S_student) + sum_{v != u} D_v / S_v.
    target_count = tl.sum(is_target.to(ACC_DTYPE), axis=0)
    row_loss = target_count * tl.log(student_sum) + tl.sum(tl.where(is_target, pair_sum / teacher_sum, 0.0), axis=0)
    tl.store(row_loss_ptr + row, row_loss)

    if COMPUTE_GRAD:
        # 5. Pass 2: grad = scale * (count * softmax(z) - sum_{v != u} softmax(y_v)), re-reading the chunks.
        teacher_lse = teacher_max + tl.log(teacher_sum)
        student_lse = student_max + tl.log(student_sum)
        grad_row = grad_ptr + row * n_cols
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            in_row = cols < n_cols
            y = _teacher_logits(teacher_rows, center_ptr, cols, in_row, view_exists, inv_teacher_temp, ACC_DTYPE)
            target = tl.sum(tl.where(is_target[:, None], tl.exp(y - teacher_lse[:, None]), 0.0), axis=0)
            z = _student_logits(student_row, cols, in_row, inv_student_temp, ACC_DTYPE)
            grad = grad_scale * (target_count * tl.exp(z - student_lse) - target)
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _teacher_logits(teacher_rows, center_ptr, cols, in_row, view_exists, inv_teacher_temp, ACC_DTYPE: tl.constexpr):
    """``(t - c) / τ_t`` of one chunk, ``[TEACHER_VIEWS_POW2, BLOCK_K]``; -inf past the row's end (padding views
    read as 0 and are never used as targets)."""
    center = tl.load(center_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
    teacher = tl.load(teacher_rows + cols[None, :], mask=view_exists[:, None] & in_row[None, :], other=0.0)
    y = (teacher.to(ACC_DTYPE) - center[None, :]) * inv_teacher_temp
    return tl.where(in_row[None, :], y, float("-inf"))


@triton.jit
def _student_logits(student_row, cols, in_row, inv_student_temp, ACC_DTYPE: tl.constexpr):
    """``s / τ_s`` of one chunk, ``[BLOCK_K]``; -inf past the row's end."""
    student = tl.load(student_row + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
    return tl.where(in_row, student * inv_student_temp, float("-inf"))


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_student_views: int,
              n_teacher_views: int, student_temp: float, teacher_temp: float, compute_grad: bool):
    """Launch the kernel on contiguous ``student [Vs*B, K]``, ``teacher [Vt*B, K]`` (same dtype) and ``center [K]``
    (float32; float64 for float64 logits), already validated. Returns ``(loss, grad_student)`` like the C++ kernels:
    a 0-d loss in the center's dtype and the gradient for ``grad_output = 1`` (``[0]`` if not ``compute_grad``)."""
    n_rows, n_cols = student.shape
    batch = n_rows // n_student_views
    pairs = n_teacher_views * n_student_views - min(n_teacher_views, n_student_views)
    row_losses = torch.empty(n_rows, dtype=center.dtype, device=student.device)
    grad = torch.empty_like(student) if compute_grad else student.new_empty((0,))
    teacher_views_pow2 = max(2, triton.next_power_of_2(n_teacher_views))
    block_k = min(triton.next_power_of_2(n_cols), max(256, 4096 // teacher_views_pow2))
    _dino_loss_kernel[(n_rows,)](
        student, teacher, center, grad if compute_grad else student, row_losses, batch, n_cols,
        1.0 / student_temp, 1.0 / teacher_temp, 1.0 / (student_temp * pairs * batch),
        TEACHER_VIEWS=n_teacher_views, TEACHER_VIEWS_POW2=teacher_views_pow2, COMPUTE_GRAD=compute_grad,
        ACC_DTYPE=tl.float64 if center.dtype == torch.float64 else tl.float32, BLOCK_K=block_k, num_warps=8,
    )
    return row_losses.sum() / (pairs * batch), grad
