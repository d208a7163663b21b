"""Triton kernels for fused masked token gathering (contract: ``csrc/cpu/masked_gather.cpp``).

Forward: one program per (output row ``r = v * B + b``, tile of ``BLOCK_T`` token positions, tile of ``BLOCK_D``
features) copies the prefix rows and gathers ``tokens[b, idx[v, b, k]] (+ pos)``, adding in float32 for
float16/bfloat16 and rounding once (bfloat16 round-to-nearest-even explicitly, see ``float32_to_bfloat16_rtne``).

Backward (no atomics): program ``n < N`` of a ``BLOCK_D`` feature tile walks the samples ``BLOCK_B`` at a time;
each sample's slots that read token ``n`` come from the inverse index (``offsets``, ``sources``) and are summed in
their listed order in float32, giving ``grad_tokens[b, n]`` and, summed over samples, a shared ``grad_pos[n]``.
Program ``N + p`` sums column ``p`` of all output rows into ``grad_prefix[p]``.
"""
import torch
import triton
import triton.language as tl

from .rounding import float32_to_bfloat16_rtne


@triton.jit
def _round_to_output(value, IS_BF16: tl.constexpr, OUT_DTYPE: tl.constexpr):
    if IS_BF16:
        return float32_to_bfloat16_rtne(value.to(tl.float32))
    return value.to(OUT_DTYPE)


