"""Deterministic synthetic medical-like images (no download): a Shepp-Logan-style head phantom."""
from __future__ import annotations

import numpy as np

# (intensity, semi-axis a, semi-axis b, centre x, centre y, rotation in degrees), coordinates in [-1, 1].
_ELLIPSES = [
    (1.0, 0.69, 0.92, 0.0, 0.0, 0.0),
    (-0.8, 0.6624, 0.874, 0.0, -0.0184, 0.0),
    (-0.2, 0.11, 0.31, 0.22, 0.0, -18.0),
    (-0.2, 0.16, 0.41, -0.22, 0.0, 18.0),
    (0.1, 0.21, 0.25, 0.0, 0.35, 0.0),
    (0.1, 0.046, 0.046, 0.0, 0.1, 0.0),
    (0.1, 0.046, 0.046, 0.0, -0.1, 0.0),
    (0.1, 0.046, 0.023, -0.08, -0.605, 0.0),
    (0.1, 0.023, 0.023, 0.0, -0.606, 0.0),
    (0.1, 0.023, 0.046, 0.06, -0.605, 0.0),
]


def head_phantom(height: int = 224, width: int = 224, lesion: bool = True) -> np.ndarray:
    """A float32 ``[height, width]`` image in [0, 1]: ellipses of tissue, optionally a bright lesion."""
    y, x = np.mgrid[-1:1:height * 1j, -1:1:width * 1j]
    image = np.zeros((height, width), dtype=np.float64)
    ellipses = list(_ELLIPSES) + ([(0.35, 0.08, 0.06, 0.3, 0.45, 30.0)] if lesion else [])
    for value, a, b, cx, cy, angle in ellipses:
        theta = np.deg2rad(angle)
        xr = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        yr = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
        image[(xr / a) ** 2 + (yr / b) ** 2 <= 1.0] += value
    return np.clip(image / image.max(), 0.0, 1.0).astype(np.float32)
