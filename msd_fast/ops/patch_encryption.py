"""Key-based patch permutation/encryption of images for ViTs: checks, reference, autograd, dispatch.

For ``x: [B, C, H, W]`` and patch size ``p`` dividing ``H`` and ``W`` there are ``N = (H/p)(W/p)`` blocks of
``L = C*p*p`` values each, value index ``e = c*p*p + u*p + v`` (the layout of a ViT patch-embedding weight). An
encryption is described by three small tables (:class:`PatchTables`), gather convention::

    out[b, block n, value e] = negpos_e(x[b, block src_block[n], value src_elem[e]])   # src_block may be [B, N]

with ``negpos_e(v) = max_value - v`` where ``flip[e]`` and the identity elsewhere. Encryption uses the key's block
permutation (block scrambling), value permutation (pixel shuffling, mixing channels) and mask (negative-positive);
decryption uses the inverse tables. Every backend computes this in one pass, bit-identical to the reference.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ..backends import kernels_for, resolve_backend
from ..keys import Key, SampleIds, key_from_handle, require_key, sample_ids_list
from ..checks import FLOAT_DTYPES, check_dim, check_dtype, check_max_value, check_positive_int, check_tensor

IMAGE_DTYPES = (torch.uint8,) + FLOAT_DTYPES
OP_NAME = "patch_permute"


class PatchTables(NamedTuple):
    """Gather tables of one patch permutation: ``src_block`` int64 ``[N]`` or ``[B, N]``, ``src_elem`` int64
    ``[L]``, ``flip`` uint8 ``[L]`` or None. Build with :func:`make_tables` (which validates them)."""

    src_block: torch.Tensor
    src_elem: torch.Tensor
    flip: Optional[torch.Tensor]

    def to(self, device: torch.device) -> "PatchTables":
        if all(t is None or t.device == device for t in self):  # the per-key cache already holds them there
            return self
        return PatchTables(*(t.to(device) if t is not None else None for t in self))


def make_tables(src_block: torch.Tensor, src_elem: torch.Tensor, flip: Optional[torch.Tensor],
                n_blocks: int, n_values: int) -> PatchTables:
    """Validate permutation tables (shapes and value ranges, checked once on the host) and return them."""
    for name, table, size in (("src_block", src_block, n_blocks), ("src_elem", src_elem, n_values)):
        if table.dtype != torch.int64 or table.shape[-1] != size or table.dim() not in (1, 2):
            raise ValueError(f"{name} must be int64 of length {size}, got {table.dtype} {tuple(table.shape)}")
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= size):
            raise IndexError(f"{name} has values outside [0, {size})")
    if src_elem.dim() != 1:
        raise ValueError(f"src_elem must be 1-D, got shape {tuple(src_elem.shape)}")
    if flip is not None and (flip.dtype != torch.uint8 or tuple(flip.shape) != (n_values,)):
        raise ValueError(f"flip must be uint8 of shape ({n_values},), got {flip.dtype} {tuple(flip.shape)}")
    contiguous = (lambda t: t.contiguous() if t is not None else None)
    return PatchTables(contiguous(src_block), contiguous(src_elem), contiguous(flip))


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    return torch.argsort(perm, dim=-1)


def key_tables(key: Key, n_blocks: int, n_values: int, *, block_scramble: bool, pixel_shuffle: bool, negpos: bool,
               sample_ids: Optional[list], decrypt: bool) -> PatchTables:
    """The tables that encrypt (or, with ``decrypt``, decrypt) ``N = n_blocks`` blocks of ``L = n_values``."""
    if sample_ids is not None:
        blocks = key.sample_block_permutations(n_blocks, sample_ids)
    elif block_scramble:
        blocks = key.block_permutation(n_blocks)
    else:
        blocks = torch.arange(n_blocks)
    values = key.pixel_permutation(n_values) if pixel_shuffle else torch.arange(n_values)
    flip = key.negpos_mask(n_values).to(torch.uint8) if negpos else None
    if decrypt:
        blocks, values = _inverse(blocks), _inverse(values)
        flip = flip[values] if flip is not None else None
    return make_tables(blocks, values, flip, n_blocks, n_values)


def image_to_blocks(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, N, C*p*p]``: blocks in row-major order, values in ``(c, u, v)`` order (a view when
    possible). ``patch_size`` must divide ``H`` and ``W``."""
    B, C, H, W = x.shape
    p = patch_size
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def blocks_to_image(blocks: torch.Tensor, channels: int, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`image_to_blocks`: ``[B, N, C*p*p] -> [B, C, H, W]`` (contiguous)."""
    B, p = blocks.shape[0], patch_size
    gh, gw = height // p, width // p
    return blocks.reshape(B, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, channels, height, width
                                                                                       ).contiguous()


def permute_patches_reference(x: torch.Tensor, tables: PatchTables, patch_size: int, max_value: float) -> torch.Tensor:
    """Eager PyTorch reference (reshape + index + where); differentiable; the ground truth of every backend."""
    B, C, H, W = x.shape
    blocks = image_to_blocks(x, patch_size)
    src_block = tables.src_block.to(x.device)
    if src_block.dim() == 1:
        blocks = blocks[:, src_block]
    else:
        blocks = torch.gather(blocks, 1, src_block[:, :, None].expand(-1, -1, blocks.shape[2]))
    blocks = blocks[:, :, tables.src_elem.to(x.device)]
    if tables.flip is not None:
        blocks = torch.where(tables.flip.to(x.device).bool(), negpos_reference(blocks, max_value), blocks)
    return blocks_to_image(blocks, C, H, W, patch_size)


def negpos_reference(values: torch.Tensor, max_value: float) -> torch.Tensor:
    """``max_value - v``: uint8 modulo 256, float64 in float64, other floats in float32 rounded once."""
    if values.dtype == torch.uint8:
        return ((int(max_value) - values.to(torch.int16)) & 255).to(torch.uint8)
    opmath = torch.float64 if values.dtype == torch.float64 else torch.float32
    return (torch.tensor(max_value, dtype=opmath, device=values.device) - values.to(opmath)).to(values.dtype)


def permute_patches(x: torch.Tensor, tables: PatchTables, patch_size: int, max_value: float,
                    backend: str = "auto") -> torch.Tensor:
    """Apply validated ``tables`` to ``x: [B, C, H, W]`` with the chosen backend; returns a contiguous tensor."""
    name = resolve_backend(backend, x.device, OP_NAME)
    if name == "reference":
        return permute_patches_reference(x, tables, patch_size, max_value)
    tables = tables.to(x.device)
    return kernels_for(name).patch_permute(x, tables.src_block, tables.src_elem, tables.flip, patch_size,
                                           float(max_value))


@torch.library.custom_op("msd_fast::patch_encryption", mutates_args=())
def _patch_encryption(x: torch.Tensor, key_handle: int, patch_size: int, block_scramble: bool, pixel_shuffle: bool,
                      negpos: bool, max_value: float, sample_ids: Optional[torch.Tensor], decrypt: bool,
                      backend: str) -> torch.Tensor:
    key = key_from_handle(key_handle)
    B, C, H, W = x.shape
    n_blocks, n_values = (H // patch_size) * (W // patch_size), C * patch_size * patch_size
    options = dict(block_scramble=block_scramble, pixel_shuffle=pixel_shuffle, negpos=negpos, decrypt=decrypt)
    if sample_ids is None:
        slot = ("patch-tables", n_blocks, n_values, *options.values(), str(x.device))
        tables = key.cached(slot, lambda: key_tables(key, n_blocks, n_values, sample_ids=None, **options).to(x.device))
    else:
        tables = key_tables(key, n_blocks, n_values, sample_ids=sample_ids.tolist(), **options)
    return permute_patches(x, tables, patch_size, max_value, backend)


@_patch_encryption.register_fake
def _(x, key_handle, patch_size, block_scramble, pixel_shuffle, negpos, max_value, sample_ids, decrypt, backend):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    ctx.arguments = inputs[1:]


def _backward(ctx, grad):
    # The transform is affine with slope +-1 per value, so its vector-Jacobian product is the inverse permutation
    # with the negative-positive step reduced to a sign flip (max_value = 0).
    key_handle, patch_size, block_scramble, pixel_shuffle, negpos, _, sample_ids, decrypt, backend = ctx.arguments
    grad_x = _patch_encryption(grad.contiguous(), key_handle, patch_size, block_scramble, pixel_shuffle, negpos, 0.0,
                               sample_ids, not decrypt, backend)
    return (grad_x,) + (None,) * 9


_patch_encryption.register_autograd(_backward, setup_context=_setup_context)


def _encryption_call(x, key, patch_size, block_scramble, pixel_shuffle, negpos, max_value, per_sample, sample_ids,
                     backend, decrypt) -> torch.Tensor:
    check_tensor(x, "x")
    check_dim(x, 4, "x", "[B, C, H, W]")
    check_dtype(x, IMAGE_DTYPES, "x")
    require_key(key)
    patch_size = check_positive_int(patch_size, "patch_size")
    H, W = x.shape[2], x.shape[3]
    if H % patch_size or W % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the image height {H} and width {W} "
                         "(resize or crop the images first)")
    max_value = resolve_max_value(max_value, x.dtype)
    ids = None
    if per_sample:
        if not block_scramble:
            raise ValueError("per_sample=True scrambles blocks per sample; it needs block_scramble=True")
        if sample_ids is None:
            raise ValueError("per_sample=True needs sample_ids (one id per image)")
        ids = sample_ids if isinstance(sample_ids, torch.Tensor) else torch.tensor(sample_ids_list(sample_ids))
        if ids.dim() != 1 or ids.shape[0] != x.shape[0]:
            raise ValueError(f"sample_ids must have one id per image ({x.shape[0]}), got shape {tuple(ids.shape)}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"sample_ids must be int32 or int64, got {ids.dtype}")
    elif sample_ids is not None:
        raise ValueError("sample_ids is only used with per_sample=True")
    return _patch_encryption(x, key._handle, patch_size, bool(block_scramble), bool(pixel_shuffle), bool(negpos),
                             max_value, ids, decrypt, backend)


def resolve_max_value(max_value: Optional[float], dtype: torch.dtype) -> float:
    """The negative-positive maximum: 255 for uint8 and 1.0 for floats by default; a positive finite number, for
    uint8 an int in [1, 255]."""
    if max_value is None:
        return 255.0 if dtype == torch.uint8 else 1.0
    value = check_max_value(max_value)
    if dtype == torch.uint8 and (value != int(value) or value > 255):
        raise ValueError(f"max_value for uint8 images must be an integer in [1, 255], got {max_value!r}")
    return value


def encrypt_patches(x: torch.Tensor, key: Key, patch_size: int = 16, *, block_scramble: bool = True,
                    pixel_shuffle: bool = True, negpos: bool = False, max_value: Optional[float] = None,
                    per_sample: bool = False, sample_ids: Union[SampleIds, None] = None,
                    backend: str = "auto") -> torch.Tensor:
    """Encrypt images block-wise with ``key`` for a ViT with patch size ``patch_size``.

    Args:
        x: ``[B, C, H, W]`` uint8, float16, bfloat16, float32 or float64, any strides, any device.
        key: the consortium :class:`~msd_fast.Key`.
        patch_size: block size ``p``; must divide ``H`` and ``W`` (and equal the ViT's patch size).
        block_scramble: permute the ``N = (H/p)(W/p)`` blocks with the key's block permutation.
        pixel_shuffle: permute the ``C*p*p`` values inside every block (one permutation, mixes channels).
        negpos: map key-selected values ``v -> max_value - v`` (uint8 modulo 256).
        max_value: for ``negpos``; 255 for uint8, 1.0 for floats by default.
        per_sample: scramble blocks with a different permutation per image, derived from ``sample_ids``.
        sample_ids: ``[B]`` ints (tensor or sequence), the images' dataset indices; only with ``per_sample``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        Contiguous ``[B, C, H, W]`` tensor of ``x``'s dtype and device. Differentiable (float) w.r.t. ``x``.
    """
    return _encryption_call(x, key, patch_size, block_scramble, pixel_shuffle, negpos, max_value, per_sample,
                            sample_ids, backend, decrypt=False)


def decrypt_patches(x: torch.Tensor, key: Key, patch_size: int = 16, *, block_scramble: bool = True,
                    pixel_shuffle: bool = True, negpos: bool = False, max_value: Optional[float] = None,
                    per_sample: bool = False, sample_ids: Union[SampleIds, None] = None,
                    backend: str = "auto") -> torch.Tensor:
    """Invert :func:`encrypt_patches` called with the same key and options (exact for uint8; for floats with
    ``negpos`` within one rounding of ``max_value - v``)."""
    return _encryption_call(x, key, patch_size, block_scramble, pixel_shuffle, negpos, max_value, per_sample,
                            sample_ids, backend, decrypt=True)
