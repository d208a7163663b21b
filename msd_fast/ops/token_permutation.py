"""Per-sample token permutation (p-FeSTA mode): checks, reference, autograd, dispatch.

``tokens: [B, N, D]`` (already patch-embedded and position-embedded at the client); every sample ``b`` gets its own
key-derived permutation of its ``N`` tokens, from the key and ``sample_ids[b]``, so the server never sees positions::

    permute_tokens(tokens)[b, n] = tokens[b, perm_b[n]]        unpermute_tokens inverts it.

Both are differentiable (each one's vector-Jacobian product is the other).
"""
from __future__ import annotations

import torch

from ..backends import resolve_backend
from ..keys import Key, SampleIds, key_from_handle, require_key, sample_ids_list
from ..checks import FLOAT_DTYPES, check_dim, check_dtype, check_tensor
from .masked_gather import masked_gather

OP_NAME = "token_permutation"


def gather_tokens_reference(tokens: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """``out[b, n] = tokens[b, perms[b, n]]`` for ``tokens: [B, N, D]`` and int64 ``perms: [B, N]``."""
    return torch.gather(tokens, 1, perms[:, :, None].expand(-1, -1, tokens.shape[2]))


def _gather_tokens(tokens: torch.Tensor, perms: torch.Tensor, backend: str) -> torch.Tensor:
    # A token permutation is a masked gather with one view that keeps every token: the native backends reuse the
    # fused masked_gather kernels (one pass, any strides).
    name = resolve_backend(backend, tokens.device, OP_NAME)
    if name == "reference":
        return gather_tokens_reference(tokens, perms)
    return masked_gather(tokens, perms[None], backend=name)


@torch.library.custom_op("msd_fast::token_permutation", mutates_args=())
def _token_permutation(tokens: torch.Tensor, key_handle: int, sample_ids: torch.Tensor, inverse: bool,
                       backend: str) -> torch.Tensor:
    perms = key_from_handle(key_handle).token_permutations(tokens.shape[1], sample_ids.tolist())
    if inverse:
        perms = torch.argsort(perms, dim=1)
    return _gather_tokens(tokens, perms.to(tokens.device), backend)


@_token_permutation.register_fake
def _(tokens, key_handle, sample_ids, inverse, backend):
    return tokens.new_empty(tokens.shape)


def _setup_context(ctx, inputs, output):
    ctx.arguments = inputs[1:]


def _backward(ctx, grad):
    key_handle, sample_ids, inverse, backend = ctx.arguments
    return _token_permutation(grad.contiguous(), key_handle, sample_ids, not inverse, backend), None, None, None, None


_token_permutation.register_autograd(_backward, setup_context=_setup_context)


def _call(tokens: torch.Tensor, key: Key, sample_ids: SampleIds, backend: str, inverse: bool) -> torch.Tensor:
    check_tensor(tokens, "tokens")
    check_dim(tokens, 3, "tokens", "[B, N, D]")
    check_dtype(tokens, FLOAT_DTYPES, "tokens")
    require_key(key)
    ids = sample_ids if isinstance(sample_ids, torch.Tensor) else torch.tensor(sample_ids_list(sample_ids),
                                                                               dtype=torch.int64)
    if ids.dim() != 1 or ids.shape[0] != tokens.shape[0]:
        raise ValueError(f"sample_ids must have one id per sample ({tokens.shape[0]}), got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sample_ids must be int32 or int64, got {ids.dtype}")
    return _token_permutation(tokens, key._handle, ids, inverse, backend)


def permute_tokens(tokens: torch.Tensor, key: Key, sample_ids: SampleIds, *, backend: str = "auto") -> torch.Tensor:
    """Permute each sample's tokens with its key-derived permutation.

    Args:
        tokens: ``[B, N, D]`` float16/bfloat16/float32/float64, any device.
        key: the consortium :class:`~msd_fast.Key`.
        sample_ids: ``[B]`` ints (tensor or sequence), e.g. the images' dataset indices.
        backend: ``"auto"`` or a backend name.

    Returns:
        ``[B, N, D]`` with ``out[b, n] = tokens[b, perm_b[n]]``; differentiable w.r.t. ``tokens``.
    """
    return _call(tokens, key, sample_ids, backend, inverse=False)


def unpermute_tokens(tokens: torch.Tensor, key: Key, sample_ids: SampleIds, *, backend: str = "auto") -> torch.Tensor:
    """Invert :func:`permute_tokens` for the same key and ``sample_ids``."""
    return _call(tokens, key, sample_ids, backend, inverse=True)
