"""pytest-benchmark of masked_gather at ViT shapes: each backend vs the eager reference and vs a plain copy.

    pytest bench/bench_masked_gather.py --benchmark-only [--benchmark-json=masked_gather.json]

One step makes DINO's views of one batch: 2 global views keeping 0.5 and 8 local views keeping 0.2 of the ``N``
patch tokens, one class token (``P = 1``) and a shared ``[N, D]`` position embedding -- two ``masked_gather`` calls.
``forward`` times the two calls; ``forward_backward`` adds the backward (grad_out given, grads for tokens, pos and
prefix). Providers: every backend that runs on the device, ``reference`` (the eager index + add + cat and its
autograd) and ``copy`` (``copy_`` of a tensor with the outputs' bytes; twice for forward_backward, once for the
outputs and once for their gradients) -- the bandwidth bound. Each record's ``extra_info`` holds the device, dtype,
torch version and the output bytes; compare medians within one run (the machine may be shared).

On CPU only the ViT-S/16 shape runs by default (set ``MSD_FAST_BENCH_ALL_SHAPES=1`` for ViT-B/16 at N = 1024).
"""
import os

import pytest
import torch

from msd_fast import masked_gather, sample_views

from conftest import DEVICE, kernel_backends
SHAPES = {"vit_s16": (64, 196, 384), "vit_b16_n1024": (64, 1024, 768)}  # (B, N, D)
VIEW_GROUPS = [(2, 0.5), (8, 0.2)]  # (views, keep): DINO's global and local views
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
MODES = ["forward", "forward_backward"]


def shape_ids() -> list:
    if DEVICE == "cpu" and os.environ.get("MSD_FAST_BENCH_ALL_SHAPES", "0") != "1":
        return ["vit_s16"]
    return list(SHAPES)


def make_step(shape: str, dtype: torch.dtype, mode: str, provider: str):
    """A zero-argument callable running one step, and the number of output bytes it produces."""
    B, N, D = SHAPES[shape]
    generator = torch.Generator(DEVICE).manual_seed(0)
    needs_grad = mode == "forward_backward"
    tokens = torch.randn(B, N, D, device=DEVICE, dtype=dtype, requires_grad=needs_grad)
    pos = torch.randn(N, D, device=DEVICE, dtype=dtype, requires_grad=needs_grad)
    prefix = torch.randn(1, D, device=DEVICE, dtype=dtype, requires_grad=needs_grad)
    views = [sample_views(B, N, V, keep, generator=generator, device=DEVICE) for V, keep in VIEW_GROUPS]
    outputs = [masked_gather(tokens, idx, pos=pos, prefix=prefix, backend="reference") for idx in views]
    out_bytes = sum(out.numel() * out.element_size() for out in outputs)
    grads = [torch.randn_like(out) for out in outputs]
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    if provider == "copy":
        sources = [out.detach().clone() for out in outputs] * (2 if needs_grad else 1)
        targets = [torch.empty_like(source) for source in sources]

        def step():
            for target, source in zip(targets, sources):
                target.copy_(source)
            sync()
        return step, out_bytes

    def step():
        outs = [masked_gather(tokens, idx, pos=pos, prefix=prefix, backend=provider) for idx in views]
        if needs_grad:
            torch.autograd.backward(outs, grads)
            for tensor in (tokens, pos, prefix):
                tensor.grad = None
        sync()
    return step, out_bytes


@pytest.mark.parametrize("provider", kernel_backends() + ["reference", "copy"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", shape_ids())
def test_masked_gather_step(benchmark, shape, dtype, mode, provider):
    benchmark.group = f"masked_gather {shape} {str(dtype).replace('torch.', '')} {mode} on {DEVICE}"
    step, out_bytes = make_step(shape, dtype, mode, provider)
    step()  # warm-up: Triton compilation, allocator
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        torch=torch.__version__, dtype=str(dtype), output_bytes=out_bytes)
    benchmark(step)
