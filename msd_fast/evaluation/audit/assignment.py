"""Batched one-to-one assignment (the attacks' matching step): greedy, then pairwise-swap improvement.

The attacks match blocks to blocks, pixel positions to pixel positions and tokens to positions. An exact
Hungarian solver is not needed for the audit's conclusions (true matches usually have a clear margin), and this one
runs batched in PyTorch with no extra dependency: greedy on the globally smallest remaining cost, then 2-opt swaps
``(i -> a, j -> b)  =>  (i -> b, j -> a)`` while any swap lowers the total cost.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

SMALL_PROBLEM = 1 << 20  # elements below which a loop of tensor ops runs on one thread


@contextlib.contextmanager
def single_thread(active: bool = True) -> Iterator[None]:
    """Run a Python loop of many small tensor ops on one intra-op thread (restored afterwards). Such loops spend
    their time in thread hand-offs otherwise -- 100x slower on a busy 2-core machine (measured: 1000 ``minimum`` of
    256x256 took 5.7 s on 2 threads under load, 0.03 s on one)."""
    previous = torch.get_num_threads()
    if active and previous > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if active and previous > 1:
            torch.set_num_threads(previous)


def assign(cost: torch.Tensor, *, refine: bool = True, max_swaps: int | None = None) -> torch.Tensor:
    """One-to-one assignment of rows to columns minimising the total cost, per batch item.

    Args:
        cost: float ``[B, n, n]`` (or ``[n, n]``); ``inf`` forbids a pair (a row whose entries are all ``inf`` still
            gets some free column).
        refine: improve the greedy assignment by pairwise swaps until none lowers the cost.
        max_swaps: cap on swap rounds (default ``4 n``); each round applies every improving swap whose two rows
            pick each other as best partner (disjoint pairs), or else the single best swap.

    Returns:
        int64 ``[B, n]`` (or ``[n]``): ``result[b, i]`` is the column given to row ``i``; every row of the result is a
        permutation of ``0..n-1``.
    """
    if not isinstance(cost, torch.Tensor) or cost.dim() not in (2, 3) or cost.shape[-1] != cost.shape[-2]:
        raise ValueError("cost must be a square [n, n] or [B, n, n] tensor, got "
                         f"{tuple(cost.shape) if isinstance(cost, torch.Tensor) else type(cost).__name__}")
    if not cost.dtype.is_floating_point:
        raise TypeError(f"cost must be a floating-point tensor, got {cost.dtype}")
    with single_thread(cost.numel() < SMALL_PROBLEM):
        return _assign(cost, refine, max_swaps)


def _assign(cost: torch.Tensor, refine: bool, max_swaps: int | None) -> torch.Tensor:
    single = cost.dim() == 2
    c = cost[None] if single else cost
    B, n, _ = c.shape
    c = c.double()
    finite_max = c[torch.isfinite(c)].abs().max() if torch.isfinite(c).any() else torch.tensor(0.0, dtype=c.dtype)
    big = float(finite_max) * 4 * n + 1.0  # a forbidden pair costs more than any finite assignment
    c = torch.where(torch.isfinite(c), c, torch.full_like(c, big))

    rows = torch.arange(B)
    result = torch.full((B, n), -1, dtype=torch.int64)
    work = c.clone()
    for _ in range(n):
        flat = work.view(B, n * n).argmin(1)
        i, j = flat // n, flat % n
        result[rows, i] = j
        work[rows, i, :] = float("inf")
        work[rows, :, j] = float("inf")
    if refine:
        result = _swap_refine(c, result, max_swaps if max_swaps is not None else 4 * n)
    return result[0] if single else result


def _swap_refine(cost: torch.Tensor, result: torch.Tensor, max_rounds: int) -> torch.Tensor:
    B, n, _ = cost.shape
    rows = torch.arange(n)
    for _ in range(max_rounds):
        current = torch.gather(cost, 2, result[:, :, None])[:, :, 0]            # [B, n]: cost[i, a_i]
        crossed = torch.gather(cost, 2, result[:, None, :].expand(B, n, n))    # [B, n, n]: cost[i, a_j]
        delta = crossed + crossed.transpose(1, 2) - current[:, :, None] - current[:, None, :]
        tolerance = 1e-9 * (1.0 + current.abs().sum(1))[:, None]
        best = delta.min(2)
        partner = best.indices                                                 # [B, n]: each row's best swap
        # Apply every improving swap whose two rows choose each other (disjoint pairs), all at once.
        mutual = (torch.gather(partner, 1, partner) == rows) & (best.values < -tolerance) & (partner > rows)
        if not bool(mutual.any()):
            flat = delta.view(B, n * n).min(1)
            mutual = torch.zeros(B, n, dtype=torch.bool)
            improving = flat.values < -tolerance[:, 0]
            if not bool(improving.any()):
                break
            first, second = flat.indices // n, flat.indices % n
            partner = partner.clone()
            b = torch.arange(B)[improving]
            partner[b, first[improving]] = second[improving]
            mutual[b, first[improving]] = True
        b, i = mutual.nonzero(as_tuple=True)
        j = partner[b, i]
        ai, aj = result[b, i].clone(), result[b, j].clone()
        result[b, i], result[b, j] = aj, ai
    return result
