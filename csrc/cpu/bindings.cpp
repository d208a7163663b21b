// msd_fast._C: the CPU (C++17/OpenMP) kernels. One binding line per op; the kernels live in one file each.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "msd_fast CPU kernels (C++17, OpenMP)";
  m.def("patch_permute", &msd_fast::cpu::patch_permute, "Fused key-based patch permutation / encryption",
        py::arg("x"), py::arg("src_block"), py::arg("src_elem"), py::arg("flip"), py::arg("patch_size"),
        py::arg("max_value"));
}
