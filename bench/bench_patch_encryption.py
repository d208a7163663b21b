"""Encrypt/decrypt throughput: every kernel backend vs the eager reference, ``torch.compile`` of the reference and a
plain copy of the same bytes (``torch.clone``: reads ``x``, writes a fresh output -- the bandwidth limit).

Shapes from DESIGN.md: B = 64 RGB 224x224 and grayscale 512x512 images, p = 16, all three transforms (block
scrambling, pixel shuffling, negative-positive). ``bytes_moved`` = input + output bytes.
"""
import pytest
import torch

from msd_fast import Key, decrypt_patches, encrypt_patches
from msd_fast.ops.patch_encryption import key_tables, permute_patches_reference, resolve_max_value

from bench.common import DEVICE, compile_reference, describe, group_name, kernel_backends, synchronized

KEY = Key.from_secret(b"benchmark key")
PATCH = 16
SHAPES = {"64x3x224x224": (64, 3, 224, 224), "64x1x512x512": (64, 1, 512, 512)}
DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
PROVIDERS = ["reference", "compile"] + kernel_backends() + ["copy"]
OPTIONS = dict(block_scramble=True, pixel_shuffle=True, negpos=True)


def _images(shape, dtype):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=dtype, device=DEVICE)
    return torch.rand(shape, dtype=dtype, device=DEVICE)


def make_step(shape: tuple, dtype: torch.dtype, direction: str, provider: str, group: str = "",
              options: dict = OPTIONS):
    """One encrypt/decrypt call of ``[B, C, H, W]`` images by ``provider`` with the transforms ``options`` (not
    synchronised, warmed up), and the bytes it moves. ``group`` names the benchmark in a compile failure."""
    x = _images(shape, dtype)
    bytes_moved = 2 * x.numel() * x.element_size()
    if provider == "copy":
        return (lambda: torch.clone(x)), bytes_moved
    if provider == "compile":  # the bare reference with the key's tables: what a user would write and compile
        B, C, H, W = shape
        tables = key_tables(KEY, (H // PATCH) * (W // PATCH), C * PATCH * PATCH, sample_ids=None,
                            decrypt=direction == "decrypt", **options).to(x.device)
        max_value = resolve_max_value(None, x.dtype)
        compiled = compile_reference(permute_patches_reference, lambda fn: fn(x, tables, PATCH, max_value), group)
        return (lambda: compiled(x, tables, PATCH, max_value)), bytes_moved
    op = encrypt_patches if direction == "encrypt" else decrypt_patches
    op(x, KEY, PATCH, backend=provider, **options)  # warm the key's table cache (and Triton's JIT)
    return (lambda: op(x, KEY, PATCH, backend=provider, **options)), bytes_moved


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def bench_patch_encryption(benchmark, shape_name, dtype_name, direction, provider):
    group = group_name(direction, "forward", shape_name, dtype_name)
    step, bytes_moved = make_step(SHAPES[shape_name], DTYPES[dtype_name], direction, provider, group)
    describe(benchmark, op=direction, mode="forward", shape=shape_name, dtype=dtype_name, provider=provider,
             bytes_moved=bytes_moved)
    benchmark(synchronized(step))
