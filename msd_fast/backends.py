"""Which kernel backends exist here, and which one an op call uses.

Four backends implement every op: ``reference`` (pure PyTorch, the ground truth), ``cpu`` (C++17/OpenMP,
``msd_fast._C``), ``triton`` (``msd_fast.kernels``; on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1``) and ``cuda`` (CUDA C++, ``msd_fast._cuda``).

``backend="auto"`` picks ``cpu`` for CPU tensors and the preferred GPU backend for CUDA tensors; the environment
variable ``MSD_FAST_BACKEND`` replaces ``"auto"`` (an explicit ``backend=`` argument still wins).
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
ENV_OVERRIDE = "MSD_FAST_BACKEND"

# Order in which "auto" tries GPU backends for CUDA tensors, per op. Decided by measurement (bench/); an op not
# listed uses DEFAULT_GPU_PREFERENCE.
DEFAULT_GPU_PREFERENCE = ("cuda", "triton")
GPU_PREFERENCE: dict[str, tuple[str, ...]] = {}


@dataclass(frozen=True)
class BackendStatus:
    """Availability of one backend in this process; ``reason`` says why not (or what it runs on)."""

    name: str
    available: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.reason})"


class BackendUnavailableError(RuntimeError):
    """Raised when a backend that was asked for explicitly cannot run here."""


def triton_interpreted() -> bool:
    """True when Triton kernels run in its numpy interpreter (``TRITON_INTERPRET=1``), i.e. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import(module: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(module), ""
    except ImportError as error:  # a missing or broken build: report it, do not crash
        return None, f"{module} could not be imported: {error}"


def native_cpu() -> ModuleType:
    """The compiled CPU extension ``msd_fast._C``."""
    return _require("cpu")


def native_cuda() -> ModuleType:
    """The compiled CUDA extension ``msd_fast._cuda``."""
    return _require("cuda")


def triton_kernels() -> ModuleType:
    """The Triton kernel package ``msd_fast.kernels``."""
    return _require("triton")


def kernels_for(name: str) -> ModuleType:
    """The kernel module of a resolved native backend name (``"cpu"``, ``"cuda"`` or ``"triton"``): every op calls
    ``kernels_for(resolve_backend(...)).<op>``; raises :class:`BackendUnavailableError` saying why one is missing."""
    return _require(name)


def _require(name: str) -> ModuleType:
    status = _status(name)
    if not status.available:
        raise BackendUnavailableError(f"backend {name!r} is not available: {status.reason}")
    return _import(_MODULES[name])[0]


_MODULES = {"cpu": "msd_fast._C", "cuda": "msd_fast._cuda", "triton": "msd_fast.kernels"}


def _status(name: str) -> BackendStatus:
    # Availability is a property of the process (built extensions, visible devices), except that Triton on CPU
    # depends on TRITON_INTERPRET; so it is computed once per name and interpreter setting, not on every op call.
    return _cached_status(name, triton_interpreted())


@functools.lru_cache(maxsize=None)
def _cached_status(name: str, interpreted: bool) -> BackendStatus:
    if name == "reference":
        return BackendStatus(name, True, "pure PyTorch, any device")
    if name == "cpu":
        module, why = _import("msd_fast._C")
        if module is None:
            return BackendStatus(name, False, f"extension not built: {why}")
        return BackendStatus(name, True, "C++/OpenMP on CPU tensors")
    if name == "cuda":
        module, why = _import("msd_fast._cuda")
        if module is None:
            return BackendStatus(name, False, f"extension not built (MSD_FAST_BUILD_CUDA=0 or no CUDA toolkit): {why}")
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "built, but no CUDA device is visible")
        return BackendStatus(name, True, f"CUDA C++ on {torch.cuda.get_device_name()}")
    if name == "triton":
        if not torch.cuda.is_available() and not interpreted:
            return BackendStatus(name, False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)")
        module, why = _import("msd_fast.kernels")
        if module is None:
            return BackendStatus(name, False, why)
        where = "CPU tensors via TRITON_INTERPRET=1" if interpreted else "CUDA tensors"
        return BackendStatus(name, True, f"Triton on {where}")
    raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {name!r}")


def backends() -> dict[str, BackendStatus]:
    """Report every backend: ``{name: BackendStatus(name, available, reason)}``."""
    return {name: _status(name) for name in BACKEND_NAMES}


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Turn ``backend`` (``"auto"`` or a name) into the backend that runs ``op`` on tensors on ``device``.

    Raises ``ValueError`` for an unknown name and ``BackendUnavailableError`` when the backend asked for cannot run
    here or cannot run on ``device``.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get(ENV_OVERRIDE, "auto") or "auto"
        if backend not in ("auto",) + BACKEND_NAMES:
            raise ValueError(f"{ENV_OVERRIDE} must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            candidates = GPU_PREFERENCE.get(op, DEFAULT_GPU_PREFERENCE)
        elif device.type == "cpu":
            candidates = ("cpu",)
        else:
            candidates = ()
        for name in candidates:
            if _status(name).available:
                return name
        return "reference"
    status = _status(backend)
    if not status.available:
        raise BackendUnavailableError(f"backend {backend!r} is not available for {op}: {status.reason}")
    if not _runs_on(backend, device):
        raise BackendUnavailableError(f"backend {backend!r} cannot run {op} on {device.type} tensors")
    return backend
