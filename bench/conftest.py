"""Benchmark configuration: providers per device. Triton is benchmarked only on a GPU (its CPU interpreter is a
correctness tool, not a performance backend)."""
import pytest
import torch

import msd_fast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel_backends() -> list:
    """Non-reference backends that can be timed on ``DEVICE``."""
    status = msd_fast.backends()
    wanted = ("cuda", "triton") if DEVICE == "cuda" else ("cpu",)
    return [name for name in wanted if status[name].available]


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def timed(benchmark):
    """``timed(fn, *args)``: benchmark ``fn`` with device synchronisation; returns the last result."""
    def run(fn, *args, **kwargs):
        def call():
            out = fn(*args, **kwargs)
            synchronize()
            return out
        return benchmark(call)
    return run
