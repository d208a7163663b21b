"""Index splits: simulated clients (IID or Dirichlet non-IID), stratified train/test, stratified label fractions.

Every function returns sorted int64 index tensors (sorted so that lazy datasets read files in order) and is
reproducible: the same arguments and ``seed`` give the same indices (numpy ``Generator(PCG64(seed))``).

Patient-level splits: :func:`train_test_split` and :func:`split_clients` take ``groups`` (one string per image,
e.g. :attr:`ImageSet.groups <msd_fast.data.ImageSet.groups>`, the patients). Whole groups are then assigned, so no
patient has images on both sides; stratification is by each group's most frequent label, as far as whole groups
allow.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

LabelsOrCount = Union[torch.Tensor, np.ndarray, list, int]


def _labels_array(labels, name: str = "labels") -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    values = np.asarray(labels)
    if values.ndim != 1 or (values.size and (not np.issubdtype(values.dtype, np.integer) or values.min() < 0)):
        raise ValueError(f"{name} must be a 1-D array of integers >= 0, got dtype {values.dtype} and shape "
                         f"{values.shape}")
    if values.size == 0:
        raise ValueError(f"{name} is empty")
    return values.astype(np.int64)


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return np.random.Generator(np.random.PCG64(int(seed)))


def _sorted_tensor(indices) -> torch.Tensor:
    return torch.from_numpy(np.sort(np.asarray(indices, dtype=np.int64)))


class _Groups:
    """Images grouped: ``members[g]`` (image positions), ``sizes[g]`` and ``labels[g]`` (the group's most frequent
    label, the smallest on ties) for groups in first-appearance order."""

    def __init__(self, groups, labels: np.ndarray):
        values = np.asarray(groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else groups)
        if values.ndim != 1 or len(values) != len(labels):
            raise ValueError(f"groups must be 1-D with one entry per image ({len(labels)}), got shape {values.shape}")
        _, first, inverse = np.unique(values.astype(str), return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # group ids in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        ids = rank[inverse.reshape(-1)]
        by_group = np.argsort(ids, kind="stable")  # image positions, group by group, ascending within each
        self.members = np.split(by_group, np.cumsum(np.bincount(ids, minlength=len(order)))[:-1])
        self.sizes = np.array([len(m) for m in self.members], dtype=np.int64)
        self.labels = np.array([np.bincount(labels[m]).argmax() for m in self.members], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.members)

    def images(self, chosen) -> np.ndarray:
        return np.concatenate([self.members[g] for g in chosen]) if len(chosen) else np.zeros(0, dtype=np.int64)


def split_clients(labels_or_n: LabelsOrCount, n_clients: int, *, alpha: Optional[float] = None,
                  seed: int = 0, groups=None) -> list[torch.Tensor]:
    """Partition a dataset among ``n_clients`` simulated clients.

    Args:
        labels_or_n: the labels (1-D integers) or, for an IID split only, the number of images.
        n_clients: number of clients (<= number of images).
        alpha: None for IID (a random permutation cut into near-equal parts, sizes differ by at most one), or the
            Dirichlet concentration for non-IID: for every class, the shares of the clients are drawn from
            ``Dirichlet(alpha, ..., alpha)`` and the class's images (shuffled) are cut accordingly (Hsu et al. 2019).
            Small alpha (0.1) gives clients dominated by few classes; large alpha (100) approaches IID.
        seed: the random seed.
        groups: optional ``[n]`` strings (e.g. patient IDs): every group goes to one client. IID: the shuffled
            groups are dealt, largest first, to the client with the fewest images; Dirichlet: each class's groups
            (by their most frequent label) are cut by the drawn shares of their images.

    Returns:
        ``n_clients`` sorted int64 tensors; every image is in exactly one; none is empty (a client the Dirichlet
        draw leaves empty receives one image -- with ``groups``, one group -- from the largest client). Raises
        ``ValueError`` if there are fewer images (groups) than clients.
    """
    n_clients = _count(n_clients, "n_clients")
    if isinstance(labels_or_n, (int, np.integer)) and not isinstance(labels_or_n, bool):
        if alpha is not None:
            raise ValueError("a Dirichlet (non-IID) split needs the labels, not only the number of images")
        n, labels = _count(labels_or_n, "labels_or_n"), None
    else:
        labels = _labels_array(labels_or_n, "labels_or_n")
        n = len(labels)
    if n < n_clients:
        raise ValueError(f"cannot give {n_clients} clients at least one image each from {n} images")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not (0 < alpha < math.inf)):
        raise ValueError(f"alpha must be a positive finite number (or None for IID), got {alpha!r}")
    if groups is not None:
        return _split_groups_among_clients(_Groups(groups, np.zeros(n, np.int64) if labels is None else labels),
                                           n_clients, alpha, _rng(seed))
    rng = _rng(seed)
    if alpha is None:
        return [_sorted_tensor(part) for part in np.array_split(rng.permutation(n), n_clients)]
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(n_clients, float(alpha)))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, piece in enumerate(np.split(members, cuts)):
            parts[client].extend(piece.tolist())
    for client in range(n_clients):
        if not parts[client]:
            donor = max(range(n_clients), key=lambda c: len(parts[c]))
            parts[client].append(parts[donor].pop())
    return [_sorted_tensor(part) for part in parts]


def _split_groups_among_clients(grouped: _Groups, n_clients: int, alpha: Optional[float],
                                rng: np.random.Generator) -> list[torch.Tensor]:
    """:func:`split_clients` over whole groups (see its docstring)."""
    if len(grouped) < n_clients:
        raise ValueError(f"cannot give {n_clients} clients at least one group (patient) each from {len(grouped)} "
                         "groups")
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    if alpha is None:
        loads = np.zeros(n_clients, dtype=np.int64)
        shuffled = rng.permutation(len(grouped))
        for g in shuffled[np.argsort(-grouped.sizes[shuffled], kind="stable")]:
            client = int(np.argmin(loads))
            parts[client].append(int(g))
            loads[client] += grouped.sizes[g]
    else:
        for cls in np.unique(grouped.labels):
            members = rng.permutation(np.flatnonzero(grouped.labels == cls))
            shares = rng.dirichlet(np.full(n_clients, float(alpha)))
            ends = np.cumsum(grouped.sizes[members])  # images up to and including each group
            client_of = np.searchsorted(np.cumsum(shares)[:-1] * ends[-1], ends - grouped.sizes[members] / 2)
            for g, client in zip(members, client_of):
                parts[int(client)].append(int(g))
        for client in range(n_clients):
            if not parts[client]:
                donor = max(range(n_clients), key=lambda c: len(parts[c]))
                parts[client].append(parts[donor].pop())
    return [_sorted_tensor(grouped.images(part)) for part in parts]


def _largest_remainder(counts: np.ndarray, fraction: float, total: int) -> np.ndarray:
    """Integers ``k_c <= counts_c`` summing to ``total`` and proportional to ``fraction * counts`` (Hamilton)."""
    exact = counts * fraction
    taken = np.minimum(np.floor(exact).astype(np.int64), counts)
    order = np.argsort(-(exact - taken), kind="stable")
    for c in order:
        if taken.sum() >= total:
            break
        if taken[c] < counts[c]:
            taken[c] += 1
    return taken


def train_test_split(labels: LabelsOrCount, test_fraction: float, seed: int = 0, *,
                     groups=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split into ``(train, test)`` sorted index tensors.

    ``labels`` are 1-D integers (or an int ``n`` for an unstratified split). ``round(test_fraction * n)`` images go
    to the test split, shared among classes by largest remainder, so every class keeps its proportion (up to
    rounding). Raises ``ValueError`` unless both splits get at least one image.

    With ``groups`` (``[n]`` strings, e.g. patient IDs) whole groups are assigned: for every class (of the groups'
    most frequent labels) the shuffled groups are added to the test split while that brings its image count closer
    to the class's share; both splits get at least one group (``ValueError`` with fewer than two groups).
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    labels = (np.zeros(_count(labels, "labels"), dtype=np.int64)
              if isinstance(labels, (int, np.integer)) and not isinstance(labels, bool) else _labels_array(labels))
    n = len(labels)
    total = int(round(test_fraction * n))
    if not 0 < total < n:
        raise ValueError(f"test_fraction={test_fraction} of {n} images leaves an empty split")
    rng = _rng(seed)
    if groups is not None:
        test = _grouped_test_rows(_Groups(groups, labels), test_fraction, total, rng)
    else:
        classes, counts = np.unique(labels, return_counts=True)
        test = []
        for cls, k in zip(classes, _largest_remainder(counts, test_fraction, total)):
            test.extend(rng.permutation(np.flatnonzero(labels == cls))[:k].tolist())
    mask = np.zeros(n, dtype=bool)
    mask[test] = True
    return _sorted_tensor(np.flatnonzero(~mask)), _sorted_tensor(np.flatnonzero(mask))


def _grouped_test_rows(grouped: _Groups, test_fraction: float, total: int, rng: np.random.Generator) -> np.ndarray:
    """The test images of a grouped :func:`train_test_split` (see its docstring)."""
    if len(grouped) < 2:
        raise ValueError(f"a patient-level split needs at least two groups (patients); all {grouped.sizes.sum()} "
                         "images belong to one")
    classes = np.unique(grouped.labels)
    counts = np.array([grouped.sizes[grouped.labels == c].sum() for c in classes])
    targets = _largest_remainder(counts, test_fraction, total)
    chosen = np.zeros(len(grouped), dtype=bool)
    for cls, target in zip(classes, targets):
        taken = 0
        for g in rng.permutation(np.flatnonzero(grouped.labels == cls)):
            if abs(taken + grouped.sizes[g] - target) < abs(taken - target):
                chosen[g], taken = True, taken + grouped.sizes[g]
    if not chosen.any():  # every group is larger than the test share: the smallest one is the test split
        chosen[int(np.argmin(grouped.sizes))] = True
    if chosen.all():
        chosen[int(np.argmax(grouped.sizes))] = False
    return grouped.images(np.flatnonzero(chosen))


def label_fraction_subset(labels: LabelsOrCount, fraction: float, seed: int = 0) -> torch.Tensor:
    """A stratified subset of about ``fraction`` of the images with at least one image of every class present
    (for few-label fine-tuning): sorted int64 indices. ``fraction`` in (0, 1]; 1 returns every index."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    labels = _labels_array(labels)
    classes, counts = np.unique(labels, return_counts=True)
    per_class = np.maximum(_largest_remainder(counts, fraction, int(round(fraction * len(labels)))), 1)
    rng = _rng(seed)
    chosen = []
    for cls, k in zip(classes, per_class):
        chosen.extend(rng.permutation(np.flatnonzero(labels == cls))[:k].tolist())
    return _sorted_tensor(chosen)


__all__ = ["label_fraction_subset", "split_clients", "train_test_split"]
