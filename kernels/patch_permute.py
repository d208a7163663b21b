"""Triton kernel for key-based patch permutation/encryption (contract: ``csrc/cpu/patch_permute.cpp``).

One program per (output row ``(b, c, h)``, tile of ``BLOCK_W`` columns): each lane gathers its source value through
the block table ``src_block`` (``[N]`` or per-sample ``[B, N]``) and the value table ``src_elem`` (``[C*p*p]``),
applies the negative-positive transform where ``flip`` says so, and stores contiguously.
"""
import torch
import triton
import triton.language as tl

from .rounding import float32_to_bfloat16_rtne


@triton.jit
def _patch_permute_kernel(x_ptr, out_ptr, src_block_ptr, src_elem_ptr, flip_ptr, C, H, W, p,
                          stride_b, stride_c, stride_h, stride_w, block_table_stride,
                          MAX_VALUE: tl.constexpr, HAS_FLIP: tl.constexpr, IS_UINT8: tl.constexpr,
                          OPMATH_F64: tl.constexpr, IS_BF16: tl.constexpr, BLOCK_W: tl.constexpr):
    # 1. Output row (b, c, h): block row i = h // p, row u = h % p within it.
    row = tl.program_id(0).to(tl.int64)
    h = row % H
    bc = row // H
    c = bc % C
    b = bc // C
    grid_w = W // p
    i = h // p
    u = h - i * p
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    in_row = w < W
    # 2. Lane w: block j = w // p of the row, value e = (c, u, v) of that block.
    j = w // p
    v = w - j * p
    e = c * p * p + u * p + v
    # 3. Source: block m = src_block[(b,) i * gw + j], value s = src_elem[e] = (sc, su, sv) in block m.
    m = tl.load(src_block_ptr + b * block_table_stride + i * grid_w + j, mask=in_row, other=0)
    s = tl.load(src_elem_ptr + e, mask=in_row, other=0)
    sc = s // (p * p)
    su = (s - sc * p * p) // p
    sv = s - sc * p * p - su * p
    mi = m // grid_w
    mj = m - mi * grid_w
    source = x_ptr + b * stride_b + sc * stride_c + (mi * p + su) * stride_h + (mj * p + sv) * stride_w
    value = tl.load(source, mask=in_row, other=0)
    # 4. Negative-positive transform max - value where flip[e] (uint8 wraps like the CPU path).
    if HAS_FLIP:
        flip = tl.load(flip_ptr + e, mask=in_row, other=0)
        if IS_UINT8:
            flipped = ((MAX_VALUE - value.to(tl.int32)) & 255).to(value.dtype)
        elif OPMATH_F64:
            flipped = MAX_VALUE - value
        elif IS_BF16:
            flipped = float32_to_bfloat16_rtne(MAX_VALUE - value.to(tl.float32))
        else:
            flipped = (MAX_VALUE - value.to(tl.float32)).to(value.dtype)
        value = tl.where(flip != 0, flipped, value)
    tl.store(out_ptr + row * W + w, value, mask=in_row)


def patch_permute(x: torch.Tensor, src_block: torch.Tensor, src_elem: torch.Tensor, flip, patch_size: int,
                  max_value: float) -> torch.Tensor:
    """Launch the kernel; ``x: [B, C, H, W]`` (any strides), tables on ``x.device`` and already validated."""
    B, C, H, W = x.shape
    out = torch.empty((B, C, H, W), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    per_sample = src_block.dim() == 2
    block_w = min(triton.next_power_of_2(W), 1024)
    is_uint8 = x.dtype == torch.uint8
    grid = (B * C * H, triton.cdiv(W, block_w))
    _patch_permute_kernel[grid](
        x, out, src_block, src_elem, flip if flip is not None else src_elem, C, H, W, patch_size,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3), src_block.shape[1] if per_sample else 0,
        MAX_VALUE=int(max_value) if is_uint8 else float(max_value), HAS_FLIP=flip is not None,
        IS_UINT8=is_uint8, OPMATH_F64=x.dtype == torch.float64, IS_BF16=x.dtype == torch.bfloat16, BLOCK_W=block_w,
    )
    return out
