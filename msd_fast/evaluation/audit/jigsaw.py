"""Ciphertext-only attack on block-wise image encryption: the server reassembles images from what it received.

The server knows the public encryption options (they are in the shard's metadata) and the patch size, never the key.
What it does, strongest cheap step first:

1. **Negative-positive** (``negpos``): one key-derived mask flips the same value positions of every block. Values of
   a block are positively correlated in plain images, so in the ciphertext the correlation between value positions
   ``e`` and ``e'`` has the sign ``s_e s_e'``; the leading eigenvector of the correlation matrix over all blocks of all
   images gives the mask up to one global polarity (:func:`estimate_negpos_mask`). The audit scores both polarities
   (an attacker looks at both and keeps the natural one).
2. **Pixel shuffling**: one key-derived permutation for every block of every image, so the server learns which value
   positions are neighbours from their correlations across all blocks, and lays them out on the ``p x p`` grid
   (:func:`estimate_value_order`, via :func:`~msd_fast.evaluation.audit.layout.recover_grid_layout`), up to a symmetry of the
   square.
3. **Block scrambling**: a jigsaw puzzle. Dissimilarities between facing block edges (sum of squared differences or
   Gallagher's Mahalanobis gradient compatibility, :func:`edge_dissimilarity`) feed a greedy placer
   (:func:`solve_placement`). With one key for every image (``per_sample=False``) every image has the *same*
   scramble, so the server sums the normalised dissimilarities of all images and solves one puzzle for the whole
   shard; with per-sample keys it solves each image alone.

Steps 1-2 apply the recovered tables with the fused ``patch_permute`` kernel (:func:`~msd_fast.ops.patch_encryption.
permute_patches`), as does the final reassembly.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import torch

from ...checks import check_positive_int
from ...ops.patch_encryption import image_to_blocks, make_tables, negpos_reference, permute_patches
from .assignment import single_thread
from .layout import recover_grid_layout

METHODS = ("ssd", "mgc")


@dataclasses.dataclass
class JigsawResult:
    """What the ciphertext-only attack recovered, in the gather convention of :class:`~msd_fast.ops.
    patch_encryption.PatchTables`.

    Attributes:
        placement: int64 ``[B, N]``: cell ``n`` (row-major) of image ``b``'s reassembly holds received block
            ``placement[b, n]``.
        value_order: int64 ``[L]``: value ``e`` of a reassembled block is received value ``value_order[e]``.
        flip: bool ``[L]`` or None: received value positions the attacker believes were negative-positive flipped.
        reconstruction: uint8 ``[B, C, H, W]``: the received images with these tables applied.
        cost: float64 ``[B]``: the placer's total normalised dissimilarity (lower is more confident).
    """

    placement: torch.Tensor
    value_order: torch.Tensor
    flip: Optional[torch.Tensor]
    reconstruction: torch.Tensor
    cost: torch.Tensor


def check_images(images: object, name: str, patch_size: int) -> torch.Tensor:
    """Check that ``images`` is a non-empty uint8 ``[B, C, H, W]`` tensor whose height and width ``patch_size``
    divides; raises ``ValueError`` naming ``name``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.dtype != torch.uint8:
        got = (images.dtype, tuple(images.shape)) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a uint8 [B, C, H, W] tensor, got {got}")
    check_positive_int(patch_size, "patch_size")
    if images.shape[2] % patch_size or images.shape[3] % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the height and width of {name} "
                         f"{tuple(images.shape[2:])}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image")
    return images


def estimate_negpos_mask(values: torch.Tensor) -> torch.Tensor:
    """Estimate a shared negative-positive mask from ciphertext block values.

    Args:
        values: ``[S, L]`` real: ``S`` blocks (of all images) by their ``L`` value positions.

    Returns:
        bool ``[L]``: the positions on the minority side of the leading eigenvector of the correlation matrix (the
        mask or its complement: the global polarity is not identifiable from correlations).
    """
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[0] < 2:
        raise ValueError("values must be a [S, L] tensor with S >= 2")
    x = values.double()
    x = x - x.mean(0)
    std = x.pow(2).mean(0).sqrt().clamp(min=1e-12)
    corr = (x.T @ x) / x.shape[0] / std[:, None] / std[None, :]
    with single_thread():
        leading = torch.linalg.eigh(corr).eigenvectors[:, -1]
    negative = leading < 0
    return negative if int(negative.sum()) * 2 <= negative.numel() else ~negative


