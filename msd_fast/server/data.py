"""The server's view of the uploaded data: several shards as one indexable dataset, and epoch batch plans."""
from __future__ import annotations

import numpy as np
import torch

from ..protocol.shard_sets import ConcatenatedShards

_STATS_SAMPLE = 2048
_STATS_CHUNK = 64  # items read at a time by the statistics pass


class ShardDataset(ConcatenatedShards):
    """The items of compatible shards (files, or every part of a shard-set folder), concatenated: ``len()``,
    ``take(indices) -> tensor [b, *item_shape]``, read lazily (only the rows asked for; see
    :class:`~msd_fast.protocol.shard_sets.ConcatenatedShards`), so the server's memory does not grow with the data.

    ``metadata`` is the common geometry (the first shard's metadata); ``count`` per shard is in ``sizes``.
    """

    def shard_of(self, index: int) -> int:
        return int(self.locate([index])[0][0])

    def input_stats(self) -> tuple[float, float]:
        """Scalar mean and std over a fixed, evenly spaced sample of items: the server's input standardisation
        (computed from the encrypted data itself, so it needs no key and is identical on every process). Streams the
        sample in chunks of ``_STATS_CHUNK`` items (two passes, float64: mean, then squared deviations), so its
        memory is a few items whatever their size."""
        picks = torch.linspace(0, len(self) - 1, min(len(self), _STATS_SAMPLE)).round().long().unique()
        chunks = picks.split(_STATS_CHUNK)
        n = picks.numel() * int(np.prod(self.metadata.item_shape))
        mean = sum(float(self.take(chunk).double().sum()) for chunk in chunks) / n
        squares = sum(float((self.take(chunk).double() - mean).square().sum()) for chunk in chunks)
        std = (squares / max(n - 1, 1)) ** 0.5
        return mean, max(std, 1e-6)


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
