"""Block mixing (the dense key-derived block transform): the reference against autograd and a hand computation,
every backend against the reference (forward and backward, every dtype pair, odd and non-contiguous shapes), the
key-level round trip, Key.block_matrix, and bad inputs at every layer."""
import pytest
import torch

import msd_fast
from msd_fast import Key
from msd_fast.ops.block_mixing import (decrypt_blocks, encrypt_blocks, mix_blocks, mix_blocks_reference,
                                       opmath_dtype)
from msd_fast.ops.patch_encryption import image_to_blocks

from helpers import random_images, runnable_backends

KEY = Key.from_secret(b"test key for block mixing")
X_DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64]
OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# (B, C, H, W, p): non-square, B = 1, C = 1 and 3, p = 1, 3, 5, 7, L = C*p*p = 4, 27, 2, 75, 98, 48 (none a power
# of two but 4), single-block images. Small, because Triton's CPU interpreter runs these too.
SHAPES = [(1, 1, 6, 10, 2), (2, 3, 6, 9, 3), (2, 2, 5, 7, 1), (1, 3, 10, 15, 5), (2, 2, 14, 7, 7), (3, 3, 4, 4, 4)]
BACKENDS = runnable_backends("cpu")


def random_tables(shape, dtype, per_sample, generator, permutation=True):
    """A general (not orthogonal) matrix, bias and block order for ``shape``, in the op's opmath dtype."""
    B, C, H, W, p = shape
    N, L = (H // p) * (W // p), C * p * p
    opmath = opmath_dtype(dtype)
    matrix = (torch.randn(L, L, generator=generator, dtype=torch.float64) / L ** 0.5).to(opmath)
    bias = torch.randn(L, generator=generator, dtype=torch.float64).to(opmath)
    rows = B if per_sample else 1
    if permutation:
        order = torch.stack([torch.randperm(N, generator=generator) for _ in range(rows)])
    else:  # blocks repeated and left out
        order = torch.randint(0, N, (rows, N), generator=generator)
    return matrix, (order if per_sample else order[0]), bias


def error_bound(x, matrix, src_block, bias, scale, p, out_dtype, expected):
    """Largest |backend - reference| allowed, per element.

    Both compute ``scale * sum_j A_ij x_j + bias_i`` in opmath (float32, or float64 for float64 x) from exact inputs
    (uint8/float16/bfloat16 convert to float32 exactly), only in a different order: each differs from the exact
    value by at most (L + 2) unit roundoffs u of opmath times the magnitude ``|scale| sum_j |A_ij||x_j| + |bias_i|``
    (Higham's gamma_L for the L-term sum, plus one rounding for the scale and one for the bias), so they differ
    from each other by at most 2 (L + 2) u = (L + 2) eps times that magnitude. Rounding both to out_dtype then adds
    at most one unit in the last place of out_dtype (eps_out |value|, plus the smallest subnormal near zero).
    """
    L = matrix.shape[0]
    magnitude = mix_blocks_reference(x.to(torch.float64).abs(), matrix.to(torch.float64).abs(), src_block,
                                     bias.to(torch.float64).abs(), abs(scale), p, torch.float64)
    eps_op, out_info = torch.finfo(matrix.dtype).eps, torch.finfo(out_dtype)
    opmath_bound = (L + 2) * eps_op * magnitude
    return opmath_bound * (1 + out_info.eps) + out_info.eps * expected.to(torch.float64).abs() + out_info.tiny


def assert_within(actual, expected, bound, message=""):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, message
    assert actual.is_contiguous(), message
    error = (actual.to(torch.float64) - expected.to(torch.float64)).abs()
    worst = (error - bound).argmax()
    assert bool((error <= bound).all()), (f"{message}: error {error.flatten()[worst]:.3g} > bound "
                                          f"{bound.flatten()[worst]:.3g}")


def test_hand_computed_case():
    # One 1x2x2 image, p = 1: 4 blocks of L = 1 value; and one 2-channel 2x2 block, p = 2, L = 8.
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    out = mix_blocks_reference(x, torch.tensor([[2.0]]), torch.tensor([3, 2, 1, 0]), torch.tensor([0.5]), 0.25, 1,
                               torch.float32)
    assert torch.equal(out, torch.tensor([[[[2.5, 2.0], [1.5, 1.0]]]]))  # 0.25 * 2 * x[3 - n] + 0.5
    x = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2)
    swap = torch.eye(8).flip(0)  # reverses the 8 values (c, u, v) of the block
    out = mix_blocks_reference(x, swap, torch.tensor([0]), torch.zeros(8), 1.0, 2, torch.float32)
    assert torch.equal(out, x.flatten().flip(0).reshape(1, 2, 2, 2))
    for backend in BACKENDS:
        assert torch.equal(mix_blocks(x, swap, torch.tensor([0]), torch.zeros(8), 1.0, 2, torch.float32,
                                      backend=backend), out), backend