def _channel_labels(features: torch.Tensor, items_by_cell: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Order the ``C`` items of each cell consistently across cells by matching per-item statistics (mean, std) to
    per-channel prototypes; returns ``[cells, C]`` items in channel order (up to one global channel permutation)."""
    cells, C = items_by_cell.shape
    first = items_by_cell[0][features[items_by_cell[0], 0].argsort()]
    prototypes = features[first]                                              # [C, F]
    orders = torch.tensor(list(itertools.permutations(range(C))), dtype=torch.int64)  # [P, C]
    labelled = items_by_cell
    for _ in range(iterations):
        candidates = items_by_cell[:, orders]                                 # [cells, P, C]
        cost = (features[candidates] - prototypes[None, None]).pow(2).sum((-1, -2))  # [cells, P]
        labelled = torch.gather(candidates, 1, cost.argmin(1)[:, None, None].expand(cells, 1, C))[:, 0]
        prototypes = features[labelled].mean(0)
    return labelled


def estimate_value_order(values: torch.Tensor, channels: int, patch_size: int) -> torch.Tensor:
    """Estimate the inverse of a shared pixel shuffle from ciphertext block values (negative-positive undone).

    Args:
        values: ``[S, L]`` real, ``L = channels * patch_size**2``.
        channels, patch_size: the block geometry.

    Returns:
        int64 ``[L]`` gather order: reassembled value ``e = c*p*p + u*p + v`` is received value ``order[e]``. Correct
        up to a symmetry of the ``p x p`` square and, for ``channels > 1``, a global permutation of the channels.
    """
    L = channels * patch_size * patch_size
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[1] != L:
        raise ValueError(f"values must be [S, {L}] for {channels} channel(s) and patch_size {patch_size}")
    x = values.double()
    cov = torch.cov(x.T) if x.shape[0] > 1 else torch.eye(L, dtype=torch.float64)
    cov = cov + torch.eye(L, dtype=torch.float64) * 1e-9 * float(cov.diagonal().mean().clamp(min=1e-12))
    cells = recover_grid_layout(cov, patch_size, patch_size, capacity=channels)
    items_by_cell = cells.argsort(stable=True).view(patch_size * patch_size, channels)
    if channels > 1:
        features = torch.stack([x.mean(0), x.std(0)], 1)
        if channels <= 4:
            items_by_cell = _channel_labels(features, items_by_cell)
        else:
            items_by_cell = torch.gather(items_by_cell, 1, features[items_by_cell, 0].argsort(1))
    return items_by_cell.T.reshape(L).contiguous()   # channel-major: e = c * p * p + cell


def edge_dissimilarity(blocks: torch.Tensor, method: str = "mgc") -> tuple[torch.Tensor, torch.Tensor]:
    """Dissimilarity of every ordered pair of blocks as left-right and top-bottom neighbours.

    Args:
        blocks: real ``[B, N, C, p, p]`` (``p >= 2`` for ``"mgc"``).
        method: ``"ssd"`` -- sum of squared differences of the facing edge pixels; ``"mgc"`` -- Mahalanobis gradient
            compatibility (Gallagher, CVPR 2012): the gradient across the boundary scored against the distribution of
            gradients next to each block's edge, from both sides.

    Returns:
        ``(lr, tb)``: float64 ``[B, N, N]``; ``lr[b, i, j]`` scores block ``j`` right of block ``i``, ``tb[b, i, j]``
        block ``j`` below block ``i``; the diagonal is ``inf``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 5 or blocks.shape[-1] != blocks.shape[-2]:
        raise ValueError("blocks must be a [B, N, C, p, p] tensor")
    if method == "mgc" and blocks.shape[-1] < 2:
        raise ValueError("method='mgc' needs blocks of at least 2x2 pixels")
    x = blocks.double()
    lr = _left_right(x, method)
    tb = _left_right(x.transpose(-1, -2), method)
    eye = torch.eye(x.shape[1], dtype=torch.bool)
    return lr.masked_fill(eye, math.inf), tb.masked_fill(eye, math.inf)


def _squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[..., n, d], [..., m, d] -> [..., n, m]`` squared Euclidean distances (float64, clamped at 0)."""
    return (a.pow(2).sum(-1)[..., :, None] + b.pow(2).sum(-1)[..., None, :] - 2 * a @ b.transpose(-1, -2)).clamp(min=0)


def _left_right(x: torch.Tensor, method: str) -> torch.Tensor:
    B, N, C, p, _ = x.shape
    right, left = x[..., :, p - 1], x[..., :, 0]                              # [B, N, C, p]
    if method == "ssd":
        return _squared_distance(right.flatten(2), left.flatten(2))
    return (_gradient_term(right, x[..., :, p - 2], left) +
            _gradient_term(left, x[..., :, 1], right).transpose(1, 2))


def _gradient_term(edge: torch.Tensor, inner: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``D[i, j] = sum_rows (other_j - edge_i - mu_i)^T S_i^{-1} (other_j - edge_i - mu_i)``, where ``mu_i``, ``S_i``
    are the mean and (regularised) covariance over rows of block ``i``'s gradient ``edge_i - inner_i``."""
    B, N, C, p = edge.shape
    grad = (edge - inner).transpose(2, 3)                                     # [B, N, p, C]
    mu = grad.mean(2)                                                         # [B, N, C]
    centred = grad - mu[:, :, None]
    cov = centred.transpose(2, 3) @ centred / max(p - 1, 1)                   # [B, N, C, C]
    # Gallagher regularises with dummy gradients; a ridge of one grey level squared (plus 1 % of the typical
    # variance) keeps flat blocks (background) from dividing by zero without drowning real texture.
    ridge = 1.0 + 0.01 * cov.diagonal(dim1=-2, dim2=-1).mean()
    cov = cov + ridge * torch.eye(C, dtype=cov.dtype)
    whiten = torch.linalg.cholesky(torch.linalg.inv(cov))                     # S^{-1} = W W^T
    if C == 1:  # S^{-1} is a scalar per block: a scaled squared distance
        shifted = edge[:, :, 0] + mu                                          # [B, N, p]
        return whiten[..., 0, 0][:, :, None] ** 2 * _squared_distance(shifted, other[:, :, 0])
    target = (edge.transpose(2, 3) + mu[:, :, None]) @ whiten                 # [B, N, p, C]: row-vectors times W
    out = torch.empty(B, N, N, dtype=torch.float64)
    others = other.transpose(2, 3)                                            # [B, N(j), p, C]
    for b in range(B):
        moved = torch.einsum("jrc,icd->ijrd", others[b], whiten[b])           # [N(i), N(j), p, C]
        out[b] = (moved - target[b][:, None]).pow(2).sum((-1, -2))
    return out


def normalise_dissimilarity(d: torch.Tensor, *, reduce: str = "mean") -> torch.Tensor:
    """Confidence form of a dissimilarity (Pomeranz et al. 2011): each pair's dissimilarity divided by the
    second-smallest of its row (the other candidates for the same side of block ``i``) and by that of its column (the
    other candidates for block ``j``), combined by ``reduce`` (``"mean"`` or ``"max"``): float64 ``[B, N, N]``.
    Below 1 means better than the alternatives -- with ``"max"``, the two blocks are each other's best match ("best
    buddies"); about 1 means ambiguous (flat background next to flat background). A small floor (1e-3 of the median
    dissimilarity) keeps exact ties at 1 instead of 0/0."""
    finite = torch.where(torch.isfinite(d), d, torch.full_like(d, math.nan))
    floor = torch.nan_to_num(finite.flatten(1).nanmedian(1).values, nan=0.0).clamp(min=1e-12)[:, None, None] * 1e-3
    row = (d + floor) / (d.topk(2, dim=2, largest=False).values[..., 1:2] + floor)
    col = (d + floor) / (d.topk(2, dim=1, largest=False).values[:, 1:2, :] + floor)
    return torch.maximum(row, col) if reduce == "max" else 0.5 * (row + col)


def _merge_confident_pairs(lr: torch.Tensor, tb: torch.Tensor, rows: int, cols: int,
                           threshold: float) -> list[tuple[int, int, int]]:
    """Kruskal-style assembly of one puzzle (Gallagher 2012): take pair relations in order of confidence and join
    the two pieces' clusters whenever the result neither overlaps itself nor outgrows the ``rows x cols`` frame.
    Returns the largest cluster as ``(block, row, col)`` with the cluster's top-left at ``(0, 0)``."""
    N = lr.shape[0]
    scores = torch.stack([lr, tb]).flatten()
    order = scores.argsort(stable=True)
    keep = int((scores[order] < threshold).sum())
    cluster = list(range(N))
    members = {k: {k: (0, 0)} for k in range(N)}              # cluster id -> block -> (row, col)
    cells = {k: {(0, 0): k} for k in range(N)}                 # cluster id -> (row, col) -> block
    steps = ((0, 1), (1, 0))
    for flat in order[:keep].tolist():
        direction, rest = divmod(flat, N * N)
        i, j = divmod(rest, N)
        ci, cj = cluster[i], cluster[j]
        if ci == cj:
            continue
        if len(members[ci]) < len(members[cj]):                # move the smaller cluster
            (ci, i, sign), (cj, j) = (cj, j, -1), (ci, i)
        else:
            sign = 1
        ri, cci = members[ci][i]
        rj, ccj = members[cj][j]
        dr, dc = ri + sign * steps[direction][0] - rj, cci + sign * steps[direction][1] - ccj
        moved = {block: (r + dr, c + dc) for block, (r, c) in members[cj].items()}
        if any(pos in cells[ci] for pos in moved.values()):
            continue
        all_r = [r for r, _ in members[ci].values()] + [r for r, _ in moved.values()]
        all_c = [c for _, c in members[ci].values()] + [c for _, c in moved.values()]
        if max(all_r) - min(all_r) >= rows or max(all_c) - min(all_c) >= cols:
            continue
        for block, pos in moved.items():
            members[ci][block] = pos
            cells[ci][pos] = block
            cluster[block] = ci
        del members[cj], cells[cj]
        if len(members[ci]) == N:
            break
    largest = max(members.values(), key=len)
    r0 = min(r for r, _ in largest.values())
    c0 = min(c for _, c in largest.values())
    return [(block, r - r0, c - c0) for block, (r, c) in largest.items()]


def solve_placement(lr: torch.Tensor, tb: torch.Tensor, rows: int, cols: int, *,
                    threshold: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Jigsaw solver on a ``rows x cols`` frame, batched over puzzles.

    1. Normalise the dissimilarities to confidences (:func:`normalise_dissimilarity`).
    2. Per puzzle, join pieces along their most confident relations first (Kruskal-style, refusing overlaps and
       anything that outgrows the frame) while the confidence is below ``threshold``; keep the largest cluster.
    3. Place it in the middle of a ``(2 rows - 1) x (2 cols - 1)`` canvas and fill the rest greedily: each step fills
       the open cell whose best free block (lowest mean confidence against the cell's placed neighbours) beats its
       second best by the widest margin -- ambiguous cells such as flat background go last -- among cells that keep
       the placed region inside a ``rows x cols`` window.

    Args:
        lr, tb: float ``[B, N, N]`` raw dissimilarities (``N = rows * cols``), as from :func:`edge_dissimilarity`;
            ``lr[b, i, j]`` for ``j`` right of ``i``, ``tb[b, i, j]`` for ``j`` below ``i``; ``inf`` forbids a pair.
        threshold: confidence below which step 2 joins pieces.

    Returns:
        ``(placement, cost)``: int64 ``[B, N]`` (cell ``n`` holds block ``placement[b, n]``) and float64 ``[B]``,
        the sum of the normalised dissimilarities of all adjacent pairs in the solution.
    """
    if lr.shape != tb.shape or lr.dim() != 3 or lr.shape[1] != lr.shape[2] or lr.shape[1] != rows * cols:
        raise ValueError(f"lr and tb must both be [B, {rows * cols}, {rows * cols}] for a {rows}x{cols} grid, got "
                         f"{tuple(lr.shape)} and {tuple(tb.shape)}")
    B, N, _ = lr.shape
    if N == 1:
        return torch.zeros(B, 1, dtype=torch.int64), torch.zeros(B, dtype=torch.float64)
    buddies_lr = normalise_dissimilarity(lr.double(), reduce="max")
    buddies_tb = normalise_dissimilarity(tb.double(), reduce="max")
    lr, tb = normalise_dissimilarity(lr.double()), normalise_dissimilarity(tb.double())
    both = torch.stack([lr, tb])
    finite = torch.isfinite(both)
    cap = 10.0 * float(both[finite].max()) + 1.0 if bool(finite.any()) else 1.0
    lr, tb = lr.clamp(max=cap), tb.clamp(max=cap)
    H, W = 2 * rows - 1, 2 * cols - 1
    K = H * W
    cell_r, cell_c = torch.arange(K) // W, torch.arange(K) % W
    # A block a placed at cell k is the left neighbour of k+1 (adds lr[a, :] to that cell's scores), the right
    # neighbour of k-1 (adds lr[:, a]), the top neighbour of k+W (adds tb[a, :]) and the bottom one of k-W (tb[:, a]).
    updates = ((0, 1, lr, False), (0, -1, lr, True), (1, 0, tb, False), (-1, 0, tb, True))
    score_sum = torch.zeros(B, K, N, dtype=torch.float64)
    count = torch.zeros(B, K, dtype=torch.float64)
    cell_block = torch.full((B, K), -1, dtype=torch.int64)
    free = torch.ones(B, N, dtype=torch.bool)
    r_lo, r_hi = torch.full((B,), H), torch.full((B,), -1)
    c_lo, c_hi = torch.full((B,), W), torch.full((B,), -1)

    def place(batch: torch.Tensor, cells: torch.Tensor, blocks: torch.Tensor) -> None:
        cell_block[batch, cells] = blocks
        free[batch, blocks] = False
        r, c = cell_r[cells], cell_c[cells]
        r_lo[batch], r_hi[batch] = torch.minimum(r_lo[batch], r), torch.maximum(r_hi[batch], r)
        c_lo[batch], c_hi[batch] = torch.minimum(c_lo[batch], c), torch.maximum(c_hi[batch], c)
        for dr, dc, table, transposed in updates:
            nr, nc = r + dr, c + dc
            inside = (nr >= 0) & (nr < H) & (nc >= 0) & (nc < W)
            target = (nr.clamp(0, H - 1) * W + nc.clamp(0, W - 1))
            row = table[batch, :, blocks] if transposed else table[batch, blocks, :]
            score_sum[batch, target] += row * inside[:, None]
            count[batch, target] += inside.double()

    clusters = [_merge_confident_pairs(buddies_lr[b], buddies_tb[b], rows, cols, threshold) for b in range(B)]
    for step in range(max(len(c) for c in clusters)):
        batch = torch.tensor([b for b in range(B) if step < len(clusters[b])], dtype=torch.int64)
        picked = [clusters[b][step] for b in batch.tolist()]
        cells = torch.tensor([(r + rows - 1) * W + c + cols - 1 for _, r, c in picked], dtype=torch.int64)
        place(batch, cells, torch.tensor([block for block, _, _ in picked], dtype=torch.int64))
    everyone = torch.arange(B)
    for _ in range(N - min(len(c) for c in clusters)):
        remaining = free.any(1)
        fits = ((torch.maximum(r_hi[:, None], cell_r) - torch.minimum(r_lo[:, None], cell_r) < rows) &
                (torch.maximum(c_hi[:, None], cell_c) - torch.minimum(c_lo[:, None], cell_c) < cols))
        open_cell = (cell_block < 0) & (count > 0) & fits                     # [B, K]
        score = (score_sum / count.clamp(min=1)[:, :, None]).masked_fill(~free[:, None, :], math.inf)
        best2 = score.topk(2, dim=2, largest=False)
        confidence = torch.nan_to_num(best2.values[..., 1] - best2.values[..., 0], nan=0.0, posinf=cap * 4)
        cells = confidence.masked_fill(~open_cell, -math.inf).argmax(1)
        batch = everyone[remaining]
        place(batch, cells[batch], best2.indices[batch, cells[batch], 0])
    top = r_lo * W + c_lo                                                    # [B]
    offsets = (torch.arange(rows)[:, None] * W + torch.arange(cols)[None, :]).reshape(-1)
    placement = torch.gather(cell_block, 1, top[:, None] + offsets[None, :])
    grid = placement.view(B, rows, cols)
    cost = (torch.gather(lr.flatten(1), 1, (grid[:, :, :-1] * N + grid[:, :, 1:]).flatten(1)).sum(1) +
            torch.gather(tb.flatten(1), 1, (grid[:, :-1, :] * N + grid[:, 1:, :]).flatten(1)).sum(1))
    return placement, cost


def apply_tables(received: torch.Tensor, patch_size: int, src_block: torch.Tensor, src_elem: torch.Tensor,
                 flip: Optional[torch.Tensor], max_value: float) -> torch.Tensor:
    """Apply attacker-estimated tables to ``received`` (uint8 ``[B, C, H, W]``) with the fused patch kernel.

    ``src_block`` is int64 ``[N]`` or ``[B, N]``, ``src_elem`` int64 ``[L]`` (gather convention), ``flip`` bool
    ``[L]`` over *received* value positions (undone before the values move) or None."""
    B, C, H, W = received.shape
    N, L = (H // patch_size) * (W // patch_size), C * patch_size * patch_size
    out_flip = None if flip is None else flip[src_elem].to(torch.uint8)
    tables = make_tables(src_block.contiguous(), src_elem.contiguous(), out_flip, N, L)
    return permute_patches(received.contiguous(), tables, patch_size, max_value)


def solve_block_order(blocks: torch.Tensor, rows: int, cols: int, *, per_sample: bool,
                      method: str = "mgc") -> tuple[torch.Tensor, torch.Tensor]:
    """Reassemble scrambled blocks whose contents are known (or estimated, e.g. decoded by another attack).

    Args:
        blocks: real ``[B, N, C, p, p]`` in received order, ``N = rows * cols``.
        per_sample: each image has its own scramble (one puzzle per image); otherwise every image has the same one:
            the raw dissimilarities are summed over images (evidence adds up; per-image normalisation would let flat
            background blocks dominate) and one puzzle is solved for the whole set.
        method: edge dissimilarity (:func:`edge_dissimilarity`).

    Returns:
        ``(placement, cost)`` as :func:`solve_placement`, int64 ``[B, N]`` and float64 ``[B]``.
    """
    B, N = blocks.shape[:2]
    lr, tb = edge_dissimilarity(blocks, method)
    if per_sample:
        return solve_placement(lr, tb, rows, cols)
    eye = torch.eye(N, dtype=torch.bool)
    shared_lr = lr.masked_fill(eye, 0).sum(0, keepdim=True).masked_fill(eye, math.inf)
    shared_tb = tb.masked_fill(eye, 0).sum(0, keepdim=True).masked_fill(eye, math.inf)
    placement, cost = solve_placement(shared_lr, shared_tb, rows, cols)
    return placement.expand(B, N).contiguous(), cost.expand(B).contiguous()


def jigsaw_attack(received: torch.Tensor, patch_size: int, *, pixel_shuffle: bool, negpos: bool, per_sample: bool,
                  max_value: float = 255.0, method: str = "mgc") -> JigsawResult:
    """The ciphertext-only attack on images encrypted by :func:`~msd_fast.encrypt_patches` (block scrambling on).

    Args:
        received: uint8 ``[B, C, H, W]``: what the server holds (a shard's images), in shard order.
        patch_size: the block size ``p`` (public: it is the ViT's patch size, stored in the shard).
        pixel_shuffle, negpos, per_sample: the public encryption options from the shard metadata.
        max_value: the negative-positive maximum (255 for uint8 shards).
        method: edge dissimilarity, ``"mgc"`` or ``"ssd"`` (see :func:`edge_dissimilarity`).

    Returns:
        :class:`JigsawResult` (the reassembly is up to a symmetry of the image grid when ``pixel_shuffle``, and up to a
        global polarity when ``negpos``).
    """
    received = check_images(received, "received", patch_size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    B, C, H, W = received.shape
    p = patch_size
    rows, cols = H // p, W // p
    N, L = rows * cols, C * p * p
    identity_blocks = torch.arange(N)
    flip = None
    if negpos:
        flip = estimate_negpos_mask(image_to_blocks(received, p).reshape(B * N, L))
    value_order = torch.arange(L)
    if pixel_shuffle:
        unflipped = received if flip is None else apply_tables(received, p, identity_blocks, value_order, flip,
                                                               max_value)
        value_order = estimate_value_order(image_to_blocks(unflipped, p).reshape(B * N, L), C, p)
    unshuffled = apply_tables(received, p, identity_blocks, value_order, flip, max_value)
    blocks = image_to_blocks(unshuffled, p).reshape(B, N, C, p, p)
    placement, cost = solve_block_order(blocks, rows, cols, per_sample=per_sample, method=method)
    reconstruction = apply_tables(unshuffled, p, placement, torch.arange(L), None, max_value)
    return JigsawResult(placement=placement, value_order=value_order, flip=flip, reconstruction=reconstruction,
                        cost=cost)


def invert_polarity(images: torch.Tensor, max_value: float = 255.0) -> torch.Tensor:
    """Every value through the negative-positive map ``v -> max_value - v`` (uint8 modulo 256): the other polarity
    of a reassembly whose negative-positive mask was recovered up to its complement."""
    return negpos_reference(images, max_value)
