// DINO distillation loss on CPU: loss and student gradient with one exponential per logit and no [V, B, K]
// temporaries (contract and gradient derivation: msd_fast/ops/dino_loss.py).
//
// Threads share out the Vs * B student rows, taken sample by sample, in contiguous chunks of up to Vs rows (a whole
// sample when B >= threads). For each sample in a chunk a thread first builds the sample's targets, then streams each
// of the chunk's rows of that sample twice:
//   targets: q_v = softmax((t_v - c) / tau_t) for every teacher view v (a max pass, then one exp pass), added into
//            T_u = sum_{v != u} q_v for each u < Vt and T_all = sum_v q_v, the target of every u >= Vt (sums of
//            non-negative terms: no cancellation). Computed once per sample, not once per (v, u) pair.
//   pass 1 over row (u, b): z = s_u / tau_s in tiles of kTile values (a tile stays in L1), online softmax: the tile's
//            max first, then in one vectorised loop the running sum of exp(z - m) and D = sum_k T_k (m - z_k), a sum
//            of non-negative terms (exact for unbounded logits), shifted by (m_new - m_old) * sum(T so far) when the
//            running max m grows. Row loss = count * log(sum) + D, since <T, LSE(z) - z> = <T, m - z> + count *
//            log(sum) with count = sum_k T_k, the number of teacher views v != u.
//            If the gradient is wanted, the loop also stores e = exp(z - m_tile), m_tile the running max at its tile.
//   pass 2 over row (u, b) (gradient only, right after pass 1, so the row is still in L2): softmax(z) =
//            e * exp(m_tile - LSE), so grad_u = scale * (count * exp(m_tile - LSE) * e - T), in the logits' dtype.
// Pass 1 stores e in the gradient row itself when it has the accumulation dtype (float32, float64), else in a
// per-thread float32 row, so that a 16-bit gradient is rounded once.
// Extra memory: the gradient itself plus, per thread, Vt + 2 rows of K values (targets and one teacher row), one
// more for 16-bit logits, and the tile maxima of one row.
#include <omp.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/argument_checks.h"
#include "ops.h"

