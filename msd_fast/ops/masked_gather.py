"""Fused masked token gathering for multi-view masked sampling: checks, reference, autograd, dispatch.

A masked-sampling "view" keeps ``K`` of an image's ``N`` patch tokens. For ``tokens: [B, N, D]``, indices
``idx: [V, B, K]``, an optional position embedding ``pos`` (``[N, D]`` shared or ``[B, N, D]`` per sample) and
optional prefix tokens ``prefix: [P, D]`` (class and register tokens), the output ``[V * B, P + K, D]`` is::

    out[v * B + b, p]     = prefix[p]                                              for p < P
    out[v * B + b, P + k] = tokens[b, idx[v, b, k]] + pos[(b,) idx[v, b, k]]

view-major (all of view 0's batch first, as DINO orders crops). The addition is done in float32 for
float16/bfloat16 and rounded once (as ``torch.add`` does), so every backend is bit-identical to the reference.

The backward scatters ``grad_out`` back to tokens (and pos, and prefix). Every backend computes it without atomics:
a per-sample inverse index (:func:`inverse_index`, a stable sort of each sample's indices) lists, for each token
``(b, n)``, the output rows that used it in ascending (view, slot) order; one program per token sums those rows in
that fixed order in float32, writes ``grad_tokens[b, n]`` and adds the sum into ``grad_pos[n]`` -- so the result
is deterministic and duplicate indices (within or across views) accumulate correctly. ``grad_prefix`` is a column
sum over all output rows, done by extra programs of the same kernel.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..backends import kernels_for, resolve_backend
from ..checks import FLOAT_DTYPES, check_dim, check_dtype, check_positive_int, check_same_device, check_tensor

OP_NAME = "masked_gather"
INDEX_DTYPES = (torch.int32, torch.int64)
# How a position embedding is laid out, which decides the shape of its gradient.
POS_NONE, POS_SHARED, POS_PER_SAMPLE = "none", "shared", "per_sample"


def check_masked_gather_args(tokens: torch.Tensor, idx: torch.Tensor, pos: Optional[torch.Tensor],
                             prefix: Optional[torch.Tensor]) -> None:
    """Check shapes, dtypes and devices (index values are checked in :func:`check_index_range`)."""
    check_tensor(tokens, "tokens")
    check_dim(tokens, 3, "tokens", "[B, N, D]")
    check_dtype(tokens, FLOAT_DTYPES, "tokens")
    B, N, D = tokens.shape
    check_tensor(idx, "idx")
    check_dim(idx, 3, "idx", "[n_views, B, K]")
    check_dtype(idx, INDEX_DTYPES, "idx")
    check_same_device(idx, tokens, "idx", "tokens")
    if idx.shape[1] != B:
        raise ValueError(f"idx must be [n_views, B, K] with B = {B} (tokens' batch), got shape {tuple(idx.shape)}")
    if pos is not None:
        check_tensor(pos, "pos")
        check_dtype(pos, (tokens.dtype,), "pos")
        check_same_device(pos, tokens, "pos", "tokens")
        if tuple(pos.shape) not in ((N, D), (B, N, D)):
            raise ValueError(f"pos must be [N, D] = [{N}, {D}] or [B, N, D] = [{B}, {N}, {D}], "
                             f"got shape {tuple(pos.shape)}")
    if prefix is not None:
        check_tensor(prefix, "prefix")
        check_dim(prefix, 2, "prefix", "[P, D]")
        check_dtype(prefix, (tokens.dtype,), "prefix")
        check_same_device(prefix, tokens, "prefix", "tokens")
        if prefix.shape[1] != D:
            raise ValueError(f"prefix must be [P, D] with D = {D}, got shape {tuple(prefix.shape)}")


# Indices made by sample_views carry the bound they were drawn below and the tensor's version counter at that time,
# so masked_gather can skip the min/max reduction and its host<->device sync for them; any in-place change of the
# tensor (or of a view of it) bumps the version and brings the full check back. Writes that bypass autograd's version
# counter (through ``.data``, ``.numpy()`` or DLPack) are not seen: the CPU kernel still checks every index itself.
_RANGE_TAG = "_msd_fast_index_bound"


def mark_index_range(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Record on ``idx`` that its values are in ``[0, num_tokens)`` (true by construction); returns ``idx``."""
    if not torch.compiler.is_compiling():  # graph tensors are traced, not tagged; they take the full check
        setattr(idx, _RANGE_TAG, (num_tokens, idx._version))
    return idx


