// Device-independent argument checks shared by the CPU and CUDA launchers: shapes, dtypes and layouts, each failure
// a Python exception naming the argument. Every launcher checks the device of its first tensor itself; these checks
// require the other tensors to be on that same device.
#pragma once
#include <algorithm>
#include <initializer_list>

#include <torch/extension.h>

namespace msd_fast {

// A gradient buffer to be filled: grad_out's device and dtype, contiguous, of the given shape (or absent).
inline void check_gradient_buffer(const c10::optional<torch::Tensor>& grad, const torch::Tensor& grad_out,
                                  std::initializer_list<int64_t> shape, const char* name) {
  if (!grad.has_value()) return;
  TORCH_CHECK(grad->device() == grad_out.device(), name, " must be on ", grad_out.device(), ", got ", grad->device());
  TORCH_CHECK(grad->scalar_type() == grad_out.scalar_type() && grad->is_contiguous(), name,
              " must be contiguous with grad_out's dtype");
  TORCH_CHECK(grad->sizes() == c10::IntArrayRef(shape), name, " must have shape ", c10::IntArrayRef(shape), ", got ",
              grad->sizes());
}

// Geometry of a masked_gather backward: V views, B samples, N tokens, K kept, P prefix tokens, D features.
struct GatherBackwardShape {
  int64_t V, B, N, K, P, D;
  bool pos_per_sample;
};

inline GatherBackwardShape check_gather_backward(const torch::Tensor& grad_out, const torch::Tensor& offsets,
                                                 const torch::Tensor& sources, int64_t num_views,
                                                 const c10::optional<torch::Tensor>& grad_tokens,
                                                 const c10::optional<torch::Tensor>& grad_pos,
                                                 const c10::optional<torch::Tensor>& grad_prefix) {
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.dim() == 3, "grad_out must be a contiguous [V * B, P + K, D] tensor");
  for (const auto* table : {&offsets, &sources}) {
    TORCH_CHECK(table->device() == grad_out.device() && table->scalar_type() == at::kLong &&
                    table->is_contiguous() && table->dim() == 2,
                "offsets and sources must be contiguous 2-D int64 tensors on grad_out's device (from inverse_index)");
  }
  const int64_t V = num_views, B = offsets.size(0), N = offsets.size(1) - 1;
  TORCH_CHECK(V > 0 && sources.size(0) == B && sources.size(1) % V == 0, "sources must be [B=", B, ", V*K]");
  const int64_t K = sources.size(1) / V, P = grad_out.size(1) - K, D = grad_out.size(2);
  TORCH_CHECK(grad_out.size(0) == V * B && P >= 0, "grad_out must be [V*B=", V * B, ", P + K, D] with K=", K);
  check_gradient_buffer(grad_tokens, grad_out, {B, N, D}, "grad_tokens");
  const bool pos_per_sample = grad_pos.has_value() && grad_pos->dim() == 3;
  if (pos_per_sample) {
    check_gradient_buffer(grad_pos, grad_out, {B, N, D}, "grad_pos");
  } else {
    check_gradient_buffer(grad_pos, grad_out, {N, D}, "grad_pos");
  }
  check_gradient_buffer(grad_prefix, grad_out, {P, D}, "grad_prefix");
  return {V, B, N, K, P, D, pos_per_sample};
}

// Where a masked_gather backward reads and writes (grad_out, the inverse index, and the gradients asked for, or
// null); a plain struct passed by value to the CPU and CUDA kernels.
template <typename scalar_t>
struct GatherBackwardPointers {
  const scalar_t* grad_out;
  const int64_t* offsets;
  const int64_t* sources;
  scalar_t* grad_tokens;
  scalar_t* grad_pos;
  bool pos_per_sample;
  scalar_t* grad_prefix;
};

template <typename scalar_t>
inline GatherBackwardPointers<scalar_t> gather_backward_pointers(
    const torch::Tensor& grad_out, const torch::Tensor& offsets, const torch::Tensor& sources,
    const c10::optional<torch::Tensor>& grad_tokens, const c10::optional<torch::Tensor>& grad_pos,
    const c10::optional<torch::Tensor>& grad_prefix, bool pos_per_sample) {
  const auto pointer = [](const c10::optional<torch::Tensor>& t) {
    return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
  };
  return {grad_out.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(), sources.data_ptr<int64_t>(),
          pointer(grad_tokens), pointer(grad_pos), pos_per_sample, pointer(grad_prefix)};
}

// Geometry of a DINO loss call: B samples per view, K logits per row.
struct DinoLossShape {
  int64_t batch, K;
};

inline DinoLossShape check_dino_loss(const torch::Tensor& student, const torch::Tensor& teacher,
                                     const torch::Tensor& center, int64_t n_student_views, int64_t n_teacher_views,
                                     double student_temp, double teacher_temp) {
  TORCH_CHECK(teacher.device() == student.device() && center.device() == student.device(),
              "student, teacher and center must be on one device");
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, "student and teacher must be 2-D [views * B, K]");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous() && center.is_contiguous(),
              "student, teacher and center must be contiguous");
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "teacher must have the student's dtype");
  TORCH_CHECK(n_student_views > 0 && n_teacher_views > 0, "view counts must be positive");
  TORCH_CHECK(student.size(0) % n_student_views == 0 && teacher.size(0) % n_teacher_views == 0,
              "row counts must be multiples of the view counts");
  const int64_t batch = student.size(0) / n_student_views, K = student.size(1);
  TORCH_CHECK(batch > 0 && teacher.size(0) / n_teacher_views == batch, "student and teacher batch sizes differ");
  TORCH_CHECK(K > 0 && teacher.size(1) == K, "student and teacher must have the same K >= 1");
  TORCH_CHECK(center.dim() == 1 && center.size(0) == K, "center must have shape [K]");
  TORCH_CHECK(n_teacher_views * n_student_views > std::min(n_teacher_views, n_student_views),
              "the view counts form no (teacher view, other student view) pair");
  TORCH_CHECK(student_temp > 0 && teacher_temp > 0, "temperatures must be positive");
  const at::ScalarType acc_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(center.scalar_type() == acc_type, "center must be ", c10::toString(acc_type), " for ",
              c10::toString(student.scalar_type()), " logits");
  return {batch, K};
}

}  // namespace msd_fast
