"""Triton kernel for the dense key-derived block transform, block mixing (contract: ``csrc/cpu/block_mix.cpp``).

A GEMM whose left operand is gathered: rows are output blocks ``r = (b, n)`` (``B*N`` of them), columns the ``L``
output values. One program computes a tile of ``BLOCK_M`` rows x ``BLOCK_N`` values and loops over the ``L`` inputs
in chunks of ``BLOCK_K``: it loads the source values of its rows straight from the image (through ``src_block``
and the strides; no gathered copy is made) and the matching ``[BLOCK_N, BLOCK_K]`` tile of ``matrix``, and
accumulates in opmath. float32 uses ``tl.dot`` with ``input_precision="ieee"`` (plain FMAs, no TF32, so it matches
the full-precision reference); float64 accumulates with elementwise products (Triton's dot has no float64 path on
every GPU). The epilogue computes ``scale * acc + bias`` (two roundings, as the reference) and stores the tile in
image layout, rounded to ``out_dtype``. Index math in a tile: int64 for each row's base address, int32 within a
block (checked to fit).
"""
import torch
import triton
import triton.language as tl

from .rounding import float32_to_bfloat16_rtne

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_X_DTYPES = (torch.uint8,) + _OUT_DTYPES


@triton.jit
def _block_mix_kernel(x_ptr, matrix_ptr, src_block_ptr, bias_ptr, scale_ptr, out_ptr, C, H, W, p, N, L, R,
                      stride_b, stride_c, stride_h, stride_w, block_table_stride,
                      OPMATH_F64: tl.constexpr, OUT_BF16: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    opmath = tl.float64 if OPMATH_F64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)            # output blocks r = b * N + n
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)            # output values i
    row_ok = rows < R
    col_ok = cols < L
    b = rows // N
    n = rows - b * N
    grid_w = W // p
    pp = p * p
    # 1. Each tile row r = (b, n) reads source block m = src_block[(b,) n]: its grid cell (m_i, m_j).
    m = tl.load(src_block_ptr + b.to(tl.int64) * block_table_stride + n, mask=row_ok, other=0).to(tl.int32)
    m_i = m // grid_w
    m_j = m - m_i * grid_w
    # Address of each row's source block (int64: the whole tensor may exceed 2^31 elements).
    source_row = b.to(tl.int64) * stride_b + (m_i * p).to(tl.int64) * stride_h + (m_j * p).to(tl.int64) * stride_w

    # 2. acc[r, i] = sum_j x[r's source block, value j] * matrix[i, j], BLOCK_K inputs j at a time: the input
    #    values are loaded straight from the image (value j = (c, u, v) at c*sc + u*sh + v*sw in the block).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=opmath)
    for k0 in range(0, L, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)                                    # input values j
        k_ok = ks < L
        kc = ks // pp
        ku = (ks - kc * pp) // p
        kv = ks - kc * pp - ku * p
        in_block = kc * stride_c + ku * stride_h + kv * stride_w          # int32 (checked by the launcher)
        values = tl.load(x_ptr + source_row[:, None] + in_block[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0).to(opmath)
        # matrix^T tile: [BLOCK_K, BLOCK_N], element (j, i) = matrix[i, j]
        weights = tl.load(matrix_ptr + cols[None, :].to(tl.int64) * L + ks[:, None],
                          mask=k_ok[:, None] & col_ok[None, :], other=0)
        if OPMATH_F64:
            acc += tl.sum(values[:, :, None] * weights[None, :, :], axis=1)
        else:
            acc = tl.dot(values, weights, acc, input_precision="ieee")

    # 3. Epilogue: scale * acc, then + bias (two roundings, the reference's order).
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0)
    result = acc * tl.load(scale_ptr)
    result = result + bias[None, :]
    # Image layout: block n = (i, j) of its image, value (c, u, v) -> out[b, c, i * p + u, j * p + v].
    # 4. Store in image layout, rounded to out_dtype (see below).
    n_i = n // grid_w
    n_j = n - n_i * grid_w
    oc = cols // pp
    ou = (cols - oc * pp) // p
    ov = cols - oc * pp - ou * p
    out_row = b.to(tl.int64) * C * H * W + (n_i * p).to(tl.int64) * W + n_j * p
    out_col = oc.to(tl.int64) * H * W + ou * W + ov
    target = out_ptr + out_row[:, None] + out_col[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if OUT_BF16:  # explicit round-to-nearest-even (the interpreter truncates this cast); float64 -> float32 first
        tl.store(target, float32_to_bfloat16_rtne(result.to(tl.float32)), mask=mask)
    else:
        tl.store(target, result.to(out_ptr.dtype.element_ty), mask=mask)


def block_mix(x: torch.Tensor, matrix: torch.Tensor, src_block: torch.Tensor, bias: torch.Tensor, scale: float,
              patch_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Launch the kernel. ``x: [B, C, H, W]`` (any strides); ``matrix [L, L]`` and ``bias [L]`` contiguous opmath;
    ``src_block`` int64 ``[N]`` or ``[B, N]``, values in ``[0, N)`` (validated by the Python layer); all on
    ``x.device``. Returns a contiguous ``[B, C, H, W]`` of ``out_dtype``."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be uint8 or float, got {x.dtype}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16, float32 or float64, got {out_dtype}")
    B, C, H, W = x.shape
    p = patch_size
    if p < 1 or H % p or W % p:
        raise ValueError(f"patch_size={p} must divide H={H} and W={W}")
    N, L = (H // p) * (W // p), C * p * p
    opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, tensor, shape in (("matrix", matrix, (L, L)), ("bias", bias, (L,))):
        if tensor.dtype != opmath or tuple(tensor.shape) != shape or not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous {opmath} {list(shape)}, got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
    per_sample = src_block.dim() == 2
    if src_block.dtype != torch.int64 or not src_block.is_contiguous() or \
            tuple(src_block.shape) not in ((N,), (B, N)):
        raise ValueError(f"src_block must be contiguous int64 [{N}] or [{B}, {N}], got {src_block.dtype} "
                         f"{tuple(src_block.shape)}")
    for name, tensor in (("matrix", matrix), ("src_block", src_block), ("bias", bias)):
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    out = torch.empty((B, C, H, W), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    if (C - 1) * x.stride(1) + (p - 1) * (x.stride(2) + x.stride(3)) >= 2**31 or C * H * W >= 2**31 or L >= 2**31:
        raise ValueError("x is too large for the kernel's 32-bit in-block offsets")
    R = B * N
    if opmath == torch.float64:
        block_m, block_n, block_k = 16, 16, 8
    else:  # tl.dot needs tiles of at least 16 in every dimension
        block_m, block_n, block_k = 64, 64, 32
        if x.device.type == "cpu":  # the interpreter: smaller tiles waste less on tiny test shapes
            block_m, block_n, block_k = 16, 16, 16
    grid = (triton.cdiv(R, block_m), triton.cdiv(L, block_n))
    # The scale as an opmath scalar in memory (a float argument would reach the kernel as float32), filled on the
    # device without a host synchronisation.
    scale_value = torch.full((1,), float(scale), dtype=opmath, device=x.device)
    _block_mix_kernel[grid](
        x, matrix, src_block, bias, scale_value, out, C, H, W, p, N, L, R,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3), N if per_sample else 0,
        OPMATH_F64=opmath == torch.float64, OUT_BF16=out_dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