def check_index_range(idx: torch.Tensor, num_tokens: int) -> None:
    """Raise ``IndexError`` unless every index is in ``[0, num_tokens)``: one min/max reduction and one sync, unless
    ``idx`` is unchanged since :func:`mark_index_range` recorded a bound ``<= num_tokens``."""
    if idx.numel() == 0:
        return
    known = getattr(idx, _RANGE_TAG, None)
    if known is not None and known[0] <= num_tokens and known[1] == idx._version:
        return
    low, high = (int(value) for value in torch.aminmax(idx))
    if low < 0 or high >= num_tokens:
        bad = low if low < 0 else high
        raise IndexError(f"idx holds {bad}, outside [0, {num_tokens}) (tokens has N = {num_tokens} tokens)")


def masked_gather_reference(tokens: torch.Tensor, idx: torch.Tensor, pos: Optional[torch.Tensor] = None,
                            prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eager PyTorch reference (index, add, cat); differentiable; the ground truth of every backend."""
    V, B, K = idx.shape
    D = tokens.shape[2]
    idx = idx.to(torch.int64)
    batch = torch.arange(B, device=tokens.device)[None, :, None]
    gathered = tokens[batch, idx]
    if pos is not None:
        gathered = gathered + (pos[idx] if pos.dim() == 2 else pos[batch, idx])
    gathered = gathered.reshape(V * B, K, D)
    if prefix is None:
        return gathered
    return torch.cat([prefix.expand(V * B, -1, -1), gathered], dim=1)


def masked_gather_backward_reference(grad_out: torch.Tensor, idx: torch.Tensor, num_tokens: int, pos_layout: str,
                                     prefix_len: int) -> tuple:
    """The vector-Jacobian product of :func:`masked_gather_reference` (``torch.func.vjp``), in float32 for
    float16/bfloat16 and rounded once.

    The op is affine in ``(tokens, pos, prefix)``, so its VJP does not depend on their values: it is taken at zeros.
    Returns ``(grad_tokens [B, N, D], grad_pos or None, grad_prefix [P, D] or None)`` in ``grad_out``'s dtype.
    """
    _, B, _ = idx.shape
    D = grad_out.shape[2]
    opmath = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    pos_shape = _pos_shape(pos_layout, B, num_tokens, D)
    shapes = [(B, num_tokens, D), pos_shape, (prefix_len, D) if prefix_len else None]
    zeros = [torch.zeros(shape, dtype=opmath, device=grad_out.device) for shape in shapes if shape is not None]

    def gather(tokens, *rest):
        extra = iter(rest)
        pos = next(extra) if pos_shape is not None else None
        prefix = next(extra) if prefix_len else None
        return masked_gather_reference(tokens, idx, pos, prefix)

    _, vjp = torch.func.vjp(gather, *zeros)
    grads = iter(grad.to(grad_out.dtype) for grad in vjp(grad_out.to(opmath)))
    return tuple(next(grads) if shape is not None else None for shape in shapes)


def _pos_shape(pos_layout: str, B: int, N: int, D: int) -> Optional[tuple]:
    """The shape of a position embedding (and its gradient) laid out as ``pos_layout``; None for ``"none"``."""
    return {POS_SHARED: (N, D), POS_PER_SAMPLE: (B, N, D)}.get(pos_layout)


def inverse_index(idx: torch.Tensor, num_tokens: int) -> tuple:
    """Per sample, which (view, slot) pairs read each token: the backward's deterministic gather table.

    For ``idx: [V, B, K]`` (values in ``[0, num_tokens)``) returns ``offsets: int64 [B, N + 1]`` and
    ``sources: int64 [B, V * K]`` such that the slots ``s = v * K + k`` with ``idx[v, b, k] == n`` are
    ``sources[b, offsets[b, n]:offsets[b, n + 1]]``, ascending (a stable sort; duplicates are all listed).
    """
    V, B, K = idx.shape
    per_sample = idx.to(torch.int64).permute(1, 0, 2).reshape(B, V * K).contiguous()
    sorted_tokens, sources = torch.sort(per_sample, dim=1, stable=True)
    boundaries = torch.arange(num_tokens + 1, device=idx.device).expand(B, num_tokens + 1).contiguous()
    offsets = torch.searchsorted(sorted_tokens, boundaries)
    return offsets, sources


@torch.library.custom_op("msd_fast::masked_gather", mutates_args=())
def _masked_gather(tokens: torch.Tensor, idx: torch.Tensor, pos: Optional[torch.Tensor],
                   prefix: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    check_index_range(idx, tokens.shape[1])
    name = resolve_backend(backend, tokens.device, OP_NAME)
    if name == "reference":
        return masked_gather_reference(tokens, idx, pos, prefix)
    prefix = prefix.contiguous() if prefix is not None else None
    return kernels_for(name).masked_gather_forward(tokens, idx.contiguous(), pos, prefix)


@_masked_gather.register_fake
def _(tokens, idx, pos, prefix, backend):
    V, B, K = idx.shape
    P = prefix.shape[0] if prefix is not None else 0
    return tokens.new_empty((V * B, P + K, tokens.shape[2]))


@torch.library.custom_op("msd_fast::masked_gather_backward", mutates_args=())
def _masked_gather_backward(grad_out: torch.Tensor, idx: torch.Tensor, num_tokens: int, tokens_grad: bool,
                            pos_layout: str, prefix_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor]:
    """Gradients ``(tokens, pos, prefix)`` for ``grad_out: [V * B, P + K, D]``; one not asked for
    (``tokens_grad=False``, ``pos_layout="none"``, ``prefix_grad=False``) comes back as an empty tensor."""
    prefix_len = grad_out.shape[1] - idx.shape[2]
    name = resolve_backend(backend, grad_out.device, OP_NAME)
    if name == "reference":
        grads = masked_gather_backward_reference(grad_out, idx, num_tokens, pos_layout, prefix_len)
        wanted = (tokens_grad, pos_layout != POS_NONE, prefix_grad)
        return tuple(grad if keep else grad_out.new_empty(0) for grad, keep in zip(grads, wanted))
    grad_tokens, grad_pos, grad_prefix = _empty_grads(grad_out, idx, num_tokens, tokens_grad, pos_layout, prefix_grad)
    if grad_out.numel() == 0:  # no views (V = 0 or B = 0) or no features: nothing flows back
        return grad_tokens.zero_(), grad_pos.zero_(), grad_prefix.zero_()
    offsets, sources = inverse_index(idx, num_tokens)
    kernels_for(name).masked_gather_backward(grad_out, offsets, sources, idx.shape[0],
                                          grad_tokens if tokens_grad else None,
                                          grad_pos if pos_layout != POS_NONE else None,
                                          grad_prefix if prefix_grad else None)
    return grad_tokens, grad_pos, grad_prefix


def _empty_grads(grad_out, idx, num_tokens, tokens_grad, pos_layout, prefix_grad):
    _, B, K = idx.shape
    D = grad_out.shape[2]
    pos_shape = _pos_shape(pos_layout, B, num_tokens, D) or (0,)
    return (grad_out.new_empty((B, num_tokens, D) if tokens_grad else (0,)), grad_out.new_empty(pos_shape),
            grad_out.new_empty((grad_out.shape[1] - K, D) if prefix_grad else (0,)))


@_masked_gather_backward.register_fake
def _(grad_out, idx, num_tokens, tokens_grad, pos_layout, prefix_grad, backend):
    return _empty_grads(grad_out, idx, num_tokens, tokens_grad, pos_layout, prefix_grad)


def _setup_context(ctx, inputs, output):
    tokens, idx, pos, _, backend = inputs
    ctx.save_for_backward(idx)
    ctx.num_tokens = tokens.shape[1]
    ctx.pos_layout = POS_NONE if pos is None else (POS_SHARED if pos.dim() == 2 else POS_PER_SAMPLE)
    ctx.backend = backend


def _backward(ctx, grad_out):
    (idx,) = ctx.saved_tensors
    tokens_grad, _, pos_grad, prefix_grad, _ = ctx.needs_input_grad
    grad_tokens, grad_pos, grad_prefix = _masked_gather_backward(
        grad_out.contiguous(), idx, ctx.num_tokens, tokens_grad, ctx.pos_layout if pos_grad else POS_NONE,
        bool(prefix_grad), ctx.backend)
    return (grad_tokens if tokens_grad else None, None, grad_pos if pos_grad else None,
            grad_prefix if prefix_grad else None, None)


_masked_gather.register_autograd(_backward, setup_context=_setup_context)


def masked_gather(tokens: torch.Tensor, idx: torch.Tensor, *, pos: Optional[torch.Tensor] = None,
                  prefix: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Gather the kept tokens of every view, add their position embedding and prepend the prefix tokens.

    Args:
        tokens: ``[B, N, D]`` float16, bfloat16, float32 or float64 (the reference also runs float64 gradcheck),
            any strides: the patch tokens of ``B`` images.
        idx: ``[V, B, K]`` int32 or int64 on ``tokens``' device: view ``v`` of sample ``b`` keeps tokens
            ``idx[v, b, :]`` (e.g. from :func:`sample_views`); any values in ``[0, N)``, duplicates allowed.
        pos: ``[N, D]`` (shared) or ``[B, N, D]`` (per sample) of ``tokens``' dtype, added to each gathered token;
            or None.
        prefix: ``[P, D]`` of ``tokens``' dtype (class and register tokens, with their own position embedding
            already added), prepended to every output row; or None (``P = 0``).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``. Under ``torch.compile``
            ``"reference"`` is traced into the graph (the baseline a compiler makes of the plain PyTorch), every other
            backend is one custom-op node.

    Returns:
        Contiguous ``[V * B, P + K, D]`` of ``tokens``' dtype, view-major: row ``v * B + b`` is view ``v`` of sample
        ``b``. Differentiable w.r.t. ``tokens``, ``pos`` and ``prefix`` (gradients accumulate in float32).

    Raises:
        TypeError / ValueError for a bad type, shape, dtype or device (naming the argument); IndexError for an
        index outside ``[0, N)``.
    """
    check_masked_gather_args(tokens, idx, pos, prefix)
    if backend == "reference" and torch.compiler.is_compiling():
        # Traced, not an opaque op: the compiler fuses the reference's math (its indexing checks the bounds).
        return masked_gather_reference(tokens, idx, pos, prefix)
    return _masked_gather(tokens, idx, pos, prefix, backend)


def kept_count(keep: Union[int, float], num_tokens: int) -> int:
    """``K`` for ``keep``: an int is the count itself (``1 <= K <= N``); a float in ``(0, 1]`` is a fraction,
    ``K = max(1, round(keep * N))``."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int count or a float fraction, got {type(keep).__name__}")
    if isinstance(keep, int):
        if not 1 <= keep <= num_tokens:
            raise ValueError(f"keep={keep} must be a count in [1, num_tokens={num_tokens}]")
        return keep
    if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep={keep!r} must be a fraction in (0, 1] (or an int count)")
    return max(1, round(keep * num_tokens))


def sample_views(batch_size: int, num_tokens: int, n_views: int, keep: Union[int, float], *,
                 generator: Optional[torch.Generator] = None,
                 device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """Draw ``n_views`` random token subsets per sample: the indices of masked-sampling views.

    Args:
        batch_size: ``B``; num_tokens: ``N`` tokens per sample; n_views: ``V``.
        keep: a float fraction in ``(0, 1]`` (``K = max(1, round(keep * N))``) or an int count ``K``.
        generator: a ``torch.Generator`` (on ``device``) for reproducible draws; default: torch's global one.
        device: where to draw; default ``generator``'s device, else CPU.

    Returns:
        ``idx: int64 [V, B, K]``, each row ``idx[v, b]`` uniformly random among ``K``-subsets of ``range(N)``:
        unique and sorted ascending. One vectorised draw (uniform noise, top-k, sort); no loop over samples.
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    num_tokens = check_positive_int(num_tokens, "num_tokens")
    n_views = check_positive_int(n_views, "n_views")
    K = kept_count(keep, num_tokens)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but device is {device}")
    noise = torch.rand((n_views, batch_size, num_tokens), generator=generator, device=device)
    return mark_index_range(noise.topk(K, dim=-1, sorted=False).indices.sort(dim=-1).values, num_tokens)
