// DINO distillation loss on CPU: loss and student gradient in two streaming passes per sample, no [V, B, K]
// temporaries (contract and gradient derivation: msd_fast/ops/dino_loss.py).
//
// Threads split the batch: one sample b owns its Vt teacher rows and Vs student rows. Its columns are streamed in
// tiles of kTile values (small enough that a tile of every view stays in L1):
//   pass 1, per teacher view v: running max M_v and sum S_v of e_v = exp(y_v - M_v), y_v = (t_v - c) / tau_t;
//           per student view u: running max m_u and sum of exp(z_u - m_u), z_u = s_u / tau_s;
//           per pair: D[v][u] = sum_k e_v[k] * (m_u - z_u[k]), a sum of non-negative terms (no cancellation,
//           exact for unbounded logits), rescaled when M_v grows and shifted by (m_new - m_old) * S_v when m_u grows.
//           Row loss (u, b) = sum_{v != u} D[v][u] / S_v + m_u_count * log(sum_u), since <q_v, LSE(z) - z> =
//           <q_v, m_u - z> + log(sum_u) and sum_k q_v = 1.
//   pass 2 (if the gradient is wanted): q_v = exp(y_v - LSE_v), p_u = exp(z_u - LSE_u) and
//           grad_u = scale * (m_u_count * p_u - sum_{v != u} q_v), written in the logits' dtype.
// Extra memory: the gradient itself plus per-thread tiles and O(Vt * Vs) statistics per sample.
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
#include <vector>

#include "../common/argument_checks.h"
#include "ops.h"

namespace msd_fast {
namespace cpu {
namespace {

constexpr int64_t kTile = 256;

// The build targets baseline x86-64 (SSE2). On Linux x86-64 the two per-sample passes, where the exponentials are,
// are also compiled for AVX2+FMA and AVX+FMA; the loader picks the best clone for the CPU (function multiversioning).
#if defined(__linux__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__AVX__)
#define MSD_FAST_SIMD_CLONES __attribute__((target_clones("arch=haswell", "fma", "default"), flatten))
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

template <typename acc_t>
acc_t tile_max(const acc_t* values, int64_t n) {
  acc_t result = kNegInf<acc_t>;
#pragma omp simd reduction(max : result)
  for (int64_t k = 0; k < n; ++k) result = std::max(result, values[k]);
  return result;
}

// out[k] = exp(values[k] - shift); returns the sum of out.
template <typename acc_t>
acc_t exp_shifted(const acc_t* values, acc_t shift, acc_t* out, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) {
    out[k] = exp_nonpositive(values[k] - shift);
    sum += out[k];
  }
  return sum;
}

template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += a[k] * b[k];
  return sum;
}

template <typename acc_t>
void add_to(const acc_t* values, acc_t* sum, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) sum[k] += values[k];
}

// y[k] = (teacher[k] - center[k]) * inv_temp: the sharpened, centered teacher logits of one tile.
template <typename scalar_t, typename acc_t>
void teacher_tile(const scalar_t* teacher, const acc_t* center, acc_t inv_temp, acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] = (static_cast<acc_t>(teacher[k]) - center[k]) * inv_temp;
}

template <typename scalar_t, typename acc_t>
void student_tile(const scalar_t* student, acc_t inv_temp, acc_t* z, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) z[k] = static_cast<acc_t>(student[k]) * inv_temp;
}

struct Shape {
  int64_t batch, out_dim, student_views, teacher_views;
  // Number of teacher views v != u that student view u is compared with.
  int64_t targets_of(int64_t u) const { return u < teacher_views ? teacher_views - 1 : teacher_views; }
};

// Online statistics of one sample (see the file comment); logsumexp() finalises them after pass 1.
template <typename acc_t>
struct SampleStats {
  std::vector<acc_t> teacher_max, teacher_sum, student_max, student_sum, pair_sum;  // pair_sum[v * Vs + u]

  explicit SampleStats(const Shape& shape)
      : teacher_max(shape.teacher_views, kNegInf<acc_t>),
        teacher_sum(shape.teacher_views, 0),
        student_max(shape.student_views, kNegInf<acc_t>),
        student_sum(shape.student_views, 0),
        pair_sum(shape.teacher_views * shape.student_views, 0) {}
};

