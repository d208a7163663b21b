"""The embedded default dataset: deterministic, generated, medical-like grayscale scans in five classes.

How an image is made (all coordinates in ``[-1, 1]``, so the same anatomy is drawn at any ``size``):

1. **Scan of normal tissue** (every class starts here): a dark field (air), a body ellipse of random centre, axes and
   orientation with a soft edge, a softer darker internal organ ellipse, anatomical texture inside the body (value
   noise at 4, 8 and 16 cells across the image, amplitudes 0.09/0.05/0.03) and two to four faint vessel-like lines.
2. **The class's finding**, drawn into the tissue at a random place:

   ========================  ==================================================================================
   ``normal``                nothing
   ``round_lesion``          one disk, radius 0.10-0.17, sharp anti-aliased edge, brighter than tissue
   ``spiculated_lesion``     a small lobulated core (three overlapping disks) with 7-12 thin tapering spicules
   ``microcalcifications``   5-12 tiny bright dots (radius 0.02-0.035, about one pixel at 64x64) in a small cluster
   ``diffuse_texture``       the body's texture replaced by a granular, higher-frequency one
   ========================  ==================================================================================

3. **Histogram lock** (the fairness step): the image's pixels are re-assigned, by rank, the exact sorted values of
   its own step-1 scan (a monotone map: shapes, edges and which pixel is brighter than which are kept).
4. Gaussian-like sensor noise (sigma 0.025; Irwin-Hall: the sum of four 16-bit uniforms), then rounding to uint8.

**Why it is a fair test.** After step 3 the *multiset* of pixel values of every image is exactly that of a normal
scan drawn from one class-independent distribution; step 4 adds i.i.d. noise per pixel, which keeps that property.
So every function of the pixel values alone -- mean, standard deviation, histogram, quantiles, the brightest pixel
-- has the same distribution in every class, and a classifier on them can only reach chance (1/5). The classes
differ only in *where* the values sit: shape, edge sharpness, spatial frequency, clustering. A model must look at
spatial structure to tell them apart, which is what pretraining is supposed to learn (``tests/test_data_synthetic.py``
checks both halves: per-image statistics stay at chance, spatial features do much better). Classes are balanced
(counts differ by at most one) and shuffled.

**Same bytes on every machine.** Randomness is PCG64's raw 64-bit stream (seeded by ``SeedSequence([seed, split,
size, n_classes])``), turned into uniform doubles by ``(word >> 11) * 2**-53``; NumPy guarantees that stream across
versions, unlike ``Generator`` methods. The pixel arithmetic (float32) uses only ``+ - * /``, ``sqrt``, ``floor``,
``min``/``max``, sorting and indexing -- IEEE-exact everywhere, no ``exp``/``sin`` whose last bit varies between math
libraries -- so the output is bit-identical across machines, NumPy versions and thread counts
(``tests/test_data_synthetic.py`` pins a SHA-256). Images are generated in fixed-size chunks, vectorised per chunk.
"""
from __future__ import annotations

import numpy as np
import torch

from .imageset import ImageSet

CLASS_NAMES = ("normal", "round_lesion", "spiculated_lesion", "microcalcifications", "diffuse_texture")
SPLITS = ("train", "val", "test")
DEFAULT_COUNT = 2000
_CHUNK = 256  # images generated together; fixed, so the stream does not depend on n
_NOISE_SIGMA = 0.025


class _Uniforms:
    """Uniform doubles in ``[low, high)`` from PCG64's raw stream (bit-identical on every machine)."""

    def __init__(self, seed_words: list[int]):
        self._bits = np.random.PCG64(np.random.SeedSequence(seed_words))

    def uniform(self, shape, low: float = 0.0, high: float = 1.0) -> np.ndarray:
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        raw = self._bits.random_raw(int(np.prod(shape, dtype=np.int64)))
        unit = (raw >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)
        return (low + (high - low) * unit).reshape(shape)

    def gaussian(self, shape) -> np.ndarray:
        """Approximately standard normal, one raw word per value: the sum ``S`` of its four 16-bit lanes is
        Irwin-Hall(4)-distributed, scaled to unit variance (integer sum, so independent of byte order)."""
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        raw = self._bits.random_raw(int(np.prod(shape, dtype=np.int64)))
        lanes = raw.view(np.uint16).reshape(-1, 4).astype(np.int64)
        total = lanes[:, 0] + lanes[:, 1] + lanes[:, 2] + lanes[:, 3]
        return ((total + 2).astype(np.float64) * (1.0 / 65536.0) - 2.0).reshape(shape) * np.sqrt(3.0)

    def integers(self, shape, low: int, high: int) -> np.ndarray:
        """Integers in ``[low, high]`` (inclusive)."""
        return low + np.floor(self.uniform(shape) * (high - low + 1)).astype(np.int64)

    def directions(self, shape) -> tuple[np.ndarray, np.ndarray]:
        """Unit vectors ``(cos, sin)`` of random angles (a normalised pair of Gaussian-like draws)."""
        gx, gy = self.gaussian(shape), self.gaussian(shape)
        norm = np.sqrt(gx * gx + gy * gy) + 1e-12
        return gx / norm, gy / norm