@triton.jit
def _masked_gather_forward_kernel(tokens_ptr, idx_ptr, pos_ptr, prefix_ptr, out_ptr, B, K, P, D,
                                  stride_tb, stride_tn, stride_td, stride_pb, stride_pn, stride_pd,
                                  HAS_POS: tl.constexpr, OPMATH: tl.constexpr, IS_BF16: tl.constexpr,
                                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_len = P + K
    in_d = d < D
    is_prefix = t < P
    is_token = (t >= P) & (t < row_len)
    b = r % B
    # 1. Output row r = v * B + b, positions t: the first P are prefix rows, the others token n = idx[v, b, t - P].
    n = tl.load(idx_ptr + r * K + (t - P), mask=is_token, other=0).to(tl.int64)
    token_mask = is_token[:, None] & in_d[None, :]
    value = tl.load(tokens_ptr + b * stride_tb + n[:, None] * stride_tn + d[None, :] * stride_td, mask=token_mask,
                    other=0)
    # 2. tokens[b, n] (+ pos[(b,) n], summed in opmath and rounded once).
    if HAS_POS:
        pos = tl.load(pos_ptr + b * stride_pb + n[:, None] * stride_pn + d[None, :] * stride_pd, mask=token_mask,
                      other=0)
        value = _round_to_output(value.to(OPMATH) + pos.to(OPMATH), IS_BF16, value.dtype)
    # 3. Prefix positions take prefix[t]; one masked store of the whole tile.
    prefix = tl.load(prefix_ptr + t[:, None] * D + d[None, :], mask=is_prefix[:, None] & in_d[None, :], other=0)
    value = tl.where(is_prefix[:, None], prefix, value)
    tl.store(out_ptr + (r * row_len + t)[:, None] * D + d[None, :], value,
             mask=(t < row_len)[:, None] & in_d[None, :])


@triton.jit
def _token_gradient(grad_out_ptr, offsets_ptr, sources_ptr, grad_tokens_ptr, grad_pos_ptr, n, d, in_d, B, N, K, P,
                    D, V, WRITE_TOKENS: tl.constexpr, POS_GRAD: tl.constexpr, ACC: tl.constexpr,
                    IS_BF16: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # POS_GRAD: 0 none, 1 shared [N, D] (sum over samples), 2 per sample [B, N, D].
    row_len = P + K
    pos_sum = tl.zeros([BLOCK_D], dtype=tl.float64)  # sums over samples: float64, they add hundreds of terms
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        in_b = b < B
        # 1. For BLOCK_B samples at once: the slots that read (b, n) are sources[b, offsets[b, n]:offsets[b, n + 1]].
        begin = tl.load(offsets_ptr + b * (N + 1) + n, mask=in_b, other=0)
        count = tl.load(offsets_ptr + b * (N + 1) + n + 1, mask=in_b, other=0) - begin
        sample_sum = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
        # 2. Sum the grad_out rows of those slots (row v * B + b, token P + k for slot v * K + k) in listed order.
        for j in range(0, tl.max(count, axis=0)):
            used = j < count
            slot = tl.load(sources_ptr + b * (V * K) + begin + j, mask=used, other=0)
            view = slot // K
            row = (view * B + b) * row_len + P + (slot - view * K)
            rows = tl.load(grad_out_ptr + row[:, None] * D + d[None, :], mask=used[:, None] & in_d[None, :], other=0)
            sample_sum += rows.to(ACC)
        # 3. Store per sample (tokens, per-sample pos); a shared pos adds the samples in float64.
        token = (b * N + n)[:, None] * D + d[None, :]
        store_mask = in_b[:, None] & in_d[None, :]
        if WRITE_TOKENS:
            tl.store(grad_tokens_ptr + token, _round_to_output(sample_sum, IS_BF16, grad_tokens_ptr.dtype.element_ty),
                     mask=store_mask)
        if POS_GRAD == 2:
            tl.store(grad_pos_ptr + token, _round_to_output(sample_sum, IS_BF16, grad_pos_ptr.dtype.element_ty),
                     mask=store_mask)
        if POS_GRAD == 1:
            pos_sum += tl.sum(sample_sum.to(tl.float64), axis=0)
    if POS_GRAD == 1:
        tl.store(grad_pos_ptr + n * D + d, _round_to_output(pos_sum, IS_BF16, grad_pos_ptr.dtype.element_ty),
                 mask=in_d)


@triton.jit
def _prefix_gradient(grad_out_ptr, grad_prefix_ptr, p, d, in_d, rows_total, row_len, D, IS_BF16: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    column_sum = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float64)  # hundreds of rows: accumulate in float64
    for r0 in range(0, rows_total, BLOCK_B):
        r = r0 + tl.arange(0, BLOCK_B)
        rows = tl.load(grad_out_ptr + (r * row_len + p)[:, None] * D + d[None, :],
                       mask=(r < rows_total)[:, None] & in_d[None, :], other=0)
        column_sum += rows.to(tl.float64)
    tl.store(grad_prefix_ptr + p * D + d,
             _round_to_output(tl.sum(column_sum, axis=0), IS_BF16, grad_prefix_ptr.dtype.element_ty), mask=in_d)


@triton.jit
def _masked_gather_backward_kernel(grad_out_ptr, offsets_ptr, sources_ptr, grad_tokens_ptr, grad_pos_ptr,
                                   grad_prefix_ptr, first_item, B, N, K, P, D, V,
                                   WRITE_TOKENS: tl.constexpr, POS_GRAD: tl.constexpr, ACC: tl.constexpr,
                                   IS_BF16: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    item = first_item + tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = d < D
    if item < N:
        _token_gradient(grad_out_ptr, offsets_ptr, sources_ptr, grad_tokens_ptr, grad_pos_ptr, item, d, in_d, B, N,
                        K, P, D, V, WRITE_TOKENS, POS_GRAD, ACC, IS_BF16, BLOCK_B, BLOCK_D)
    else:
        _prefix_gradient(grad_out_ptr, grad_prefix_ptr, item - N, d, in_d, V * B, P + K, D, IS_BF16, BLOCK_B,
                         BLOCK_D)


def _token_strides(t: torch.Tensor) -> tuple:
    return (0,) + tuple(t.stride()) if t.dim() == 2 else tuple(t.stride())


def _feature_block(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), 128)


def masked_gather_forward(tokens: torch.Tensor, idx: torch.Tensor, pos, prefix) -> torch.Tensor:
    """Launch the forward; ``idx`` contiguous and in range, ``prefix`` contiguous (see the op module)."""
    B, N, D = tokens.shape
    V, _, K = idx.shape
    P = prefix.shape[0] if prefix is not None else 0
    out = torch.empty((V * B, P + K, D), dtype=tokens.dtype, device=tokens.device)
    if out.numel() == 0:
        return out
    block_d = _feature_block(D)
    block_t = min(triton.next_power_of_2(P + K), max(1, 2048 // block_d))
    opmath = tl.float64 if tokens.dtype == torch.float64 else tl.float32
    grid = (V * B, triton.cdiv(P + K, block_t), triton.cdiv(D, block_d))
    _masked_gather_forward_kernel[grid](
        tokens, idx, pos if pos is not None else tokens, prefix if prefix is not None else tokens, out, B, K, P, D,
        *_token_strides(tokens), *(_token_strides(pos) if pos is not None else (0, 0, 0)),
        HAS_POS=pos is not None, OPMATH=opmath, IS_BF16=tokens.dtype == torch.bfloat16, BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return out


def masked_gather_backward(grad_out: torch.Tensor, offsets: torch.Tensor, sources: torch.Tensor, num_views: int,
                           grad_tokens, grad_pos, grad_prefix) -> None:
    """Fill the given gradients (contiguous, ``grad_out``'s dtype; None = not wanted) from the contiguous
    ``grad_out: [V * B, P + K, D]`` and the inverse index ``offsets: [B, N + 1]``, ``sources: [B, V * K]``."""
    B, N = offsets.shape[0], offsets.shape[1] - 1
    V = num_views
    K = sources.shape[1] // V
    P, D = grad_out.shape[1] - K, grad_out.shape[2]
    token_items = grad_tokens is not None or grad_pos is not None
    first_item = 0 if token_items else N
    items = N + (P if grad_prefix is not None else 0) - first_item
    if items == 0 or D == 0:
        return
    pos_grad = 0 if grad_pos is None else (2 if grad_pos.dim() == 3 else 1)
    block_d = _feature_block(D)
    acc = tl.float64 if grad_out.dtype == torch.float64 else tl.float32
    placeholder = grad_out  # pointer argument of an output not written (its store is compiled out)
    _masked_gather_backward_kernel[(items, triton.cdiv(D, block_d))](
        grad_out, offsets, sources, grad_tokens if grad_tokens is not None else placeholder,
        grad_pos if grad_pos is not None else placeholder, grad_prefix if grad_prefix is not None else placeholder,
        first_item, B, N, K, P, D, V, WRITE_TOKENS=grad_tokens is not None, POS_GRAD=pos_grad, ACC=acc,
        IS_BF16=grad_out.dtype == torch.bfloat16, BLOCK_B=min(triton.next_power_of_2(max(V * B, 1)), 16),
        BLOCK_D=block_d,
    )
