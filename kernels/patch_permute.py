"""Triton kernel for key-based patch permutation/encryption (contract: ``csrc/cpu/patch_permute.cpp``).

One program per (output row ``(b, c, h)``, tile of ``BLOCKS`` blocks of that row): a ``[BLOCKS, p]`` tile whose
row ``j`` is block ``j``'s ``p`` contiguous output columns. Its addresses need no per-value division: the source
offset of each column ``v`` inside a block (through the value table ``src_elem``, ``[C*p*p]``) is the same for every
block of the row and is computed once per program; each block's source origin (through the block table
``src_block``, ``[N]`` or per-sample ``[B, N]``) once per block. The patch size is a compile-time constant (one
specialisation per patch size), so the divisions by it are multiplications. Lanes gather, apply the
negative-positive transform where ``flip`` says so, and store the tile contiguously.
"""
import torch
import triton
import triton.language as tl

from .rounding import float32_to_bfloat16_rtne


@triton.jit
def _patch_permute_kernel(x_ptr, out_ptr, src_block_ptr, src_elem_ptr, flip_ptr, C, H, W, grid_w,
                          stride_b, stride_c, stride_h, stride_w, block_table_stride,
                          P: tl.constexpr, P_POW2: tl.constexpr, BLOCKS: tl.constexpr,
                          MAX_VALUE: tl.constexpr, HAS_FLIP: tl.constexpr, IS_UINT8: tl.constexpr,
                          OPMATH_F64: tl.constexpr, IS_BF16: tl.constexpr):
    # 1. Output row (b, c, h): block row i = h // P, row u = h % P within it (P is a compile-time constant, so
    #    these divisions are multiplications).
    row = tl.program_id(0).to(tl.int64)
    h = row % H
    bc = row // H
    c = bc % C
    b = bc // C
    i = h // P
    u = h - i * P
    # 2. Columns v < P of a block: value e = (c, u, v); its source s = src_elem[e] = (sc, su, sv), as an offset
    #    inside a source block. The same for every block of the row: computed once per program, [P_POW2].
    v = tl.arange(0, P_POW2)
    in_block = v < P
    e = c * P * P + u * P + v
    s = tl.load(src_elem_ptr + e, mask=in_block, other=0)
    sc = s // (P * P)
    su = (s - sc * (P * P)) // P
    sv = s - sc * (P * P) - su * P
    value_offset = sc * stride_c + su * stride_h + sv * stride_w
    # 3. This program's BLOCKS blocks j of the row: source block m = src_block[(b,) i * gw + j], its origin
    #    (mi * P, mj * P): one division per block, [BLOCKS].
    j = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    in_row = j < grid_w
    m = tl.load(src_block_ptr + b * block_table_stride + i * grid_w + j, mask=in_row, other=0)
    mi = m // grid_w
    mj = m - mi * grid_w
    block_offset = mi * (P * stride_h) + mj * (P * stride_w)
    # 4. Gather the [BLOCKS, P] tile: block j's P values of output row (b, c, h) are contiguous columns j*P + v.
    mask = in_row[:, None] & in_block[None, :]
    value = tl.load(x_ptr + b * stride_b + block_offset[:, None] + value_offset[None, :], mask=mask, other=0)
    # 5. Negative-positive transform max - value where flip[e] (uint8 wraps like the CPU path).
    if HAS_FLIP:
        flip = tl.load(flip_ptr + e, mask=in_block, other=0)[None, :]
        if IS_UINT8:
            flipped = ((MAX_VALUE - value.to(tl.int32)) & 255).to(value.dtype)
        elif OPMATH_F64:
            flipped = MAX_VALUE - value
        elif IS_BF16:
            flipped = float32_to_bfloat16_rtne(MAX_VALUE - value.to(tl.float32))
        else:
            flipped = (MAX_VALUE - value.to(tl.float32)).to(value.dtype)
        value = tl.where(flip != 0, flipped, value)
    tl.store(out_ptr + row * W + j[:, None] * P + v[None, :], value, mask=mask)


def patch_permute(x: torch.Tensor, src_block: torch.Tensor, src_elem: torch.Tensor, flip, patch_size: int,
                  max_value: float) -> torch.Tensor:
    """Launch the kernel; ``x: [B, C, H, W]`` (any strides), tables on ``x.device`` and already validated."""
    B, C, H, W = x.shape
    out = torch.empty((B, C, H, W), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    per_sample = src_block.dim() == 2
    grid_w = W // patch_size
    p_pow2 = triton.next_power_of_2(patch_size)
    blocks = min(triton.next_power_of_2(grid_w), max(1, 1024 // p_pow2))
    is_uint8 = x.dtype == torch.uint8
    grid = (B * C * H, triton.cdiv(grid_w, blocks))
    _patch_permute_kernel[grid](
        x, out, src_block, src_elem, flip if flip is not None else src_elem, C, H, W, grid_w,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3), src_block.shape[1] if per_sample else 0,
        P=patch_size, P_POW2=p_pow2, BLOCKS=blocks, MAX_VALUE=int(max_value) if is_uint8 else float(max_value),
        HAS_FLIP=flip is not None, IS_UINT8=is_uint8, OPMATH_F64=x.dtype == torch.float64,
        IS_BF16=x.dtype == torch.bfloat16,
    )
    return out