// Per-thread tile buffers: y and exp(y - max) per teacher view; pass 1: z and m - z of the student view at hand;
// pass 2: the target sums over all teacher views and over all but one.
template <typename acc_t>
struct Tiles {
  std::vector<acc_t> teacher_logits, teacher_exp, student_logits, student_work, all_targets, targets;
  explicit Tiles(const Shape& shape)
      : teacher_logits(shape.teacher_views * kTile),
        teacher_exp(shape.teacher_views * kTile),
        student_logits(kTile),
        student_work(kTile),
        all_targets(kTile),
        targets(kTile) {}
};

// Pass 1 over one sample: fills stats and returns the sum of the sample's Vs row losses.
template <typename scalar_t, typename acc_t>
MSD_FAST_SIMD_CLONES
acc_t sample_loss(const scalar_t* student, const scalar_t* teacher, const acc_t* center, int64_t b, const Shape& shape,
                  acc_t inv_student_temp, acc_t inv_teacher_temp, SampleStats<acc_t>& stats, Tiles<acc_t>& tiles) {
  const int64_t K = shape.out_dim, Vt = shape.teacher_views, Vs = shape.student_views;
  std::vector<acc_t> teacher_sum_before(Vt);
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int64_t n = std::min(kTile, K - k0);
    for (int64_t v = 0; v < Vt; ++v) {
      acc_t* y = tiles.teacher_logits.data() + v * kTile;
      // 1. Teacher view v: y = (t - c) / tau_t for this tile; a larger running max M_v rescales what was summed with
      //    the old max (S_v and every D[v][u]) by exp(M_old - M_new) before the tile's exp(y - M_v) are added.
      teacher_tile(teacher + ((v * shape.batch + b) * K + k0), center + k0, inv_teacher_temp, y, n);
      const acc_t new_max = std::max(stats.teacher_max[v], tile_max(y, n));
      const acc_t rescale = k0 == 0 ? acc_t(0) : exp_nonpositive(stats.teacher_max[v] - new_max);
      teacher_sum_before[v] = stats.teacher_sum[v] * rescale;
      for (int64_t u = 0; u < Vs; ++u) stats.pair_sum[v * Vs + u] *= rescale;
      stats.teacher_max[v] = new_max;
      stats.teacher_sum[v] =
          teacher_sum_before[v] + exp_shifted(y, new_max, tiles.teacher_exp.data() + v * kTile, n);
    }
    for (int64_t u = 0; u < Vs; ++u) {
      acc_t* z = tiles.student_logits.data();
      acc_t* distance = tiles.student_work.data();
      // 2. Student view u: z = s / tau_s; its running log-sum-exp as for the teacher, and distance = m_u - z >= 0.
      student_tile(student + ((u * shape.batch + b) * K + k0), inv_student_temp, z, n);
      const acc_t new_max = std::max(stats.student_max[u], tile_max(z, n));
      const acc_t shift = k0 == 0 ? acc_t(0) : new_max - stats.student_max[u];
      acc_t exp_sum = 0;
#pragma omp simd reduction(+ : exp_sum)
      for (int64_t k = 0; k < n; ++k) {
        distance[k] = new_max - z[k];
        exp_sum += exp_nonpositive(-distance[k]);
      }
      stats.student_sum[u] = stats.student_sum[u] * exp_nonpositive(-shift) + exp_sum;
      stats.student_max[u] = new_max;
      // 3. D[v][u] += <e_v, m_u - z_u> over the tile; a grown m_u adds (m_new - m_old) to every earlier term, i.e.
      //    shift * S_v (with S_v as it stood before this tile).
      for (int64_t v = 0; v < Vt; ++v) {
        stats.pair_sum[v * Vs + u] +=
            shift * teacher_sum_before[v] + dot(tiles.teacher_exp.data() + v * kTile, distance, n);
      }
    }
  }
  // 4. Row loss of (u, b): sum over v != u of D[v][u] / S_v, plus (number of targets) * log(sum_u).
  acc_t loss = 0;
  for (int64_t u = 0; u < Vs; ++u) {
    acc_t row = static_cast<acc_t>(shape.targets_of(u)) * std::log(stats.student_sum[u]);
    for (int64_t v = 0; v < Vt; ++v) {
      if (v != u) row += stats.pair_sum[v * Vs + u] / stats.teacher_sum[v];
    }
    loss += row;
  }
  return loss;
}