@pytest.mark.parametrize("per_sample", [False, True])
def test_gradcheck_reference_float64(per_sample):
    gen = torch.Generator().manual_seed(1)
    shape = (2, 2, 6, 9, 3)
    x = torch.rand(shape[:4], dtype=torch.float64, generator=gen, requires_grad=True)
    matrix, src_block, bias = random_tables(shape, torch.float64, per_sample, gen)
    assert torch.autograd.gradcheck(lambda t: mix_blocks_reference(t, matrix, src_block, bias, 0.7, 3, torch.float64),
                                    (x,))


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("permutation", [True, False])
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradcheck_op_float64(backend, per_sample, permutation):
    # The op is opaque to autograd: this checks its registered backward (the transposed op in the inverse block
    # order, or a scatter-add when src_block repeats blocks) through each backend.
    # Small: gradcheck calls the op twice per input value, and Triton's interpreter is slow.
    gen = torch.Generator().manual_seed(2)
    shape = (2, 1, 3, 9, 3)
    x = torch.rand(shape[:4], dtype=torch.float64, generator=gen, requires_grad=True)
    matrix, src_block, bias = random_tables(shape, torch.float64, per_sample, gen)
    if not permutation:  # block 2 twice, block 1 never (and per image another repetition)
        src_block = torch.tensor([[2, 2, 0], [1, 0, 1]]) if per_sample else torch.tensor([2, 2, 0])
    assert torch.autograd.gradcheck(
        lambda t: mix_blocks(t, matrix, src_block, bias, 0.7, 3, torch.float64, backend=backend), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", X_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_reference(backend, shape, dtype):
    gen = torch.Generator().manual_seed(3)
    *image, p = shape
    x = random_images(image, dtype, generator=gen)
    scale = 1 / 255 if dtype == torch.uint8 else 0.8
    for per_sample in (False, True):
        matrix, src_block, bias = random_tables(shape, dtype, per_sample, gen)
        for out_dtype in OUT_DTYPES:
            expected = mix_blocks(x, matrix, src_block, bias, scale, p, out_dtype, backend="reference")
            actual = mix_blocks(x, matrix, src_block, bias, scale, p, out_dtype, backend=backend)
            bound = error_bound(x, matrix, src_block, bias, scale, p, out_dtype, expected)
            assert_within(actual, expected, bound, f"{backend} {out_dtype} per_sample={per_sample}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32])
def test_backend_non_contiguous_and_repeated_blocks(backend, dtype):
    gen = torch.Generator().manual_seed(4)
    base = random_images((3, 5, 12, 12), dtype, generator=gen)
    views = {
        "channel-slice": base[:, 1:4],
        "channels_last": base[:, :3].contiguous(memory_format=torch.channels_last),
        "transposed": base[:, :3].transpose(2, 3),
        "expanded": base[:1, :3].expand(3, -1, -1, -1),
        "cropped": base[:, :3, 2:10, 1:9],
    }
    for name, x in views.items():
        assert not x.is_contiguous() or name == "channels_last"
        shape = tuple(x.shape) + (4,)
        for per_sample, permutation in ((False, True), (True, False)):
            matrix, src_block, bias = random_tables(shape, dtype, per_sample, gen, permutation)
            expected = mix_blocks(x, matrix, src_block, bias, 0.5, 4, torch.float32, backend="reference")
            actual = mix_blocks(x, matrix, src_block, bias, 0.5, 4, torch.float32, backend=backend)
            bound = error_bound(x, matrix, src_block, bias, 0.5, 4, torch.float32, expected)
            assert_within(actual, expected, bound, f"{backend} {name} per_sample={per_sample}")


def backward_bound(x, matrix, src_block, scale, p, grad, expected):
    """Largest |backend - reference| of d x. The backward is the transposed op (scale * A^T g per block, summed over
    the copies of a repeated block), so the forward's reasoning applies with L + 3 roundings (the reference scales
    g before its matmul, the kernels after; a repeated block adds one rounding per extra copy) and the magnitude
    ``|scale| |A|^T |g|`` (the same VJP with absolute values, in float64), then one unit in the last place of x's
    dtype."""
    x64 = x.detach().to(torch.float64).requires_grad_()
    zero = torch.zeros(matrix.shape[0], dtype=torch.float64)
    out = mix_blocks_reference(x64, matrix.to(torch.float64).abs(), src_block, zero, abs(scale), p, torch.float64)
    (magnitude,) = torch.autograd.grad(out, x64, grad.to(torch.float64).abs())
    repeats = int(torch.bincount(src_block.flatten()).max()) - 1
    eps_op, x_info = torch.finfo(matrix.dtype).eps, torch.finfo(x.dtype)
    opmath_bound = (matrix.shape[0] + 3 + repeats) * eps_op * magnitude
    return opmath_bound * (1 + x_info.eps) + x_info.eps * expected.to(torch.float64).abs() + x_info.tiny


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5]])
def test_backward_matches_reference(backend, shape, dtype):
    gen = torch.Generator().manual_seed(5)
    *image, p = shape
    x = random_images(image, dtype, generator=gen).requires_grad_()
    for out_dtype in (torch.float16, torch.float32):
        for per_sample, permutation in ((False, True), (True, True), (True, False)):
            matrix, src_block, bias = random_tables(shape, dtype, per_sample, gen, permutation)
            grad = torch.randn(image, generator=gen, dtype=torch.float64).to(out_dtype)
            grads = {}
            for name in ("reference", backend):
                out = mix_blocks(x, matrix, src_block, bias, 0.6, p, out_dtype, backend=name)
                (grads[name],) = torch.autograd.grad(out, x, grad)
            bound = backward_bound(x, matrix, src_block, 0.6, p, grad, grads["reference"])
            assert_within(grads[backend], grads["reference"], bound,
                          f"{backend} {out_dtype} per_sample={per_sample} permutation={permutation}")


