"""pytest-benchmark: dino_loss forward + backward, each available backend vs the eager DINO reference.

Run ``pytest bench/bench_dino_loss.py --benchmark-only [--benchmark-json out.json]``. Shapes: B = 64 images,
Vt = 2 teacher views, Vs = 10 student views, K = 65536 and 4096, float32 (and bfloat16 on GPU). Each result's
``extra_info`` holds the device, versions, the peak memory beyond the inputs (CUDA: ``max_memory_allocated``;
CPU: resident set size sampled every millisecond) and that peak as a multiple of the student logits' size.
"""
import os
import platform
import threading
import time

import pytest
import torch

from msd_fast import dino_loss

from conftest import DEVICE, kernel_backends

BATCH, TEACHER_VIEWS, STUDENT_VIEWS = 64, 2, 10
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


class PeakResidentMemory:
    """Peak resident set size of this process above its level at entry, sampled every millisecond."""

    def __enter__(self):
        self.baseline = self.peak = _resident_bytes()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, _resident_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _resident_bytes())
        self.extra = self.peak - self.baseline


def peak_extra_memory(step) -> int:
    """Bytes allocated by one call of ``step`` beyond what was allocated before it."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline
    with PeakResidentMemory() as memory:
        step()
    return memory.extra


def dtypes():
    return [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


@pytest.mark.parametrize("dtype", dtypes(), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("out_dim", [65536, 4096])
@pytest.mark.parametrize("provider", kernel_backends() + ["reference"])
def test_dino_loss_forward_backward(benchmark, provider, out_dim, dtype):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(STUDENT_VIEWS * BATCH, out_dim, generator=generator).to(DEVICE, dtype)
    teacher = torch.randn(TEACHER_VIEWS * BATCH, out_dim, generator=generator).to(DEVICE, dtype)
    center = torch.zeros(out_dim, device=DEVICE)
    student.requires_grad_()

    def step():
        loss = dino_loss(student, teacher, center, n_student_views=STUDENT_VIEWS, n_teacher_views=TEACHER_VIEWS,
                         backend=provider)
        loss.backward()
        student.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return loss

    step()  # warm up: kernel compilation, first-touch of the allocator's pages
    extra = peak_extra_memory(step)
    student_bytes = student.numel() * student.element_size()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or platform.machine(),
        threads=torch.get_num_threads(), torch=torch.__version__, provider=provider,
        shape=f"B={BATCH} Vt={TEACHER_VIEWS} Vs={STUDENT_VIEWS} K={out_dim}", dtype=str(dtype),
        peak_extra_bytes=extra, peak_extra_over_student_logits=round(extra / student_bytes, 3),
    )
    rounds = 3 if DEVICE == "cpu" and out_dim == 65536 else 10
    loss = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)
