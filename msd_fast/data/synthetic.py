"""The embedded default dataset: deterministic, generated chest-CT-like grayscale slices in seven classes.

Each image is an axial chest-CT-like slice (dark air, a body with a subcutaneous fat rim, two dark lungs, the heart,
the spine); the class is a finding a radiologist would name. All geometry is drawn in body coordinates inside
``[-1, 1]``, so the same scan renders at any ``size`` (default 32, the demo's; 64 and up just look sharper).

How an image is made:

1. **Pose** (nuisance): body centre within +-0.024, tilt within +-4.8 degrees, scale 0.952-1.0 (a patient centred
   in the gantry, as a CT technologist positions one).
2. **Anatomy** (every class, all sizes and grey levels jittered per image): body ellipse (semi-axes 0.88-0.96 x
   0.62-0.72) with a darker fat rim and smooth soft-tissue texture (value noise at 4 and 8 cells); two lung ellipses
   (0.25-0.31 x 0.38-0.46, each with its own jitter) with a faint fine texture, three tapering vessels from each
   hilum and 0-2 faint vessel cross-sections (dots about one pixel wide); the heart (0.17-0.22 x 0.15-0.19) just
   right of the midline in the image, i.e. on the patient's left; a bright vertebral body and the aorta.
3. **The finding** of the class (lesions have a grey level of 0.60-0.80 over lung at about 0.1):

   ========================  ==========================================================================================
   class                     what differs (sizes in body units; one pixel is 0.0625 at 32x32)
   ========================  ==========================================================================================
   ``normal``                nothing
   ``round_mass``            **shape**: one smooth disk, radius 0.21-0.28 (6-9 px across), anywhere in either lung
   ``spiculated_mass``       **shape**: a small lobulated core (three disks, radius 0.045-0.065) with 8 straight
                             spicules (length 0.32-0.46, 1.2-1.6 px wide) radiating all round (a sunburst)
   ``multiple_nodules``      **count**: 3-5 small disks (radius 0.08-0.10, 2.5-3 px across) spread over both lungs
   ``interstitial_pattern``  **texture**: a reticular net (zero sets of two smooth random fields at 8 and 12 cells)
                             over both lungs, +0.28-0.38
   ``cardiomegaly``          **organ structure**: the heart enlarged 1.45-1.7 times, growing into the left lung
   ``dextrocardia``          **laterality**: the heart mirrored to the image left (the patient's right); a horizontal
                             flip turns a normal scan into this class, so flips are not label-preserving here
   ========================  ==========================================================================================

4. **Acquisition** (nuisance): a slightly varying window (gain 0.97-1.03, offset -0.012..0.012: CT values are
   calibrated Hounsfield units, so one protocol's window barely moves), Gaussian-like sensor noise (sigma
   0.015-0.035, Irwin-Hall: the sum of four 16-bit uniforms), rounding to uint8.

**Why the nuisances are this small.** The first version drew pose and window 2.5x and 5x wider (centre +-0.06, tilt
+-12 degrees, scale 0.88-1.0, gain 0.85-1.15, offset +-0.06). Supervised training still learned it, but no
self-supervised method without geometric augmentations can: a global pose or window shift is visible in every token,
so it is the easiest thing for masked views to agree on, and the encryption rules out the crops and rotations that
would teach invariance to it. Measured with the demo's pretraining (seed 0): the k-NN monitor *fell* from 0.32 to 0.26
over 20 epochs on the first version and rose from 0.51 to 0.70 on this one. Real scans vary this little within a
protocol; a hospital whose data varies more would register or window it before encoding.

**Why it is a fair test.** Classes differ in *where and what shape* things are, not in how bright the image is.
Every finding is small against the per-image variation of anatomy (organ sizes, lesion positions, textures) and
noise, so global statistics say little, and the anatomy and lesion positions keep the set from being separable in
pixel space, while a spatial model learns it. Measured 2026-12-02 by ``msd-fast demo`` (2400 images: 1800 for
training over 3 clients, 600 for the test; seeds 0-2, mean +- std) and by ``tests/test_data_synthetic.py`` (700 /
350 images):

   ==========================================================  ==========================================
   model (test accuracy; chance 1/7 = 0.14)                    accuracy
   ==========================================================  ==========================================
   ridge regression on per-image [mean, std, 5 quantiles]      0.44 (all 700 labels)
   ridge regression on fixed random 5x5 filters, pooled        0.98 (all 700 labels)
   raw-pixel k-NN (centred cosine, k = sqrt(n))                0.613 +- 0.005 (60 labels per client)
   the demo's ViT from scratch (patch 8, depth 4, width 96)    0.499 +- 0.010 (60 labels per client, 300
                                                               steps), 0.928 +- 0.004 (all 1800 labels
                                                               pooled, 1500 steps)
   ==========================================================  ==========================================

At 10 % labels the ViT stays far below its all-labels accuracy, which leaves room for pretraining. Classes are
balanced (counts differ by at most one) and shuffled; the ``train``/``val``/``test`` splits are independent draws.

**Same bytes on every machine.** Randomness is PCG64's raw 64-bit stream (seeded by ``SeedSequence([seed, split,
size, n_classes, 2])``), turned into uniform doubles by ``(word >> 11) * 2**-53``; NumPy guarantees that stream
across versions, unlike ``Generator`` methods. Every random parameter is drawn for every image of a chunk, whatever
its label, so the stream never depends on the labels. The pixel arithmetic (float32) uses only ``+ - * /``,
``sqrt``, ``abs``, ``floor``, ``min``/``max``, sorting and indexing -- IEEE-exact everywhere; angles come as
normalised vectors, never from ``sin``/``cos``/``exp``, whose last bit varies between math libraries -- so the output
is bit-identical across machines, NumPy versions and thread counts (``tests/test_data_synthetic.py`` pins a SHA-256).
Images are generated in fixed chunks of 256, vectorised per chunk: 2400 images at 32x32 take about 0.9 s (4.4 s at
64x64).
"""
from __future__ import annotations

