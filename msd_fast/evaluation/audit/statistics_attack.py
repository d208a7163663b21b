"""Ciphertext-only statistics attack on the dense block transform (:mod:`msd_fast.ops.block_mixing`).

Every ciphertext block is ``y = A u`` with ``u = x / 255 - 1/2`` the block's centred values and ``A`` the key's secret
random orthogonal ``[L, L]`` matrix. Orthogonal maps preserve second-order structure, which is the known weakness of
random projections: the ciphertext blocks' covariance is ``A C_u A^T``, so its eigenvectors are ``A`` times the
plaintext's. The server never sees ``C_u``, but blocks of *public* images of a similar kind have nearly the same
covariance. The attack (:func:`statistics_attack`):

1. Moments of the ciphertext blocks of the whole shard and of public plain blocks (:func:`block_moments`): mean,
   eigen-decomposition of the covariance, standardised coordinates ``z = V^T (u - mean) / sqrt(lambda)``, and the
   co-skewness matrix ``T[i, j] = E[z_i^2 z_j]``.
2. Eigenvectors are paired by rank. Each pairing is known only up to a sign -- and, where neighbouring eigenvalues
   are nearly equal, up to a rotation within that group of components. Third moments break the tie: if the cipher
   coordinates of a group ``G`` are ``R z_G`` of the public ones, then ``T_c[i, G] = R T_p[i, G]`` for every
   component ``i`` outside ``G`` (``z_i^2`` does not see ``i``'s sign) and the mean coordinates move the same way;
   ``R`` is the orthogonal Procrustes solution over those rows (a sign vote for a group of one).
3. ``A`` is estimated as ``sum_G U_G R_G V_G^T`` and the leading ``k`` aligned components decode every block; the
   rest of a block is filled with the public mean. ``k`` is chosen without the key by rehearsing the attack on the
   public images themselves (:func:`rehearse_components`): half of them encrypted with the attacker's own random
   orthogonal matrix, the other half as the prior.

Block order is a separate problem: the decoded blocks go to :func:`~msd_fast.evaluation.audit.jigsaw.solve_block_order`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from ...ops.patch_encryption import image_to_blocks
from .jigsaw import check_images

MAX_VALUE = 255.0
GROUP_RATIO = 0.85   # neighbouring eigenvalues closer than this ratio are treated as one (rotatable) group
MAX_GROUP = 6        # largest group rotated as one (tail groups are split: their third moments are noise)
THIRD_ORDER_COMPONENTS = 32  # leading components whose full third-moment tensor resolves the signs jointly


def units(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """uint8 images ``[B, C, H, W]`` -> float64 blocks ``[B, N, L]`` in the transform's units ``x / 255 - 1/2``."""
    return image_to_blocks(images, patch_size).double() / MAX_VALUE - 0.5