// Pass 2 over one sample: grad_u = scale * (targets_of(u) * softmax(z_u) - sum_{v != u} q_v).
template <typename scalar_t, typename acc_t>
MSD_FAST_SIMD_CLONES
void sample_gradient(const scalar_t* student, const scalar_t* teacher, const acc_t* center, scalar_t* grad, int64_t b,
                     const Shape& shape, acc_t inv_student_temp, acc_t inv_teacher_temp, acc_t scale,
                     const SampleStats<acc_t>& stats, Tiles<acc_t>& tiles) {
  const int64_t K = shape.out_dim, Vt = shape.teacher_views, Vs = shape.student_views;
  std::vector<acc_t> teacher_lse(Vt), student_lse(Vs);
  // 1. Finalise the statistics of pass 1: LSE = max + log(sum), per view.
  for (int64_t v = 0; v < Vt; ++v) teacher_lse[v] = stats.teacher_max[v] + std::log(stats.teacher_sum[v]);
  for (int64_t u = 0; u < Vs; ++u) student_lse[u] = stats.student_max[u] + std::log(stats.student_sum[u]);
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int64_t n = std::min(kTile, K - k0);
    for (int64_t v = 0; v < Vt; ++v) {
      acc_t* y = tiles.teacher_logits.data() + v * kTile;
      // 2. q_v = softmax of the teacher view's tile, recomputed (cheaper than storing [Vt, K] per sample).
      teacher_tile(teacher + ((v * shape.batch + b) * K + k0), center + k0, inv_teacher_temp, y, n);
      exp_shifted(y, teacher_lse[v], tiles.teacher_exp.data() + v * kTile, n);
    }
    // 3. The targets of each student view (below).
    // Targets: the sum of all teacher views for u >= Vt, all but view u for u < Vt (summed directly, no
    // cancellation).
    acc_t* all_views = tiles.all_targets.data();
    std::fill(all_views, all_views + n, acc_t(0));
    for (int64_t v = 0; v < Vt; ++v) add_to(tiles.teacher_exp.data() + v * kTile, all_views, n);
    for (int64_t u = 0; u < Vs; ++u) {
      const acc_t* target = all_views;
      if (u < Vt) {
        acc_t* other_views = tiles.targets.data();
        std::fill(other_views, other_views + n, acc_t(0));
        for (int64_t v = 0; v < Vt; ++v) {
          if (v != u) add_to(tiles.teacher_exp.data() + v * kTile, other_views, n);
        }
        target = other_views;
      }
      // 4. grad_u = scale * (count * softmax(z_u) - targets), written straight into the gradient.
      const acc_t count = static_cast<acc_t>(shape.targets_of(u));
      const acc_t lse = student_lse[u];
      const scalar_t* in = student + ((u * shape.batch + b) * K + k0);
      scalar_t* out = grad + ((u * shape.batch + b) * K + k0);
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const acc_t z = static_cast<acc_t>(in[k]) * inv_student_temp;
        out[k] = static_cast<scalar_t>(scale * (count * exp_nonpositive(z - lse) - target[k]));
      }
    }
  }
}

// A fresh multi-MB gradient costs one page fault per 4 KiB page on its first write, a large share of pass 2 at
// DINO's shapes; on Linux, ask for transparent huge pages instead (a hint: ignored where THP is off).
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
  std::vector<acc_t> sample_losses(shape.batch);
  // Below this many logits a call is cheaper on one thread than waking the OpenMP team.
  const bool parallel = (shape.student_views + shape.teacher_views) * shape.batch * shape.out_dim >= (1 << 15);
#pragma omp parallel num_threads(at::get_num_threads()) if (parallel)
  {
    Tiles<acc_t> tiles(shape);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < shape.batch; ++b) {
      SampleStats<acc_t> stats(shape);
      sample_losses[b] = sample_loss(student_ptr, teacher_ptr, center_ptr, b, shape, inv_student_temp,
                                     inv_teacher_temp, stats, tiles);
      if (grad_ptr != nullptr) {
        sample_gradient(student_ptr, teacher_ptr, center_ptr, grad_ptr, b, shape, inv_student_temp, inv_teacher_temp,
                        scale, stats, tiles);
      }
    }
  }
  acc_t total = 0;
  for (const acc_t value : sample_losses) total += value;
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