import numpy as np
import torch

from .imageset import ImageSet

CLASS_NAMES = ("normal", "round_mass", "spiculated_mass", "multiple_nodules", "interstitial_pattern",
               "cardiomegaly", "dextrocardia")
SPLITS = ("train", "val", "test")
DEFAULT_COUNT = 2000
DEFAULT_SIZE = 32
MIN_SIZE = 16  # the smallest side the anatomy is drawn at
_CHUNK = 256  # images generated together; fixed, so the stream does not depend on n


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

    def tilts(self, shape, max_tan: float) -> tuple[np.ndarray, np.ndarray]:
        """Unit vectors ``(cos, sin)`` of angles within ``+-atan(max_tan)`` (``(1, t) / |(1, t)|``, no trig)."""
        t = self.uniform(shape, -max_tan, max_tan)
        norm = np.sqrt(1.0 + t * t)
        return 1.0 / norm, t / norm

    def disk_points(self, shape) -> tuple[np.ndarray, np.ndarray]:
        """Points ``(du, dv)`` uniform in the unit disk (radius ``sqrt(U)`` times a random direction)."""
        radius = np.sqrt(self.uniform(shape))
        cos, sin = self.directions(shape)
        return radius * cos, radius * sin


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


def _blend(image: np.ndarray, value, coverage: np.ndarray) -> np.ndarray:
    """Paint ``value`` over ``image`` where ``coverage`` (in [0, 1]) says, anti-aliased at the edges."""
    return image + (value - image) * coverage


class _Frame:
    """Body-frame coordinates of a chunk's pixels: ``u`` (patient right -> left, i.e. image left -> right) and ``v``
    (anterior -> posterior, image top -> bottom), ``[b, H, W]``, after undoing each image's pose (centre, tilt, scale);
    ``px [b, 1, 1]`` is one pixel in body units. ``sel`` restricts to some images of the chunk."""

    def __init__(self, u, v, px):
        self.u, self.v, self.px = u, v, px

    def take(self, sel) -> "_Frame":
        return _Frame(self.u[sel], self.v[sel], self.px[sel])

    def disk(self, cu, cv, radius, sharpness=1.0) -> np.ndarray:
        du, dv = self.u - cu, self.v - cv
        return _soft(radius - np.sqrt(du * du + dv * dv), self.px * _F(sharpness))

    def ellipse(self, cu, cv, au, av, edge=1.0) -> np.ndarray:
        du, dv = (self.u - cu) / au, (self.v - cv) / av
        return _soft((_F(1.0) - np.sqrt(du * du + dv * dv)) * np.minimum(au, av), self.px * _F(edge))

    def segment(self, u0, v0, u1, v1, width, taper=0.6) -> np.ndarray:
        """A line of ``width`` pixels from ``(u0, v0)`` to ``(u1, v1)``, fading by ``taper`` towards its end."""
        eu, ev = u1 - u0, v1 - v0
        length2 = eu * eu + ev * ev + _F(1e-12)
        du, dv = self.u - u0, self.v - v0
        t = np.minimum(np.maximum((du * eu + dv * ev) / length2, _F(0.0)), _F(1.0))
        pu, pv = du - t * eu, dv - t * ev
        return _soft(width * self.px * _F(0.5) - np.sqrt(pu * pu + pv * pv), self.px) * (_F(1.0) - _F(taper) * t)


