"""Server-side augmentations of encrypted images: only those that commute with the encryption.

Block scrambling and pixel shuffling permute values and negative-positive maps ``v -> M - v``, so a map ``f`` can
run on the server, before the key's inverse, when ``f(encrypt(x)) == encrypt(f(x))``: contrast scaling about
mid-grey ``M/2`` (``M - (M/2 + a (v - M/2)) = M/2 + a ((M - v) - M/2)``) does exactly, per image; i.i.d. Gaussian
noise does in distribution (its law is symmetric and the same at every pixel). Brightness shifts, flips, crops and
rotations do not (they move or flip values across blocks), so they are not offered.
"""
from __future__ import annotations

import torch


def contrast_about_midgrey(images: torch.Tensor, scale: torch.Tensor, max_value: float) -> torch.Tensor:
    """``M/2 + scale * (images - M/2)`` in float32; ``images [B, C, H, W]``, ``scale [B]`` (one factor per image)."""
    half = max_value / 2
    return (images.float() - half) * scale.view(-1, *([1] * (images.dim() - 1))).to(images.device) + half


def commuting_augmentation(images: torch.Tensor, *, contrast: float, noise: float, max_value: float,
                           generator: torch.Generator, global_batch: int, first: int) -> torch.Tensor:
    """Random contrast factor in ``[1 - contrast, 1 + contrast]`` per image and Gaussian noise of std
    ``noise * max_value``, drawn for the whole global batch (``global_batch`` rows, with ``generator``) and sliced
    at ``first`` for this process's ``images [b, C, H, W]``, so every process count draws the same augmentation.
    Returns float32."""
    rows = slice(first, first + images.shape[0])
    scale = 1 + contrast * (2 * torch.rand(global_batch, generator=generator) - 1)
    augmented = contrast_about_midgrey(images, scale[rows], max_value)
    if noise:
        gaussian = torch.randn((global_batch, *images.shape[1:]), generator=generator)[rows]
        augmented = augmented + (gaussian * (noise * max_value)).to(images.device)
    return augmented