def cipher_blocks(cipher: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Dense ciphertext ``[B, C, H, W]`` (float16/32/64) -> float64 blocks ``[B, N, L]`` (received order)."""
    if not isinstance(cipher, torch.Tensor) or cipher.dim() != 4 or not cipher.is_floating_point():
        raise ValueError("cipher must be a floating-point [B, C, H, W] tensor (a dense-scheme ciphertext)")
    if cipher.shape[2] % patch_size or cipher.shape[3] % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the cipher's height and width {tuple(cipher.shape[2:])}")
    return image_to_blocks(cipher, patch_size).double()


def to_pixels(blocks: torch.Tensor) -> torch.Tensor:
    """Blocks in units back to pixel values: float64, clamped to ``[0, 255]`` (not rounded)."""
    return ((blocks + 0.5) * MAX_VALUE).clamp(0.0, MAX_VALUE)


@dataclasses.dataclass
class BlockMoments:
    """Moments of a set of ``S`` blocks of ``L`` values (float64).

    Attributes:
        mean: ``[L]``. eigenvalues: ``[L]`` descending. components: ``[L, L]``, column ``i`` the ``i``-th eigenvector.
        mean_coords: ``[L]``: ``components^T mean / sqrt(eigenvalues)`` (the mean in standardised coordinates).
        coskew: ``[L, L]``: ``E[z_i^2 z_j]`` of the standardised coordinates ``z``.
        third: ``[K, K, K]``: ``E[z_i z_j z_k]`` of the leading ``K`` components.
        count: ``S``.
    """

    mean: torch.Tensor
    eigenvalues: torch.Tensor
    components: torch.Tensor
    mean_coords: torch.Tensor
    coskew: torch.Tensor
    third: torch.Tensor
    count: int


def block_moments(blocks: torch.Tensor, leading: int = THIRD_ORDER_COMPONENTS, chunk: int = 16384) -> BlockMoments:
    """:class:`BlockMoments` of ``blocks``: float ``[S, L]`` (or ``[B, N, L]``, flattened), ``S >= 2``; the full
    third-moment tensor for the ``leading`` components."""
    x = blocks.reshape(-1, blocks.shape[-1]).double()
    S, L = x.shape
    if S < 2:
        raise ValueError("block_moments needs at least 2 blocks")
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / (S - 1)
    values, vectors = torch.linalg.eigh(cov)
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    scale = values.clamp(min=1e-12 * float(values[0].clamp(min=1e-300))).sqrt()
    K = min(leading, L)
    coskew = torch.zeros(L, L, dtype=torch.float64)
    third = torch.zeros(K * K, K, dtype=torch.float64)
    for start in range(0, S, chunk):
        z = centred[start:start + chunk] @ vectors / scale
        coskew += (z * z).T @ z
        head = z[:, :K]
        third += (head[:, :, None] * head[:, None, :]).reshape(-1, K * K).T @ head
    return BlockMoments(mean=mean, eigenvalues=values, components=vectors, mean_coords=(vectors.T @ mean) / scale,
                        coskew=coskew / S, third=third.view(K, K, K) / S, count=S)


def eigen_groups(eigenvalues: torch.Tensor, ratio: float = GROUP_RATIO, max_size: int = MAX_GROUP) -> list:
    """Split ``range(L)`` into runs of neighbouring components whose eigenvalues are within ``ratio`` of each other
    (at most ``max_size`` long): the components that rank pairing cannot tell apart."""
    groups, current = [], [0]
    for i in range(1, eigenvalues.numel()):
        close = float(eigenvalues[i]) >= ratio * float(eigenvalues[i - 1])
        if close and len(current) < max_size:
            current.append(i)
        else:
            groups.append(current)
            current = [i]
    groups.append(current)
    return groups


def align_components(cipher: BlockMoments, public: BlockMoments, *, ratio: float = GROUP_RATIO,
                     max_group: int = MAX_GROUP, mean_weight: float = 1.0) -> torch.Tensor:
    """The attacker's estimate of ``A``: float64 ``[L, L]`` with ``A_hat v_j ~ A v_j`` for the public eigenvectors
    ``v_j``, from rank pairing plus a third-moment (and mean) Procrustes rotation within each group of
    near-equal eigenvalues (see the module docstring). Uses no key: only the two sets of moments."""
    L = cipher.mean.numel()
    if public.mean.numel() != L:
        raise ValueError(f"cipher blocks have {L} values but public blocks {public.mean.numel()}")
    # Groups where either spectrum is flat: a pairing error in one of them is as likely as in the other.
    spectrum = torch.minimum(cipher.eigenvalues / cipher.eigenvalues[0].clamp(min=1e-300),
                             public.eigenvalues / public.eigenvalues[0].clamp(min=1e-300))
    groups = eigen_groups(torch.maximum(spectrum, torch.full_like(spectrum, 1e-300)), ratio, max_group)
    rotation = torch.zeros(L, L, dtype=torch.float64)       # z_cipher = rotation @ z_public (block diagonal)
    member = torch.zeros(len(groups), L, dtype=torch.float64)
    for index, group in enumerate(groups):
        member[index, group] = 1.0
    # E[|z_H|^2 z_j] for every group H: invariant to the rotation within H, linear in the rotation of j's group.
    grouped_c, grouped_p = member @ cipher.coskew, member @ public.coskew
    for index, group in enumerate(groups):
        g = torch.tensor(group)
        others = torch.arange(len(groups)) != index
        rows_c = [mean_weight * cipher.mean_coords[g][None], grouped_c[others][:, g]]
        rows_p = [mean_weight * public.mean_coords[g][None], grouped_p[others][:, g]]
        if len(group) == 1:                                   # a single component's own skewness flips with it
            rows_c.append(cipher.coskew[g][:, g])
            rows_p.append(public.coskew[g][:, g])
        f_c, f_p = torch.cat(rows_c), torch.cat(rows_p)
        u, _, vh = torch.linalg.svd(f_p.T @ f_c)               # f_c ~ f_p R^T  =>  R^T = U V^T
        rotation[g[:, None], g[None, :]] = (u @ vh).T
    signs = joint_signs(cipher, public, rotation, groups, mean_weight=mean_weight)
    rotation = rotation * signs[None, :]
    return cipher.components @ rotation @ public.components.T


def joint_signs(cipher: BlockMoments, public: BlockMoments, rotation: torch.Tensor, groups: list, *,
                mean_weight: float = 1.0, sweeps: int = 50) -> torch.Tensor:
    """Refine the sign of every leading aligned component jointly from the full third moments.

    With the aligned cipher coordinates ``z_a = rotation^T z_c ~ s * z_p`` (``s`` a sign per component), every
    third moment ``E[z_i z_j z_k]`` gives ``s_i s_j s_k``, so the signs maximise
    ``sum_ijk T_a[ijk] T_p[ijk] s_i s_j s_k + sum_j m_a[j] m_p[j] s_j`` (``K^3`` constraints instead of ``K``);
    maximised by coordinate ascent from the all-plus start (the group step's answer). Returns float64 ``[L]`` of
    +-1 (1 beyond the leading ``K``, cut at a group boundary)."""
    L = rotation.shape[0]
    K = min(cipher.third.shape[0], public.third.shape[0])
    ends = [group[-1] + 1 for group in groups if group[-1] + 1 <= K]
    K = max(ends) if ends else 0
    signs = torch.ones(L, dtype=torch.float64)
    if K < 2:
        return signs
    R = rotation[:K, :K]
    aligned = torch.einsum("abc,ai,bj,ck->ijk", cipher.third[:K, :K, :K], R, R, R)
    weight = aligned * public.third[:K, :K, :K]                       # symmetric in (i, j, k)
    linear = mean_weight * (R.T @ cipher.mean_coords[:K]) * public.mean_coords[:K] + weight.diagonal(0, 0, 1).diagonal()
    off = ~torch.eye(K, dtype=torch.bool)
    s = signs[:K].clone()
    for _ in range(sweeps):
        changed = False
        for j in range(K):
            # Terms holding j exactly once (3 placements), plus j three times (s_j^3 = s_j); j twice: no s_j.
            pair = weight[j].masked_fill(~(off[j][:, None] & off[j][None, :]), 0.0)
            field = 3 * float(s @ pair @ s) + float(linear[j])
            want = 1.0 if field >= 0 else -1.0
            if want != s[j]:
                s[j], changed = want, True
        if not changed:
            break
    signs[:K] = s
    return signs


@dataclasses.dataclass
class StatisticsResult:
    """The statistics attack's estimate.

    Attributes:
        matrix: float64 ``[L, L]``: the estimate of ``A`` (orthogonal).
        public_components: float64 ``[L, L]``: the public eigenvectors (columns, by descending variance).
        public_mean: float64 ``[L]``: the public mean block (units).
        components: the ``k`` used by :meth:`decode` by default (chosen without the key).
        k_curve: float64 ``[L]`` or None: the rehearsal's MSE for ``k = 1..L`` (what ``components`` minimised).
    """

    matrix: torch.Tensor
    public_components: torch.Tensor
    public_mean: torch.Tensor
    components: int
    k_curve: Optional[torch.Tensor] = None

    def decode(self, blocks: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
        """Decode ciphertext blocks ``[..., L]`` (float) with the leading ``k`` aligned components (default
        :attr:`components`); the rest of each block is the public mean. Returns float64 ``[..., L]`` in units."""
        k = self.components if k is None else int(k)
        V = self.public_components[:, :k]
        coords = blocks.double() @ (self.matrix @ V)                       # [.., k] ~ V^T A^T y = V^T u
        rest = self.public_mean - V @ (V.T @ self.public_mean)
        return coords @ V.T + rest


def natural_image_blocks(patch_size: int, channels: int = 1, *, scales=(1, 2, 4, 8),
                         max_blocks: int = 200000) -> torch.Tensor:
    """Blocks of natural photos as a public prior: scikit-learn's two sample photos (``load_sample_images``),
    converted to ``channels`` (1: luminance; 3: RGB), box-downscaled by each of ``scales`` (so the prior covers
    several scales of detail), cut into every non-overlapping ``p x p`` block. Returns float64 ``[S, C*p*p]`` in
    units (at most ``max_blocks``, evenly subsampled)."""
    from sklearn.datasets import load_sample_images

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3 for the natural-image prior, got {channels}")
    out = []
    for photo in load_sample_images().images:
        rgb = torch.from_numpy(photo.copy()).permute(2, 0, 1).double()[None]     # [1, 3, H, W]
        image = rgb if channels == 3 else (rgb * torch.tensor([0.299, 0.587, 0.114],
                                                               dtype=torch.float64)[None, :, None, None]).sum(
            1, keepdim=True)
        for scale in scales:
            small = torch.nn.functional.avg_pool2d(image, scale) if scale > 1 else image
            H, W = (small.shape[2] // patch_size) * patch_size, (small.shape[3] // patch_size) * patch_size
            if H == 0 or W == 0:
                continue
            pixels = small[:, :, :H, :W].round().clamp(0, 255).to(torch.uint8)
            out.append(units(pixels, patch_size).reshape(-1, channels * patch_size * patch_size))
    blocks = torch.cat(out)
    if blocks.shape[0] > max_blocks:
        blocks = blocks[torch.linspace(0, blocks.shape[0] - 1, max_blocks).long()]
    return blocks


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal ``[n, n]`` float64 matrix (the attacker's own, for rehearsals)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.where(r.diagonal() < 0, -1.0, 1.0)


def rehearse_components(public_blocks: torch.Tensor, *, seed: int = 0, ratio: float = GROUP_RATIO,
                        max_group: int = MAX_GROUP) -> torch.Tensor:
    """The attacker's key-free choice of ``k``: split the public blocks in two halves, encrypt one with a random
    orthogonal matrix of its own, attack it with the other half as the prior, and measure the decoding MSE for every
    ``k``. Returns float64 ``[L]``: the MSE (units^2) with ``k = 1..L`` components."""
    x = public_blocks.reshape(-1, public_blocks.shape[-1]).double()
    S, L = x.shape
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(S, generator=g)
    prior, target = x[order[: S // 2]], x[order[S // 2:]]
    secret = random_orthogonal(L, g)
    cipher = target @ secret.T
    prior_moments = block_moments(prior)
    estimate = align_components(block_moments(cipher), prior_moments, ratio=ratio, max_group=max_group)
    V = prior_moments.components
    coords = cipher @ estimate @ V                                      # [S', L]
    truth = target @ V
    # Decoding with k components: error = sum over j > k of (mean-filled) + sum over j <= k of coordinate errors.
    mean_coords = prior_moments.mean @ V
    err_in = (coords - truth).pow(2).mean(0)                            # per component, when decoded
    err_out = (truth - mean_coords).pow(2).mean(0)                      # per component, when filled with the mean
    total_out = err_out.sum()
    return (torch.cumsum(err_in, 0) + total_out - torch.cumsum(err_out, 0)) / L


def statistics_attack(cipher: torch.Tensor, patch_size: int, public_blocks: torch.Tensor, *,
                      components: Optional[int] = None, ratio: float = GROUP_RATIO, max_group: int = MAX_GROUP,
                      seed: int = 0) -> StatisticsResult:
    """Ciphertext-only attack on the dense transform's values (not its block order).

    Args:
        cipher: float ``[B, C, H, W]``: what the server holds (the shard), any block order.
        patch_size: the block size ``p`` (public).
        public_blocks: float ``[S, L]`` (or ``[..., L]``): plain blocks of public images in units ``x/255 - 1/2``
            (:func:`units`, :func:`natural_image_blocks`), ``L = C*p*p``.
        components: decode with this many leading components (default: chosen by :func:`rehearse_components`).
        ratio, max_group: the eigenvalue grouping (:func:`eigen_groups`).

    Returns:
        :class:`StatisticsResult`; ``result.decode(cipher_blocks(cipher, p))`` gives the decoded blocks ``[B, N, L]``
        in the received order.
    """
    y = cipher_blocks(cipher, patch_size)
    L = y.shape[-1]
    public = public_blocks.reshape(-1, public_blocks.shape[-1]).double()
    if public.shape[1] != L:
        raise ValueError(f"public_blocks have {public.shape[1]} values per block but the cipher's blocks have {L} "
                         f"(C*p*p for patch_size={patch_size})")
    if public.shape[0] < 4:
        raise ValueError("public_blocks must hold at least 4 blocks")
    prior = block_moments(public)
    estimate = align_components(block_moments(y), prior, ratio=ratio, max_group=max_group)
    curve = None
    if components is None:
        curve = rehearse_components(public, seed=seed, ratio=ratio, max_group=max_group)
        components = int(curve.argmin()) + 1
    if not 1 <= int(components) <= L:
        raise ValueError(f"components must be in [1, {L}], got {components}")
    return StatisticsResult(matrix=estimate, public_components=prior.components, public_mean=prior.mean,
                            components=int(components), k_curve=curve)


def public_blocks_from_images(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """uint8 public images ``[B, C, H, W]`` -> their blocks ``[B*N, L]`` in units (the same-domain prior)."""
    images = check_images(images, "public images", patch_size)
    return units(images, patch_size).reshape(-1, images.shape[1] * patch_size * patch_size)


def chance_psnr_of_mean(mean_image: torch.Tensor, plain: torch.Tensor) -> float:
    """PSNR of guessing ``mean_image`` ``[C, H, W]`` for every image of ``plain`` (set PSNR, dB)."""
    mse = float((mean_image.double()[None] - plain.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(MAX_VALUE**2 / mse)