def _pose(rand: _Uniforms, b: int, size: int) -> _Frame:
    """Random patient pose: centre within +-0.024, tilt within +-4.8 degrees, scale 0.952-1.0."""
    centres = ((np.arange(size) + 0.5) * (2.0 / size) - 1.0).astype(_F)
    y, x = centres[None, :, None], centres[None, None, :]
    cy, cx = _col(rand.uniform(b, -0.024, 0.024)), _col(rand.uniform(b, -0.024, 0.024))
    cos, sin = rand.tilts(b, 0.084)
    cos, sin = _col(cos), _col(sin)
    scale = _col(rand.uniform(b, 0.952, 1.0))
    dy, dx = y - cy, x - cx
    u = (dx * cos + dy * sin) / scale
    v = (dy * cos - dx * sin) / scale
    return _Frame(u, v, _F(2.0 / size) / scale)


def _lung_point(rand: _Uniforms, b: int, lungs, spread: float):
    """A random point inside a random lung (the outer ``spread`` of its ellipse, biased away from the heart);
    returns ``(u, v)``, each ``[b]``."""
    side = np.where(rand.uniform(b) < 0.5, -1.0, 1.0)
    du, dv = rand.disk_points(b)
    lu, lv, la, lb = lungs
    return side * (lu + 0.06 + spread * la * du), lv + spread * lb * dv


