"""pytest-benchmark: the DINO head's last layer + loss, forward + backward, fused (:func:`msd_fast.dino_head_loss`)
against the unfused path that pretraining runs without ``--fused-head`` (``F.linear`` to the whole logits, cast to
float32 as ``MaskedSamplingNet`` returns them, then :func:`msd_fast.dino_loss`), on each backend, and against the
eager reference (``F.linear`` + ``dino_loss_reference``).

Run ``pytest bench/bench_dino_head_loss.py --benchmark-only``. Shapes: 2 global + 10 local views (Vt = 2,
Vs = 12), bottleneck D = 256, K = 65536; GPU: B = 64, bfloat16 (the autocast dtype) and float32; CPU: B = 16,
float32. Gradients go to the student features and the (float32) weight. ``extra_info`` holds
``peak_extra_bytes`` (peak memory of one step beyond its inputs; see ``bench.common.peak_extra_memory``),
``gradient_bytes`` (the two gradients every provider returns: ``[Vs * B, D]`` and the ``[K, D]`` float32 weight
gradient) and ``logits_bytes``, the size of the unfused path's float32 logits ``[(Vs + Vt) * B, K]``: the target
is a fused peak beyond the gradients of at most 0.25x that.
"""
import pytest
import torch

from msd_fast import dino_head_loss, dino_loss
from msd_fast.ops.dino_loss import dino_loss_reference

from bench.common import DEVICE, describe, dtype_name, kernel_backends, peak_extra_memory, synchronized

TEACHER_VIEWS, STUDENT_VIEWS, WIDTH, OUT_DIM = 2, 12, 256, 65536
BATCH = 64 if DEVICE == "cuda" else 16
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def dtypes():
    return [torch.bfloat16, torch.float32] if DEVICE == "cuda" else [torch.float32]


def providers():
    return [f"{kind}-{backend}" for backend in kernel_backends() for kind in ("fused", "unfused")] + ["reference"]


def head_loss(provider: str):
    """``loss(features_s, features_t, weight_s, weight_t, center)`` of ``provider``."""
    kind, _, backend = provider.partition("-")
    if kind == "fused":
        def loss(x_s, x_t, w_s, w_t, center):
            return dino_head_loss(x_s, x_t, w_s, w_t, center, n_student_views=STUDENT_VIEWS,
                                  n_teacher_views=TEACHER_VIEWS, student_temp=STUDENT_TEMP,
                                  teacher_temp=TEACHER_TEMP, backend=backend)[0]
        return loss

    def loss(x_s, x_t, w_s, w_t, center):
        student = torch.nn.functional.linear(x_s, w_s.to(x_s.dtype)).float()
        with torch.no_grad():
            teacher = torch.nn.functional.linear(x_t, w_t.to(x_t.dtype)).float()
        if kind == "reference":
            return dino_loss_reference(student, teacher, center, STUDENT_VIEWS, TEACHER_VIEWS, STUDENT_TEMP,
                                       TEACHER_TEMP)
        return dino_loss(student, teacher, center, n_student_views=STUDENT_VIEWS, n_teacher_views=TEACHER_VIEWS,
                         student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP, backend=backend)
    return loss


def make_step(batch: int, dtype: torch.dtype, provider: str):
    """One forward + backward of ``provider`` on unit-norm features and weight rows (warmed up), the unfused float32
    logits' bytes and the gradients' bytes."""
    generator = torch.Generator().manual_seed(0)

    def unit_rows(rows):
        return torch.nn.functional.normalize(torch.randn(rows, WIDTH, generator=generator), dim=1).to(DEVICE)

    x_s = unit_rows(STUDENT_VIEWS * batch).to(dtype).requires_grad_()
    x_t = unit_rows(TEACHER_VIEWS * batch).to(dtype)
    w_s, w_t = unit_rows(OUT_DIM).requires_grad_(), unit_rows(OUT_DIM)
    center = torch.zeros(OUT_DIM, device=DEVICE)
    loss_fn = head_loss(provider)

    def step():
        loss = loss_fn(x_s, x_t, w_s, w_t, center)
        loss.backward()
        x_s.grad = w_s.grad = None
        return loss

    step()
    gradient_bytes = x_s.numel() * x_s.element_size() + w_s.numel() * 4
    return step, (STUDENT_VIEWS + TEACHER_VIEWS) * batch * OUT_DIM * 4, gradient_bytes


@pytest.mark.parametrize("dtype", dtypes(), ids=dtype_name)
@pytest.mark.parametrize("provider", providers())
def bench_dino_head_loss(benchmark, provider, dtype):
    shape = f"B={BATCH} Vt={TEACHER_VIEWS} Vs={STUDENT_VIEWS} D={WIDTH} K={OUT_DIM}"
    step, logits_bytes, gradient_bytes = make_step(BATCH, dtype, provider)
    step = synchronized(step)
    describe(benchmark, op="dino_head_loss", mode="forward_backward", shape=shape, dtype=dtype_name(dtype),
             provider=provider, peak_extra_bytes=peak_extra_memory(step), gradient_bytes=gradient_bytes,
             logits_bytes=logits_bytes)
    loss = benchmark.pedantic(step, rounds=3 if DEVICE == "cpu" else 10, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)
