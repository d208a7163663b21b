"""masked_gather: every backend against the eager reference -- forward bit-identical, backward within the dtype's
default tolerance -- plus gradcheck, duplicates, strides, determinism, torch.compile and bad input."""
import os
import subprocess
import sys

import pytest
import torch

from msd_fast import BackendUnavailableError, masked_gather
from msd_fast.backends import native_cpu
from msd_fast.ops.masked_gather import inverse_index, masked_gather_reference

from helpers import runnable_backends

BACKENDS = runnable_backends("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
POS_LAYOUTS = [None, "shared", "per_sample"]
# (B, N, D, V, K, P): N not a power of two, D = 1, K = N, K = 1, B = 1, P = 0 / 1 / 5
SHAPES = [(3, 7, 5, 2, 4, 1), (2, 5, 1, 3, 2, 0), (2, 6, 8, 2, 6, 5), (4, 9, 3, 5, 1, 1), (1, 13, 7, 3, 5, 0)]


def make_inputs(B, N, D, V, K, P, pos_layout, dtype, device="cpu", seed=0, unique=False):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).to(device)

    tokens = randn(B, N, D)
    if unique:
        idx = torch.rand((V, B, N), generator=generator).argsort(-1)[..., :K]
    else:
        idx = torch.randint(0, N, (V, B, K), generator=generator)
    pos = {None: None, "shared": lambda: randn(N, D), "per_sample": lambda: randn(B, N, D)}[pos_layout]
    pos = pos() if pos is not None else None
    prefix = randn(P, D) if P else None
    return tokens, idx.to(device), pos, prefix


def gradients(tokens, idx, pos, prefix, grad_out, backend):
    inputs = [t.detach().requires_grad_() if t is not None else None for t in (tokens, pos, prefix)]
    out = masked_gather(inputs[0], idx, pos=inputs[1], prefix=inputs[2], backend=backend)
    wanted = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, wanted, grad_out)


def test_hand_computed_case():
    tokens = torch.arange(12.0).reshape(2, 3, 2)  # sample b, token n = [6b + 2n, 6b + 2n + 1]
    idx = torch.tensor([[[2, 0], [1, 1]]])  # one view: sample 0 keeps tokens 2, 0; sample 1 keeps 1 twice
    pos = torch.tensor([[100.0, 100.0], [200.0, 200.0], [300.0, 300.0]])
    prefix = torch.tensor([[-1.0, -2.0]])
    expected = torch.tensor([[[-1.0, -2.0], [304.0, 305.0], [100.0, 101.0]],
                             [[-1.0, -2.0], [208.0, 209.0], [208.0, 209.0]]])
    for backend in ["reference"] + BACKENDS:
        assert torch.equal(masked_gather(tokens, idx, pos=pos, prefix=prefix, backend=backend), expected), backend


