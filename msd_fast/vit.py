"""timm ViT integration: the one factory of every ViT we build, forward on masked-sampling views, and the exact
model-side key transform.

:func:`build_vit` makes every ViT of the package (the server's backbone, the client's random-init baseline, a loaded
export) from a timm name and keyword arguments, and turns timm's refusals into one ``ValueError`` naming ``--arch``.

:func:`forward_views` runs a ``VisionTransformer`` on views of already-embedded patch tokens built by one fused
:func:`~msd_fast.masked_gather`.

:func:`encrypt_vit` / :func:`decrypt_vit`: a ViT's patch embedding is linear in the block's ``L = C*p*p`` values
(value index ``e = c*p*p + u*p + v``, the layout of the Conv2d weight) and its transformer is equivariant to
permutations of the patch tokens once the position embedding moves with them. Every encryption maps a block
affinely, ``y_n = G x_{bperm[n]} + h`` (:func:`block_affine`: a signed permutation for pixel shuffling and
negative-positive, ``A / M`` with ``A`` orthogonal for the dense transform), so the model ``m'`` with::

    W' = Wn G^-1      b' = bn - W' h      pos'[n] = pos[bperm[n]]   (patch rows; class/register rows unchanged)

satisfies ``m'(y) == m(normalize(x))`` up to float rounding, where ``Wn = W / std_c`` and ``bn = b - Wn @ mean_c``
fold the input normalisation into the embedding (the transforms mix values and channels, so normalising *after*
encryption would not be exact). :func:`decrypt_vit` applies the inverse map. The arithmetic is done in float64.

Supported: timm ``VisionTransformer`` with its ``PatchEmbed`` (Conv2d, kernel = stride = patch size), class token
or not, register tokens, ``no_embed_class`` either way, learned or no position embedding, any in_chans, square or
not, every global pool (token, avg, max, avgmax, map). Refused (ValueError): ``dynamic_img_size`` /
``dynamic_img_pad`` (the position-embedding resampling does not commute with block scrambling), other patch
embeddings (hybrid CNN stems mix neighbouring blocks), and ``per_sample`` block scrambling in :func:`encrypt_vit`
(no single model exists; :func:`decrypt_vit` folds the values and keeps the position embedding).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import torch
import timm
from timm.layers import PatchEmbed
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .keys import Key, require_key
from .checks import check_max_value
from .ops.masked_gather import masked_gather

Stats = Union[float, Sequence[float], None]



def build_vit(arch: str, **kwargs) -> VisionTransformer:
    """``timm.create_model(arch, pretrained=False, **kwargs)``, required to be a ``VisionTransformer``.

    Raises ``ValueError`` naming ``--arch`` when ``arch`` is not a timm name, not a ViT (a non-ViT family rejects
    the ViT keyword arguments or builds something else), or when timm refuses the shape (e.g. a width the heads do
    not divide; the architecture overrides among ``kwargs`` are named as flags)."""
    if not timm.is_model(arch):
        raise ValueError(f"--arch {arch!r} is not a timm model name (see timm.list_models('vit_*'))")
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError:
        model = None
    except AssertionError as error:
        given = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in kwargs.items()
                          if k in ("depth", "embed_dim", "num_heads")) or "its own shape"
        raise ValueError(f"--arch {arch!r} with {given}: {error or 'timm refused the shape'}") from None
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"--arch {arch!r} is not a timm VisionTransformer")
    return model


def _check_vit(model: nn.Module, patch_size: Optional[int]) -> int:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    embed = model.patch_embed
    if type(embed) is not PatchEmbed or not isinstance(embed.proj, nn.Conv2d):
        raise ValueError(f"model.patch_embed must be timm's PatchEmbed with a Conv2d projection, got "
                         f"{type(embed).__name__} (hybrid/CNN stems mix neighbouring blocks: no exact key transform)")
    conv = embed.proj
    p = conv.kernel_size[0]
    if (conv.kernel_size != (p, p) or conv.stride != (p, p) or conv.padding != (0, 0) or conv.dilation != (1, 1)
            or conv.groups != 1):
        raise ValueError("model.patch_embed.proj must be a square Conv2d with kernel = stride = patch size, "
                         "no padding, dilation or groups")
    if getattr(model, "dynamic_img_size", False) or getattr(embed, "dynamic_img_pad", False):
        raise ValueError("models with dynamic_img_size/dynamic_img_pad resample the position embedding, which does "
                         "not commute with block scrambling; build the model for the encrypted image size")
    if patch_size is not None and patch_size != p:
        raise ValueError(f"patch_size={patch_size} differs from the model's patch size {p}; encrypt with the "
                         "model's patch size")
    return p


def _per_value(stat: Stats, channels: int, patch_size: int, name: str, default: float) -> torch.Tensor:
    """Expand a scalar or per-channel statistic to the ``C*p*p`` values of a block (float64)."""
    if stat is None:
        values = torch.full((channels,), default, dtype=torch.float64)
    else:
        values = torch.as_tensor(stat, dtype=torch.float64).flatten()
        if values.numel() == 1:
            values = values.expand(channels)
        if values.numel() != channels:
            raise ValueError(f"{name} must be a scalar or have one value per channel ({channels}), "
                             f"got {values.numel()}")
    if name == "std" and bool((values == 0).any()):
        raise ValueError("std must be non-zero")
    return values.repeat_interleave(patch_size * patch_size)


def block_affine(key: Key, n_values: int, *, pixel_shuffle: bool, negpos: bool, mixing: bool,
                 max_value: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-block map of an encryption, ``y = G x + h`` on the ``L`` values of a block (raw units), as float64
    ``(G [L, L], G^-1 [L, L], h [L])``: for the permutation scheme ``G = S P`` (pixel shuffle ``P``, signs ``S``)
    and ``h = M`` on flipped values; for the dense scheme ``G = A / M`` and ``h = -A 1 / 2`` (``A`` orthogonal, so
    ``G^-1 = M A^T``). Both inverses are exact by construction, never a numerical inversion."""
    if mixing:
        matrix = key.block_matrix(n_values)
        return matrix / max_value, matrix.t() * max_value, -0.5 * matrix.sum(dim=1)
    value_perm = key.pixel_permutation(n_values) if pixel_shuffle else torch.arange(n_values)
    flip = key.negpos_mask(n_values) if negpos else torch.zeros(n_values, dtype=torch.bool)
    sign = 1.0 - 2.0 * flip.to(torch.float64)
    gather = torch.zeros(n_values, n_values, dtype=torch.float64)
    gather[torch.arange(n_values), value_perm] = 1.0
    forward = sign[:, None] * gather
    offset = flip.to(torch.float64) * (float(max_value) if negpos else 0.0)
    return forward, forward.t().contiguous(), offset


