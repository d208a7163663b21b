// DINO distillation loss on CUDA: same contract and statistics as csrc/cpu/dino_loss.cpp (derivation in
// msd_fast/ops/dino_loss.py).
//
// One thread block per student row (u, b) of Vs*B; its threads stride over the K columns of that row and of the Vt
// teacher rows of sample b (coalesced loads). Pass 1: each thread keeps an online state (student max and exp-sum;
// per teacher view max, exp-sum and the pair sum D_v = sum_k exp(y_v - M_v) * (m - z_k), a sum of non-negative
// terms), updated per element; the block merges the states (warp shuffles, then one warp over shared memory) and
// thread 0 writes the row loss. Pass 2 (compute_grad): every thread writes
// grad = scale * (count * exp(z - LSE_s) - sum_{v != u} exp(y_v - LSE_v)) in the logits' dtype.
// The teacher view count is a template parameter (1..kMaxTeacherViews) so the per-view state stays in registers.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/argument_checks.h"
#include "ops.h"

namespace msd_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxTeacherViews = 4;

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// Online statistics of a set of columns of one student row and its sample's teacher rows. Empty: student_max = -inf.
template <typename acc_t, int kViews>
struct RowState {
  acc_t student_max, student_sum;
  acc_t teacher_max[kViews], teacher_sum[kViews], pair_sum[kViews];
};

template <typename acc_t, int kViews>
__device__ __forceinline__ RowState<acc_t, kViews> empty_state() {
  RowState<acc_t, kViews> state;
  state.student_max = -std::numeric_limits<acc_t>::infinity();
  state.student_sum = 0;
#pragma unroll
  for (int v = 0; v < kViews; ++v) {
    state.teacher_max[v] = -std::numeric_limits<acc_t>::infinity();
    state.teacher_sum[v] = 0;
    state.pair_sum[v] = 0;
  }
  return state;
}

// Add one column: student logit z = s / tau_s, teacher logits y[v] = (t_v - c) / tau_t.
template <typename acc_t, int kViews>
__device__ __forceinline__ void add_column(RowState<acc_t, kViews>& state, acc_t z, const acc_t (&y)[kViews]) {
  acc_t teacher_exp[kViews];
#pragma unroll
  for (int v = 0; v < kViews; ++v) {
    // 1. Teacher view v: a new maximum rescales its exp-sum and pair sum by exp(M_old - M_new).
    if (y[v] > state.teacher_max[v]) {
      const acc_t rescale = exp_acc(state.teacher_max[v] - y[v]);  // 0 while the state is empty
      state.teacher_sum[v] *= rescale;
      state.pair_sum[v] *= rescale;
      state.teacher_max[v] = y[v];
    }
    teacher_exp[v] = exp_acc(y[v] - state.teacher_max[v]);
  }
  // 2. Student: a new maximum m shifts every earlier (m - z) term by (m_new - m_old): D_v += shift * S_v.
  if (z > state.student_max) {
    const bool first = state.student_max == -std::numeric_limits<acc_t>::infinity();
    const acc_t shift = first ? acc_t(0) : z - state.student_max;
    state.student_sum *= exp_acc(-shift);
#pragma unroll
    for (int v = 0; v < kViews; ++v) state.pair_sum[v] += shift * state.teacher_sum[v];
    state.student_max = z;
  }
  // 3. Add this column's terms: exp(z - m), and exp(y_v - M_v) * (m - z) >= 0 to each D_v.
  state.student_sum += exp_acc(z - state.student_max);
  const acc_t distance = state.student_max - z;
#pragma unroll
  for (int v = 0; v < kViews; ++v) {
    state.pair_sum[v] += teacher_exp[v] * distance;
    state.teacher_sum[v] += teacher_exp[v];
  }
}

// a <- the state of the union of a's and b's columns.
template <typename acc_t, int kViews>
__device__ __forceinline__ void merge(RowState<acc_t, kViews>& a, const RowState<acc_t, kViews>& b) {
  if (b.student_max == -std::numeric_limits<acc_t>::infinity()) return;
  if (a.student_max == -std::numeric_limits<acc_t>::infinity()) {
    a = b;
    return;
  }
  // Merging two partial states: bring both to the common maxima (the same rescale and shift as in add_column),
  // then add.
  const acc_t student_max = fmax(a.student_max, b.student_max);
#pragma unroll
  for (int v = 0; v < kViews; ++v) {
    const acc_t teacher_max = fmax(a.teacher_max[v], b.teacher_max[v]);
    const acc_t scale_a = exp_acc(a.teacher_max[v] - teacher_max), scale_b = exp_acc(b.teacher_max[v] - teacher_max);
    a.pair_sum[v] = scale_a * (a.pair_sum[v] + (student_max - a.student_max) * a.teacher_sum[v]) +
                    scale_b * (b.pair_sum[v] + (student_max - b.student_max) * b.teacher_sum[v]);
    a.teacher_sum[v] = scale_a * a.teacher_sum[v] + scale_b * b.teacher_sum[v];
    a.teacher_max[v] = teacher_max;
  }
  a.student_sum = a.student_sum * exp_acc(a.student_max - student_max) +
                  b.student_sum * exp_acc(b.student_max - student_max);
  a.student_max = student_max;
}