@pytest.mark.parametrize("pos_layout", POS_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_bit_identical_to_reference(shape, dtype, pos_layout):
    tokens, idx, pos, prefix = make_inputs(*shape, pos_layout, dtype)
    expected = masked_gather_reference(tokens, idx, pos, prefix)
    B, _, D, V, K, P = shape
    assert expected.shape == (V * B, P + K, D) and expected.dtype == dtype
    for backend in ["reference"] + BACKENDS:
        out = masked_gather(tokens, idx, pos=pos, prefix=prefix, backend=backend)
        assert out.is_contiguous() and out.dtype == dtype
        assert torch.equal(out, expected), backend


@pytest.mark.parametrize("pos_layout", POS_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(shape, dtype, pos_layout):
    tokens, idx, pos, prefix = make_inputs(*shape, pos_layout, dtype)
    B, _, D, V, K, P = shape
    grad_out = torch.randn(V * B, P + K, D, dtype=torch.float64).to(dtype)
    _, expected = gradients(tokens, idx, pos, prefix, grad_out, "reference")
    for backend in BACKENDS:
        _, grads = gradients(tokens, idx, pos, prefix, grad_out, backend)
        for grad, want in zip(grads, expected):
            assert grad.dtype == dtype and grad.shape == want.shape
            torch.testing.assert_close(grad, want, msg=lambda m: f"{backend}: {m}")


def test_reference_backward_is_autograd_of_the_reference():
    # The op's reference backward (a float32 VJP) equals eager autograd through the reference in float32.
    tokens, idx, pos, prefix = make_inputs(3, 7, 5, 4, 6, 2, "shared", torch.float32)
    grad_out = torch.randn(12, 8, 5)
    _, op_grads = gradients(tokens, idx, pos, prefix, grad_out, "reference")
    inputs = [t.requires_grad_() for t in (tokens, pos, prefix)]
    eager = torch.autograd.grad(masked_gather_reference(tokens, idx, inputs[1], inputs[2]), inputs, grad_out)
    for grad, want in zip(op_grads, eager):
        assert torch.equal(grad, want)


@pytest.mark.parametrize("pos_layout", POS_LAYOUTS)
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_gradcheck_float64(backend, pos_layout):
    tokens, idx, pos, prefix = make_inputs(2, 4, 2, 2, 3, 1, pos_layout, torch.float64)
    inputs = [t.requires_grad_() for t in (tokens, pos, prefix) if t is not None]

    def gather(tokens, *rest):
        return masked_gather(tokens, idx, pos=rest[0] if pos is not None else None, prefix=rest[-1], backend=backend)

    assert torch.autograd.gradcheck(gather, inputs)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_duplicate_indices_accumulate(backend):
    # Sample 0 uses token 1 three times (twice in view 0, once in view 1) and token 3 once; with grad_out = 1 every
    # token's gradient is its use count, every pos row the count summed over samples, the prefix V * B.
    idx = torch.tensor([[[1, 1, 3], [0, 0, 0]], [[1, 2, 2], [4, 0, 0]]])
    tokens, pos, prefix = torch.randn(2, 5, 3), torch.randn(5, 3), torch.randn(2, 3)
    out, grads = gradients(tokens, idx, pos, prefix, torch.ones(4, 5, 3), backend)
    counts = torch.zeros(2, 5)
    for v in range(2):
        for b in range(2):
            for n in idx[v, b].tolist():
                counts[b, n] += 1
    assert counts[0].tolist() == [0, 3, 2, 1, 0] and counts[1].tolist() == [5, 0, 0, 0, 1]
    assert torch.equal(grads[0], counts[:, :, None].expand(2, 5, 3))
    assert torch.equal(grads[1], counts.sum(0)[:, None].expand(5, 3))
    assert torch.equal(grads[2], torch.full((2, 3), 4.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_tokens_and_pos(dtype):
    B, N, D, V, K, P = 3, 7, 6, 2, 5, 2
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(B, D, N, generator=generator).to(dtype).transpose(1, 2)  # feature stride N
    pos = torch.randn(2 * N, D, generator=generator).to(dtype)[::2]  # token stride 2 D
    prefix = torch.randn(D, P, generator=generator).to(dtype).t()
    idx = torch.randint(0, N, (V, B, K), generator=generator).transpose(0, 1).contiguous().transpose(0, 1)
    assert not (tokens.is_contiguous() or pos.is_contiguous() or prefix.is_contiguous() or idx.is_contiguous())
    grad_out = torch.randn(V * B, P + K, D, generator=generator).to(dtype)
    expected_out, expected = gradients(tokens, idx, pos, prefix, grad_out, "reference")
    assert torch.equal(expected_out, masked_gather_reference(tokens.contiguous(), idx.contiguous(), pos.contiguous(),
                                                             prefix.contiguous()))
    for backend in BACKENDS:
        out, grads = gradients(tokens, idx, pos, prefix, grad_out, backend)
        assert torch.equal(out, expected_out), backend
        for grad, want in zip(grads, expected):
            torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_int32_indices_match_int64(backend):
    tokens, idx, pos, prefix = make_inputs(3, 7, 5, 2, 4, 1, "per_sample", torch.float32)
    grad_out = torch.randn(6, 5, 5)
    out64, grads64 = gradients(tokens, idx, pos, prefix, grad_out, backend)
    out32, grads32 = gradients(tokens, idx.to(torch.int32), pos, prefix, grad_out, backend)
    assert torch.equal(out32, out64)
    for a, b in zip(grads32, grads64):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_only_the_inputs_that_need_grad_get_one(backend):
    tokens, idx, pos, prefix = make_inputs(2, 6, 4, 3, 2, 2, "shared", torch.float32)
    grad_out = torch.randn(6, 4, 4)
    _, (want_tokens, want_pos, want_prefix) = gradients(tokens, idx, pos, prefix, grad_out, "reference")
    pos.requires_grad_()  # frozen embedder: only the position embedding learns
    (grad_pos,) = torch.autograd.grad(masked_gather(tokens, idx, pos=pos, prefix=prefix, backend=backend), pos,
                                      grad_out)
    torch.testing.assert_close(grad_pos, want_pos)
    pos.requires_grad_(False)
    prefix.requires_grad_()
    (grad_prefix,) = torch.autograd.grad(masked_gather(tokens, idx, pos=pos, prefix=prefix, backend=backend), prefix,
                                         grad_out)
    torch.testing.assert_close(grad_prefix, want_prefix)
    tokens.requires_grad_()
    out = masked_gather(tokens, idx, pos=pos, prefix=prefix, backend=backend)
    out.backward(grad_out)
    torch.testing.assert_close(tokens.grad, want_tokens)
    assert pos.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    tokens, idx, pos, prefix = make_inputs(4, 9, 16, 6, 7, 1, "shared", torch.float32)
    grad_out = torch.randn(24, 8, 16)
    runs = [gradients(tokens, idx, pos, prefix, grad_out, backend)[1] for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


def test_inverse_index_lists_every_use_in_order():
    idx = torch.tensor([[[2, 0, 2]], [[0, 2, 1]]])  # V = 2, B = 1, K = 3: slots s = v * 3 + k
    offsets, sources = inverse_index(idx, 4)
    assert offsets.tolist() == [[0, 2, 3, 6, 6]]
    assert sources.tolist() == [[1, 3, 5, 0, 2, 4]]  # token 0: slots 1, 3; token 1: 5; token 2: 0, 2, 4


def test_empty_views():
    tokens = torch.randn(2, 5, 3, requires_grad=True)
    idx = torch.zeros((0, 2, 4), dtype=torch.int64)
    for backend in ["reference"] + BACKENDS:
        out = masked_gather(tokens, idx, prefix=torch.randn(1, 3), backend=backend)
        assert out.shape == (0, 5, 3)
        (grad,) = torch.autograd.grad(out, tokens, torch.ones_like(out))
        assert torch.equal(grad, torch.zeros(2, 5, 3))


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_opcheck(backend):
    tokens, idx, pos, prefix = make_inputs(2, 6, 4, 3, 2, 2, "shared", torch.float32)
    inputs = (tokens.requires_grad_(), idx, pos.requires_grad_(), prefix.requires_grad_(), backend)
    torch.library.opcheck(torch.ops.msd_fast.masked_gather.default, inputs)


def test_torch_compile_fullgraph():
    tokens, idx, pos, prefix = make_inputs(3, 7, 8, 2, 4, 1, "shared", torch.float32)
    inputs = [t.requires_grad_() for t in (tokens, pos, prefix)]

    def loss(tokens, pos, prefix):
        views = masked_gather(tokens, idx, pos=pos, prefix=prefix)
        return (views * views).sum()

    compiled = torch.compile(loss, fullgraph=True)
    expected = torch.autograd.grad(loss(*inputs), inputs)
    value = compiled(*inputs)
    torch.testing.assert_close(value, loss(*inputs))
    for grad, want in zip(torch.autograd.grad(value, inputs), expected):
        torch.testing.assert_close(grad, want)


def test_bad_input_raises_naming_the_argument():
    tokens, idx, pos, prefix = make_inputs(2, 5, 3, 2, 4, 1, "shared", torch.float32)
    cases = [
        (dict(tokens=tokens[0]), ValueError, "tokens must be"),
        (dict(tokens=tokens.to(torch.int32)), TypeError, "tokens must have dtype"),
        (dict(tokens=tokens.numpy()), TypeError, "tokens must be a torch.Tensor"),
        (dict(idx=idx[0]), ValueError, "idx must be"),
        (dict(idx=idx.float()), TypeError, "idx must have dtype"),
        (dict(idx=idx[:, :1]), ValueError, "idx must be .* B = 2"),
        (dict(idx=idx.to("meta")), ValueError, "idx is on meta"),
        (dict(idx=idx.clone().fill_(5)), IndexError, "idx holds 5, outside \\[0, 5\\)"),
        (dict(idx=idx.clone().fill_(-1)), IndexError, "idx holds -1"),
        (dict(pos=pos[:4]), ValueError, "pos must be \\[N, D\\]"),
        (dict(pos=pos[None]), ValueError, "pos must be"),
        (dict(pos=pos.double()), TypeError, "pos must have dtype"),
        (dict(prefix=prefix[:, :2]), ValueError, "prefix must be \\[P, D\\] with D = 3"),
        (dict(prefix=prefix[0]), ValueError, "prefix must be"),
        (dict(prefix=prefix.half()), TypeError, "prefix must have dtype"),
        (dict(backend="fastest"), ValueError, "backend must be one of"),
    ]
    for change, error, message in cases:
        args = dict(tokens=tokens, idx=idx, pos=pos, prefix=prefix, backend="reference") | change
        tensors = args.pop("tokens"), args.pop("idx")
        with pytest.raises(error, match=message):
            masked_gather(*tensors, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_index_never_reaches_a_kernel(backend):
    tokens = torch.randn(2, 5, 3)
    for bad in (5, -1, 1 << 40):
        idx = torch.zeros(2, 2, 4, dtype=torch.int64)
        idx[1, 1, 3] = bad
        with pytest.raises(IndexError, match="idx holds"):
            masked_gather(tokens, idx, backend=backend)


def test_cpu_kernel_checks_indices_itself():
    tokens = torch.randn(2, 5, 3)
    with pytest.raises(IndexError, match="idx holds 7"):
        native_cpu().masked_gather_forward(tokens, torch.full((1, 2, 2), 7), None, None)


def test_unavailable_backend_says_why():
    # No GPU: "not available (... no CUDA device ...)"; with one: "cannot run masked_gather on cpu tensors".
    tokens, idx, _, _ = make_inputs(2, 5, 3, 2, 4, 0, None, torch.float32)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda'"):
        masked_gather(tokens, idx, backend="cuda")


# ---- GPU: cuda and triton against the reference at ViT shapes ------------------------------------------------------

GPU_SHAPES = [(64, 196, 384, 2, 98, 1), (64, 196, 384, 8, 39, 1), (8, 1024, 768, 2, 512, 5), (3, 37, 20, 3, 11, 0)]


@pytest.mark.gpu
@pytest.mark.parametrize("pos_layout", POS_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_backends_match_reference(shape, dtype, pos_layout):
    tokens, idx, pos, prefix = make_inputs(*shape, pos_layout, dtype, device="cuda")
    B, _, D, V, K, P = shape
    grad_out = torch.randn(V * B, P + K, D, device="cuda", dtype=dtype)
    expected_out, expected = gradients(tokens, idx, pos, prefix, grad_out, "reference")
    for backend in runnable_backends("cuda"):
        out, grads = gradients(tokens, idx, pos, prefix, grad_out, backend)
        assert torch.equal(out, expected_out), backend
        for grad, want in zip(grads, expected):
            torch.testing.assert_close(grad, want, msg=lambda m: f"{backend}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_strided_and_misaligned_inputs(dtype):
    # A one-element offset defeats 16-byte vector loads; a transposed view has feature stride N.
    B, N, D, V, K, P = 4, 50, 64, 3, 20, 1
    base = torch.randn(B * N * D + 1, device="cuda", dtype=dtype)
    misaligned = base[1:].view(B, N, D)
    transposed = torch.randn(B, D, N, device="cuda", dtype=dtype).transpose(1, 2)
    idx = torch.randint(0, N, (V, B, K), device="cuda", dtype=torch.int32)
    pos, prefix = torch.randn(N, D, device="cuda", dtype=dtype), torch.randn(P, D, device="cuda", dtype=dtype)
    grad_out = torch.randn(V * B, P + K, D, device="cuda", dtype=dtype)
    for tokens in (misaligned, transposed):
        expected_out, expected = gradients(tokens, idx, pos, prefix, grad_out, "reference")
        for backend in runnable_backends("cuda"):
            out, grads = gradients(tokens, idx, pos, prefix, grad_out, backend)
            assert torch.equal(out, expected_out), backend
            for grad, want in zip(grads, expected):
                torch.testing.assert_close(grad, want)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_and_checks_indices():
    tokens, idx, pos, prefix = make_inputs(64, 196, 384, 8, 39, 1, "shared", torch.bfloat16, device="cuda")
    grad_out = torch.randn(512, 40, 384, device="cuda", dtype=torch.bfloat16)
    for backend in runnable_backends("cuda"):
        first = gradients(tokens, idx, pos, prefix, grad_out, backend)[1]
        second = gradients(tokens, idx, pos, prefix, grad_out, backend)[1]
        for a, b in zip(first, second):
            assert torch.equal(a, b), backend
        bad = idx.clone()
        bad[3, 7, 5] = 196
        with pytest.raises(IndexError, match="idx holds 196"):
            masked_gather(tokens, bad, backend=backend)



TRITON_GPU_COMPILE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from msd_fast.kernels import masked_gather as kernels

for fn, types, constants in [
    (kernels._masked_gather_forward_kernel, ["*bf16", "*i32", "*bf16", "*bf16", "*bf16"] + ["i32"] * 4 + ["i64"] * 6,
     dict(HAS_POS=True, OPMATH=tl.float32, IS_BF16=True, BLOCK_T=16, BLOCK_D=128)),
    (kernels._masked_gather_backward_kernel, ["*bf16", "*i64", "*i64", "*bf16", "*bf16", "*bf16"] + ["i32"] * 7,
     dict(WRITE_TOKENS=True, POS_GRAD=1, ACC=tl.float32, IS_BF16=True, BLOCK_B=16, BLOCK_D=128)),
]:
    signature = dict(zip(fn.arg_names, types + ["constexpr"] * len(constants)))
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32))
    assert ".entry" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0
    print(fn.__name__, "compiled")
"""


def test_triton_kernels_compile_for_a_gpu():
    # The interpreter runs the kernels' Python only; this compiles them to sm_90 PTX and cubin (no GPU needed), in a
    # process without TRITON_INTERPRET so that @triton.jit builds real kernels.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", TRITON_GPU_COMPILE], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["_masked_gather_forward_kernel", "compiled", "_masked_gather_backward_kernel",
                                     "compiled"]