def _transform(model: nn.Module, key: Key, patch_size: Optional[int], block_scramble: bool, pixel_shuffle: bool,
               negpos: bool, mixing: bool, max_value: Optional[float], mean: Stats, std: Stats, per_sample: bool,
               decrypt: bool) -> nn.Module:
    require_key(key)
    p = _check_vit(model, patch_size)
    if per_sample and not decrypt:
        raise ValueError("per_sample block scrambling gives every image its own block order, so no single model "
                         "matches it; use block_scramble without per_sample, a model without position embedding, "
                         "or token mode (permute_tokens)")
    if mixing and (pixel_shuffle or negpos):
        raise ValueError("mixing=True (the dense transform) replaces pixel_shuffle and negpos; turn them off")
    if (negpos or mixing) and max_value is None:
        raise ValueError("max_value is required with negpos or mixing: 255.0 for uint8-range inputs, 1.0 for [0, 1] "
                         "floats")
    if negpos or mixing:
        check_max_value(max_value)
    conv = model.patch_embed.proj
    channels, n_blocks = conv.in_channels, model.patch_embed.num_patches
    n_values = channels * p * p
    forward, inverse, offset = block_affine(key, n_values, pixel_shuffle=pixel_shuffle, negpos=negpos, mixing=mixing,
                                            max_value=max_value)
    block_perm = key.block_permutation(n_blocks) if block_scramble else torch.arange(n_blocks)
    mean_e = _per_value(mean, channels, p, "mean", 0.0)
    std_e = _per_value(std, channels, p, "std", 1.0)

    out = copy.deepcopy(model)
    weight = conv.weight.detach().to(torch.float64).reshape(conv.out_channels, n_values)
    bias = (conv.bias.detach().to(torch.float64) if conv.bias is not None
            else torch.zeros(conv.out_channels, dtype=torch.float64))
    if not decrypt:  # W' = Wn G^-1, b' = bn - W' h
        folded_w = weight / std_e
        folded_b = bias - folded_w @ mean_e
        new_w = folded_w @ inverse
        new_b = folded_b - new_w @ offset
    else:            # Wn = W' G, bn = b' + W' h, then undo the normalisation fold
        folded_w = weight @ forward
        folded_b = bias + weight @ offset
        new_w = folded_w * std_e
        new_b = folded_b + folded_w @ mean_e
    _set_projection(out, new_w.reshape_as(conv.weight), new_b)

    if out.pos_embed is not None and block_scramble and not per_sample:
        pos = out.pos_embed.detach()
        patch_rows = pos[:, pos.shape[1] - n_blocks:]
        if decrypt:
            restored = torch.empty_like(patch_rows)
            restored[:, block_perm] = patch_rows
        else:
            restored = patch_rows[:, block_perm]
        with torch.no_grad():
            out.pos_embed[:, pos.shape[1] - n_blocks:] = restored
    return out