# ---- the key-level encryption --------------------------------------------------------------------------------------

ROUND_TRIP_OPTIONS = [dict(), dict(per_sample=True, sample_ids=[4, 0, 9]), dict(block_scramble=False)]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("cipher_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 3, 8, 12, 4), (3, 1, 10, 5, 5)])
def test_round_trip_exact_for_uint8(backend, cipher_dtype, shape):
    *image, p = shape
    x = random_images(image, torch.uint8, generator=torch.Generator().manual_seed(6))
    for options in ROUND_TRIP_OPTIONS:
        y = encrypt_blocks(x, KEY, p, out_dtype=cipher_dtype, backend=backend, **options)
        assert y.dtype == cipher_dtype and y.shape == x.shape and y.is_contiguous()
        assert torch.equal(decrypt_blocks(y, KEY, p, backend=backend, **options), x), options


@pytest.mark.parametrize("cipher_dtype", [torch.float32, torch.float16])
def test_round_trip_exact_at_vit_patch_size(cipher_dtype):
    # p = 16 on RGB: L = 768 values mixed per block, the largest sum the ciphertext's rounding error goes through.
    x = random_images((2, 3, 32, 48), torch.uint8, generator=torch.Generator().manual_seed(7))
    for backend in ["reference"] + [name for name in BACKENDS if name != "triton"]:  # the interpreter is too slow
        y = encrypt_blocks(x, KEY, 16, out_dtype=cipher_dtype, backend=backend)
        assert torch.equal(decrypt_blocks(y, KEY, 16, backend=backend), x), backend


def test_encryption_is_centred_norm_preserving_and_keyed():
    # float64 pixels in [0, 255]: computed in float64, so the orthogonal transform preserves norms to 1e-12.
    x = random_images((2, 3, 16, 16), torch.uint8, generator=torch.Generator().manual_seed(8)).to(torch.float64)
    y = encrypt_blocks(x, KEY, 8, block_scramble=False, max_value=255.0, out_dtype=torch.float64)
    centred = image_to_blocks(x / 255 - 0.5, 8)
    torch.testing.assert_close(image_to_blocks(y, 8).norm(dim=-1), centred.norm(dim=-1), rtol=1e-12, atol=1e-12)
    wrong = decrypt_blocks(y.float(), Key.from_secret(b"another key"), 8, block_scramble=False)
    assert (wrong != x).float().mean() > 0.9
    raw = decrypt_blocks(y, KEY, 8, block_scramble=False, out_dtype=torch.float64)
    torch.testing.assert_close(raw, x, rtol=0, atol=1e-9)


def test_per_sample_orders_differ_by_sample_id():
    x = random_images((1, 1, 16, 16), torch.uint8).expand(3, -1, -1, -1)
    y = encrypt_blocks(x, KEY, 4, per_sample=True, sample_ids=[0, 1, 0])
    assert torch.equal(y[0], y[2]) and not torch.equal(y[0], y[1])
    assert torch.equal(decrypt_blocks(y, KEY, 4, per_sample=True, sample_ids=[0, 1, 0]), x)


@pytest.mark.parametrize("n", [1, 3, 48, 192, 768])
def test_block_matrix_orthogonal_deterministic_and_keyed(n):
    # Two keys at n = 768 (a matrix takes seconds to derive there), three below.
    secrets = [b"block matrix key one", b"block matrix key two", b"block matrix key three"][:2 if n > 192 else 3]
    matrices = [Key.from_secret(secret).block_matrix(n) for secret in secrets]
    assert torch.equal(Key.from_secret(secrets[0]).block_matrix(n), matrices[0])  # a fresh Key: no cache involved
    assert abs(float(torch.linalg.cond(matrices[0])) - 1.0) < 1e-12
    identity = torch.eye(n, dtype=torch.float64)
    for matrix in matrices:
        assert matrix.dtype == torch.float64 and matrix.shape == (n, n)
        assert (matrix @ matrix.t() - identity).abs().max() < 1e-12
        assert (matrix.t() @ matrix - identity).abs().max() < 1e-12
    if n > 1:  # a 1x1 orthogonal matrix is +-1, so two keys may agree
        for i in range(len(matrices)):
            for j in range(i):
                assert (matrices[i] - matrices[j]).abs().max() > 0.1


# ---- bad inputs ----------------------------------------------------------------------------------------------------

def valid_call():
    x = random_images((2, 3, 8, 8), torch.uint8)
    matrix, src_block, bias = random_tables((2, 3, 8, 8, 4), torch.uint8, False, torch.Generator().manual_seed(9))
    return x, matrix, src_block, bias


def test_bad_input_through_the_python_api():
    x, matrix, src_block, bias = valid_call()
    cases = [
        (ValueError, "matrix must be", dict(matrix=matrix[:, :-1])),
        (ValueError, "matrix must be", dict(matrix=matrix.double())),
        (ValueError, "bias must be", dict(bias=bias[:-1])),
        (ValueError, "bias must be", dict(bias=bias.double())),
        (IndexError, "src_block has values outside", dict(src_block=torch.tensor([0, 1, 2, 4]))),
        (IndexError, "src_block has values outside", dict(src_block=torch.tensor([0, 1, 2, -1]))),
        (ValueError, "src_block must be", dict(src_block=src_block.expand(3, -1))),
        (ValueError, "src_block must be", dict(src_block=src_block[:3])),
        (ValueError, "src_block must be", dict(src_block=src_block.int())),
        (ValueError, "src_block must be", dict(src_block=torch.tensor(0))),
        (ValueError, "patch_size=3 must divide", dict(patch_size=3)),
        (ValueError, "patch_size must be a positive int", dict(patch_size=0)),
        (TypeError, "out_dtype must be", dict(out_dtype=torch.int32)),
        (TypeError, "out_dtype must be", dict(out_dtype=torch.uint8)),
        (ValueError, "scale must be a finite number", dict(scale=float("nan"))),
        (TypeError, "x must have dtype", dict(x=x.to(torch.int32))),
        (ValueError, r"x must be \[B, C, H, W\]", dict(x=x[0])),
        (TypeError, "matrix must be a torch.Tensor", dict(matrix=matrix.numpy())),
    ]
    for error, message, change in cases:
        arguments = dict(x=x, matrix=matrix, src_block=src_block, bias=bias, scale=1.0, patch_size=4,
                         out_dtype=torch.float32)
        arguments.update(change)
        with pytest.raises(error, match=message):
            mix_blocks(**arguments)


def test_bad_input_through_the_key_api():
    x = random_images((2, 3, 8, 8), torch.uint8)
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        encrypt_blocks(x, KEY, 3)
    with pytest.raises(TypeError, match="out_dtype must be"):
        encrypt_blocks(x, KEY, 4, out_dtype=torch.uint8)
    with pytest.raises(TypeError, match="out_dtype must be uint8 or a float"):
        decrypt_blocks(encrypt_blocks(x, KEY, 4), KEY, 4, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="x must have dtype"):
        decrypt_blocks(x, KEY, 4)
    with pytest.raises(TypeError, match="key must be an msd_fast.Key"):
        encrypt_blocks(x, b"raw secret", 4)
    with pytest.raises(ValueError, match="needs sample_ids"):
        encrypt_blocks(x, KEY, 4, per_sample=True)
    with pytest.raises(ValueError, match="one id per image"):
        encrypt_blocks(x, KEY, 4, per_sample=True, sample_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="needs block_scramble=True"):
        encrypt_blocks(x, KEY, 4, per_sample=True, sample_ids=[1, 2], block_scramble=False)
    with pytest.raises(ValueError, match="only used with per_sample"):
        decrypt_blocks(encrypt_blocks(x, KEY, 4), KEY, 4, sample_ids=[1, 2])
    if not msd_fast.backends()["cuda"].available:
        with pytest.raises(msd_fast.BackendUnavailableError, match="'cuda' is not available"):
            encrypt_blocks(x, KEY, 4, backend="cuda")


def kernel_bad_calls(x, matrix, src_block, bias):
    """(message, arguments) of calls every kernel must refuse: (x, matrix, src_block, bias, scale, p, out_dtype)."""
    return [
        ("matrix", (x, matrix[:, :-1].contiguous(), src_block, bias, 1.0, 4, torch.float32)),
        ("matrix", (x, matrix.double(), src_block, bias, 1.0, 4, torch.float32)),
        ("matrix", (x, matrix.t(), src_block, bias, 1.0, 4, torch.float32)),  # not contiguous
        ("bias", (x, matrix, src_block, bias[:-1], 1.0, 4, torch.float32)),
        ("bias", (x, matrix, src_block, bias.double(), 1.0, 4, torch.float32)),
        ("src_block", (x, matrix, src_block.expand(3, -1).contiguous(), bias, 1.0, 4, torch.float32)),
        ("src_block", (x, matrix, src_block.int(), bias, 1.0, 4, torch.float32)),
        ("src_block", (x, matrix, src_block[:3], bias, 1.0, 4, torch.float32)),
        ("patch_size", (x, matrix, src_block, bias, 1.0, 3, torch.float32)),
        ("patch_size", (x, matrix, src_block, bias, 1.0, 0, torch.float32)),
        ("out_dtype", (x, matrix, src_block, bias, 1.0, 4, torch.int32)),
        ("x must be", (x[0], matrix, src_block, bias, 1.0, 4, torch.float32)),
        ("x must be", (x.to(torch.int32), matrix, src_block, bias, 1.0, 4, torch.float32)),
    ]


def test_native_cpu_kernel_rejects_bad_arguments_itself():
    if "cpu" not in BACKENDS:
        pytest.fail("the CPU extension must be built for the test suite")
    from msd_fast.backends import native_cpu

    x, matrix, src_block, bias = valid_call()
    for message, arguments in kernel_bad_calls(x, matrix, src_block, bias):
        with pytest.raises(RuntimeError, match=message):
            native_cpu().block_mix(*arguments)
    for bad in (torch.tensor([0, 1, 2, 4]), torch.tensor([0, -1, 2, 3]), torch.tensor([[0, 1, 2, 3], [0, 1, 9, 3]])):
        with pytest.raises(RuntimeError, match="out of range"):
            native_cpu().block_mix(x, matrix, bad, bias, 1.0, 4, torch.float32)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not available")
def test_triton_launcher_rejects_bad_arguments_itself():
    from msd_fast.backends import triton_kernels

    x, matrix, src_block, bias = valid_call()
    for message, arguments in kernel_bad_calls(x, matrix, src_block, bias):
        with pytest.raises((ValueError, TypeError), match=message):
            triton_kernels().block_mix(*arguments)


# ---- on a GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", X_DTYPES)
def test_gpu_backends_match_reference_at_realistic_shapes(dtype):
    gen = torch.Generator().manual_seed(10)
    shape = (8, 3, 224, 224, 16)
    x = random_images(shape[:4], dtype, generator=gen).cuda()
    views = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    for backend in runnable_backends("cuda"):
        for per_sample in (False, True):
            matrix, src_block, bias = (t.cuda() for t in random_tables(shape, dtype, per_sample, gen))
            for out_dtype in OUT_DTYPES:
                expected = mix_blocks(x, matrix, src_block, bias, 0.01, 16, out_dtype, backend="reference")
                bound = error_bound(x, matrix, src_block, bias, 0.01, 16, out_dtype, expected)
                for name, view in views.items():
                    actual = mix_blocks(view, matrix, src_block, bias, 0.01, 16, out_dtype, backend=backend)
                    assert_within(actual, expected, bound, f"{backend} {name} {out_dtype} per_sample={per_sample}")


@pytest.mark.gpu
def test_gpu_backends_odd_shapes_backward_and_round_trip():
    gen = torch.Generator().manual_seed(11)
    for backend in runnable_backends("cuda"):
        for shape in SHAPES:
            *image, p = shape
            for dtype in (torch.float32, torch.float64):
                x = random_images(image, dtype, generator=gen).cuda().requires_grad_()
                matrix, src_block, bias = (t.cuda() for t in random_tables(shape, dtype, True, gen))
                grad = torch.randn(image, generator=gen).cuda()
                results = {}
                for name in ("reference", backend):
                    out = mix_blocks(x, matrix, src_block, bias, 0.3, p, torch.float32, backend=name)
                    results[name] = (out,) + torch.autograd.grad(out, x, grad)
                bound = error_bound(x.detach(), matrix, src_block, bias, 0.3, p, torch.float32, results["reference"][0])
                assert_within(results[backend][0], results["reference"][0], bound, f"{backend} {shape} {dtype}")
                bound = backward_bound(x.cpu(), matrix.cpu(), src_block.cpu(), 0.3, p, grad.cpu(),
                                       results["reference"][1].cpu())
                assert_within(results[backend][1].cpu(), results["reference"][1].cpu(), bound, f"{backend} grad")
        x = random_images((4, 3, 64, 96), torch.uint8, generator=gen).cuda()
        for cipher_dtype in (torch.float32, torch.float16):
            for options in ROUND_TRIP_OPTIONS[:1] + [dict(per_sample=True, sample_ids=[1, 2, 3, 4])]:
                y = encrypt_blocks(x, KEY, 16, out_dtype=cipher_dtype, backend=backend, **options)
                assert torch.equal(decrypt_blocks(y, KEY, 16, backend=backend, **options), x), (backend, options)


@pytest.mark.gpu
def test_gpu_cuda_kernel_rejects_bad_arguments_itself():
    if not msd_fast.backends()["cuda"].available:
        pytest.skip("the CUDA extension is not built")
    from msd_fast.backends import native_cuda

    x, matrix, src_block, bias = (t.cuda() for t in valid_call())
    for message, arguments in kernel_bad_calls(x, matrix, src_block, bias):
        with pytest.raises(RuntimeError, match=message):
            native_cuda().block_mix(*arguments)
    with pytest.raises(RuntimeError, match="outside"):
        native_cuda().block_mix(x, matrix, torch.tensor([0, 1, 2, 4], device="cuda"), bias, 1.0, 4, torch.float32)
    with pytest.raises(RuntimeError, match="must be on"):
        native_cuda().block_mix(x, matrix.cpu(), src_block, bias, 1.0, 4, torch.float32)
