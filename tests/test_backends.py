import pytest
import torch

import msd_fast
from msd_fast.backends import BACKEND_NAMES, BackendUnavailableError, resolve_backend


def test_report_names_every_backend_with_a_reason():
    report = msd_fast.backends()
    assert tuple(report) == BACKEND_NAMES
    for name, status in report.items():
        assert status.name == name and isinstance(status.available, bool) and status.reason
    assert report["reference"].available
    assert report["cpu"].available, f"the CPU extension must be built: {report['cpu'].reason}"
    if not torch.cuda.is_available():
        assert not report["cuda"].available and "no CUDA device" in report["cuda"].reason or "not built" in \
            report["cuda"].reason


def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    assert resolve_backend("auto", torch.device("cpu"), "patch_permute") == "cpu"


def test_environment_override(monkeypatch):
    monkeypatch.setenv("MSD_FAST_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu"), "patch_permute") == "reference"
    assert resolve_backend("cpu", torch.device("cpu"), "patch_permute") == "cpu"  # explicit argument wins
    monkeypatch.setenv("MSD_FAST_BACKEND", "turbo")
    with pytest.raises(ValueError, match="MSD_FAST_BACKEND must be one of"):
        resolve_backend("auto", torch.device("cpu"), "patch_permute")


def test_unavailable_or_misplaced_backends_raise():
    with pytest.raises(BackendUnavailableError, match="'cuda' cannot run patch_permute on cpu tensors|not available"):
        resolve_backend("cuda", torch.device("cpu"), "patch_permute")
    with pytest.raises(BackendUnavailableError, match="'cpu' cannot run"):
        resolve_backend("cpu", torch.device("cuda"), "patch_permute")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("fast", torch.device("cpu"), "patch_permute")
    with pytest.raises(TypeError, match="backend must be a str"):
        resolve_backend(None, torch.device("cpu"), "patch_permute")


def test_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        assert msd_fast.backends()["triton"].available
        return
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    status = msd_fast.backends()["triton"]
    assert not status.available and "TRITON_INTERPRET" in status.reason


def test_no_top_level_kernels_module_is_installed():
    import importlib.util
    import os
    import sys

    spec = importlib.util.find_spec("msd_fast.kernels")
    assert spec is not None and spec.origin.endswith(os.path.join("kernels", "__init__.py"))
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or ".") != repo_root]
    assert importlib.machinery.PathFinder.find_spec("kernels", path) is None
