"""Intensity windows: physical values (CT Hounsfield units, MR signal, ...) -> uint8, shared by DICOM and NIfTI.

A window option (``window=`` of :func:`~msd_fast.data.load_dataset`, ``?window=`` in a ``--data`` spec) is one of

* ``None`` (default): DICOM -- the file's own Window Center / Window Width tags (first value when several are
  given; applied with the file's VOI LUT Function), or the percentile window where a file has none;
  NIfTI -- the percentile window of each volume.
* ``"percentile"``: ``[P0.5, P99.5]`` of the values of one volume (NIfTI) or one file (DICOM; all its frames),
  mapped linearly onto ``[0, 255]``; robust to a few extreme voxels (metal, air outside the field of view).
  A constant volume maps to 0.
* a preset name (CT, in HU; center/width as in Radiopaedia's "Windowing (CT)"): see :data:`PRESETS`.
* ``"C,W"``: an explicit center and width in the data's physical units, e.g. ``"-600,1500"`` (width > 0).

Presets and ``"C,W"`` use DICOM's LINEAR_EXACT function (PS3.3 C.11.2.1.3.2):
``y = 255 * clip((x - C) / W + 0.5, 0, 1)``, rounded half up. File tags use the file's function: LINEAR (the DICOM
default, C.11.2.1.2.1: ``x <= C - 0.5 - (W - 1)/2 -> 0``, ``x > C - 0.5 + (W - 1)/2 -> 255``, else
``((x - (C - 0.5)) / (W - 1) + 0.5) * 255``), LINEAR_EXACT or SIGMOID (``255 / (1 + exp(-4 (x - C) / W))``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from .imageset import DataError

#: CT window presets, name -> (center, width) in Hounsfield units.
PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
}
PERCENTILE = "percentile"
PERCENTILES = (0.5, 99.5)
FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass(frozen=True)
class Window:
    """A linear (or sigmoid) map of physical values onto ``[0, 255]``: ``center`` and ``width`` in the data's units."""

    center: float
    width: float
    function: str = "LINEAR_EXACT"
    preset: str = field(default="", compare=False)  # the preset's name, when it came from one

    def __post_init__(self):
        if self.function not in FUNCTIONS:
            raise DataError(f"window function must be one of {FUNCTIONS}, got {self.function!r}")
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            raise DataError(f"window center and width must be finite, got {self.center}, {self.width}")
        if self.width <= 0 or (self.function == "LINEAR" and self.width < 1):
            raise DataError(f"window width must be > 0 (>= 1 for the LINEAR function), got {self.width:g}")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """float ``values`` (any shape) -> uint8 of the same shape (NaN -> 0). Computed in float64, in place."""
        c, w = self.center, self.width
        if self.function == "LINEAR_EXACT":
            y = np.subtract(values, c, dtype=np.float64)
            y /= w
            y += 0.5
        elif self.function == "LINEAR":
            y = np.subtract(values, c - 0.5, dtype=np.float64)
            if w > 1:
                y /= w - 1
                y += 0.5
            else:
                y = (y > 0).astype(np.float64)
        else:
            exponent = np.clip(-4.0 * (np.asarray(values, dtype=np.float64) - c) / w, -700.0, 700.0)  # no overflow
            y = 1.0 / (1.0 + np.exp(exponent))
        np.clip(y, 0.0, 1.0, out=y)
        y[np.isnan(y)] = 0.0  # NaN voxels (masked maps) -> black
        y *= 255.0
        y += 0.5
        return np.floor(y, out=y).astype(np.uint8)


WindowOption = Union[None, str, tuple]


def parse_window(window: WindowOption, name: str = "window") -> Union[None, str, Window]:
    """Check a window option: None, ``"percentile"``, a preset name, ``"C,W"`` or a ``(C, W)`` pair -> None,
    ``"percentile"`` or a :class:`Window`. Raises :class:`DataError` naming ``name`` and the accepted values."""
    if window is None or window == PERCENTILE:
        return window
    if isinstance(window, Window):
        return window
    if isinstance(window, str):
        text = window.strip().lower()
        if text in PRESETS:
            return Window(*PRESETS[text], preset=text)
        parts = text.split(",")
        if len(parts) == 2:
            try:
                center, width = float(parts[0]), float(parts[1])
            except ValueError:
                pass
            else:
                return _explicit(center, width, name, window)
    elif isinstance(window, (tuple, list)) and len(window) == 2 and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in window):
        return _explicit(float(window[0]), float(window[1]), name, window)
    raise DataError(f"{name}={window!r}: expected a preset ({', '.join(PRESETS)}), '{PERCENTILE}', or 'C,W' "
                    "(center and width in the data's units, e.g. '-600,1500')")


def _explicit(center: float, width: float, name: str, given) -> Window:
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise DataError(f"{name}={given!r}: the center must be finite and the width a positive number")
    return Window(center, width)


def percentile_window(values: np.ndarray) -> Optional[Window]:
    """The ``[P0.5, P99.5]`` window of ``values`` (finite ones), or None when they are constant (-> all zeros)."""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return None
    low, high = np.percentile(finite, PERCENTILES)
    if not high > low:
        return None
    return Window((float(low) + float(high)) / 2.0, float(high) - float(low))


def apply_window(values: np.ndarray, window: Optional[Window]) -> np.ndarray:
    """``window.apply(values)``; ``None`` (a constant volume's percentile window) gives zeros."""
    if window is None:
        return np.zeros(values.shape, dtype=np.uint8)
    return window.apply(values)


__all__ = ["PERCENTILE", "PRESETS", "Window", "apply_window", "parse_window", "percentile_window"]
