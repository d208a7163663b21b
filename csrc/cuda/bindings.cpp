// msd_fast._cuda: the CUDA C++ kernels. One binding line per op; the kernels live in one .cu file each.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "msd_fast CUDA kernels";
  m.def("patch_permute", &msd_fast::cuda::patch_permute, "Fused key-based patch permutation / encryption",
        py::arg("x"), py::arg("src_block"), py::arg("src_elem"), py::arg("flip"), py::arg("patch_size"),
        py::arg("max_value"));
  m.def("block_mix", &msd_fast::cuda::block_mix, "Dense key-derived block transform (block mixing)", py::arg("x"),
        py::arg("matrix"), py::arg("src_block"), py::arg("bias"), py::arg("scale"), py::arg("patch_size"),
        py::arg("out_dtype"));
  m.def("masked_gather_forward", &msd_fast::cuda::masked_gather_forward,
        "Fused masked token gathering: gather views, add position embedding, prepend prefix tokens",
        py::arg("tokens"), py::arg("idx"), py::arg("pos"), py::arg("prefix"));
  m.def("masked_gather_backward", &msd_fast::cuda::masked_gather_backward,
        "Deterministic backward of masked_gather_forward into the given gradient tensors", py::arg("grad_out"),
        py::arg("offsets"), py::arg("sources"), py::arg("num_views"), py::arg("grad_tokens"), py::arg("grad_pos"),
        py::arg("grad_prefix"));
  m.def("dino_loss", &msd_fast::cuda::dino_loss, "Fused DINO distillation loss and student gradient",
        py::arg("student"), py::arg("teacher"), py::arg("center"), py::arg("n_student_views"),
        py::arg("n_teacher_views"), py::arg("student_temp"), py::arg("teacher_temp"), py::arg("compute_grad"));
}
