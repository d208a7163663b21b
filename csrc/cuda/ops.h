// Declarations of the CUDA C++ kernels bound in msd_fast._cuda; same contracts as csrc/cpu/ops.h, on CUDA tensors.
// Index tables arrive validated by the Python layer (value ranges are checked once on the host when a table is
// built); each launcher re-checks shapes, dtypes and devices with TORCH_CHECK.
#pragma once
#include <torch/extension.h>

namespace msd_fast {
namespace cuda {

torch::Tensor patch_permute(const torch::Tensor& x, const torch::Tensor& src_block, const torch::Tensor& src_elem,
                            const c10::optional<torch::Tensor>& flip, int64_t patch_size, double max_value);

// The src_block value range is checked here too (one reduction and one synchronisation per call).
torch::Tensor block_mix(const torch::Tensor& x, const torch::Tensor& matrix, const torch::Tensor& src_block,
                        const torch::Tensor& bias, double scale, int64_t patch_size, at::ScalarType out_dtype);

torch::Tensor masked_gather_forward(const torch::Tensor& tokens, const torch::Tensor& idx,
                                    const c10::optional<torch::Tensor>& pos,
                                    const c10::optional<torch::Tensor>& prefix);

void masked_gather_backward(const torch::Tensor& grad_out, const torch::Tensor& offsets, const torch::Tensor& sources,
                            int64_t num_views, const c10::optional<torch::Tensor>& grad_tokens,
                            const c10::optional<torch::Tensor>& grad_pos,
                            const c10::optional<torch::Tensor>& grad_prefix);

// At most 4 teacher views (a template parameter of the kernel).
std::tuple<torch::Tensor, torch::Tensor> dino_loss(const torch::Tensor& student, const torch::Tensor& teacher,
                                                   const torch::Tensor& center, int64_t n_student_views,
                                                   int64_t n_teacher_views, double student_temp, double teacher_temp,
                                                   bool compute_grad);

}  // namespace cuda
}  // namespace msd_fast