def _set_projection(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    conv = model.patch_embed.proj
    if conv.bias is None:
        new_conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, bias=True,
                             device=conv.weight.device, dtype=conv.weight.dtype)
        model.patch_embed.proj = conv = new_conv
    with torch.no_grad():
        conv.weight.copy_(weight.to(conv.weight.dtype))
        conv.bias.copy_(bias.to(conv.bias.dtype))


def encrypt_vit(model: nn.Module, key: Key, patch_size: Optional[int] = None, *, block_scramble: bool = True,
                pixel_shuffle: bool = True, negpos: bool = False, mixing: bool = False,
                max_value: Optional[float] = None, mean: Stats = None, std: Stats = None,
                per_sample: bool = False) -> nn.Module:
    """Return a transformed copy ``m'`` of a timm ViT ``model`` with ``m'(encrypt_patches(x, key, ...)) ==
    model(normalize(x))`` up to float rounding.

    Args:
        model: a timm ``VisionTransformer`` (not modified).
        key, patch_size, block_scramble, pixel_shuffle, negpos, per_sample: as for
            :func:`~msd_fast.encrypt_patches` (``patch_size`` defaults to the model's).
        mixing: the dense scheme instead of pixel shuffling / negative-positive: ``m'`` takes
            :func:`~msd_fast.ops.block_mixing.encrypt_blocks` ciphertext (same ``max_value``).
        max_value: the negative-positive maximum / dense pixel range, in the units of the raw input ``x`` (255.0 for
            uint8-range, 1.0 for [0, 1] floats); required with ``negpos`` or ``mixing``.
        mean, std: the input normalisation ``model`` expects (scalar or per channel, in the raw input's units);
            folded into the patch embedding so ``m'`` takes raw encrypted images. None means no normalisation.
    """
    return _transform(model, key, patch_size, block_scramble, pixel_shuffle, negpos, mixing, max_value, mean, std,
                      per_sample, decrypt=False)


