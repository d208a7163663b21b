"""pytest-benchmark: dino_loss forward + backward, each backend vs the eager DINO reference and ``torch.compile`` of
it.

Run ``pytest bench/bench_dino_loss.py --benchmark-only [--benchmark-json out.json]``. Shapes: B = 64 images,
Vt = 2 teacher views, Vs = 10 student views, K = 65536 and 4096, float32 (and bfloat16 on GPU). Each record's
``extra_info`` holds ``peak_extra_bytes``, the peak memory of one step beyond the inputs (CUDA:
``max_memory_allocated``; CPU: the CPU allocator's peak, from the profiler's memory events), and ``logits_bytes``,
the size of the student logits (the gradient itself is that large, so 1.0x is the floor for any loss that returns it).
"""
import pytest
import torch

from msd_fast import dino_loss
from msd_fast.ops.dino_loss import dino_loss_reference

from bench.common import (DEVICE, compile_reference, describe, dtype_name, group_name, kernel_backends,
                          peak_extra_memory, synchronized)

BATCH, TEACHER_VIEWS, STUDENT_VIEWS = 64, 2, 10
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def dtypes():
    return [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


def shape_label(batch: int, out_dim: int) -> str:
    return f"B={batch} Vt={TEACHER_VIEWS} Vs={STUDENT_VIEWS} K={out_dim}"


def make_step(batch: int, out_dim: int, dtype: torch.dtype, provider: str, group: str = ""):
    """One forward + backward of the loss over ``[Vs*B, K]`` student and ``[Vt*B, K]`` teacher logits by
    ``provider`` (not synchronised, warmed up; returns the loss), and the student logits' bytes."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(STUDENT_VIEWS * batch, out_dim, generator=generator).to(DEVICE, dtype)
    teacher = torch.randn(TEACHER_VIEWS * batch, out_dim, generator=generator).to(DEVICE, dtype)
    center = torch.zeros(out_dim, device=DEVICE)
    student.requires_grad_()
    arguments = (student, teacher, center, STUDENT_VIEWS, TEACHER_VIEWS, STUDENT_TEMP, TEACHER_TEMP)

    if provider == "compile":
        loss_fn = compile_reference(dino_loss_reference, lambda fn: fn(*arguments).backward(), group)
    else:
        def loss_fn(student, teacher, center, n_student_views, n_teacher_views, student_temp, teacher_temp):
            return dino_loss(student, teacher, center, n_student_views=n_student_views,
                             n_teacher_views=n_teacher_views, student_temp=student_temp, teacher_temp=teacher_temp,
                             backend=provider)

    def step():
        loss = loss_fn(*arguments)
        loss.backward()
        student.grad = None
        return loss

    step()  # warm up: kernel compilation, first-touch of the allocator's pages
    return step, student.numel() * student.element_size()


@pytest.mark.parametrize("dtype", dtypes(), ids=dtype_name)
@pytest.mark.parametrize("out_dim", [65536, 4096])
@pytest.mark.parametrize("provider", kernel_backends() + ["reference", "compile"])
def bench_dino_loss(benchmark, provider, out_dim, dtype):
    shape = shape_label(BATCH, out_dim)
    step, logits_bytes = make_step(BATCH, out_dim, dtype, provider, group_name("dino_loss", "forward_backward", shape,
                                                                                dtype_name(dtype)))
    step = synchronized(step)
    describe(benchmark, op="dino_loss", mode="forward_backward", shape=shape, dtype=dtype_name(dtype),
             provider=provider, peak_extra_bytes=peak_extra_memory(step), logits_bytes=logits_bytes)
    rounds = 3 if DEVICE == "cpu" and out_dim == 65536 else 10
    loss = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)
