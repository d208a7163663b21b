"""The server's view of the uploaded data: several shards as one indexable dataset, and epoch batch plans."""
from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np
import torch

from ..protocol.shards import Shard, ShardMetadata, open_shards

_STATS_SAMPLE = 2048


class ShardDataset:
    """The items of compatible shards, concatenated: ``len()``, ``take(indices) -> tensor [b, *item_shape]``.

    ``metadata`` is the common geometry (the first shard's metadata); ``count`` per shard is in ``sizes``.
    """

    def __init__(self, shards: Sequence[Shard], metadata: ShardMetadata):
        self.shards, self.metadata = list(shards), metadata
        self.sizes = [len(s) for s in self.shards]
        self._starts = np.cumsum([0] + self.sizes).tolist()

    @classmethod
    def open(cls, paths: Sequence[str], *, verify: bool = True) -> "ShardDataset":
        """Open and verify shard files; raises ``ShardError`` on corrupt or mismatched shards."""
        shards, metadata = open_shards(paths, verify=verify)
        return cls(shards, metadata)

    def __len__(self) -> int:
        return self._starts[-1]

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """Items at global ``indices`` (int64 ``[b]``), in that order, as one tensor."""
        indices = indices.tolist()
        parts, order = [], []
        for shard_id, shard in enumerate(self.shards):
            lo, hi = self._starts[shard_id], self._starts[shard_id + 1]
            mine = [(pos, i - lo) for pos, i in enumerate(indices) if lo <= i < hi]
            if mine:
                order += [pos for pos, _ in mine]
                parts.append(shard[[row for _, row in mine]])
        if len(order) != len(indices):
            raise IndexError(f"dataset indices must be in [0, {len(self)})")
        batch = torch.cat(parts)
        return batch[torch.argsort(torch.tensor(order))]

    def shard_of(self, index: int) -> int:
        return bisect.bisect_right(self._starts, index) - 1

    def input_stats(self) -> tuple[float, float]:
        """Scalar mean and std over a fixed, evenly spaced sample of items: the server's input standardisation
        (computed from the encrypted data itself, so it needs no key and is identical on every process)."""
        picks = torch.linspace(0, len(self) - 1, min(len(self), _STATS_SAMPLE)).round().long().unique()
        values = self.take(picks).double()
        return float(values.mean()), float(values.std().clamp_min(1e-6))


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    """Global steps in one epoch (the remainder is dropped); ``ValueError`` if not even one batch fits."""
    if n_items < batch_size:
        raise ValueError(f"the shards hold {n_items} items, fewer than one global batch of {batch_size}; "
                         f"lower --batch-size")
    return n_items // batch_size


def epoch_batches(n_items: int, batch_size: int, epoch: int, seed: int) -> torch.Tensor:
    """The global batches of one epoch: int64 ``[steps, batch_size]``, a seeded shuffle with the remainder dropped
    (as DINO's ``drop_last``); the same on every process and on resume."""
    steps = steps_per_epoch(n_items, batch_size)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_items, generator=generator)
    return order[:steps * batch_size].view(steps, batch_size)
