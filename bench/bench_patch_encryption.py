"""Encrypt/decrypt throughput: every kernel backend vs the eager reference and vs a plain copy (the bandwidth
limit: same bytes read and written). Shapes from DESIGN.md: B = 64 RGB 224x224 and grayscale 512x512 images."""
import pytest
import torch

from msd_fast import Key, decrypt_patches, encrypt_patches

from conftest import DEVICE, kernel_backends

KEY = Key.from_secret(b"benchmark key")
SHAPES = {"64x3x224x224": (64, 3, 224, 224), "64x1x512x512": (64, 1, 512, 512)}
DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
PROVIDERS = ["reference"] + kernel_backends() + ["clone"]


def _images(shape, dtype):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=dtype, device=DEVICE)
    return torch.rand(shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def bench_patch_encryption(benchmark, timed, shape_name, dtype_name, direction, provider):
    x = _images(SHAPES[shape_name], DTYPES[dtype_name])
    benchmark.group = f"patch_encryption {direction} {shape_name} {dtype_name} {DEVICE}"
    benchmark.extra_info.update(op="patch_encryption", direction=direction, shape=shape_name, dtype=dtype_name,
                                provider=provider, device=DEVICE, bytes_moved=2 * x.numel() * x.element_size())
    if provider == "clone":
        timed(torch.clone, x)
        return
    op = encrypt_patches if direction == "encrypt" else decrypt_patches
    options = dict(block_scramble=True, pixel_shuffle=True, negpos=True, backend=provider)
    op(x, KEY, 16, **options)  # warm the key's table cache (and Triton's JIT)
    timed(op, x, KEY, 16, **options)
