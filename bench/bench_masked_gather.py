"""pytest-benchmark of masked_gather at ViT shapes: each backend vs the eager reference, ``torch.compile`` of the
reference and a plain copy.

    pytest bench/bench_masked_gather.py --benchmark-only [--benchmark-json=masked_gather.json]

One step makes DINO's views of one batch: 2 global views keeping 0.5 and 8 local views keeping 0.2 of the ``N``
patch tokens, one class token (``P = 1``) and a shared ``[N, D]`` position embedding -- two ``masked_gather`` calls.
``forward`` times the two calls; ``forward_backward`` adds the backward (grad_out given, grads for tokens, pos and
prefix). Providers (see bench/common.py): our backends, ``reference`` (the eager index + add + cat and its
autograd), ``compile`` (``torch.compile`` of that reference) and ``copy`` (``copy_`` of a tensor with the outputs'
bytes; twice for forward_backward, once for the outputs and once for their gradients) -- the bandwidth bound.
``bytes_moved`` is what the copy moves (read + write).

On CPU only the ViT-S/16 shape runs by default (set ``MSD_FAST_BENCH_ALL_SHAPES=1`` for ViT-B/16 at N = 1024).
"""
import os

import pytest
import torch

from msd_fast import masked_gather, sample_views
from msd_fast.ops.masked_gather import masked_gather_reference

from bench.common import (DEVICE, compile_reference, describe, dtype_name, group_name, kernel_backends,
                          synchronized)

SHAPES = {"vit_s16": (64, 196, 384), "vit_b16_n1024": (64, 1024, 768)}  # (B, N, D)
VIEW_GROUPS = [(2, 0.5), (8, 0.2)]  # (views, keep): DINO's global and local views
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
MODES = ["forward", "forward_backward"]


def shape_ids() -> list:
    if DEVICE == "cpu" and os.environ.get("MSD_FAST_BENCH_ALL_SHAPES", "0") != "1":
        return ["vit_s16"]
    return list(SHAPES)


def make_step(shape: tuple, dtype: torch.dtype, mode: str, provider: str, group: str = ""):
    """One step for tokens ``shape = (B, N, D)`` by ``provider`` (not synchronised, warmed up), and the bytes a copy
    of its outputs (and, for forward_backward, of their gradients) moves. ``group`` names it in a compile failure."""
    B, N, D = shape
    generator = torch.Generator(DEVICE).manual_seed(0)
    needs_grad = mode == "forward_backward"
    tokens = torch.randn(B, N, D, device=DEVICE, dtype=dtype, requires_grad=needs_grad)
    pos = torch.randn(N, D, device=DEVICE, dtype=dtype, requires_grad=needs_grad)
    prefix = torch.randn(1, D, device=DEVICE, dtype=dtype, requires_grad=needs_grad)
    views = [sample_views(B, N, V, keep, generator=generator, device=DEVICE) for V, keep in VIEW_GROUPS]
    outputs = [masked_gather_reference(tokens, idx, pos, prefix) for idx in views]
    copies = 2 if needs_grad else 1
    bytes_moved = 2 * copies * sum(out.numel() * out.element_size() for out in outputs)
    grads = [torch.randn_like(out) for out in outputs]

    if provider == "copy":
        sources = [out.detach().clone() for out in outputs] * copies
        targets = [torch.empty_like(source) for source in sources]

        def copy_step():
            for target, source in zip(targets, sources):
                target.copy_(source)
        return copy_step, bytes_moved

    def step_with(run):
        outs = run(tokens, pos, prefix, *views)
        if needs_grad:
            torch.autograd.backward(outs, grads)
            for tensor in (tokens, pos, prefix):
                tensor.grad = None

    if provider == "compile":
        def gather_views(tokens, pos, prefix, *views):
            return [masked_gather_reference(tokens, idx, pos, prefix) for idx in views]
        run = compile_reference(gather_views, step_with, group)  # compiles the backward too
    else:
        def run(tokens, pos, prefix, *views):
            return [masked_gather(tokens, idx, pos=pos, prefix=prefix, backend=provider) for idx in views]

    def step():
        step_with(run)
    step()  # warm-up: Triton compilation, allocator
    return step, bytes_moved


@pytest.mark.parametrize("provider", kernel_backends() + ["reference", "compile", "copy"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", shape_ids())
def bench_masked_gather(benchmark, shape, dtype, mode, provider):
    group = group_name("masked_gather", mode, shape, dtype_name(dtype))
    step, bytes_moved = make_step(SHAPES[shape], dtype, mode, provider, group)
    describe(benchmark, op="masked_gather", mode=mode, shape=shape, dtype=dtype_name(dtype), provider=provider,
             bytes_moved=bytes_moved)
    benchmark(synchronized(step))
