import itertools

import pytest
import torch

import msd_fast
from msd_fast import BackendUnavailableError, Key, decrypt_patches, encrypt_patches
from msd_fast.backends import resolve_backend
from msd_fast.ops.patch_encryption import make_tables, permute_patches, permute_patches_reference

from helpers import random_images, runnable_backends

KEY = Key.from_secret(b"test key for patch encryption")
DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64]
# (B, C, H, W, p): non-square, B = 1, C = 1, p = 1, p = 7, odd grids
SHAPES = [(1, 1, 6, 10, 2), (3, 3, 12, 8, 4), (2, 2, 5, 7, 1), (2, 3, 14, 28, 7), (1, 4, 16, 16, 16)]
OPTIONS = [dict(block_scramble=b, pixel_shuffle=s, negpos=n) for b, s, n in itertools.product([True, False], repeat=3)]
BACKENDS = runnable_backends("cpu")


def test_hand_computed_case():
    # x = [[0 1 2 3], [4 5 6 7]], p = 2: block 0 holds values [0 1 4 5], block 1 holds [2 3 6 7].
    x = torch.arange(8, dtype=torch.float32).reshape(1, 1, 2, 4)
    tables = make_tables(torch.tensor([1, 0]), torch.tensor([3, 2, 1, 0]), torch.tensor([1, 0, 0, 0],
                         dtype=torch.uint8), n_blocks=2, n_values=4)
    # out block 0 = block 1 reversed = [7 6 3 2], first value flipped 10 - 7 = 3; out block 1 = [5 4 1 0] -> [5 4 1 0]
    # with its first value flipped to 10 - 5 = 5.
    expected = torch.tensor([[3.0, 6.0, 5.0, 4.0], [3.0, 2.0, 1.0, 0.0]]).reshape(1, 1, 2, 4)
    assert torch.equal(permute_patches_reference(x, tables, 2, 10.0), expected)
    for backend in BACKENDS:
        assert torch.equal(permute_patches(x, tables, 2, 10.0, backend), expected), backend


def test_key_encryption_matches_key_tables():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    y = encrypt_patches(x, KEY, 2, pixel_shuffle=True, negpos=True, max_value=1000.0, backend="reference")
    blocks = x.reshape(2, 3, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 6, 12)
    enc = y.reshape(2, 3, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 6, 12)
    bperm, pperm, flip = KEY.block_permutation(6), KEY.pixel_permutation(12), KEY.negpos_mask(12)
    for n in range(6):
        for e in range(12):
            source = blocks[:, bperm[n], pperm[e]]
            assert torch.equal(enc[:, n, e], 1000.0 - source if flip[e] else source)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(shape, dtype):
    *image, p = shape
    x = random_images(image, dtype)
    for options in OPTIONS:
        y = encrypt_patches(x, KEY, p, **options)
        assert y.dtype == x.dtype and y.shape == x.shape
        back = decrypt_patches(y, KEY, p, **options)
        if dtype == torch.uint8 or not options["negpos"]:
            assert torch.equal(back, x), options
        else:  # max - (max - v) is within one rounding of v
            torch.testing.assert_close(back, x, rtol=0, atol=float(torch.finfo(dtype).eps), msg=str(options))


def test_encryption_hides_the_image_and_wrong_key_fails():
    x = random_images((2, 3, 32, 32), torch.uint8)
    y = encrypt_patches(x, KEY, 8, negpos=True)
    assert (y != x).float().mean() > 0.9
    wrong = decrypt_patches(y, Key.from_secret(b"another key"), 8, negpos=True)
    assert (wrong != x).float().mean() > 0.9
    assert torch.equal(decrypt_patches(y, KEY, 8, negpos=True), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_bit_identical_to_reference(backend, shape, dtype):
    *image, p = shape
    x = random_images(image, dtype)
    for options in (dict(negpos=True), dict(pixel_shuffle=False), dict(block_scramble=False, negpos=True)):
        for decrypt in (encrypt_patches, decrypt_patches):
            expected = decrypt(x, KEY, p, **options, backend="reference")
            assert torch.equal(decrypt(x, KEY, p, **options, backend=backend), expected), (options, decrypt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32])