def _generate_chunk(rand: _Uniforms, labels: np.ndarray, size: int) -> np.ndarray:
    b = len(labels)
    f = _pose(rand, b, size)

    # --- anatomy (every class) -------------------------------------------------------------------------------------
    body_a, body_b = _col(rand.uniform(b, 0.88, 0.96)), _col(rand.uniform(b, 0.62, 0.72))
    body = f.ellipse(_F(0.0), _F(0.0), body_a, body_b, edge=1.5)
    inner = f.ellipse(_F(0.0), _F(0.0), body_a - _F(0.07), body_b - _F(0.07))  # inside the subcutaneous fat layer
    tissue = _col(rand.uniform(b, 0.42, 0.50))
    texture = (_F(0.05) * _value_noise(rand, b, 4, size, size) + _F(0.03) * _value_noise(rand, b, 8, size, size))
    image = _F(0.03) + body * (_F(0.30) + (tissue - _F(0.30)) * inner + texture)

    # lungs: mirrored pair, each with its own jitter
    lung_u, lung_v = rand.uniform(b, 0.40, 0.46), rand.uniform(b, -0.06, 0.02)
    lung_a, lung_b = rand.uniform(b, 0.25, 0.31), rand.uniform(b, 0.38, 0.46)
    lung_value = _col(rand.uniform(b, 0.06, 0.12))
    lung_texture = _F(0.025) * _value_noise(rand, b, 16, size, size)
    lungs = np.zeros_like(image)
    for side in (-1.0, 1.0):
        jitter_u, jitter_v = rand.uniform(b, -0.03, 0.03), rand.uniform(b, -0.03, 0.03)
        lungs = np.maximum(lungs, f.ellipse(_col(side * lung_u + jitter_u), _col(lung_v + jitter_v),
                                            _col(lung_a), _col(lung_b)))
    image = _blend(image, lung_value + lung_texture, lungs)

    # lung vessels: lines from each hilum outwards, and a few vessel cross-sections (small faint dots)
    hilum_u, hilum_v = rand.uniform(b, 0.18, 0.24), rand.uniform(b, -0.04, 0.06)
    for side in (-1.0, 1.0):
        for _ in range(3):
            du, dv = rand.disk_points(b)
            end_u = side * (lung_u + 0.05 + 0.8 * lung_a * np.abs(du))
            end_v = lung_v + 0.8 * lung_b * dv
            width, value = rand.uniform(b, 0.6, 1.0), rand.uniform(b, 0.06, 0.12)
            line = f.segment(_col(side * hilum_u), _col(hilum_v), _col(end_u), _col(end_v), _col(width))
            image = image + _col(value) * line * lungs
    n_dots = rand.integers(b, 0, 3)
    for k in range(3):
        du, dv = _lung_point(rand, b, (lung_u, lung_v, lung_a, lung_b), 0.7)
        radius, value = rand.uniform(b, 0.025, 0.04), rand.uniform(b, 0.05, 0.10)
        on = _col((k < n_dots) * value)
        image = image + on * f.disk(_col(du), _col(dv), _col(radius)) * lungs

    # heart: at the patient's left (image right), enlarged in cardiomegaly, mirrored in dextrocardia
    heart_u, heart_v = rand.uniform(b, 0.13, 0.19), rand.uniform(b, -0.16, -0.08)
    heart_a, heart_b = rand.uniform(b, 0.17, 0.22), rand.uniform(b, 0.15, 0.19)
    enlarge = rand.uniform(b, 1.45, 1.7)
    heart_value = _col(rand.uniform(b, 0.48, 0.56))
    big = labels == CLASS_NAMES.index("cardiomegaly")
    heart_a, heart_b = np.where(big, heart_a * enlarge, heart_a), np.where(big, heart_b * enlarge, heart_b)
    heart_u = np.where(big, heart_u + 0.5 * (heart_a - heart_a / enlarge), heart_u)  # grows towards the left lung
    heart_u = np.where(labels == CLASS_NAMES.index("dextrocardia"), -heart_u, heart_u)
    image = _blend(image, heart_value, f.ellipse(_col(heart_u), _col(heart_v), _col(heart_a), _col(heart_b), 2.0))

    # spine (bright vertebral body behind the heart) and the descending aorta beside it
    spine_v, spine_r = rand.uniform(b, 0.40, 0.48), rand.uniform(b, 0.08, 0.11)
    image = _blend(image, _col(rand.uniform(b, 0.80, 0.90)), f.disk(_F(0.0), _col(spine_v), _col(spine_r)))
    aorta_r = rand.uniform(b, 0.05, 0.07)
    image = _blend(image, heart_value, f.disk(_col(np.full(b, 0.12)), _col(spine_v - spine_r - aorta_r), _col(aorta_r)))

    # --- the class's finding ---------------------------------------------------------------------------------------
    # Parameters are drawn for every image of the chunk (so the random stream does not depend on the labels); pixels
    # are drawn only for the images ``sel`` that have the finding.
    lung_box = (lung_u, lung_v, lung_a, lung_b)
    lesion_value = rand.uniform(b, 0.60, 0.80)

    # round mass: one smooth disk
    mu, mv = _lung_point(rand, b, lung_box, 0.35)
    radius = rand.uniform(b, 0.21, 0.28)
    sel = np.flatnonzero(labels == 1)
    if len(sel):
        g = f.take(sel)
        image[sel] = _blend(image[sel], _col(lesion_value[sel]), g.disk(_col(mu[sel]), _col(mv[sel]),
                                                                      _col(radius[sel])))

    # spiculated mass: a small lobulated core with 8 spicules radiating all round (a sunburst): eight directions 45
    # degrees apart (exact: 0, +-1, +-sqrt(1/2)), each jittered and the whole star turned by a random angle
    su, sv = _lung_point(rand, b, lung_box, 0.3)
    lobes = [(rand.uniform(b, -0.035, 0.035), rand.uniform(b, -0.035, 0.035), rand.uniform(b, 0.045, 0.065))
             for _ in range(3)]
    turn_cos, turn_sin = rand.directions(b)
    diagonal = np.sqrt(0.5)
    spicules = []
    for base_cos, base_sin in ((1.0, 0.0), (diagonal, diagonal), (0.0, 1.0), (-diagonal, diagonal), (-1.0, 0.0),
                               (-diagonal, -diagonal), (0.0, -1.0), (diagonal, -diagonal)):
        jc = base_cos + rand.uniform(b, -0.2, 0.2)
        js = base_sin + rand.uniform(b, -0.2, 0.2)
        norm = np.sqrt(jc * jc + js * js)
        jc, js = jc / norm, js / norm
        spicules.append(((jc * turn_cos - js * turn_sin, jc * turn_sin + js * turn_cos), rand.uniform(b, 0.32, 0.46),
                         rand.uniform(b, 1.2, 1.6)))
    sel = np.flatnonzero(labels == 2)
    if len(sel):
        g = f.take(sel)
        cu, cv = _col(su[sel]), _col(sv[sel])
        cover = np.zeros((len(sel), size, size), dtype=_F)
        for du, dv, r in lobes:
            cover = np.maximum(cover, g.disk(cu + _col(du[sel]), cv + _col(dv[sel]), _col(r[sel])))
        for (dcos, dsin), length, width in spicules:
            line = g.segment(cu, cv, cu + _col((length * dcos)[sel]), cv + _col((length * dsin)[sel]),
                             _col(width[sel]), taper=0.4)
            cover = np.maximum(cover, line)
        image[sel] = _blend(image[sel], _col(lesion_value[sel]), cover)

    # multiple nodules: 3-5 small disks spread over both lungs
    n_nodules = rand.integers(b, 3, 5)
    nodules = [(_lung_point(rand, b, lung_box, 0.65), rand.uniform(b, 0.08, 0.10)) for _ in range(5)]
    sel = np.flatnonzero(labels == 3)
    if len(sel):
        g = f.take(sel)
        cover = np.zeros((len(sel), size, size), dtype=_F)
        for k, ((nu, nv), r) in enumerate(nodules):
            on = _col((k < n_nodules[sel]).astype(_F))
            cover = np.maximum(cover, on * g.disk(_col(nu[sel]), _col(nv[sel]), _col(r[sel])))
        image[sel] = _blend(image[sel], _col(lesion_value[sel]), cover)

    # interstitial pattern: a fine reticular net (the zero set of a smooth random field) over both lungs
    strength = rand.uniform(b, 0.28, 0.38)
    sel = np.flatnonzero(labels == 4)
    net_a = _value_noise(rand, b, 8, size, size, sel)
    net_b = _value_noise(rand, b, 12, size, size, sel)
    if len(sel):
        net = np.maximum(_F(1.0) - np.abs(net_a) * _F(5.0), _F(0.0))
        net = np.maximum(net, np.maximum(_F(1.0) - np.abs(net_b) * _F(5.0), _F(0.0)))
        image[sel] = image[sel] + _col(strength[sel]) * net * lungs[sel]

    # --- acquisition: window (gain, offset) and sensor noise, then uint8 --------------------------------------------
    gain, offset = _col(rand.uniform(b, 0.97, 1.03)), _col(rand.uniform(b, -0.012, 0.012))
    sigma = _col(rand.uniform(b, 0.015, 0.035))
    image = image * gain + offset + sigma * rand.gaussian((b, size, size)).astype(_F)
    return np.clip(np.floor(image * _F(255.0) + _F(0.5)), 0, 255).astype(np.uint8)


