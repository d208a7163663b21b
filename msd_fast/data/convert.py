"""Pixel conversions shared by every loader: to uint8, channel count, size. One implementation of each.

* :func:`to_uint8` -- uint8 as is; bool -> 0/255; floats must lie in [0, 1] (-> ``round(255 v)``); integers wider
  than 8 bits (16-bit PNG/TIFF, uint16 arrays, ...) are scaled per ``high_bit_depth``:
  ``"per_image"`` (default) maps each image's own ``[min, max]`` linearly onto ``[0, 255]`` (a constant image -> 0);
  ``"full_range"`` maps the type's range (16-bit: ``[0, 65535]``) onto ``[0, 255]``, keeping absolute intensities
  comparable between images (use it for calibrated data, e.g. CT already windowed into 16 bits).
* :func:`convert_channels` -- gray -> RGB replicates the channel; RGB -> gray is ITU-R 601 luma
  ``(299 R + 587 G + 114 B) / 1000`` rounded (Pillow's "L" conversion).
* :func:`check_image_size` -- a requested size from the command line: positive, at most :data:`MAX_IMAGE_SIDE`.
* :func:`resize_images` -- bilinear with antialiasing (``torch.nn.functional.interpolate``), rounded back to uint8.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .imageset import DataError

HIGH_BIT_DEPTH = ("per_image", "full_range")
Size = Union[int, Sequence[int], None]


def parse_size(size: Size, name: str = "size") -> Optional[tuple[int, int]]:
    """``None``, an int ``s`` (-> ``(s, s)``) or ``(H, W)`` -> ``(H, W)`` of positive ints, or None."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    valid = (isinstance(size, (tuple, list)) and len(size) == 2
             and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in size))
    if not valid:
        raise ValueError(f"{name} must be a positive int or a pair (height, width), got {size!r}")
    height, width = int(size[0]), int(size[1])
    return height, width


MAX_IMAGE_SIDE = 8192  # pixels per side; one 8192x8192 RGB image is already 192 MiB, a larger request is a typo


def check_image_size(size: Size, flag: str) -> Optional[tuple[int, int]]:
    """:func:`parse_size` for a command-line flag, also refusing sides above :data:`MAX_IMAGE_SIDE` (before any
    image is allocated)."""
    parsed = parse_size(size, flag)
    if parsed is not None and max(parsed) > MAX_IMAGE_SIDE:
        raise ValueError(f"{flag} must be at most {MAX_IMAGE_SIDE} pixels per side, got {size!r}")
    return parsed


def check_high_bit_depth(high_bit_depth: str) -> str:
    if high_bit_depth not in HIGH_BIT_DEPTH:
        raise ValueError(f"high_bit_depth must be one of {HIGH_BIT_DEPTH}, got {high_bit_depth!r}")
    return high_bit_depth


def to_uint8(images: np.ndarray, high_bit_depth: str, what: str, *, full_range_max: Optional[int] = None,
             floats_as_high_bit_depth: bool = False) -> np.ndarray:
    """Convert a batch ``[n, ...]`` of images to uint8 (rules in the module docstring). ``what`` names the source in
    errors; ``full_range_max`` overrides the integer type's maximum (Pillow's 32-bit "I" images hold 16-bit data);
    ``floats_as_high_bit_depth`` scales floats per image like wide integers (32-bit float TIFFs) instead of
    requiring [0, 1]."""
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.bool_:
        return images.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(images.dtype, np.floating) and floats_as_high_bit_depth:
        if images.size and not np.all(np.isfinite(images)):
            raise DataError(f"{what}: float image contains NaN or infinity")
        high_bit_depth = "per_image"
    elif np.issubdtype(images.dtype, np.floating):
        if images.size:
            low, high = float(np.min(images)), float(np.max(images))
            if not (np.isfinite(low) and np.isfinite(high)):
                raise DataError(f"{what}: float images contain NaN or infinity")
            if low < 0.0 or high > 1.0:
                raise DataError(f"{what}: float images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}] "
                                "(scale them, or pass uint8)")
        return np.floor(images.astype(np.float64) * 255.0 + 0.5).astype(np.uint8)
    elif not np.issubdtype(images.dtype, np.integer):
        raise DataError(f"{what}: unsupported pixel dtype {images.dtype} (expected uint8, another integer type, "
                        "bool or float in [0, 1])")
    values = images.astype(np.float64)
    if high_bit_depth == "full_range":  # integers only: floats reach here only when scaled per image
        info = np.iinfo(images.dtype)
        low, high = (0, full_range_max) if full_range_max is not None else (info.min, info.max)
        scaled = (np.clip(values, low, high) - low) * 255.0 / (high - low)
    else:
        axes = tuple(range(1, values.ndim))
        low = values.min(axis=axes, keepdims=True) if values.size else 0.0
        span = values.max(axis=axes, keepdims=True) - low if values.size else 1.0
        scaled = (values - low) * 255.0 / np.where(span > 0, span, 1.0)
    return np.floor(scaled + 0.5).astype(np.uint8)


def convert_channels(images: torch.Tensor, channels: Optional[int]) -> torch.Tensor:
    """uint8 ``[b, C, H, W]`` with ``C`` in (1, 3) -> ``[b, channels, H, W]`` (None keeps ``C``)."""
    have = images.shape[1]
    if channels is None or channels == have:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
        return ((images.to(torch.int32) * weights).sum(1, keepdim=True) + 500).div(1000, rounding_mode="floor") \
            .to(torch.uint8)
    raise DataError(f"cannot convert {have}-channel images to {channels} channels (1 and 3 are supported)")


def resize_images(images: torch.Tensor, size: Optional[tuple[int, int]]) -> torch.Tensor:
    """uint8 ``[b, C, H, W]`` -> uint8 ``[b, C, size[0], size[1]]`` (bilinear, antialiased); unchanged if equal."""
    if size is None or tuple(images.shape[2:]) == tuple(size):
        return images
    resized = F.interpolate(images.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def check_channels(channels: Optional[int]) -> Optional[int]:
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    return channels
