"""Communication accounting from actual payloads: the bytes a client sends and receives, and the rounds."""
from __future__ import annotations

import dataclasses
import os

import torch
from safetensors.torch import save as safetensors_bytes


@dataclasses.dataclass(frozen=True)
class Communication:
    """Per-client traffic of one method: bytes uploaded and downloaded, and communication rounds."""

    upload_bytes: int
    download_bytes: int
    rounds: int

    @property
    def total_bytes(self) -> int:
        return self.upload_bytes + self.download_bytes


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Size of the model's weights as sent over the wire (a safetensors serialisation of the state dict)."""
    return tensors_bytes(model.state_dict())


def tensors_bytes(tensors: dict) -> int:
    """Size of named tensors as sent over the wire (their safetensors serialisation)."""
    return len(safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def file_bytes(path: str) -> int:
    return os.path.getsize(path)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
