"""Token mode (p-FeSTA style): a frozen patch embedder that every client derives from the consortium key.

In token mode a client does not upload encrypted pixels: it embeds each image into patch tokens with
:class:`TokenEmbedder` (a linear patch embedding plus a position embedding, both derived from the key, so clients
share nothing but the key) and then permutes every image's tokens with its own key-derived order
(:func:`~msd_fast.permute_tokens`). The server trains the transformer blocks on these tokens; it never sees pixels, the
embedder or the positions, except through what the tokens themselves carry.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..keys import Key, require_key

INPUT_SCALE = 4.0  # images are mapped to (x / max_value - 0.5) * INPUT_SCALE: [0, max] -> [-2, 2]


class TokenEmbedder(nn.Module):
    """Frozen patch embedding ``[B, C, H, W] -> [B, N, D]``: ``tokens = patches @ weight.T + pos``.

    ``weight`` is ``[D, C * p * p]`` over a block's values in ``(C, p, p)`` order, ``pos`` is ``[N, D]`` over blocks
    in row-major order. Inputs are uint8 or float images in ``[0, max_value]``; outputs are float32.
    Build it with :meth:`from_key`; it has no trainable parameters.
    """

    def __init__(self, weight: torch.Tensor, pos: torch.Tensor, patch_size: int, image_size: tuple[int, int],
                 max_value: float):
        super().__init__()
        channels = weight.shape[1] // (patch_size * patch_size)
        n_blocks = (image_size[0] // patch_size) * (image_size[1] // patch_size)
        if weight.shape[1] != channels * patch_size**2 or pos.shape != (n_blocks, weight.shape[0]):
            raise ValueError("weight must be [D, C*p*p] and pos [N, D] for the given patch and image size")
        self.patch_size, self.image_size, self.max_value = patch_size, tuple(image_size), float(max_value)
        self.register_buffer("weight", weight.reshape(weight.shape[0], channels, patch_size, patch_size).float())
        self.register_buffer("pos", pos.float())

    @classmethod
    def from_key(cls, key: Key, *, patch_size: int, in_chans: int, image_size: tuple[int, int], embed_dim: int,
                 max_value: float = 255.0) -> "TokenEmbedder":
        """The consortium's embedder: the same weights from the same key on every machine.

        Weights are uniform with unit output variance for unit-variance inputs (``sqrt(3 / fan_in)`` bound); the
        position embedding is uniform with unit variance, so a token carries its position as strongly as its content.
        """
        require_key(key)
        H, W = image_size
        if H % patch_size or W % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the image size {H}x{W}")
        fan_in = in_chans * patch_size * patch_size
        n_blocks = (H // patch_size) * (W // patch_size)
        geometry = (patch_size, in_chans, H, W, embed_dim)
        weight = key.uniform("token-embedder-weight", embed_dim * fan_in, *geometry) * math.sqrt(3.0 / fan_in)
        pos = key.uniform("token-embedder-pos", n_blocks * embed_dim, *geometry) * math.sqrt(3.0)
        return cls(weight.view(embed_dim, fan_in), pos.view(n_blocks, embed_dim), patch_size, (H, W), max_value)

    @property
    def embed_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.pos.shape[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.weight.shape[1] or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(f"images must be [B, {self.weight.shape[1]}, {self.image_size[0]}, {self.image_size[1]}], "
                             f"got {tuple(images.shape)}")
        x = (images.to(self.weight.dtype) / self.max_value - 0.5) * INPUT_SCALE
        tokens = nn.functional.conv2d(x, self.weight, stride=self.patch_size)  # [B, D, H/p, W/p]
        return tokens.flatten(2).transpose(1, 2) + self.pos
