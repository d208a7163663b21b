"""Metrics of the privacy audit: image similarity (PSNR, SSIM), placement accuracy of a reassembled block grid,
their chance levels, and the symmetries of a square grid that an attacker cannot (and need not) resolve.

Conventions: images are ``[B, C, H, W]`` (any real dtype, compared in float64 in the units of ``max_value``);
a *source grid* is int64 ``[B, rows, cols]`` whose cell ``(r, c)`` holds the row-major index of the plain block the
attacker put there, so a perfect reassembly is ``arange(rows * cols).view(rows, cols)``.
"""
from __future__ import annotations

from typing import Callable

import torch

PSNR_CAP_DB = 100.0  # the PSNR reported for an exact reconstruction (MSE = 0)

# The 8 symmetries of a square (dihedral group D4) acting on the last two dimensions. Every attack that learns a
# layout from statistics alone (pixel correlations, token similarities) recovers it only up to one of these; the
# audit scores the best of them, i.e. it assumes the attacker fixes the orientation by looking at one image.
DIHEDRAL: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda t: t,
    "rot90": lambda t: torch.rot90(t, 1, (-2, -1)),
    "rot180": lambda t: torch.rot90(t, 2, (-2, -1)),
    "rot270": lambda t: torch.rot90(t, 3, (-2, -1)),
    "flip_lr": lambda t: torch.flip(t, (-1,)),
    "flip_ud": lambda t: torch.flip(t, (-2,)),
    "transpose": lambda t: t.transpose(-2, -1),
    "antitranspose": lambda t: torch.rot90(t, 2, (-2, -1)).transpose(-2, -1),
}
_SHAPE_PRESERVING = ("identity", "rot180", "flip_lr", "flip_ud")


def symmetries(height: int, width: int) -> list[str]:
    """Names of the :data:`DIHEDRAL` symmetries that map a ``height x width`` grid onto itself (8 if square, else 4)."""
    return list(DIHEDRAL) if height == width else list(_SHAPE_PRESERVING)


def _check_pair(reconstruction: torch.Tensor, reference: torch.Tensor) -> None:
    for name, t in (("reconstruction", reconstruction), ("reference", reference)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a [B, C, H, W] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if reconstruction.shape != reference.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and reference {tuple(reference.shape)} "
                         "must have the same shape")


def psnr(reconstruction: torch.Tensor, reference: torch.Tensor, max_value: float = 255.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image: float64 ``[B]`` in dB, ``10 log10(max_value^2 / MSE)``; an exact
    reconstruction scores :data:`PSNR_CAP_DB`."""
    _check_pair(reconstruction, reference)
    if not max_value > 0:
        raise ValueError(f"max_value must be positive, got {max_value!r}")
    mse = (reconstruction.double() - reference.double()).pow(2).flatten(1).mean(1)
    value = 10.0 * torch.log10(max_value**2 / mse.clamp(min=1e-300))
    return torch.where(mse > 0, value.clamp(max=PSNR_CAP_DB), torch.full_like(value, PSNR_CAP_DB))


def _gaussian_taps(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    return g / g.sum()


def ssim(reconstruction: torch.Tensor, reference: torch.Tensor, max_value: float = 255.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, valid
    windows, channels averaged): float64 ``[B]`` in ``[-1, 1]``. The window shrinks (odd) for images smaller than it."""
    _check_pair(reconstruction, reference)
    B, C, H, W = reference.shape
    size = min(window, H, W)
    size -= 1 - size % 2
    taps = _gaussian_taps(size, sigma)
    x, y = reconstruction.double(), reference.double()

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region, float64
        return (t.unfold(3, size, 1) @ taps).unfold(2, size, 1) @ taps

    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return value.flatten(1).mean(1)


def _check_grid(source_grid: torch.Tensor) -> None:
    if not isinstance(source_grid, torch.Tensor) or source_grid.dim() != 3 or source_grid.dtype != torch.int64:
        raise ValueError("source_grid must be an int64 [B, rows, cols] tensor")


def direct_accuracy(source_grid: torch.Tensor) -> torch.Tensor:
    """Fraction of cells holding the block that belongs there: float64 ``[B]``."""
    _check_grid(source_grid)
    B, rows, cols = source_grid.shape
    truth = torch.arange(rows * cols, device=source_grid.device).view(rows, cols)
    return (source_grid == truth).flatten(1).double().mean(1)


def neighbour_accuracy(source_grid: torch.Tensor) -> torch.Tensor:
    """Fraction of adjacent cell pairs (left-right and top-bottom) holding blocks that are the same neighbours in the
    plain image (Cho et al. 2010): float64 ``[B]``; insensitive to a shift of a correct region."""
    _check_grid(source_grid)
    B, rows, cols = source_grid.shape
    left, right = source_grid[:, :, :-1], source_grid[:, :, 1:]
    top, bottom = source_grid[:, :-1, :], source_grid[:, 1:, :]
    horizontal = (right == left + 1) & (left % cols != cols - 1)
    vertical = bottom == top + cols
    pairs = rows * (cols - 1) + cols * (rows - 1)
    if pairs == 0:
        return torch.ones(B, dtype=torch.float64)
    return (horizontal.flatten(1).sum(1) + vertical.flatten(1).sum(1)).double() / pairs


def chance_direct_accuracy(rows: int, cols: int) -> float:
    """Expected direct accuracy of a uniformly random arrangement: ``1 / N``."""
    return 1.0 / (rows * cols)


def chance_neighbour_accuracy(rows: int, cols: int) -> float:
    """Expected neighbour accuracy of a uniformly random arrangement of ``N = rows * cols`` blocks: each adjacent
    cell pair holds an ordered pair of distinct blocks uniformly, and ``rows (cols - 1)`` of the ``N (N - 1)`` ordered
    pairs are true left-right neighbours (``cols (rows - 1)`` top-bottom)."""
    n = rows * cols
    if n < 2:
        return 1.0
    horizontal_pairs, vertical_pairs = rows * (cols - 1), cols * (rows - 1)
    total = horizontal_pairs + vertical_pairs
    return (horizontal_pairs * horizontal_pairs + vertical_pairs * vertical_pairs) / (n * (n - 1) * total)


def chance_position_accuracy(n_positions: int) -> float:
    """Expected fraction of tokens given their right position by a uniformly random guess: ``1 / N``."""
    return 1.0 / n_positions
