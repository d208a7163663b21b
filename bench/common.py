"""What every benchmark shares: the device, the providers, the record schema the report reads, torch.compile of the
references, peak-memory measurement and a description of the machine.

Providers (one per implementation timed in a group):
  ``reference`` the eager PyTorch reference through the public API (``backend="reference"``);
  ``compile``   ``torch.compile`` of the bare reference function (the alternative a user would reach for; the
                training step: the reference under the trainer's ``--compile``, and ``auto+compile`` our kernels
                under it);
  ``cpu`` / ``triton`` / ``cuda``  our kernels (Triton only on a GPU: its CPU interpreter is a correctness tool);
  ``copy``      a plain device copy of the same bytes (memory-bound ops only): the physical limit.

Record schema (``benchmark.extra_info``, set by :func:`describe`): ``op``, ``mode`` (``forward`` or
``forward_backward``), ``shape`` (a label), ``dtype``, ``provider``, ``device``, and where they apply
``bytes_moved`` (bytes read + written by one call), ``peak_extra_bytes`` and ``logits_bytes`` (the loss) and
``items`` (images per call, end-to-end steps) and ``compile_seconds`` (compiled end-to-end providers: their
warm-up step). One group per (op, mode, shape, dtype, device), so pytest-benchmark's
own tables compare the providers of one configuration.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import warnings
from typing import Callable, Optional

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import msd_fast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Compile failures seen in this process, written into the JSON by conftest.py (the report marks them).
COMPILE_FAILURES: list = []


def kernel_backends() -> list:
    """Our (non-reference) backends that can be timed on ``DEVICE``."""
    status = msd_fast.backends()
    wanted = ("cuda", "triton") if DEVICE == "cuda" else ("cpu",)
    return [name for name in wanted if status[name].available]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def synchronized(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` followed by a device synchronisation (what a benchmark times: the work, not just its launch)."""
    def call():
        out = step()
        synchronize()
        return out
    return call


def group_name(op: str, mode: str, shape: str, dtype: str) -> str:
    return f"{op} {mode} {shape} {dtype} on {DEVICE}"


def describe(benchmark, *, op: str, mode: str, shape: str, dtype: str, provider: str, **extra) -> None:
    """Name the benchmark's group and fill its ``extra_info`` with the record schema (see the module docstring)."""
    benchmark.group = group_name(op, mode, shape, dtype)
    benchmark.extra_info.update(op=op, mode=mode, shape=shape, dtype=dtype, provider=provider, device=DEVICE, **extra)


def compile_reference(fn: Callable, warm_up: Callable[[Callable], object], group: str) -> Callable:
    """``torch.compile(fn, fullgraph=True, dynamic=False)``, compiled now by ``warm_up(compiled)``.

    A reference that does not compile is recorded in :data:`COMPILE_FAILURES` under its benchmark ``group`` (the
    report marks it) and the test is skipped with the reason. Dynamo's caches are reset first, so earlier
    parametrisations never push this one past the recompile limit (past it, dynamo would silently run eager code).
    """
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    start = time.perf_counter()
    try:
        warm_up(compiled)
        synchronize()
    except Exception as error:  # any compiler failure: record it and move on
        skip_compile_failure(group, error)
    compiled.compile_seconds = time.perf_counter() - start
    return compiled


def skip_compile_failure(group: str, error: Exception) -> None:
    """Record a compiler failure of benchmark ``group`` in :data:`COMPILE_FAILURES` and skip the test with it."""
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    COMPILE_FAILURES.append({"group": group, "error": reason})
    pytest.skip(f"torch.compile failed: {reason}")


def _cpu_allocator_peak(step: Callable[[], object]) -> int:
    """Peak bytes held by PyTorch's CPU allocator during one call of ``step`` above its level at the start: the
    profiler's memory events carry the allocator's running total, including what our C++ kernels allocate."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as trace:
            events = [e["args"] for e in json.load(trace)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


def sync_warnings(step: Callable[[], object]) -> list:
    """The host-device synchronisations of one call of ``step`` on a GPU, as the warnings that
    ``torch.cuda.set_sync_debug_mode("warn")`` raises for them (each names the line that synchronised)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return [warning for warning in caught if "synchroniz" in str(warning.message)]


def peak_extra_memory(step: Callable[[], object]) -> int:
    """Bytes allocated by one call of ``step`` beyond what was allocated before it, at the peak (CUDA: the caching
    allocator's peak; CPU: the CPU allocator's, from the profiler's memory events)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline
    return _cpu_allocator_peak(step)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict:
    """What the numbers were measured on: CPU model and cores, torch threads, GPU, library versions."""
    try:
        import triton
        triton_version: Optional[str] = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "device": DEVICE,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "msd_fast_backends": [name for name, status in msd_fast.backends().items() if status.available],
    }
    if DEVICE == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    gpu_sms=properties.multi_processor_count)
    return info
