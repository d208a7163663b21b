// Declarations of the CPU (C++17/OpenMP) kernels bound in msd_fast._C. One function per op; each validates its
// tensors with TORCH_CHECK so that a bad call raises a Python exception instead of reading out of bounds.
#pragma once
#include <torch/extension.h>

namespace msd_fast {
namespace cpu {

// out[b, :, block n, value e] = negpos_e(x[b, :, block src_block[(b,) n], value src_elem[e]]), see patch_permute.cpp.
torch::Tensor patch_permute(const torch::Tensor& x, const torch::Tensor& src_block, const torch::Tensor& src_elem,
                            const c10::optional<torch::Tensor>& flip, int64_t patch_size, double max_value);

// out[b, block n, value i] = scale * sum_j matrix[i, j] * x[b, block src_block[(b,) n], value j] + bias[i] in opmath,
// rounded to out_dtype, written as a contiguous image; see block_mix.cpp.
torch::Tensor block_mix(const torch::Tensor& x, const torch::Tensor& matrix, const torch::Tensor& src_block,
                        const torch::Tensor& bias, double scale, int64_t patch_size, at::ScalarType out_dtype);

// out[v * B + b] = [prefix; tokens[b, idx[v, b]] + pos[(b,) idx[v, b]]], see masked_gather.cpp.
torch::Tensor masked_gather_forward(const torch::Tensor& tokens, const torch::Tensor& idx,
                                    const c10::optional<torch::Tensor>& pos,
                                    const c10::optional<torch::Tensor>& prefix);

// Fills the requested gradients from grad_out and the inverse index (offsets, sources), see masked_gather.cpp.
void masked_gather_backward(const torch::Tensor& grad_out, const torch::Tensor& offsets, const torch::Tensor& sources,
                            int64_t num_views, const c10::optional<torch::Tensor>& grad_tokens,
                            const c10::optional<torch::Tensor>& grad_pos,
                            const c10::optional<torch::Tensor>& grad_prefix);
// DINO loss of view-major student [Vs*B, K] and teacher [Vt*B, K] logits with center [K] (float32; float64 for
// float64 logits), see dino_loss.cpp. Returns (0-d loss, d loss / d student for grad_output = 1, or [0] when
// !compute_grad).
std::tuple<torch::Tensor, torch::Tensor> dino_loss(const torch::Tensor& student, const torch::Tensor& teacher,
                                                   const torch::Tensor& center, int64_t n_student_views,
                                                   int64_t n_teacher_views, double student_temp, double teacher_temp,
                                                   bool compute_grad);

}  // namespace cpu
}  // namespace msd_fast
