"""The argument checks, in one place. Each raises a clear exception that names the argument (or the flag):

* values -- :func:`is_positive_int`, :func:`check_positive_int`, :func:`check_max_value`, and :func:`require`, the
  one way a settings dataclass refuses a value, naming its flag;
* tensors, at the ops' public boundary -- :func:`check_tensor`, :func:`check_dim`, :func:`check_dtype`,
  :func:`check_same_device`;
* devices, before any command works -- :func:`resolve_device`, :func:`check_command` (``--out`` is
  :mod:`msd_fast.cli.paths`'s).

Inner layers trust what these checked at the boundary and do not check again.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- values ----------------------------------------------------------------------------------------------------------

def is_positive_int(value: Any) -> bool:
    """An ``int`` >= 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_positive_int(value: object, name: str) -> int:
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_max_value(value: object, name: str = "max_value") -> float:
    """The negative-positive maximum: a positive finite number (inf or NaN would make decryption give NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def require(config: Any, name: str, valid: Callable[[Any], bool], requirement: str) -> None:
    """A ``ValueError`` ``--name must be <requirement>, got <value>`` unless ``valid(config.name)`` (comparisons
    with NaN are false: NaN never passes)."""
    value = getattr(config, name)
    if not valid(value):
        raise ValueError(f"--{name.replace('_', '-')} must be {requirement}, got {value}")


# ---- tensors ---------------------------------------------------------------------------------------------------------

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


def check_same_device(tensor: torch.Tensor, reference: torch.Tensor, name: str, reference_name: str) -> None:
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device} but {reference_name} is on {reference.device}")


# ---- devices ---------------------------------------------------------------------------------------------------------

def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """``auto`` (a GPU when one is visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a device that exists
    here; anything else is a ``ValueError`` naming ``flag``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag}: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {name}: no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def check_command(config: Any) -> None:
    """The checks every command shares: its ``--device`` (when it has one) exists here."""
    if isinstance(getattr(config, "device", None), str):
        resolve_device(config.device)
