"""Dense key-derived block transform ("block mixing"): checks, reference, autograd, dispatch.

For ``x: [B, C, H, W]`` and patch size ``p`` dividing ``H`` and ``W`` there are ``N = (H/p)(W/p)`` blocks of
``L = C*p*p`` values each, value index ``e = c*p*p + u*p + v`` (the layout of a ViT patch-embedding weight, as for
:mod:`~msd_fast.ops.patch_encryption`). One kernel computes, in ``opmath`` (float32; float64 for float64 ``x``)::

    out[b, block n, i] = scale * sum_j matrix[i, j] * x[b, block src_block[(b,) n], j] + bias[i]

and writes ``out`` in image layout ``[B, C, H, W]`` with dtype ``out_dtype``. Encryption with a key is
``matrix = A`` (the key's orthogonal :meth:`~msd_fast.Key.block_matrix`), ``scale = 1/M`` and ``bias = -A 1 / 2``,
so every block becomes ``A (x/M - 1/2)``: centred, mixed over all its values and channels, norm-preserving.
Decryption is ``matrix = A^T``, ``scale = M``, ``bias = M/2`` with the inverse block order. The ciphertext is floating
point (float32 or float16; the uint8 image is recovered exactly by rounding, see :func:`decrypt_blocks`).

Unlike the permutations this is not bit-exact across backends (a sum of ``L`` products); every backend accumulates
in ``opmath`` and matches the reference to float rounding.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..backends import kernels_for, resolve_backend
from ..keys import Key, SampleIds, require_key, sample_ids_list
from ..checks import FLOAT_DTYPES, check_dim, check_dtype, check_positive_int, check_tensor
from .patch_encryption import IMAGE_DTYPES, blocks_to_image, image_to_blocks, resolve_max_value

OP_NAME = "block_mix"
CIPHER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation type of the op for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mix_blocks_reference(x: torch.Tensor, matrix: torch.Tensor, src_block: torch.Tensor, bias: torch.Tensor,
                         scale: float, patch_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Eager PyTorch reference (reshape + gather + matmul); differentiable; the ground truth of every backend."""
    B, C, H, W = x.shape
    opmath = opmath_dtype(x.dtype)
    blocks = image_to_blocks(x, patch_size)
    src_block = src_block.to(x.device)
    if src_block.dim() == 1:
        blocks = blocks[:, src_block]
    else:
        blocks = torch.gather(blocks, 1, src_block[:, :, None].expand(-1, -1, blocks.shape[2]))
    mixed = torch.matmul(blocks.to(opmath), matrix.to(device=x.device, dtype=opmath).t()) * scale
    mixed = mixed + bias.to(device=x.device, dtype=opmath)
    return blocks_to_image(mixed.to(out_dtype), C, H, W, patch_size)


