"""Shared test utilities: which backends can run here, and random inputs of every supported dtype."""
import torch

from msd_fast import backends


def runnable_backends(device: str = "cpu") -> list:
    """Non-reference backends that can run on tensors of ``device`` in this process."""
    status = backends()
    names = []
    for name in ("cpu", "triton", "cuda"):
        if not status[name].available:
            continue
        if device == "cpu" and name == "cuda":
            continue
        if device == "cuda" and name == "cpu":
            continue
        names.append(name)
    return names


def random_images(shape, dtype, device="cpu", generator=None) -> torch.Tensor:
    """Images in the natural range of ``dtype``: uint8 in [0, 255], floats in [0, 1)."""
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(device)
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype).to(device)