namespace msd_fast {
namespace cpu {
namespace {

constexpr int64_t kTile = 1024;

// The build targets baseline x86-64 (SSE2). On Linux x86-64 the targets and the student rows, where the exponentials
// are, are also compiled for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2); the loader picks the best clone the CPU
// supports (function multiversioning). The x86-64-vN levels are checked by CPU feature; an arch=<cpu name> clone such
// as arch=haswell is checked by CPU model (__builtin_cpu_is), so that an AMD Zen 5 never ran it.
#if defined(__linux__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__AVX__)
#define MSD_FAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define MSD_FAST_SIMD_CLONES
#endif

// exp(x) for x <= 0 (the only arguments here: values minus their running maximum). Cephes' single-precision
// polynomial (about 1 ulp) in straight-line code the compiler vectorises; exp(x) is 0 below -87 (under 1e-38).
inline float exp_nonpositive(float x) {
  // 1. Clamp: below -87 the result is under FLT_MIN and is returned as 0 at the end.
  const float clamped = x < -87.0f ? -87.0f : x;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  // 2. n = round(x / ln 2), so exp(x) = 2^n * exp(r) with |r| <= ln(2) / 2.
  const float n = (clamped * 1.44269504088896341f + round_magic) - round_magic;
  // 3. r = x - n ln 2 in two steps (Cody-Waite: ln 2 split into an exact high part and a small low part).
  float r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  // 4. exp(r) = 1 + r + r^2 P(r), P a degree-5 minimax polynomial (Horner).
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 5. 2^n built from its IEEE exponent bits, then exp(x) = 2^n * exp(r).
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// max_k values[k] (as acc_t); the select form vectorises to max instructions.
template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* values, int64_t n) {
  acc_t result = kNegInf<acc_t>;
#pragma omp simd reduction(max : result)
  for (int64_t k = 0; k < n; ++k) {
    const acc_t value = static_cast<acc_t>(values[k]);
    result = value > result ? value : result;
  }
  return result;
}

struct Shape {
  int64_t batch, out_dim, student_views, teacher_views;
  // Number of teacher views v != u that student view u is compared with.
  int64_t targets_of(int64_t u) const { return u < teacher_views ? teacher_views - 1 : teacher_views; }
  // Row of the targets buffer holding student view u's target: T_u for u < Vt, T_all (row Vt) otherwise.
  int64_t target_row(int64_t u) const { return std::min(u, teacher_views); }
};

// Per-thread buffers, reused across the thread's rows.
template <typename acc_t>
struct Workspace {
  std::vector<acc_t> targets;       // [Vt + 1, K]: T_u (u < Vt) and T_all of the sample at hand
  std::vector<acc_t> teacher_row;   // [K]: (t_v - c) / tau_t, then exp of it minus its max
  std::vector<acc_t> student_exp;   // [K]: pass 1's exponentials of one row, for 16-bit logits only
  std::vector<acc_t> tile_max;      // [tiles]: the running max of a student row at each of its tiles
  Workspace(const Shape& shape, bool needs_student_exp)
      : targets((shape.teacher_views + 1) * shape.out_dim),
        teacher_row(shape.out_dim),
        student_exp(needs_student_exp ? shape.out_dim : 0),
        tile_max((shape.out_dim + kTile - 1) / kTile) {}
};

// Teacher side of sample b: fills workspace.targets (see the file comment).
template <typename scalar_t, typename acc_t>
MSD_FAST_SIMD_CLONES
void sample_targets(const scalar_t* teacher, const acc_t* center, int64_t b, const Shape& shape,
                    acc_t inv_teacher_temp, Workspace<acc_t>& workspace) {
  const int64_t K = shape.out_dim, Vt = shape.teacher_views;
  acc_t* targets = workspace.targets.data();
  acc_t* y = workspace.teacher_row.data();
  std::fill(targets, targets + (Vt + 1) * K, acc_t(0));
  for (int64_t v = 0; v < Vt; ++v) {
    const scalar_t* row = teacher + (v * shape.batch + b) * K;
    // 1. y = (t - c) / tau_t and its max M.
    acc_t max = kNegInf<acc_t>;
#pragma omp simd reduction(max : max)
    for (int64_t k = 0; k < K; ++k) {
      y[k] = (static_cast<acc_t>(row[k]) - center[k]) * inv_teacher_temp;
      max = y[k] > max ? y[k] : max;
    }
    // 2. y <- exp(y - M) and their sum S.
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < K; ++k) {
      y[k] = exp_nonpositive(y[k] - max);
      sum += y[k];
    }
    // 3. q_v = y / S, added to every target that includes view v: T_u for u != v, and T_all.
    const acc_t inv_sum = acc_t(1) / sum;
    for (int64_t r = 0; r <= Vt; ++r) {
      if (r == v) continue;
      acc_t* target = targets + r * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) target[k] += y[k] * inv_sum;
    }
  }
}

// What pass 1 finds for one student row.
template <typename acc_t>
struct RowStats {
  acc_t loss, lse;  // the row's loss term and LSE(z)
};

// Pass 1 over student row (u, b) (see the file comment). With kStoreExp (the gradient is wanted), stored_exp receives
// exp(z - m_tile) and tile_max the running max m_tile of each tile.
template <bool kStoreExp, typename scalar_t, typename acc_t>
RowStats<acc_t> row_loss(const scalar_t* student, const acc_t* target, int64_t K, acc_t inv_student_temp,
                         acc_t count, acc_t* stored_exp, acc_t* tile_max) {
  acc_t max = kNegInf<acc_t>, sum = 0, distance = 0, target_sum = 0;
  for (int64_t k0 = 0, tile = 0; k0 < K; k0 += kTile, ++tile) {
    const int64_t n = std::min(kTile, K - k0);
    const scalar_t* s = student + k0;
    const acc_t* t = target + k0;
    // 1. The tile's max of z = s / tau_s is max(s) / tau_s (dividing by tau_s > 0 keeps the order); a larger running
    //    max rescales the sum by exp(m_old - m_new) and adds (m_new - m_old) to every earlier term of D.
    const acc_t new_max = std::max(max, row_max<scalar_t, acc_t>(s, n) * inv_student_temp);
    if (k0 > 0) {
      sum *= exp_nonpositive(max - new_max);
      distance += (new_max - max) * target_sum;
    }
    max = new_max;
    // 2. The tile's exp(z - m), their sum, and D += <T, m - z>, in one vectorised loop.
    acc_t tile_sum = 0, tile_distance = 0, tile_target_sum = 0;
#pragma omp simd reduction(+ : tile_sum, tile_distance, tile_target_sum)
    for (int64_t k = 0; k < n; ++k) {
      const acc_t gap = max - static_cast<acc_t>(s[k]) * inv_student_temp;
      const acc_t exp_z = exp_nonpositive(-gap);
      if constexpr (kStoreExp) stored_exp[k0 + k] = exp_z;
      tile_sum += exp_z;
      tile_distance += t[k] * gap;
      tile_target_sum += t[k];
    }
    if constexpr (kStoreExp) tile_max[tile] = max;
    sum += tile_sum;
    distance += tile_distance;
    target_sum += tile_target_sum;
  }
  return {count * std::log(sum) + distance, max + std::log(sum)};
}

// Pass 2 over student row (u, b): grad = scale * (count * exp(z - LSE) - T), from pass 1's exp(z - m_tile).
template <typename scalar_t, typename acc_t>
void row_gradient(const acc_t* stored_exp, const acc_t* tile_max, const acc_t* target, int64_t K, acc_t lse,
                  acc_t count, acc_t scale, scalar_t* grad) {
  for (int64_t k0 = 0, tile = 0; k0 < K; k0 += kTile, ++tile) {
    const int64_t n = std::min(kTile, K - k0);
    const acc_t factor = scale * count * exp_nonpositive(tile_max[tile] - lse);
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      grad[k0 + k] = static_cast<scalar_t>(factor * stored_exp[k0 + k] - scale * target[k0 + k]);
    }
  }
}

