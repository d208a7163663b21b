"""Recover a 2-D grid layout from pairwise similarities alone (an attack step shared by the pixel and token attacks).

Pixels of natural and medical images are correlated, and the correlation falls off with distance. So given only the
correlation matrix of ``M`` anonymous items (the shuffled value positions of a block, or the clusters of tokens that
share a position), an attacker can lay them out on their ``rows x cols`` grid:

1. turn correlations into distances ``sqrt(2 - 2 r)`` and keep each item's nearest neighbours (a k-NN graph; a few
   k are tried and the best final layout kept);
2. geodesic distances on that graph (Floyd-Warshall) and classical multidimensional scaling to 2-D (Isomap), which
   unrolls the grid up to a rotation and reflection;
3. sweep the rotation, snap the points to the grid by rank (rows by one coordinate, then columns by the other) and
   keep the angle whose layout has the largest total correlation between grid neighbours;
4. fit an affine map from the 2-D points to the snapped cells and reassign points to the nearest cells (one-to-one),
   which straightens bent rows;
5. improve that layout by pairwise swaps while the total neighbour correlation grows.

The answer is defined only up to the symmetries of the grid (:data:`~msd_fast.evaluation.audit.metrics.DIHEDRAL`).
``capacity > 1`` places ``capacity`` items per cell (e.g. the C channels of one pixel).
"""
from __future__ import annotations

import math

import torch

from ...checks import check_positive_int
from .assignment import assign, single_thread


def grid_adjacency(rows: int, cols: int) -> torch.Tensor:
    """bool ``[rows*cols, rows*cols]``: True for 4-neighbour cells (row-major cell indices)."""
    r = torch.arange(rows * cols) // cols
    c = torch.arange(rows * cols) % cols
    return ((r[:, None] - r[None, :]).abs() + (c[:, None] - c[None, :]).abs()) == 1


def _correlation(similarity: torch.Tensor) -> torch.Tensor:
    s = similarity.double()
    s = (s + s.T) / 2
    d = s.diagonal().clamp(min=1e-12).sqrt()
    return (s / d[:, None] / d[None, :]).clamp(-1.0, 1.0)


def _isomap_2d(corr: torch.Tensor, neighbours: int) -> torch.Tensor:
    M = corr.shape[0]
    dist = (2.0 - 2.0 * corr).clamp(min=0).sqrt()
    k = min(neighbours, M - 1)
    graph = torch.full_like(dist, math.inf)
    nearest = dist.masked_fill(torch.eye(M, dtype=torch.bool), math.inf).topk(k, dim=1, largest=False).indices
    rows = torch.arange(M)[:, None].expand(M, k)
    graph[rows, nearest] = dist[rows, nearest]
    graph = torch.minimum(graph, graph.T).float()  # float32 path lengths are plenty for a layout
    graph.fill_diagonal_(0.0)
    step = torch.empty_like(graph)
    for via in range(M):  # Floyd-Warshall, one vectorised relaxation per intermediate node
        torch.add(graph[:, via, None], graph[None, via, :], out=step)
        torch.minimum(graph, step, out=graph)
    graph = graph.double()
    finite = torch.isfinite(graph)
    if not bool(finite.all()):  # a disconnected graph: place the components far apart rather than fail
        graph = torch.where(finite, graph, graph[finite].max() * 2.0)
    sq = graph**2
    centred = sq - sq.mean(0, keepdim=True) - sq.mean(1, keepdim=True) + sq.mean()
    values, vectors = torch.linalg.eigh(-0.5 * centred)
    return vectors[:, -2:] * values[-2:].clamp(min=0).sqrt()


def _snap(coords: torch.Tensor, rows: int, cols: int, capacity: int) -> torch.Tensor:
    """Rank-snap 2-D points ``[A, M, 2]`` (per angle) to cells: int64 ``[A, M]`` cell of each item."""
    A, M, _ = coords.shape
    by_row = coords[:, :, 1].argsort(dim=1, stable=True)                    # items sorted by y
    row_of_rank = torch.arange(M) // (cols * capacity)
    x_sorted = torch.gather(coords[:, :, 0], 1, by_row).view(A, rows, cols * capacity)
    within = x_sorted.argsort(dim=2, stable=True).argsort(dim=2, stable=True).view(A, M)  # rank by x inside a row
    cell_of_rank = row_of_rank[None, :] * cols + within // capacity
    cells = torch.empty_like(cell_of_rank)
    cells.scatter_(1, by_row, cell_of_rank)
    return cells


