"""Builds msd_fast._C (C++17 CPU kernels, OpenMP) always and msd_fast._cuda (CUDA C++) when possible.

Environment:
  MSD_FAST_BUILD_CUDA=0   skip the CUDA extension (quick iteration); =1 require it (fail if impossible).
  CUDA_HOME               CUDA toolkit; defaults to /usr/local/cuda when that exists.
  TORCH_CUDA_ARCH_LIST    target GPUs; defaults to the visible GPU, else "8.0;9.0+PTX".
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension is imported)
from torch.utils import cpp_extension  # noqa: E402

# Our sources are C++17; the language standard flag itself comes from torch (torch >= 2.10 headers need C++20).
# torch's headers are marked as system headers so that -Wall -Wextra report warnings in our code only.
# -fno-trapping-math lets GCC if-convert and vectorise branch-free float code (no kernel reads FP exception flags);
# -ffp-contract=off keeps a*b+c rounded the same in every clone and pass (FMA clones would otherwise fuse some).
SYSTEM_INCLUDES = [flag for path in cpp_extension.include_paths() for flag in ("-isystem", path)]
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off", "-Wall", "-Wextra"] + SYSTEM_INCLUDES
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + SYSTEM_INCLUDES


def _sources(folder, patterns):
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join("csrc", folder, pattern)))
    return found


def _want_cuda():
    switch = os.environ.get("MSD_FAST_BUILD_CUDA", "auto").lower()
    if switch in ("0", "false", "no", "off"):
        print("msd_fast: MSD_FAST_BUILD_CUDA=0, skipping msd_fast._cuda")
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is not a CUDA build")
    if cpp_extension.CUDA_HOME is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    if reasons:
        if switch in ("1", "true", "yes", "on"):
            raise RuntimeError("MSD_FAST_BUILD_CUDA=1 but " + "; ".join(reasons))
        print("msd_fast: skipping msd_fast._cuda: " + "; ".join(reasons))
        return False
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return True


extensions = [
    cpp_extension.CppExtension(
        "msd_fast._C",
        sources=_sources("cpu", ["*.cpp"]),
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )
]
if _want_cuda():
    extensions.append(
        cpp_extension.CUDAExtension(
            "msd_fast._cuda",
            sources=_sources("cuda", ["*.cpp", "*.cu"]),
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    )
print("msd_fast: building " + ", ".join(e.name for e in extensions))

# Every package under msd_fast/ is found automatically; the Triton kernels in kernels/ install as msd_fast.kernels
# (there is no top-level `kernels` module). MANIFEST.in puts the C++/CUDA sources and headers into the sdist.
PACKAGES = find_packages(include=["msd_fast", "msd_fast.*"]) + ["msd_fast.kernels"]

setup(
    packages=PACKAGES,
    package_dir={"msd_fast": "msd_fast", "msd_fast.kernels": "kernels"},
    ext_modules=extensions,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