// Student row (u, b), whose sample's targets are in workspace.targets: returns its loss term and, if grad is not
// null, writes its gradient row.
template <typename scalar_t, typename acc_t>
MSD_FAST_SIMD_CLONES
acc_t student_row(const scalar_t* student, scalar_t* grad, int64_t u, int64_t b, const Shape& shape,
                  acc_t inv_student_temp, acc_t scale, Workspace<acc_t>& workspace) {
  const int64_t K = shape.out_dim, row = (u * shape.batch + b) * K;
  const acc_t* target = workspace.targets.data() + shape.target_row(u) * K;
  const acc_t count = static_cast<acc_t>(shape.targets_of(u));
  if (grad == nullptr) {
    return row_loss<false, scalar_t, acc_t>(student + row, target, K, inv_student_temp, count, nullptr, nullptr).loss;
  }
  // Pass 1's exponentials go into the gradient row itself when it has the accumulation dtype (pass 2 then reads them
  // back from L2 and overwrites them), else into a row of that dtype, so that the gradient is rounded once.
  acc_t* stored_exp;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    stored_exp = grad + row;
  } else {
    stored_exp = workspace.student_exp.data();
  }
  const RowStats<acc_t> stats =
      row_loss<true>(student + row, target, K, inv_student_temp, count, stored_exp, workspace.tile_max.data());
  row_gradient(stored_exp, workspace.tile_max.data(), target, K, stats.lse, count, scale, grad + row);
  return stats.loss;
}

// A fresh multi-MB gradient costs one page fault per 4 KiB page on its first write, a large share of its writing
// at DINO's shapes; on Linux, ask for transparent huge pages instead (a hint: ignored where THP is off).
void advise_huge_pages(torch::Tensor& tensor) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const auto start = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  const uintptr_t end = start + static_cast<uintptr_t>(tensor.nbytes());
  const uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1), last = end & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)tensor;
