"""Server-side augmentations of encrypted images: only those that commute with the encryption.

A map ``f`` can run on the server, before the key's inverse, when ``f(encrypt(x)) == encrypt(f(x))``. Contrast
scaling about mid-grey does exactly, per image: the permutation scheme permutes values and maps ``v -> M - v``
(``M - (M/2 + a (v - M/2)) = M/2 + a ((M - v) - M/2)``), and the dense scheme is linear in ``x/M - 1/2``, so
mid-grey is its ciphertext 0. I.i.d. Gaussian noise commutes in distribution (permutations and sign flips keep its
law, and so does an orthogonal matrix). Mixup of two images commutes with both (an affine map of a convex
combination). Brightness shifts, flips, crops and rotations do not (they move or flip values across blocks), so
they are not offered. Mid-grey and the pixel range in ciphertext units come from
:meth:`~msd_fast.protocol.encryption.EncryptionSpec.ciphertext_units`.
"""
from __future__ import annotations

import torch


def contrast_about_midgrey(images: torch.Tensor, scale: torch.Tensor, midgrey: float) -> torch.Tensor:
    """``midgrey + scale * (images - midgrey)`` in float32; ``images [B, C, H, W]``, ``scale [B]`` (one factor per
    image)."""
    return (images.float() - midgrey) * scale.view(-1, *([1] * (images.dim() - 1))).to(images.device) + midgrey


def commuting_augmentation(images: torch.Tensor, *, contrast: float, noise: float, midgrey: float,
                           value_range: float, generator: torch.Generator, global_batch: int,
                           first: int) -> torch.Tensor:
    """Random contrast factor in ``[1 - contrast, 1 + contrast]`` per image about ``midgrey`` and Gaussian noise of
    std ``noise * value_range`` (both in ciphertext units), drawn for the whole global batch (``global_batch`` rows, with ``generator``) and sliced
    at ``first`` for this process's ``images [b, C, H, W]``, so every process count draws the same augmentation.
    Returns float32."""
    rows = slice(first, first + images.shape[0])
    scale = 1 + contrast * (2 * torch.rand(global_batch, generator=generator) - 1)
    augmented = contrast_about_midgrey(images, scale[rows], midgrey)
    if noise:
        gaussian = torch.randn((global_batch, *images.shape[1:]), generator=generator)[rows]
        augmented = augmented + (gaussian * (noise * value_range)).to(images.device)
    return augmented
