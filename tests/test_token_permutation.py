import pytest
import torch

from msd_fast import Key, permute_tokens, unpermute_tokens
from msd_fast.ops.token_permutation import gather_tokens_reference

from helpers import runnable_backends

KEY = Key.from_secret(b"token permutation key")
BACKENDS = ["reference"] + runnable_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 5), (2, 13, 1)])
def test_permute_matches_key_permutations_and_round_trips(backend, dtype, shape):
    tokens = torch.randn(shape).to(dtype)
    tokens[-1] = tokens[0]  # samples 0 and 2 share content and id
    ids = torch.tensor([4, 9, 4][: shape[0]])
    out = permute_tokens(tokens, KEY, ids, backend=backend)
    perms = KEY.token_permutations(shape[1], ids)
    assert torch.equal(out, gather_tokens_reference(tokens, perms))
    assert torch.equal(unpermute_tokens(out, KEY, ids, backend=backend), tokens)
    if shape[0] == 3:
        assert torch.equal(out[0], out[2]) and torch.equal(out[0][perms[0].argsort()], tokens[0])


def test_permutation_differs_per_sample_and_is_non_trivial():
    tokens = torch.arange(196, dtype=torch.float32)[None, :, None].expand(2, -1, 3)
    out = permute_tokens(tokens, KEY, [0, 1])
    assert not torch.equal(out[0], out[1])
    assert (out[0, :, 0] != tokens[0, :, 0]).float().mean() > 0.9


def test_non_contiguous_tokens():
    base = torch.randn(4, 10, 6)
    tokens = base.transpose(0, 1)[:, :4].transpose(0, 1)[:, ::2]  # [4, 5, 6], strided
    assert not tokens.is_contiguous()
    assert torch.equal(permute_tokens(tokens, KEY, [1, 2, 3, 4]), permute_tokens(tokens.contiguous(), KEY, [1, 2, 3, 4]))


def test_gradcheck_float64():
    tokens = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gather_tokens_reference(t, KEY.token_permutations(5, [0, 1])), (tokens,))
    assert torch.autograd.gradcheck(lambda t: permute_tokens(t, KEY, [0, 1]), (tokens,))
    assert torch.autograd.gradcheck(lambda t: unpermute_tokens(t, KEY, [0, 1]), (tokens,))


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_backward_matches_reference(backend):
    tokens = torch.randn(3, 9, 4, requires_grad=True)
    grad = torch.randn(3, 9, 4)
    expected, = torch.autograd.grad(permute_tokens(tokens, KEY, [1, 2, 3], backend="reference"), tokens, grad)
    actual, = torch.autograd.grad(permute_tokens(tokens, KEY, [1, 2, 3], backend=backend), tokens, grad)
    assert torch.equal(actual, expected)


def test_bad_input():
    tokens = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=r"tokens must be \[B, N, D\]"):
        permute_tokens(tokens[0], KEY, [0])
    with pytest.raises(TypeError, match="tokens must have dtype"):
        permute_tokens(tokens.to(torch.int64), KEY, [0, 1])
    with pytest.raises(ValueError, match="one id per sample"):
        permute_tokens(tokens, KEY, [0])
    with pytest.raises(ValueError, match="sample_ids must be in"):
        permute_tokens(tokens, KEY, [0, -3])
    with pytest.raises(TypeError, match="key must be an msd_fast.Key"):
        permute_tokens(tokens, None, [0, 1])
