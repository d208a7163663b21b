"""Process-group setup for ``torchrun`` (NCCL on GPUs, gloo on CPU) and the few collectives the trainer needs."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> ProcessInfo:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` and pick this process's device:
    ``cuda:LOCAL_RANK`` when CUDA is available and ``device`` is auto/cuda, else the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: CUDA is not available here (use --device cpu or auto)")
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return ProcessInfo(rank=rank, world_size=dist.get_world_size() if dist.is_initialized() else 1, device=chosen)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_floats(value: float, info: ProcessInfo) -> list[float]:
    """``value`` of every process, in rank order (just ``[value]`` without a process group)."""
    if not info.distributed:
        return [value]
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    gathered = [torch.zeros_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(gathered, tensor)
    return [float(t) for t in gathered]
