"""Argument checks shared by the ops: each raises a clear exception that names the argument."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_dim(tensor: torch.Tensor, dims: int, name: str, layout: str) -> None:
    if tensor.dim() != dims:
        raise ValueError(f"{name} must be {layout} ({dims}-D), got shape {tuple(tensor.shape)}")


def check_dtype(tensor: torch.Tensor, allowed: tuple, name: str) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(tensor.dtype).replace('torch.', '')}")


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_max_value(value: object, name: str = "max_value") -> float:
    """The negative-positive maximum: a positive finite number (inf or NaN would make decryption give NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_same_device(tensor: torch.Tensor, reference: torch.Tensor, name: str, reference_name: str) -> None:
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device} but {reference_name} is on {reference.device}")