def synthetic_dataset(n: int = DEFAULT_COUNT, size: int = DEFAULT_SIZE, n_classes: int = len(CLASS_NAMES),
                      seed: int = 0, channels: int = 1, *, split: str = "train") -> ImageSet:
    """Generate ``n`` chest-CT-like slices (see the module docstring for how, and why they are a fair test).

    Args:
        n: number of images (>= 1).
        size: image side in pixels (>= 16, default 32); the anatomy is drawn in ``[-1, 1]`` coordinates, so the same
            scan renders at any size.
        n_classes: 2 to 7: the first ``n_classes`` of :data:`CLASS_NAMES`.
        seed: the dataset seed; together with ``split`` (and ``size``, ``n_classes``) it fixes every byte.
        channels: 1 (grayscale) or 3 (the gray value replicated into RGB).
        split: ``"train"``, ``"val"`` or ``"test"``: independent draws from the same distribution, so a test split
            never repeats a training image.

    Returns:
        An in-memory :class:`ImageSet` of uint8 ``[n, channels, size, size]`` with balanced, shuffled ``labels``
        (int64) and ``class_names``. Deterministic: the same arguments give the same bytes on every machine.
    """
    n = _int_arg(n, "n", 1)
    size = _int_arg(size, "size", MIN_SIZE)
    n_classes = _int_arg(n_classes, "n_classes", 2)
    if n_classes > len(CLASS_NAMES):
        raise ValueError(f"n_classes must be at most {len(CLASS_NAMES)}, got {n_classes}")
    seed = _int_arg(seed, "seed", 0)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rand = _Uniforms([seed, SPLITS.index(split), size, n_classes, 2])  # the last word: generator version
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


__all__ = ["CLASS_NAMES", "DEFAULT_SIZE", "MIN_SIZE", "synthetic_dataset"]