def test_backend_per_sample_and_non_contiguous(backend, dtype):
    base = random_images((3, 8, 12, 20), dtype)
    views = {
        "channel-slice": base[:, 1:4],
        "channels_last": base[:, :3].contiguous(memory_format=torch.channels_last),
        "transposed": base[:, :3].transpose(2, 3),
        "expanded": base[:1, :3].expand(3, -1, -1, -1),
    }
    for name, x in views.items():
        assert not x.is_contiguous() or name == "channels_last"
        for options in (dict(negpos=True), dict(per_sample=True, sample_ids=[7, 0, 7], negpos=True)):
            expected = encrypt_patches(x, KEY, 4, **options, backend="reference")
            assert torch.equal(encrypt_patches(x, KEY, 4, **options, backend=backend), expected), (name, options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_random_tables(backend):
    gen = torch.Generator().manual_seed(0)
    x = random_images((2, 3, 10, 15), torch.float32, generator=gen)
    n_blocks, n_values = 6, 75
    for per_sample in (False, True):
        blocks = (torch.stack([torch.randperm(n_blocks, generator=gen) for _ in range(2)]) if per_sample
                  else torch.randint(0, n_blocks, (n_blocks,), generator=gen))  # not even a permutation
        tables = make_tables(blocks, torch.randint(0, n_values, (n_values,), generator=gen),
                             torch.randint(0, 2, (n_values,), generator=gen, dtype=torch.uint8), n_blocks, n_values)
        expected = permute_patches_reference(x, tables, 5, 0.75)
        assert torch.equal(permute_patches(x, tables, 5, 0.75, backend), expected)


def test_per_sample_scrambling():
    x = random_images((1, 1, 16, 16), torch.uint8).expand(3, -1, -1, -1)
    y = encrypt_patches(x, KEY, 4, per_sample=True, sample_ids=torch.tensor([0, 1, 0]))
    assert torch.equal(y[0], y[2]) and not torch.equal(y[0], y[1])
    shared = encrypt_patches(x, KEY, 4)
    assert not torch.equal(y[0], shared[0])
    assert torch.equal(decrypt_patches(y, KEY, 4, per_sample=True, sample_ids=[0, 1, 0]), x)


def test_gradcheck_reference_float64():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 2, 6, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    tables = make_tables(torch.randperm(6, generator=gen), torch.randperm(18, generator=gen),
                         torch.randint(0, 2, (18,), generator=gen, dtype=torch.uint8), 6, 18)
    assert torch.autograd.gradcheck(lambda t: permute_patches_reference(t, tables, 3, 1.0), (x,))


def test_gradcheck_op_float64():
    # The op is opaque to autograd; this checks its registered backward (inverse permutation, sign flips).
    x = torch.rand(2, 2, 6, 9, dtype=torch.float64, requires_grad=True)
    for options in (dict(negpos=True), dict(negpos=True, per_sample=True, sample_ids=[3, 5])):
        assert torch.autograd.gradcheck(lambda t: encrypt_patches(t, KEY, 3, **options, backend="reference"), (x,))
        assert torch.autograd.gradcheck(lambda t: decrypt_patches(t, KEY, 3, **options, backend="reference"), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_backward_matches_reference(backend, dtype):
    x = random_images((2, 3, 8, 12), dtype).requires_grad_()
    grad = torch.randn(2, 3, 8, 12).to(dtype)
    grads = {}
    for name in ("reference", backend):
        (g,) = torch.autograd.grad(encrypt_patches(x, KEY, 4, negpos=True, backend=name), x, grad)
        grads[name] = g
    assert torch.equal(grads["reference"], grads[backend])


def test_bad_input():
    x = random_images((2, 3, 8, 8), torch.uint8)
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        encrypt_patches(x, KEY, 3)
    with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\]"):
        encrypt_patches(x[0], KEY, 4)
    with pytest.raises(TypeError, match="x must have dtype"):
        encrypt_patches(x.to(torch.int32), KEY, 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        encrypt_patches(x.numpy(), KEY, 4)
    with pytest.raises(TypeError, match="key must be an msd_fast.Key"):
        encrypt_patches(x, b"raw secret bytes", 4)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        encrypt_patches(x, KEY, 0)
    with pytest.raises(ValueError, match="max_value for uint8"):
        encrypt_patches(x, KEY, 4, negpos=True, max_value=300)
    with pytest.raises(ValueError, match="needs sample_ids"):
        encrypt_patches(x, KEY, 4, per_sample=True)
    with pytest.raises(ValueError, match="one id per image"):
        encrypt_patches(x, KEY, 4, per_sample=True, sample_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="only used with per_sample"):
        encrypt_patches(x, KEY, 4, sample_ids=[1, 2])
    with pytest.raises(ValueError, match="backend must be one of"):
        encrypt_patches(x, KEY, 4, backend="fastest")
    with pytest.raises(BackendUnavailableError, match="'cpu' cannot run"):
        resolve_backend("cpu", torch.device("cuda"), "patch_permute")
    with pytest.raises(IndexError, match="src_block has values outside"):
        make_tables(torch.tensor([0, 4]), torch.arange(4), None, 2, 4)
    if not msd_fast.backends()["cuda"].available:
        with pytest.raises(BackendUnavailableError, match="'cuda' is not available"):
            encrypt_patches(x, KEY, 4, backend="cuda")


def test_native_kernel_rejects_bad_tables_itself():
    if "cpu" not in BACKENDS:
        pytest.fail("the CPU extension must be built for the test suite")
    from msd_fast.backends import native_cpu

    x = random_images((1, 1, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="out of range"):
        native_cpu().patch_permute(x, torch.tensor([0, 1, 2, 9]), torch.arange(4), None, 2, 1.0)
    with pytest.raises(RuntimeError, match="src_elem"):
        native_cpu().patch_permute(x, torch.arange(4), torch.arange(3), None, 2, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backends_match_reference_at_realistic_shapes(dtype):
    x = random_images((8, 3, 224, 224), dtype, device="cuda")
    for backend in runnable_backends("cuda"):
        for options in (dict(negpos=True), dict(per_sample=True, sample_ids=list(range(8)))):
            expected = encrypt_patches(x, KEY, 16, **options, backend="reference")
            assert torch.equal(encrypt_patches(x, KEY, 16, **options, backend=backend), expected), backend