def layout_score(corr: torch.Tensor, cells: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """Total correlation between items in neighbouring cells: float64 ``[A]`` for cells ``[A, M]``."""
    neighbours = adjacency[cells[:, :, None], cells[:, None, :]]  # [A, M, M]
    return (neighbours * corr[None]).sum((1, 2)) / 2


def recover_grid_layout(similarity: torch.Tensor, rows: int, cols: int, *, capacity: int = 1,
                        neighbours: int | None = None, angles: int = 180, max_swaps: int | None = None) -> torch.Tensor:
    """Lay out ``M = rows * cols * capacity`` items on a grid from their similarities.

    Args:
        similarity: float ``[M, M]``, a covariance or correlation matrix (larger = closer).
        rows, cols: the grid.
        capacity: items per cell.
        neighbours: k of the k-NN graph; by default ``(8, 12, 16, 24) * capacity`` are tried and the layout with
            the largest neighbour correlation (before swaps) is kept.
        angles: rotations tried in the sweep over 180 degrees.
        max_swaps: cap on improving swaps (default ``20 * M``).

    Returns:
        int64 ``[M]``: the row-major cell of each item (each cell used ``capacity`` times).
    """
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError("similarity must be a square [M, M] tensor")
    for name, value in (("rows", rows), ("cols", cols), ("capacity", capacity)):
        check_positive_int(value, name)
    M = similarity.shape[0]
    if M != rows * cols * capacity:
        raise ValueError(f"similarity is {M}x{M} but rows * cols * capacity = {rows * cols * capacity}")
    with single_thread():
        return _recover(similarity, rows, cols, capacity, neighbours, angles, max_swaps)


def _recover(similarity: torch.Tensor, rows: int, cols: int, capacity: int, neighbours: int | None, angles: int,
             max_swaps: int | None) -> torch.Tensor:
    M = similarity.shape[0]
    adjacency = grid_adjacency(rows, cols).double()
    if M == capacity:
        return torch.zeros(M, dtype=torch.int64)
    corr = _correlation(similarity)
    corr_off = corr.masked_fill(torch.eye(M, dtype=torch.bool), 0.0)
    theta = torch.arange(angles, dtype=torch.float64) * (math.pi / angles)
    rotation = torch.stack([torch.stack([theta.cos(), -theta.sin()], -1), torch.stack([theta.sin(), theta.cos()], -1)],
                           -2)                                                  # [A, 2, 2]
    best, best_score = None, -math.inf
    tries = (neighbours,) if neighbours is not None else tuple(k * capacity for k in (8, 12, 16, 24))
    for k in dict.fromkeys(min(k, M - 1) for k in tries):
        coords = _isomap_2d(corr, k)
        candidates = _snap(torch.einsum("mk,akl->aml", coords, rotation), rows, cols, capacity)
        cells = _affine_snap(coords, candidates[layout_score(corr_off, candidates, adjacency).argmax()].clone(),
                             rows, cols, capacity)
        score = float(layout_score(corr_off, cells[None], adjacency)[0])
        if score > best_score:
            best, best_score = cells, score
    return _swap_improve(corr_off, best, adjacency, max_swaps if max_swaps is not None else 20 * M)


def _affine_snap(coords: torch.Tensor, cells: torch.Tensor, rows: int, cols: int, capacity: int,
                 iterations: int = 10) -> torch.Tensor:
    """Fit an affine map from the embedding to the current cells' centres, then reassign items to the nearest free
    cell slots (one-to-one); repeat until stable. Fixes rank-snapping errors where the embedding's rows bend."""
    centres = torch.stack([torch.arange(rows * cols) % cols, torch.arange(rows * cols) // cols], -1).double()
    slots = centres.repeat_interleave(capacity, 0)                      # [M, 2]: each cell `capacity` times
    design = torch.cat([coords, torch.ones(coords.shape[0], 1, dtype=coords.dtype)], 1)
    for _ in range(iterations):
        fitted = design @ torch.linalg.lstsq(design, centres[cells]).solution
        new = assign(((fitted[:, None, :] - slots[None]) ** 2).sum(-1)) // capacity
        if torch.equal(new, cells):
            break
        cells = new
    return cells


def _swap_improve(corr: torch.Tensor, cells: torch.Tensor, adjacency: torch.Tensor, max_swaps: int) -> torch.Tensor:
    M = corr.shape[0]
    beside = adjacency[cells]                   # [M, K]: is item m's cell next to cell k
    gain_at = corr @ beside                     # [M, K]: correlation of item m with the items around cell k
    self_corr = corr.diagonal()
    for _ in range(max_swaps):
        here = gain_at.gather(1, cells[:, None])[:, 0]             # [M]
        there = gain_at[:, cells]                                  # [M, M]: item a moved to item b's cell
        touching = adjacency[cells[:, None], cells[None, :]]
        delta = there + there.T - here[:, None] - here[None, :] + touching * (
            2 * corr - self_corr[:, None] - self_corr[None, :])
        flat = delta.argmax()
        if float(delta.view(-1)[flat]) <= 1e-12 * (1.0 + float(here.abs().sum())):
            break
        a, b = int(flat) // M, int(flat) % M
        old_a, old_b = beside[a].clone(), beside[b].clone()
        cells[a], cells[b] = cells[b].clone(), cells[a].clone()
        beside[a], beside[b] = old_b, old_a
        gain_at += corr[:, a, None] * (old_b - old_a)[None, :] + corr[:, b, None] * (old_a - old_b)[None, :]
    return cells