template <typename acc_t, int kViews>
__device__ __forceinline__ RowState<acc_t, kViews> shuffle_down(const RowState<acc_t, kViews>& state, int offset) {
  constexpr unsigned kFullMask = 0xffffffffu;
  RowState<acc_t, kViews> other;
  other.student_max = __shfl_down_sync(kFullMask, state.student_max, offset);
  other.student_sum = __shfl_down_sync(kFullMask, state.student_sum, offset);
#pragma unroll
  for (int v = 0; v < kViews; ++v) {
    other.teacher_max[v] = __shfl_down_sync(kFullMask, state.teacher_max[v], offset);
    other.teacher_sum[v] = __shfl_down_sync(kFullMask, state.teacher_sum[v], offset);
    other.pair_sum[v] = __shfl_down_sync(kFullMask, state.pair_sum[v], offset);
  }
  return other;
}

// Lane 0 of each warp ends with the merge of its warp's states.
template <typename acc_t, int kViews>
__device__ __forceinline__ void warp_merge(RowState<acc_t, kViews>& state) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) merge(state, shuffle_down(state, offset));
}

// Every thread returns the merge of all the block's states.
template <typename acc_t, int kViews>
__device__ RowState<acc_t, kViews> block_merge(RowState<acc_t, kViews> state) {
  __shared__ RowState<acc_t, kViews> warp_states[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  warp_merge(state);
  if (lane == 0) warp_states[warp] = state;
  __syncthreads();
  if (warp == 0) {
    state = lane < kWarps ? warp_states[lane] : empty_state<acc_t, kViews>();
    warp_merge(state);
    if (lane == 0) warp_states[0] = state;
  }
  __syncthreads();
  return warp_states[0];
}

template <typename scalar_t, typename acc_t, int kViews>
__device__ __forceinline__ void load_column(const scalar_t* __restrict__ student_row,
                                            const scalar_t* __restrict__ teacher_sample,
                                            const acc_t* __restrict__ center, int64_t k, int64_t teacher_view_stride,
                                            acc_t inv_student_temp, acc_t inv_teacher_temp, acc_t& z,
                                            acc_t (&y)[kViews]) {
  z = static_cast<acc_t>(student_row[k]) * inv_student_temp;
  const acc_t c = center[k];
#pragma unroll
  for (int v = 0; v < kViews; ++v) {
    y[v] = (static_cast<acc_t>(teacher_sample[v * teacher_view_stride + k]) - c) * inv_teacher_temp;
  }
}

template <typename scalar_t, typename acc_t, int kViews>
__global__ void __launch_bounds__(kThreads) dino_loss_kernel(
    const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher, const acc_t* __restrict__ center,
    scalar_t* __restrict__ grad, acc_t* __restrict__ row_losses, int64_t batch, int64_t n_cols,
    acc_t inv_student_temp, acc_t inv_teacher_temp, acc_t grad_scale) {
  const int64_t row = blockIdx.x;
  const int64_t u = row / batch, b = row % batch;
  const scalar_t* student_row = student + row * n_cols;
  const scalar_t* teacher_sample = teacher + b * n_cols;
  const int64_t teacher_view_stride = batch * n_cols;

  RowState<acc_t, kViews> state = empty_state<acc_t, kViews>();
  acc_t z, y[kViews];
  // 1. Pass 1: each thread folds its strided columns into one online state; the block merges the states.
  for (int64_t k = threadIdx.x; k < n_cols; k += kThreads) {
    load_column(student_row, teacher_sample, center, k, teacher_view_stride, inv_student_temp, inv_teacher_temp, z,
                y);
    add_column(state, z, y);
  }
  state = block_merge(state);

  // 2. Row loss = count * log(S_student) + sum_{v != u} D_v / S_v (thread 0 writes it).
  const acc_t target_count = static_cast<acc_t>(u < kViews ? kViews - 1 : kViews);
  if (threadIdx.x == 0) {
    acc_t loss = target_count * log_acc(state.student_sum);
#pragma unroll
    for (int v = 0; v < kViews; ++v) {
      if (v != u) loss += state.pair_sum[v] / state.teacher_sum[v];
    }
    row_losses[row] = loss;
  }
  if (grad == nullptr) return;

  // 3. Pass 2: re-read the row, q_v = exp(y_v - LSE_v), p = exp(z - LSE_s), grad = scale * (count * p - sum q_v).
  acc_t teacher_lse[kViews];
#pragma unroll
  for (int v = 0; v < kViews; ++v) teacher_lse[v] = state.teacher_max[v] + log_acc(state.teacher_sum[v]);
  const acc_t student_lse = state.student_max + log_acc(state.student_sum);
  scalar_t* grad_row = grad + row * n_cols;
  for (int64_t k = threadIdx.x; k < n_cols; k += kThreads) {
    load_column(student_row, teacher_sample, center, k, teacher_view_stride, inv_student_temp, inv_teacher_temp, z,
                y);
    acc_t target = 0;
#pragma unroll
    for (int v = 0; v < kViews; ++v) {
      if (v != u) target += exp_acc(y[v] - teacher_lse[v]);
    }
    grad_row[k] = static_cast<scalar_t>(grad_scale * (target_count * exp_acc(z - student_lse) - target));
  }
}

template <typename scalar_t, int kViews>
void launch(const torch::Tensor& student, const torch::Tensor& teacher, const torch::Tensor& center,
            torch::Tensor* grad, torch::Tensor& row_losses, int64_t batch, double student_temp, double teacher_temp,
            double grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dino_loss_kernel<scalar_t, acc_t, kViews><<<static_cast<unsigned>(student.size(0)), kThreads, 0, stream>>>(
      student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), center.data_ptr<acc_t>(),
      grad != nullptr ? grad->data_ptr<scalar_t>() : nullptr, row_losses.data_ptr<acc_t>(), batch, student.size(1),
      static_cast<acc_t>(1.0 / student_temp), static_cast<acc_t>(1.0 / teacher_temp),
      static_cast<acc_t>(grad_scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> dino_loss(const torch::Tensor& student, const torch::Tensor& teacher,
                                                   const torch::Tensor& center, int64_t n_student_views,
                                                   int64_t n_teacher_views, double student_temp, double teacher_temp,
                                                   bool compute_grad) {
  TORCH_CHECK(student.is_cuda(), "student, teacher and center must be CUDA tensors");
  TORCH_CHECK(n_teacher_views <= kMaxTeacherViews, "the CUDA kernel supports up to ", kMaxTeacherViews,
              " teacher views, got ", n_teacher_views, " (backend='triton' has no limit)");
  const DinoLossShape checked = check_dino_loss(student, teacher, center, n_student_views, n_teacher_views,
                                                student_temp, teacher_temp);
  const int64_t batch = checked.batch;
  TORCH_CHECK(student.size(0) < (int64_t{1} << 31), "too many student rows for one launch");
  const int64_t pairs = n_teacher_views * n_student_views - std::min(n_teacher_views, n_student_views);
  const at::ScalarType acc_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  const c10::cuda::CUDAGuard guard(student.device());
  auto row_losses = torch::empty({student.size(0)}, student.options().dtype(acc_type));
  auto grad = compute_grad ? torch::empty_like(student) : torch::empty({0}, student.options());
  torch::Tensor* grad_out = compute_grad ? &grad : nullptr;
  const double grad_scale = 1.0 / (student_temp * static_cast<double>(pairs * batch));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "dino_loss_cuda", [&] {
    switch (n_teacher_views) {
      case 1:
        launch<scalar_t, 1>(student, teacher, center, grad_out, row_losses, batch, student_temp, teacher_temp,
                            grad_scale);
        break;
      case 2:
        launch<scalar_t, 2>(student, teacher, center, grad_out, row_losses, batch, student_temp, teacher_temp,
                            grad_scale);
        break;
      case 3:
        launch<scalar_t, 3>(student, teacher, center, grad_out, row_losses, batch, student_temp, teacher_temp,
                            grad_scale);
        break;
      default:
        launch<scalar_t, 4>(student, teacher, center, grad_out, row_losses, batch, student_temp, teacher_temp,
                            grad_scale);
        break;
    }
  });
  return {row_losses.sum().div_(static_cast<double>(pairs * batch)), grad};
}

}  // namespace cuda
}  // namespace msd_fast
