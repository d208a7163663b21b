"""timm ViT integration: run a ``VisionTransformer`` on masked-sampling views of already-embedded patch tokens."""
from __future__ import annotations

from typing import Optional

import torch
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

from .ops.masked_gather import masked_gather


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
