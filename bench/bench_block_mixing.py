"""Block-mixing encrypt/decrypt throughput: every kernel backend vs the eager reference, ``torch.compile`` of the
reference and a plain converting copy of the same bytes (``copy_`` from the input's dtype into the output's: reads
the input, writes an output of the op's dtype -- the bandwidth limit; the op itself also does ``L`` multiply-adds
per value, so it is compute-bound at ViT patch sizes).

    pytest bench/bench_block_mixing.py --benchmark-only [--benchmark-json=block_mixing.json]

Shapes from DESIGN.md: B = 64 RGB 224x224 and grayscale 512x512 images, p = 16 (L = 768 and 256 values mixed per
block), uint8 images to a float16 or float32 ciphertext (encrypt) and back (decrypt, rounding to uint8), block
scrambling on. ``bytes_moved`` = input + output bytes. On CPU only the RGB shape runs by default (set
``MSD_FAST_BENCH_ALL_SHAPES=1`` for both).
"""
import os

import pytest
import torch

from msd_fast import Key
from msd_fast.ops.block_mixing import decrypt_blocks, encrypt_blocks, mix_blocks_reference

from bench.common import DEVICE, compile_reference, describe, dtype_name, group_name, kernel_backends, synchronized

KEY = Key.from_secret(b"benchmark key")
PATCH = 16
MAX_VALUE = 255.0
SHAPES = {"64x3x224x224": (64, 3, 224, 224), "64x1x512x512": (64, 1, 512, 512)}
CIPHER_DTYPES = [torch.float16, torch.float32]
PROVIDERS = ["reference", "compile"] + kernel_backends() + ["copy"]


def shape_ids() -> list:
    if DEVICE == "cpu" and os.environ.get("MSD_FAST_BENCH_ALL_SHAPES", "0") != "1":
        return ["64x3x224x224"]
    return list(SHAPES)


def decrypt_reference(y, matrix_t, inverse, bias, max_value, patch_size):
    """The reference decryption to uint8 (what :func:`decrypt_blocks` computes), as one function to compile."""
    return mix_blocks_reference(y, matrix_t, inverse, bias, max_value, patch_size, torch.float32).round().clamp(
        0, 255).to(torch.uint8)


def make_step(shape: tuple, cipher_dtype: torch.dtype, direction: str, provider: str, group: str = ""):
    """One encrypt (uint8 -> ``cipher_dtype``) or decrypt (``cipher_dtype`` -> uint8) call of ``[B, C, H, W]`` images
    by ``provider`` (not synchronised, warmed up), and the bytes it moves. ``group`` names it in a compile failure."""
    B, C, H, W = shape
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=DEVICE)
    if direction == "encrypt":
        source, out_dtype = images, cipher_dtype
    else:
        source, out_dtype = encrypt_blocks(images, KEY, PATCH, out_dtype=cipher_dtype, backend="reference"), torch.uint8
    bytes_moved = source.numel() * (source.element_size() + torch.empty((), dtype=out_dtype).element_size())
    if provider == "copy":
        target = torch.empty(shape, dtype=out_dtype, device=DEVICE)
        return (lambda: target.copy_(source)), bytes_moved
    if provider == "compile":  # the bare reference with the key's tables: what a user would write and compile
        L, N = C * PATCH * PATCH, (H // PATCH) * (W // PATCH)
        matrix = KEY.block_matrix(L).to(device=DEVICE, dtype=torch.float32)
        order = KEY.block_permutation(N).to(DEVICE)
        if direction == "encrypt":
            bias = (-0.5 * KEY.block_matrix(L).sum(dim=1)).to(device=DEVICE, dtype=torch.float32)
            arguments = (source, matrix, order, bias, 1.0 / MAX_VALUE, PATCH, out_dtype)
            fn = mix_blocks_reference
        else:
            bias = torch.full((L,), 0.5 * MAX_VALUE, device=DEVICE)
            arguments = (source, matrix.t().contiguous(), torch.argsort(order), bias, MAX_VALUE, PATCH)
            fn = decrypt_reference
        compiled = compile_reference(fn, lambda f: f(*arguments), group)
        return (lambda: compiled(*arguments)), bytes_moved
    if direction == "encrypt":
        def step():
            return encrypt_blocks(source, KEY, PATCH, out_dtype=cipher_dtype, backend=provider)
    else:
        def step():
            return decrypt_blocks(source, KEY, PATCH, backend=provider)
    step()  # warm the key's matrix cache (and Triton's JIT)
    return step, bytes_moved


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
@pytest.mark.parametrize("cipher_dtype", CIPHER_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape_name", shape_ids())
def bench_block_mixing(benchmark, shape_name, cipher_dtype, direction, provider):
    label = f"uint8<->{dtype_name(cipher_dtype)}"
    group = group_name(f"block_mix {direction}", "forward", shape_name, label)
    step, bytes_moved = make_step(SHAPES[shape_name], cipher_dtype, direction, provider, group)
    describe(benchmark, op=f"block_mix {direction}", mode="forward", shape=shape_name, dtype=label,
             provider=provider, bytes_moved=bytes_moved)
    benchmark(synchronized(step))
