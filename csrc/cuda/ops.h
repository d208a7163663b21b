// Declarations of the CUDA C++ kernels bound in msd_fast._cuda; same contracts as csrc/cpu/ops.h, on CUDA tensors.
// Index tables arrive validated by the Python layer (value ranges are checked once on the host when a table is
// built); each launcher re-checks shapes, dtypes and devices with TORCH_CHECK.
#pragma once
#include <torch/extension.h>

namespace msd_fast {
namespace cuda {

torch::Tensor patch_permute(const torch::Tensor& x, const torch::Tensor& src_block, const torch::Tensor& src_elem,
                            const c10::optional<torch::Tensor>& flip, int64_t patch_size, double max_value);

}  // namespace cuda
}  // namespace msd_fast
