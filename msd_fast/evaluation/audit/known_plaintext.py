"""Known-plaintext attack on block-wise image encryption: recover the key's tables from plain/encrypted pairs.

The server obtains ``k`` images together with their encryptions (a public sample that a hospital also uploaded, a
leaked study, images it could guess). Encryption is a fixed table lookup (:mod:`msd_fast.ops.patch_encryption`)::

    encrypted[b, block n, value e] = negpos_e(plain[b, block src_block[n], value src_elem[e]])

so matching values reveals the tables:

1. **Blocks.** ``v`` and ``max - v`` fold to the same ``min(v, max - v)``, and pixel shuffling only reorders a block,
   so the *sorted folded values* of a block survive every transform. Each encrypted block position is matched to the
   plain block position whose signatures agree over all ``k`` pairs (one-to-one, :func:`~msd_fast.evaluation.audit.assignment.
   assign`). With per-sample keys every pair has its own block order; it is matched pair by pair and cannot be reused.
2. **Values.** Given the block matches, each encrypted value position ``e`` is matched to the plain position ``e'``
   and polarity (kept or flipped) that agree over all matched blocks of all pairs; that is the pixel permutation and
   the negative-positive mask.
3. Re-match blocks with the full decrypted content (resolves blocks with equal value histograms) and repeat step 2.

Entries the data cannot distinguish (e.g. blocks that are flat in every known pair) come out arbitrary; the audit
therefore reports both the fraction of each table recovered and what the recovered tables do to *other* images.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ...checks import check_positive_int
from ...ops.patch_encryption import image_to_blocks, negpos_reference
from .assignment import assign
from .jigsaw import apply_tables, check_images


@dataclasses.dataclass
class RecoveredTables:
    """The attacker's estimate of the encryption tables (gather convention, as :class:`~msd_fast.ops.
    patch_encryption.PatchTables`).

    Attributes:
        src_block: int64 ``[N]`` (one key for all images) or None (per-sample keys: not reusable).
        pair_src_block: int64 ``[k, N]``: the block order found for each known pair.
        src_elem: int64 ``[L]``: encrypted value ``e`` came from plain value ``src_elem[e]``.
        flip: bool ``[L]`` or None: encrypted value positions found negative-positive flipped.
    """

    src_block: Optional[torch.Tensor]
    pair_src_block: torch.Tensor
    src_elem: torch.Tensor
    flip: Optional[torch.Tensor]

    def decrypt(self, encrypted: torch.Tensor, patch_size: int, max_value: float = 255.0) -> torch.Tensor:
        """Apply the inverse of the recovered tables to other encrypted images (uint8 ``[B, C, H, W]``) with the
        fused patch kernel. With per-sample keys only the pixel tables are inverted and blocks stay where they are."""
        encrypted = check_images(encrypted, "encrypted", patch_size)
        N = self.pair_src_block.shape[1]
        inverse_elem = torch.argsort(self.src_elem)
        blocks = torch.argsort(self.src_block) if self.src_block is not None else torch.arange(N)
        return apply_tables(encrypted, patch_size, blocks, inverse_elem, self.flip, max_value)


def _fold(values: torch.Tensor, max_value: int) -> torch.Tensor:
    flipped = negpos_reference(values, max_value)
    return torch.minimum(values, flipped)


def _sq_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(-1)[..., :, None] + b.pow(2).sum(-1)[..., None, :] - 2 * a @ b.transpose(-1, -2)).clamp(min=0)


def _match_values(enc: torch.Tensor, plain: torch.Tensor, *, pixel_shuffle: bool, negpos: bool,
                  max_value: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``enc``, ``plain``: uint8 ``[S, L]`` matched blocks. Returns ``src_elem [L]`` and ``flip [L]`` (or None)."""
    L = enc.shape[1]
    y = enc.double().T                                                        # [L, S]
    same = _sq_distance(y, plain.double().T)                                 # [L(e), L(e')]
    cost, flipped = same, None
    if negpos:
        other = _sq_distance(y, negpos_reference(plain, max_value).double().T)
        flipped = other < same
        cost = torch.minimum(same, other)
    if not pixel_shuffle:
        cost = torch.where(torch.eye(L, dtype=torch.bool), cost, torch.full_like(cost, float("inf")))
    src_elem = assign(cost)
    flip = flipped[torch.arange(L), src_elem] if negpos else None
    return src_elem, flip


def recover_key_tables(plain: torch.Tensor, encrypted: torch.Tensor, patch_size: int, *, block_scramble: bool = True,
                       pixel_shuffle: bool = True, negpos: bool = False, per_sample: bool = False,
                       max_value: float = 255.0, rounds: int = 2) -> RecoveredTables:
    """Recover the encryption tables from ``k`` known pairs.

    Args:
        plain: uint8 ``[k, C, H, W]`` known plain images.
        encrypted: uint8 ``[k, C, H, W]``: their encryptions (same order).
        patch_size: the block size.
        block_scramble, pixel_shuffle, negpos, per_sample: the public encryption options (from the shard).
        max_value: the negative-positive maximum (an integer for uint8).
        rounds: block-then-value matching rounds (the first on folded histograms, later ones on decrypted content).

    Returns:
        :class:`RecoveredTables`.
    """
    plain = check_images(plain, "plain", patch_size)
    encrypted = check_images(encrypted, "encrypted", patch_size)
    if plain.shape != encrypted.shape:
        raise ValueError(f"plain {tuple(plain.shape)} and encrypted {tuple(encrypted.shape)} must have the same shape")
    check_positive_int(rounds, "rounds")
    max_value = int(max_value)
    k = plain.shape[0]
    x, y = image_to_blocks(plain, patch_size), image_to_blocks(encrypted, patch_size)   # [k, N, L]
    N, L = x.shape[1], x.shape[2]
    if negpos:
        x_key, y_key = _fold(x, max_value), _fold(y, max_value)
    else:
        x_key, y_key = x, y
    if pixel_shuffle:
        x_key, y_key = x_key.sort(-1).values, y_key.sort(-1).values
    block_cost = _sq_distance(y_key.double(), x_key.double())                 # [k, N(enc), N(plain)]
    src_elem, flip = torch.arange(L), None
    for round_ in range(rounds):
        if not block_scramble:
            pair_blocks = torch.arange(N).expand(k, N)
        elif per_sample:
            pair_blocks = assign(block_cost)                                  # [k, N]
        else:
            pair_blocks = assign(block_cost.sum(0)).expand(k, N)
        matched = torch.gather(x, 1, pair_blocks[:, :, None].expand(k, N, L))  # plain block behind each enc block
        src_elem, flip = _match_values(y.reshape(k * N, L), matched.reshape(k * N, L), pixel_shuffle=pixel_shuffle,
                                       negpos=negpos, max_value=max_value)
        if round_ + 1 < rounds and block_scramble:
            # Decrypt the values of every encrypted block with the current tables and compare contents directly.
            inverse = torch.argsort(src_elem)
            restored = y[:, :, inverse]
            if flip is not None:
                restored = torch.where(flip[inverse], negpos_reference(restored, max_value), restored)
            block_cost = _sq_distance(restored.double(), x.double())
    return RecoveredTables(src_block=None if per_sample else pair_blocks[0].clone(),
                           pair_src_block=pair_blocks.contiguous(), src_elem=src_elem, flip=flip)