_F = np.float32  # pixel arithmetic in float32 (IEEE-exact operations only, so still bit-identical everywhere)


def _soft(signed_distance: np.ndarray, width) -> np.ndarray:
    """Anti-aliased inside-indicator: 1 inside, 0 outside, a linear ramp of ``width`` across the edge."""
    return np.minimum(np.maximum(signed_distance / width + _F(0.5), _F(0.0)), _F(1.0))


def _value_noise(rand: _Uniforms, b: int, cells: int, H: int, W: int, sel=None) -> np.ndarray:
    """Smooth random field ``[b, H, W]`` in [-1, 1]: a ``(cells+1)^2`` grid interpolated with smoothstep weights
    (separably: along x on the small grid, then along y). With ``sel``, grids are drawn for all ``b`` images but only
    those at ``sel`` are interpolated: ``[len(sel), H, W]``."""
    grid = rand.uniform((b, cells + 1, cells + 1), -1.0, 1.0).astype(_F)
    if sel is not None:
        grid = grid[sel]

    def axis(n):
        pos = (np.arange(n) + 0.5) * (cells / n)
        i0 = np.minimum(np.floor(pos).astype(np.int64), cells - 1)
        t = pos - i0
        return i0, (t * t * (3.0 - 2.0 * t)).astype(_F)

    iy, wy = axis(H)
    ix, wx = axis(W)
    left, right = grid[:, :, ix], grid[:, :, ix + 1]
    rows = left + (right - left) * wx  # [b, cells + 1, W]
    top, bottom = rows[:, iy], rows[:, iy + 1]
    return top + (bottom - top) * wy[None, :, None]


def _col(values) -> np.ndarray:
    return np.asarray(values, dtype=_F)[:, None, None]


def _distance(y, x, cy, cx):
    dy, dx = y - cy, x - cx
    return np.sqrt(dy * dy + dx * dx)


def _ellipse_radius(y, x, cy, cx, a, b, cos, sin):
    """Normalised elliptical radius (1 on the boundary) for per-image parameters of shape ``[b, 1, 1]``."""
    dy, dx = y - cy, x - cx
    u = (dx * cos + dy * sin) / a
    v = (dy * cos - dx * sin) / b
    return np.sqrt(u * u + v * v)


def _segment_distance(y, x, y0, x0, y1, x1):
    """Distance of every pixel to segments ``(y0, x0)-(y1, x1)`` and the position ``t`` in [0, 1] along them."""
    ey, ex = y1 - y0, x1 - x0
    length2 = ey * ey + ex * ex + _F(1e-12)
    dy, dx = y - y0, x - x0
    t = np.minimum(np.maximum((dy * ey + dx * ex) / length2, _F(0.0)), _F(1.0))
    py, px = dy - t * ey, dx - t * ex
    return np.sqrt(py * py + px * px), t


class _Canvas:
    """Pixel grid of one chunk: coordinates ``y [1, H, 1]``, ``x [1, 1, W]`` in [-1, 1], one pixel ``px``."""

    def __init__(self, size: int):
        self.H = self.W = size
        self.px = _F(2.0 / size)
        centres = ((np.arange(size) + 0.5) * (2.0 / size) - 1.0).astype(_F)
        self.y, self.x = centres[None, :, None], centres[None, None, :]