#endif
}

template <typename scalar_t>
void dino_loss_kernel(const torch::Tensor& student, const torch::Tensor& teacher, const torch::Tensor& center,
                      const Shape& shape, double student_temp, double teacher_temp, torch::Tensor& loss,
                      torch::Tensor* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* student_ptr = student.data_ptr<scalar_t>();
  const scalar_t* teacher_ptr = teacher.data_ptr<scalar_t>();
  const acc_t* center_ptr = center.data_ptr<acc_t>();
  scalar_t* grad_ptr = grad != nullptr ? grad->data_ptr<scalar_t>() : nullptr;
  const acc_t inv_student_temp = static_cast<acc_t>(1.0 / student_temp);
  const acc_t inv_teacher_temp = static_cast<acc_t>(1.0 / teacher_temp);
  const int64_t pairs = shape.teacher_views * shape.student_views - std::min(shape.teacher_views, shape.student_views);
  const acc_t normaliser = static_cast<acc_t>(pairs * shape.batch);
  const acc_t scale = static_cast<acc_t>(1.0 / (student_temp * static_cast<double>(pairs * shape.batch)));
  const bool needs_student_exp = grad_ptr != nullptr && !std::is_same_v<scalar_t, acc_t>;
  const int64_t rows = shape.batch * shape.student_views;
  std::vector<acc_t> row_losses(rows);
  // Below this many logits a call is cheaper on one thread than waking the OpenMP team.
  const bool parallel = (shape.student_views + shape.teacher_views) * shape.batch * shape.out_dim >= (1 << 15);
  // Rows are handed out in chunks of one sample (index b * Vs + u), fewer rows when there are fewer than Vs per
  // thread; handed out dynamically, so that a thread that loses its core to another process holds up one chunk only.
  // A thread rebuilds the targets only when its next row is of another sample than its last one.
  const int64_t chunk = std::clamp<int64_t>(rows / at::get_num_threads(), 1, shape.student_views);
#pragma omp parallel num_threads(at::get_num_threads()) if (parallel)
  {
    Workspace<acc_t> workspace(shape, needs_student_exp);
    int64_t targets_of_sample = -1;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t index = 0; index < rows; ++index) {
      const int64_t b = index / shape.student_views, u = index % shape.student_views;
      if (b != targets_of_sample) {
        sample_targets(teacher_ptr, center_ptr, b, shape, inv_teacher_temp, workspace);
        targets_of_sample = b;
      }
      row_losses[index] = student_row(student_ptr, grad_ptr, u, b, shape, inv_student_temp, scale, workspace);
    }
  }
  acc_t total = 0;
  for (const acc_t value : row_losses) total += value;
  loss.fill_(total / normaliser);
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> dino_loss(const torch::Tensor& student, const torch::Tensor& teacher,
                                                   const torch::Tensor& center, int64_t n_student_views,
                                                   int64_t n_teacher_views, double student_temp, double teacher_temp,
                                                   bool compute_grad) {
  TORCH_CHECK(student.device().is_cpu(), "student, teacher and center must be CPU tensors");
  const DinoLossShape checked = check_dino_loss(student, teacher, center, n_student_views, n_teacher_views,
                                                student_temp, teacher_temp);
  const int64_t batch = checked.batch, K = checked.K;
  const at::ScalarType acc_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = torch::empty({}, student.options().dtype(acc_type));
  auto grad = compute_grad ? torch::empty_like(student) : torch::empty({0}, student.options());
  advise_huge_pages(grad);
  const Shape shape{batch, K, n_student_views, n_teacher_views};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "dino_loss_cpu", [&] {
    dino_loss_kernel<scalar_t>(student, teacher, center, shape, student_temp, teacher_temp, loss,
                               compute_grad ? &grad : nullptr);
  });
  return {loss, grad};
}

}  // namespace cpu
}  // namespace msd_fast