def _check_tables(x: torch.Tensor, matrix: torch.Tensor, src_block: torch.Tensor, bias: torch.Tensor,
                  patch_size: int) -> None:
    B, C, H, W = x.shape
    L, N = C * patch_size * patch_size, (H // patch_size) * (W // patch_size)
    if matrix.shape != (L, L) or matrix.dtype != opmath_dtype(x.dtype):
        raise ValueError(f"matrix must be {opmath_dtype(x.dtype)} [{L}, {L}], got {matrix.dtype} {tuple(matrix.shape)}")
    if bias.shape != (L,) or bias.dtype != matrix.dtype:
        raise ValueError(f"bias must be {matrix.dtype} [{L}], got {bias.dtype} {tuple(bias.shape)}")
    if src_block.dtype != torch.int64 or src_block.dim() not in (1, 2) or src_block.shape[-1] != N or \
            (src_block.dim() == 2 and src_block.shape[0] != B):
        raise ValueError(f"src_block must be int64 [{N}] or [{B}, {N}], got {src_block.dtype} "
                         f"{tuple(src_block.shape)}")
    if src_block.numel() and (int(src_block.min()) < 0 or int(src_block.max()) >= N):
        raise IndexError(f"src_block has values outside [0, {N})")
    for name, tensor in (("matrix", matrix), ("src_block", src_block), ("bias", bias)):
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")


def mix_blocks(x: torch.Tensor, matrix: torch.Tensor, src_block: torch.Tensor, bias: torch.Tensor, scale: float,
               patch_size: int, out_dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """The op (see the module docstring) with the chosen backend; tables must be on ``x``'s device (checked).

    Args:
        x: ``[B, C, H, W]`` uint8 or float, any strides.
        matrix: ``[L, L]`` contiguous, ``opmath_dtype(x.dtype)``.
        src_block: int64 ``[N]`` (one block order) or ``[B, N]`` (one per image), values in ``[0, N)``.
        bias: ``[L]``, the matrix's dtype.
        scale: a finite float.
        out_dtype: float16, bfloat16, float32 or float64.
    Returns:
        Contiguous ``[B, C, H, W]`` of ``out_dtype``; differentiable w.r.t. a float ``x``.
    """
    patch_size = _check_images(x, patch_size, IMAGE_DTYPES)
    _check_out_dtype(out_dtype)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    for name, tensor in (("matrix", matrix), ("src_block", src_block), ("bias", bias)):
        check_tensor(tensor, name)
    _check_tables(x, matrix, src_block, bias, patch_size)
    return _block_mix(x, matrix.contiguous(), src_block.contiguous(), bias.contiguous(), float(scale), patch_size,
                      out_dtype, backend)


@torch.library.custom_op("msd_fast::block_mix", mutates_args=())
def _block_mix(x: torch.Tensor, matrix: torch.Tensor, src_block: torch.Tensor, bias: torch.Tensor, scale: float,
               patch_size: int, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    name = resolve_backend(backend, x.device, OP_NAME)
    if name == "reference":
        return mix_blocks_reference(x, matrix, src_block, bias, scale, patch_size, out_dtype)
    return kernels_for(name).block_mix(x, matrix, src_block, bias, scale, patch_size, out_dtype)


@_block_mix.register_fake
def _(x, matrix, src_block, bias, scale, patch_size, out_dtype, backend):
    return x.new_empty(x.shape, dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    x, matrix, src_block, bias, scale, patch_size, out_dtype, backend = inputs
    ctx.save_for_backward(matrix, src_block)
    ctx.arguments = (x.dtype, scale, patch_size, backend)


def _backward(ctx, grad):
    # out = scale * A x[src] + bias, so d x[src] = scale * A^T d out: the same op with the transposed matrix, the
    # inverse block order and no bias, written in x's dtype. That holds when src_block is a permutation (every key
    # table is); a src_block that repeats blocks (mix_blocks allows any values in [0, N)) needs the gradients of
    # the copies summed: the op in the output's block order, then a scatter-add into the source blocks.
    matrix, src_block = ctx.saved_tensors
    x_dtype, scale, patch_size, backend = ctx.arguments
    grad = grad.to(matrix.dtype).contiguous()
    transposed, no_bias = matrix.t().contiguous(), torch.zeros_like(matrix[0])
    inverse = torch.argsort(src_block, dim=-1)
    identity = torch.arange(src_block.shape[-1], device=src_block.device)
    if torch.equal(torch.gather(src_block, -1, inverse), identity.expand_as(src_block)):
        grad_x = _block_mix(grad, transposed, inverse, no_bias, scale, patch_size, x_dtype, backend)
        return (grad_x,) + (None,) * 7
    B, C, H, W = grad.shape
    grad_out_order = image_to_blocks(_block_mix(grad, transposed, identity, no_bias, scale, patch_size,
                                                matrix.dtype, backend), patch_size)
    index = src_block.expand(B, -1)[:, :, None].expand_as(grad_out_order)
    grad_blocks = torch.zeros_like(grad_out_order).scatter_add_(1, index, grad_out_order)
    return (blocks_to_image(grad_blocks, C, H, W, patch_size).to(x_dtype),) + (None,) * 7


_block_mix.register_autograd(_backward, setup_context=_setup_context)


# ---- the key-level encryption --------------------------------------------------------------------------------------

def _block_order(key: Key, n_blocks: int, block_scramble: bool, per_sample: bool,
                 sample_ids: Union[SampleIds, None], batch: int) -> torch.Tensor:
    if per_sample:
        if not block_scramble:
            raise ValueError("per_sample=True scrambles blocks per sample; it needs block_scramble=True")
        if sample_ids is None:
            raise ValueError("per_sample=True needs sample_ids (one id per image)")
        ids = sample_ids_list(sample_ids)
        if len(ids) != batch:
            raise ValueError(f"sample_ids must have one id per image ({batch}), got {len(ids)}")
        return key.sample_block_permutations(n_blocks, ids)
    if sample_ids is not None:
        raise ValueError("sample_ids is only used with per_sample=True")
    return key.block_permutation(n_blocks) if block_scramble else torch.arange(n_blocks)


def _check_images(x: torch.Tensor, patch_size: int, allowed: tuple) -> int:
    check_tensor(x, "x")
    check_dim(x, 4, "x", "[B, C, H, W]")
    check_dtype(x, allowed, "x")
    patch_size = check_positive_int(patch_size, "patch_size")
    H, W = x.shape[2], x.shape[3]
    if H % patch_size or W % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the image height {H} and width {W} "
                         "(resize or crop the images first)")
    return patch_size


def _check_out_dtype(out_dtype: object) -> None:
    if out_dtype not in CIPHER_DTYPES:
        raise TypeError(f"out_dtype must be one of float16, bfloat16, float32, float64, got {out_dtype}")


def _key_matrix(key: Key, n_values: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return key.cached(("block-matrix", n_values, dtype, str(device)),
                      lambda: key.block_matrix(n_values).to(device=device, dtype=dtype).contiguous())


def encrypt_blocks(x: torch.Tensor, key: Key, patch_size: int = 16, *, block_scramble: bool = True,
                   per_sample: bool = False, sample_ids: Union[SampleIds, None] = None,
                   max_value: Optional[float] = None, out_dtype: torch.dtype = torch.float32,
                   backend: str = "auto") -> torch.Tensor:
    """Encrypt images with the key's dense block transform (and block order) for a ViT with patch size ``p``.

    Every output block is ``A (x[src block] / max_value - 1/2)`` with ``A`` the key's random orthogonal ``[L, L]``
    matrix (``L = C*p*p``, mixing every value and channel of the block). Folds exactly into a ViT's patch embedding
    (:func:`~msd_fast.encrypt_vit` with ``mixing=True``).

    Args:
        x: ``[B, C, H, W]`` uint8 or float (raw pixel units), any strides, any device.
        key: the consortium :class:`~msd_fast.Key`.
        patch_size: block size ``p``; must divide ``H`` and ``W``.
        block_scramble: also permute the ``N`` blocks with the key's block permutation.
        per_sample: a different block order per image, derived from ``sample_ids`` (``[B]`` ints).
        max_value: the pixel range, 255 for uint8 and 1.0 for floats by default.
        out_dtype: the ciphertext's dtype: float32 (default), float16, bfloat16 or float64.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        Contiguous ``[B, C, H, W]`` of ``out_dtype`` on ``x``'s device; differentiable w.r.t. a float ``x``.
    """
    require_key(key)
    patch_size = _check_images(x, patch_size, IMAGE_DTYPES)
    _check_out_dtype(out_dtype)
    max_value = resolve_max_value(max_value, x.dtype)
    B, C, H, W = x.shape
    n_blocks, n_values = (H // patch_size) * (W // patch_size), C * patch_size * patch_size
    order = _block_order(key, n_blocks, block_scramble, per_sample, sample_ids, B).to(x.device)
    opmath = opmath_dtype(x.dtype)
    matrix = _key_matrix(key, n_values, opmath, x.device)
    bias = key.cached(("block-bias", n_values, opmath, str(x.device)),
                      lambda: (-0.5 * key.block_matrix(n_values).sum(dim=1)).to(device=x.device, dtype=opmath))
    return _block_mix(x, matrix, order.contiguous(), bias, 1.0 / max_value, patch_size, out_dtype, backend)


def decrypt_blocks(y: torch.Tensor, key: Key, patch_size: int = 16, *, block_scramble: bool = True,
                   per_sample: bool = False, sample_ids: Union[SampleIds, None] = None,
                   max_value: float = 255.0, out_dtype: torch.dtype = torch.uint8,
                   backend: str = "auto") -> torch.Tensor:
    """Invert :func:`encrypt_blocks` (same key and options): ``x = max_value * (A^T y + 1/2)`` in the original block
    order. ``out_dtype=torch.uint8`` (default) rounds to the nearest integer and clamps to ``[0, 255]``, which
    recovers uint8 images exactly from a float32 or float16 ciphertext; a float ``out_dtype`` returns the raw
    values. ``max_value`` must be the one used to encrypt (255 for uint8 images)."""
    require_key(key)
    patch_size = _check_images(y, patch_size, FLOAT_DTYPES)
    max_value = resolve_max_value(max_value, y.dtype)
    if out_dtype not in IMAGE_DTYPES:
        raise TypeError(f"out_dtype must be uint8 or a float dtype, got {out_dtype}")
    B, C, H, W = y.shape
    n_blocks, n_values = (H // patch_size) * (W // patch_size), C * patch_size * patch_size
    order = _block_order(key, n_blocks, block_scramble, per_sample, sample_ids, B)
    inverse = torch.argsort(order, dim=-1).to(y.device).contiguous()
    opmath = opmath_dtype(y.dtype)
    transposed = key.cached(("block-matrix-t", n_values, opmath, str(y.device)),
                            lambda: key.block_matrix(n_values).t().to(device=y.device, dtype=opmath).contiguous())
    bias = torch.full((n_values,), 0.5 * max_value, dtype=opmath, device=y.device)
    if out_dtype == torch.uint8:
        plain = _block_mix(y, transposed, inverse, bias, max_value, patch_size, opmath, backend)
        return plain.round_().clamp_(0, 255).to(torch.uint8)
    return _block_mix(y, transposed, inverse, bias, max_value, patch_size, out_dtype, backend)