def _tissue(rand: _Uniforms, b: int, cv: _Canvas) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 1: normal scans ``[b, H, W]`` in about [0, 1]; also returns the body mask and the texture (for class 4)."""
    y, x, px = cv.y, cv.x, cv.px
    cy, cx = _col(rand.uniform(b, -0.05, 0.05)), _col(rand.uniform(b, -0.05, 0.05))
    a, bb = _col(rand.uniform(b, 0.78, 0.92)), _col(rand.uniform(b, 0.62, 0.80))
    cos, sin = rand.directions(b)
    body = _soft((_F(1.0) - _ellipse_radius(y, x, cy, cx, a, bb, _col(cos), _col(sin))) * _F(0.7), _F(1.5) * px)

    oy, ox = cy + _col(rand.uniform(b, -0.3, 0.3)), cx + _col(rand.uniform(b, -0.3, 0.3))
    oa, ob = _col(rand.uniform(b, 0.20, 0.40)), _col(rand.uniform(b, 0.15, 0.30))
    ocos, osin = rand.directions(b)
    organ = _soft((_F(1.0) - _ellipse_radius(y, x, oy, ox, oa, ob, _col(ocos), _col(osin))) * _F(0.25), _F(4.0) * px)
    organ_delta = _col(rand.uniform(b, -0.14, -0.08))

    texture = (_F(0.09) * _value_noise(rand, b, 4, cv.H, cv.W) + _F(0.05) * _value_noise(rand, b, 8, cv.H, cv.W)
               + _F(0.03) * _value_noise(rand, b, 16, cv.H, cv.W))

    vessels = np.zeros((b, cv.H, cv.W), dtype=_F)
    n_vessels = rand.integers(b, 2, 4)
    for k in range(4):
        y0, x0 = rand.uniform(b, -0.6, 0.6), rand.uniform(b, -0.6, 0.6)
        vcos, vsin = rand.directions(b)
        length = rand.uniform(b, 0.4, 0.9)
        on = k < n_vessels
        if not on.any():
            continue
        dist, _ = _segment_distance(y, x, _col(y0[on]), _col(x0[on]), _col((y0 + length * vsin)[on]),
                                    _col((x0 + length * vcos)[on]))
        vessels[on] = np.maximum(vessels[on], _F(0.05) * _soft(_F(0.6) * px - dist, px))

    scan = _F(0.05) + body * (_F(0.50) + organ_delta * organ + texture + vessels)
    return scan, body, texture


# Each finding draws its parameters for every image of the chunk (so the random stream does not depend on the
# labels) and draws pixels only for the images ``sel`` that have it; it returns the additive change
# ``[len(sel), H, W]``.

def _lesion_centre(rand: _Uniforms, b: int) -> tuple[np.ndarray, np.ndarray]:
    return rand.uniform(b, -0.4, 0.4), rand.uniform(b, -0.4, 0.4)


def _round_lesion(rand, b, sel, cv, body, texture):
    cy, cx = _lesion_centre(rand, b)
    radius, contrast = rand.uniform(b, 0.10, 0.17), rand.uniform(b, 0.16, 0.24)
    dist = _distance(cv.y, cv.x, _col(cy[sel]), _col(cx[sel]))
    return _col(contrast[sel]) * _soft(_col(radius[sel]) - dist, cv.px)


def _spiculated_lesion(rand, b, sel, cv, body, texture):
    cy, cx = _lesion_centre(rand, b)
    contrast = rand.uniform(b, 0.20, 0.28)
    lobes = [(rand.uniform(b, -0.05, 0.05), rand.uniform(b, -0.05, 0.05), rand.uniform(b, 0.05, 0.08))
             for _ in range(3)]
    n_spicules = rand.integers(b, 7, 12)
    spicules = [(rand.directions(b), rand.uniform(b, 0.16, 0.32), rand.uniform(b, 0.7, 1.0), rand.uniform(b, 0.6, 0.8))
                for _ in range(12)]
    cy, cx, contrast, n_spicules = _col(cy[sel]), _col(cx[sel]), _col(contrast[sel]), n_spicules[sel]
    core = np.zeros((len(sel), cv.H, cv.W), dtype=_F)
    for dy, dx, radius in lobes:  # a lobulated core: three overlapping disks
        dist = _distance(cv.y, cv.x, cy + _col(dy[sel]), cx + _col(dx[sel]))
        core = np.maximum(core, _soft(_col(radius[sel]) - dist, cv.px))
    lesion = contrast * core
    for k, ((dcos, dsin), length, width, strength) in enumerate(spicules):
        on = (k < n_spicules).astype(_F)
        tip_y, tip_x = cy + _col((length * dsin)[sel]), cx + _col((length * dcos)[sel])
        dist, t = _segment_distance(cv.y, cv.x, cy, cx, tip_y, tip_x)
        ridge = _soft(_col(width[sel]) * cv.px - dist, cv.px) * (_F(1.0) - _F(0.6) * t)
        lesion = np.maximum(lesion, _col(on * strength[sel]) * contrast * ridge)
    return lesion


def _microcalcifications(rand, b, sel, cv, body, texture):
    cy, cx = _lesion_centre(rand, b)
    n_dots = rand.integers(b, 5, 12)
    dots = [(rand.uniform(b, -0.11, 0.11), rand.uniform(b, -0.11, 0.11), rand.uniform(b, 0.02, 0.035),
             rand.uniform(b, 0.30, 0.45)) for _ in range(12)]
    cy, cx, n_dots = _col(cy[sel]), _col(cx[sel]), n_dots[sel]
    spots = np.zeros((len(sel), cv.H, cv.W), dtype=_F)
    for k, (dy, dx, radius, contrast) in enumerate(dots):
        on = (k < n_dots).astype(_F)
        dist = _distance(cv.y, cv.x, cy + _col(dy[sel]), cx + _col(dx[sel]))
        spots = np.maximum(spots, _col(on * contrast[sel]) * _soft(_col(radius[sel]) - dist, cv.px))
    return spots


def _diffuse_texture(rand, b, sel, cv, body, texture):
    changed = (_F(0.04) * _value_noise(rand, b, 4, cv.H, cv.W, sel)
               + _F(0.03) * _value_noise(rand, b, 8, cv.H, cv.W, sel)
               + _F(0.08) * _value_noise(rand, b, 32, cv.H, cv.W, sel))
    return changed - texture[sel]


_FINDINGS = (_round_lesion, _spiculated_lesion, _microcalcifications, _diffuse_texture)  # classes 1..4


def _histogram_lock(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Give each image ``[b, H, W]`` the exact sorted values of ``reference`` by rank (stable, so deterministic)."""
    b = image.shape[0]
    flat = image.reshape(b, -1)
    order = np.argsort(flat, axis=1, kind="stable")
    out = np.empty_like(flat)
    np.put_along_axis(out, order, np.sort(reference.reshape(b, -1), axis=1), axis=1)
    return out.reshape(image.shape)


