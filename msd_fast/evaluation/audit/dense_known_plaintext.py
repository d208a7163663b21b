"""Known-plaintext attack on the dense block transform: recover the key's orthogonal matrix from plain/cipher pairs.

The server holds ``k`` plain images and their ciphertexts. Every cipher block is ``y = A u`` (``u = x/255 - 1/2``)
of some plain block of the same image, in an unknown (key-wide or per-image) order. ``A`` is orthogonal, so it
preserves norms and inner products: a block's norm and the sorted list of its inner products with the other blocks of
its image (its *Gram profile*) are the same in both. The attack (:func:`recover_block_matrix`):

1. Match cipher blocks to plain blocks by norm and Gram profile (one-to-one per image; with a key-wide order the
   costs of all pairs are summed and one order is found).
2. Estimate ``A`` by orthogonal Procrustes over the matched blocks, restricted to the span the plain blocks cover:
   ``A_hat = U_r V_r^T`` from the SVD of ``sum y u^T`` (rank ``r``). When the matched plain blocks span ``R^L``
   (``L = C*p*p`` linearly independent blocks: flat or repeated blocks add nothing) this is ``A``; with fewer it is
   ``A`` on the known span and 0 elsewhere (decoding gives each block's projection onto that span).
3. Re-match with the decoded content (``A_hat^T y`` against ``u``) and re-estimate, a few rounds.

The attacker's own verdict (:attr:`RecoveredBlockMatrix.recovered`) uses no key: full rank and a fit residual at the
ciphertext's rounding level.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ...checks import check_positive_int
from .assignment import assign
from .jigsaw import check_images
from .statistics_attack import cipher_blocks, units

RANK_TOLERANCE = 1e-6     # singular values below this fraction of the largest do not count as independent
RESIDUAL_LIMIT = 1e-2     # relative fit residual below which the attacker trusts a full-rank fit (float16: ~3e-4)


@dataclasses.dataclass
class RecoveredBlockMatrix:
    """The attacker's estimate of the dense transform.

    Attributes:
        matrix: float64 ``[L, L]``: ``A_hat`` (orthogonal when ``rank == L``; ``A`` on the known span otherwise).
        rank: linearly independent plain blocks among the matched ones (``L`` needed).
        residual: ``|Y - A_hat U| / |Y|`` over the matched blocks.
        recovered: the attacker's verdict: ``rank == L`` and ``residual < RESIDUAL_LIMIT``.
        pair_src_block: int64 ``[k, N]``: cipher block ``n`` of pair ``b`` came from plain block ``[b, n]``.
        src_block: int64 ``[N]`` (key-wide order: reusable for other images) or None (per-sample orders).
    """

    matrix: torch.Tensor
    rank: int
    residual: float
    recovered: bool
    pair_src_block: torch.Tensor
    src_block: Optional[torch.Tensor]

    def decode_blocks(self, cipher: torch.Tensor, patch_size: int) -> torch.Tensor:
        """Decode dense ciphertext ``[B, C, H, W]`` block by block: float64 ``[B, N, L]`` in units, received order."""
        return cipher_blocks(cipher, patch_size) @ self.matrix


def _gram_profiles(blocks: torch.Tensor) -> torch.Tensor:
    """``[k, N, L] -> [k, N, N + 1]``: each block's norm and its sorted inner products with its image's blocks."""
    gram = blocks @ blocks.transpose(1, 2)
    return torch.cat([gram.diagonal(0, 1, 2).clamp(min=0).sqrt()[..., None] * blocks.shape[1] ** 0.5,
                      gram.sort(-1).values], -1)


def _sq_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(-1)[..., :, None] + b.pow(2).sum(-1)[..., None, :] - 2 * a @ b.transpose(-1, -2)).clamp(min=0)


def _match(cost: torch.Tensor, per_sample: bool) -> torch.Tensor:
    k, N, _ = cost.shape
    if per_sample:
        return assign(cost)
    return assign(cost.sum(0)).expand(k, N).contiguous()


def _procrustes(y: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``A_hat`` restricted to the span of ``u`` (rows ``[S, L]``), and that span's dimension."""
    L = u.shape[1]
    singular = torch.linalg.svdvals(u)
    rank = int((singular > RANK_TOLERANCE * singular[0].clamp(min=1e-300)).sum()) if singular.numel() else 0
    left, _, right_h = torch.linalg.svd(y.T @ u)
    if rank >= L:
        return left @ right_h, L
    # Only the known span: project onto it first (right singular vectors of u), then rotate.
    basis = torch.linalg.svd(u, full_matrices=False)[2][:rank]                 # [r, L] rows span the known blocks
    projected = basis.T @ basis
    left, _, right_h = torch.linalg.svd(y.T @ (u @ projected))
    return left[:, :rank] @ right_h[:rank], rank


def recover_block_matrix(plain: torch.Tensor, cipher: torch.Tensor, patch_size: int, *, per_sample: bool,
                         rounds: int = 3) -> RecoveredBlockMatrix:
    """Recover the dense transform from ``k`` known pairs.

    Args:
        plain: uint8 ``[k, C, H, W]`` known plain images.
        cipher: float ``[k, C, H, W]``: their dense ciphertexts (same order; float16 or float32).
        patch_size: the block size ``p`` (public).
        per_sample: the shard's public option: one block order per image (matched image by image; not reusable).
        rounds: matching/estimation rounds (the first on Gram profiles, later ones on decoded content).

    Returns:
        :class:`RecoveredBlockMatrix`.
    """
    plain = check_images(plain, "plain", patch_size)
    if not isinstance(cipher, torch.Tensor) or cipher.shape != plain.shape:
        raise ValueError(f"cipher must be a tensor shaped like plain {tuple(plain.shape)}, got "
                         f"{tuple(cipher.shape) if isinstance(cipher, torch.Tensor) else type(cipher).__name__}")
    check_positive_int(rounds, "rounds")
    u, y = units(plain, patch_size), cipher_blocks(cipher, patch_size)        # [k, N, L]
    k, N, L = u.shape
    cost = _sq_distance(_gram_profiles(y), _gram_profiles(u))
    matrix, rank = torch.eye(L, dtype=torch.float64), 0
    for _ in range(rounds):
        order = _match(cost, per_sample)
        matched = torch.gather(u, 1, order[:, :, None].expand(k, N, L))
        matrix, rank = _procrustes(y.reshape(-1, L), matched.reshape(-1, L))
        decoded = y @ matrix                                                    # [k, N, L]: A_hat^T y = P u
        cost = _sq_distance(decoded, u @ matrix.T @ matrix)                     # against P u (P: known span)
    order = _match(cost, per_sample)
    matched = torch.gather(u, 1, order[:, :, None].expand(k, N, L)).reshape(-1, L)
    fit = y.reshape(-1, L)
    residual = float((fit - matched @ matrix.T).norm() / fit.norm().clamp(min=1e-300))
    return RecoveredBlockMatrix(matrix=matrix, rank=rank, residual=residual,
                                recovered=rank == L and residual < RESIDUAL_LIMIT, pair_src_block=order,
                                src_block=None if per_sample else order[0].clone())
