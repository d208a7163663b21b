"""The masked views of one training step, named by group: the teacher sees the global views, the student all."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..ops.masked_gather import mark_index_range, sample_views
from .config import PretrainConfig
from .seeds import SEED_VIEWS, derived_seed


@dataclasses.dataclass(frozen=True)
class Views:
    """Token indices of one step's views, int64 ``[V, B, K]`` per group (``K`` kept tokens of ``N``):
    ``global_views`` (``V = global_views`` of the config, large ``K``) and ``local_views`` (small ``K``; ``None``
    without local views)."""

    global_views: torch.Tensor
    local_views: Optional[torch.Tensor] = None

    @property
    def all(self) -> list[torch.Tensor]:
        """Every group, global first: the student's input (``DINOLoss`` counts views in this order)."""
        return [self.global_views] + ([] if self.local_views is None else [self.local_views])

    def select(self, first: int, count: int, device: torch.device, num_tokens: int) -> "Views":
        """Items ``[first, first + count)`` of every group, on ``device``, marked as in range for ``masked_gather``
        (they are by construction: this spares its index-range check, a device sync per call on GPUs). The copy to
        a GPU does not block: from pageable memory CUDA stages it before returning, so no stream synchronisation
        waits for the previous step's work."""
        def part(idx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if idx is None:
                return None
            return mark_index_range(idx[:, first:first + count].to(device, non_blocking=True), num_tokens)

        return Views(part(self.global_views), part(self.local_views))


def sample_view_groups(config: PretrainConfig, batch_size: int, num_tokens: int,
                       generator: torch.Generator) -> Views:
    """The masked views of a batch of ``batch_size`` items over ``num_tokens`` tokens (on the CPU; global views
    first, then local ones, from ``generator``)."""
    global_views = sample_views(batch_size, num_tokens, config.global_views, config.global_keep, generator=generator)
    local_views = (sample_views(batch_size, num_tokens, config.local_views, config.local_keep, generator=generator)
                   if config.local_views else None)
    return Views(global_views, local_views)


def draw_views(config: PretrainConfig, num_tokens: int, step: int, first: int, count: int,
               device: torch.device) -> Views:
    """The views of items ``[first, first + count)`` of step ``step``'s global batch, on ``device``. Every process
    draws the whole global batch's views (seeded by ``(seed, step)``) and keeps its slice, so the split into processes
    does not change them."""
    generator = torch.Generator().manual_seed(derived_seed(config.seed, SEED_VIEWS, step))
    return sample_view_groups(config, config.batch_size, num_tokens, generator).select(first, count, device,
                                                                                       num_tokens)