def decrypt_vit(model: nn.Module, key: Key, patch_size: Optional[int] = None, *, block_scramble: bool = True,
                pixel_shuffle: bool = True, negpos: bool = False, mixing: bool = False,
                max_value: Optional[float] = None, mean: Stats = None, std: Stats = None,
                per_sample: bool = False) -> nn.Module:
    """Inverse of :func:`encrypt_vit`: from ``m'`` (takes raw encrypted images) return ``m`` with
    ``m(normalize(x)) == m'(encrypt_patches(x, key, ...))``; e.g. turn a model pretrained on encrypted images into
    one for plain (normalised with ``mean``/``std``, or raw when they are None) images.

    With ``per_sample`` (every image had its own block order, so the server's position embedding was trained on
    random orders and holds no positions) the values are folded exactly and the position embedding is kept as it
    is: ``m(normalize(x)) == m'(y)`` for the ciphertext ``y`` of ``x`` in the identity block order."""
    return _transform(model, key, patch_size, block_scramble, pixel_shuffle, negpos, mixing, max_value, mean, std,
                      per_sample, decrypt=True)


def view_embeddings(vit: VisionTransformer, dtype: torch.dtype) -> tuple[Optional[torch.Tensor],
                                                                          Optional[torch.Tensor]]:
    """The model's prefix tokens and patch position embedding, as :func:`~msd_fast.masked_gather` takes them.

    Returns ``(prefix [P, D] or None, pos [N, D] or None)`` in ``dtype`` (differentiable): ``prefix`` is the class
    token then the register tokens, with their position embedding added when the model embeds them
    (``no_embed_class=False``), as ``VisionTransformer._pos_embed`` does.
    """
    prefix_parts = [token[0] for token in (vit.cls_token, vit.reg_token) if token is not None]
    prefix = torch.cat(prefix_parts).to(dtype) if prefix_parts else None
    if vit.pos_embed is None:
        return prefix, None
    pos = vit.pos_embed[0].to(dtype)
    if vit.no_embed_class:
        return prefix, pos
    P = vit.num_prefix_tokens
    if prefix is not None:
        prefix = prefix + pos[:P]
    return prefix, pos[P:]


def forward_views(vit: VisionTransformer, tokens: torch.Tensor, idx: torch.Tensor, *,
                  backend: str = "auto") -> torch.Tensor:
    """Run ``vit`` (blocks, norm, pooling, head) on the masked-sampling views of embedded patch tokens.

    Equivalent to timm's ``vit.forward_head(vit.forward_features(x))`` with only the kept patches of each view, the
    model's own class/register tokens and position embedding (``no_embed_class`` either way), but the views are built
    by one fused :func:`~msd_fast.masked_gather` instead of an eager loop.

    Args:
        vit: a timm ``VisionTransformer`` with a fixed-size (not dynamically resampled) position embedding.
        tokens: ``[B, N, D]`` patch tokens, ``vit.patch_embed(x)`` (before the position embedding), any float dtype.
        idx: ``[V, B, K]`` int32/int64 kept-token indices per view and sample (e.g. from
            :func:`~msd_fast.sample_views`).
        backend: the :func:`~msd_fast.masked_gather` backend.

    Returns:
        The head's output for every view, ``[V * B, ...]``, view-major (row ``v * B + b``).
    """
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"vit must be a timm VisionTransformer, got {type(vit).__name__}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError("tokens must be a [B, N, D] tensor (flatten a dynamic-size model's [B, H, W, D] tokens)")
    prefix, pos = view_embeddings(vit, tokens.dtype)
    if pos is not None and pos.shape[0] != tokens.shape[1]:
        raise ValueError(f"tokens has N = {tokens.shape[1]} patches but vit's position embedding covers "
                         f"{pos.shape[0]}; resample the position embedding for this image size first")
    x = masked_gather(tokens, idx, pos=pos, prefix=prefix, backend=backend)
    x = vit.pos_drop(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    if vit.grad_checkpointing and not torch.jit.is_scripting():
        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    x = vit.norm(x)
    return vit.forward_head(x)