def _generate_chunk(rand: _Uniforms, labels: np.ndarray, size: int) -> np.ndarray:
    b, cv = len(labels), _Canvas(size)
    scan, body, texture = _tissue(rand, b, cv)
    image = scan.copy()
    for cls, finding in enumerate(_FINDINGS, start=1):
        sel = np.flatnonzero(labels == cls)
        change = finding(rand, b, sel, cv, body, texture)
        image[sel] += body[sel] * change
    image = _histogram_lock(image, scan)
    image = image + _F(_NOISE_SIGMA) * rand.gaussian((b, size, size)).astype(_F)
    return np.clip(np.floor(image * _F(255.0) + _F(0.5)), 0, 255).astype(np.uint8)


def synthetic_dataset(n: int = DEFAULT_COUNT, size: int = 64, n_classes: int = len(CLASS_NAMES), seed: int = 0,
                      channels: int = 1, *, split: str = "train") -> ImageSet:
    """Generate ``n`` medical-like scans (see the module docstring for how and why they are a fair test).

    Args:
        n: number of images (>= 1).
        size: image side in pixels (>= 16); the anatomy scales with it.
        n_classes: 2 to 5: the first ``n_classes`` of :data:`CLASS_NAMES` (normal, round lesion, spiculated lesion,
            micro-calcifications, diffuse texture change).
        seed: the dataset seed; together with ``split`` it fixes every byte.
        channels: 1 (grayscale) or 3 (the gray value replicated into RGB).
        split: ``"train"``, ``"val"`` or ``"test"``: independent draws from the same distribution, so a test split
            never repeats a training image.

    Returns:
        An in-memory :class:`ImageSet` of uint8 ``[n, channels, size, size]`` with balanced ``labels`` (int64) and
        ``class_names``. Deterministic: the same arguments give the same bytes on every machine.
    """
    n = _int_arg(n, "n", 1)
    size = _int_arg(size, "size", 16)
    n_classes = _int_arg(n_classes, "n_classes", 2)
    if n_classes > len(CLASS_NAMES):
        raise ValueError(f"n_classes must be at most {len(CLASS_NAMES)}, got {n_classes}")
    seed = _int_arg(seed, "seed", 0)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rand = _Uniforms([seed, SPLITS.index(split), size, n_classes])
    # Balanced labels in a random order: a stable argsort of uniforms is a permutation.
    labels = (np.arange(n) % n_classes)[np.argsort(rand.uniform(n), kind="stable")]
    images = np.empty((n, size, size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        images[start:stop] = _generate_chunk(rand, labels[start:stop], size)
    pixels = torch.from_numpy(images)[:, None]
    if channels == 3:
        pixels = pixels.expand(-1, 3, -1, -1).contiguous()
    return ImageSet(pixels, torch.from_numpy(labels.astype(np.int64)), list(CLASS_NAMES[:n_classes]),
                    description=f"synthetic(n={n}, size={size}, n_classes={n_classes}, seed={seed}, split={split})")


def _int_arg(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


__all__ = ["CLASS_NAMES", "synthetic_dataset"]
