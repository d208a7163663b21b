// Fused masked token gathering on CPU (contract: msd_fast/ops/masked_gather.py), forward and backward.
//
// Forward: tokens [B, N, D] (any strides), idx [V, B, K] int32/int64 (contiguous), pos [N, D] or [B, N, D] (any
// strides) or none, prefix [P, D] (contiguous) or none -> out [V * B, P + K, D] (contiguous),
//   out[v * B + b, p] = prefix[p],  out[v * B + b, P + k] = tokens[b, idx[v, b, k]] + pos[(b,) idx[v, b, k]],
// the addition in at::opmath_type (float32 for half/bfloat16) rounded once, as torch.add does. Threads split the
// output token rows.
//
// Backward (no atomics): offsets [B, N + 1] and sources [B, V * K] (int64, from inverse_index) list, per sample
// b and token n, the slots s = v * K + k that read it. Work item n < N sums those grad_out rows in that fixed order
// (per sample, then over samples for a shared pos); work item N + p sums column p of every output row (the prefix).
#include <omp.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../common/argument_checks.h"
#include "ops.h"

namespace msd_fast {
namespace cpu {
namespace {

// Strides (in elements) of a [B, N, D] token-like tensor; stride_b is 0 for a position embedding shared by samples.
struct TokenStrides {
  int64_t b, n, d;
};

TokenStrides token_strides(const torch::Tensor& t) {
  if (t.dim() == 2) return {0, t.stride(0), t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

template <typename scalar_t>
void copy_row(scalar_t* out, const scalar_t* source, int64_t stride_d, int64_t D) {
  if (stride_d == 1) {
    std::memcpy(out, source, D * sizeof(scalar_t));
    return;
  }
  for (int64_t d = 0; d < D; ++d) out[d] = source[d * stride_d];
}

template <typename scalar_t>
void add_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ source, int64_t stride_d,
             const scalar_t* __restrict__ pos, int64_t pos_stride_d, int64_t D) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (stride_d == 1 && pos_stride_d == 1) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      out[d] = static_cast<scalar_t>(static_cast<opmath_t>(source[d]) + static_cast<opmath_t>(pos[d]));
    }
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    out[d] = static_cast<scalar_t>(static_cast<opmath_t>(source[d * stride_d]) +
                                   static_cast<opmath_t>(pos[d * pos_stride_d]));
  }
}

// Below this many values a call is cheaper on one thread than waking the OpenMP team.
constexpr int64_t kParallelMinValues = 1 << 15;

template <typename scalar_t, typename index_t>
void gather_views(const scalar_t* tokens, TokenStrides ts, const index_t* idx, const scalar_t* pos, TokenStrides ps,
                  const scalar_t* prefix, scalar_t* out, int64_t V, int64_t B, int64_t K, int64_t P, int64_t D) {
  const int64_t row_len = P + K;
  const bool parallel = V * B * row_len * D >= kParallelMinValues;
#pragma omp parallel for collapse(2) schedule(static) num_threads(at::get_num_threads()) if (parallel)
  for (int64_t r = 0; r < V * B; ++r) {
    for (int64_t t = 0; t < row_len; ++t) {
      scalar_t* target = out + (r * row_len + t) * D;
      // 1. Output token t of row r = v * B + b: the first P tokens copy the prefix (CLS/registers).
      if (t < P) {
        std::memcpy(target, prefix + t * D, D * sizeof(scalar_t));
        continue;
      }
      // 2. The others read token n = idx[v, b, t - P] of sample b (any strides) ...
      const int64_t b = r % B, n = static_cast<int64_t>(idx[r * K + t - P]);
      const scalar_t* source = tokens + b * ts.b + n * ts.n;
      // 3. ... and add its position embedding, shared ([N, D]) or per sample ([B, N, D]).
      if (pos == nullptr) {
        copy_row(target, source, ts.d, D);
      } else {
        add_row(target, source, ts.d, pos + b * ps.b + n * ps.n, ps.d, D);
      }
    }
  }
}

template <typename index_t>
void check_index_values(const torch::Tensor& idx, int64_t N) {
  const index_t* values = idx.data_ptr<index_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK_INDEX(values[i] >= 0 && values[i] < N, "idx holds ", static_cast<int64_t>(values[i]),
                      ", outside [0, ", N, ")");
  }
}

// Where the backward reads and writes: grad_out [V * B, P + K, D] contiguous; outputs contiguous or null.
using BackwardGeometry = GatherBackwardShape;
template <typename scalar_t>
using BackwardTensors = GatherBackwardPointers<scalar_t>;

template <typename scalar_t, typename opmath_t>
void store_row(scalar_t* out, const opmath_t* sum, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(sum[d]);
}

// Token n: for each sample, the sum of the grad_out rows that read (b, n); their sum over samples for a shared pos.
template <typename scalar_t, typename opmath_t>
void token_gradient(const BackwardTensors<scalar_t>& t, const BackwardGeometry& g, int64_t n, opmath_t* sample_sum,
                    double* pos_sum) {
  const int64_t row_len = g.P + g.K, D = g.D;
  const bool shared_pos = t.grad_pos != nullptr && !t.pos_per_sample;
  if (shared_pos) std::fill(pos_sum, pos_sum + D, 0.0);
  for (int64_t b = 0; b < g.B; ++b) {
    std::fill(sample_sum, sample_sum + D, opmath_t(0));
    // 1. The slots s = v * K + k that read (b, n): entries offsets[b, n] .. offsets[b, n + 1] of sources[b].
    const int64_t* slots = t.sources + b * g.V * g.K;
    const int64_t begin = t.offsets[b * (g.N + 1) + n], end = t.offsets[b * (g.N + 1) + n + 1];
    for (int64_t o = begin; o < end; ++o) {
      // 2. Sum those grad_out rows (row v * B + b, token P + k) in the fixed order of the table: deterministic.
      const int64_t v = slots[o] / g.K, k = slots[o] % g.K;
      const scalar_t* row = t.grad_out + ((v * g.B + b) * row_len + g.P + k) * D;
      for (int64_t d = 0; d < D; ++d) sample_sum[d] += static_cast<opmath_t>(row[d]);
    }
    // 3. That sum is the token's gradient and a per-sample pos's; a shared pos sums it over samples in float64.
    const int64_t token = (b * g.N + n) * D;
    if (t.grad_tokens != nullptr) store_row(t.grad_tokens + token, sample_sum, D);
    if (t.grad_pos != nullptr && t.pos_per_sample) store_row(t.grad_pos + token, sample_sum, D);
    if (shared_pos) {
      for (int64_t d = 0; d < D; ++d) pos_sum[d] += sample_sum[d];
    }
  }
  if (shared_pos) store_row(t.grad_pos + n * D, pos_sum, D);
}

// Prefix token p: the sum of column p over all V * B output rows (in float64: it adds hundreds of terms).
template <typename scalar_t>
void prefix_gradient(const BackwardTensors<scalar_t>& t, const BackwardGeometry& g, int64_t p, double* sum) {
  const int64_t row_len = g.P + g.K, D = g.D;
  std::fill(sum, sum + D, 0.0);
  for (int64_t r = 0; r < g.V * g.B; ++r) {
    const scalar_t* row = t.grad_out + (r * row_len + p) * D;
    for (int64_t d = 0; d < D; ++d) sum[d] += static_cast<double>(row[d]);
  }
  store_row(t.grad_prefix + p * D, sum, D);
}

template <typename scalar_t>
void scatter_views(const BackwardTensors<scalar_t>& t, const BackwardGeometry& g) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t prefix_items = t.grad_prefix != nullptr ? g.P : 0;
  const bool token_items = t.grad_tokens != nullptr || t.grad_pos != nullptr;
  const int64_t first = token_items ? 0 : g.N;
  const bool parallel = g.V * g.B * (g.P + g.K) * g.D >= kParallelMinValues;  // values of grad_out read
#pragma omp parallel num_threads(at::get_num_threads()) if (parallel)
  {
    std::vector<opmath_t> sample_sum(g.D);
    std::vector<double> cross_sample_sum(g.D);  // shared pos and prefix: sums over samples/rows in float64
    // Work items: tokens n < N (skipped when neither tokens nor pos want a gradient), then prefix tokens N + p;
    // each item writes only its own output rows, so threads never collide.
#pragma omp for schedule(static)
    for (int64_t item = first; item < g.N + prefix_items; ++item) {
      if (item < g.N) {
        token_gradient(t, g, item, sample_sum.data(), cross_sample_sum.data());
      } else {
        prefix_gradient(t, g, item - g.N, cross_sample_sum.data());
      }
    }
  }
}

// The backward tables must describe a valid inverse index (they come from inverse_index): offsets ascending from
// 0 to V * K per sample, sources in [0, V * K). Cheap next to the gradient itself, and no read goes out of bounds.
void check_inverse_index(const torch::Tensor& offsets, const torch::Tensor& sources, int64_t slots) {
  const int64_t B = offsets.size(0), entries = offsets.size(1);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* src = sources.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(off[b * entries] == 0 && off[b * entries + entries - 1] == slots,
                "offsets must run from 0 to V*K=", slots, " in every sample");
    for (int64_t i = 1; i < entries; ++i) {
      TORCH_CHECK(off[b * entries + i - 1] <= off[b * entries + i], "offsets must be non-decreasing");
    }
  }
  for (int64_t i = 0; i < sources.numel(); ++i) {
    TORCH_CHECK_INDEX(src[i] >= 0 && src[i] < slots, "sources holds ", src[i], ", outside [0, ", slots, ")");
  }
}

}  // namespace

torch::Tensor masked_gather_forward(const torch::Tensor& tokens, const torch::Tensor& idx,
                                    const c10::optional<torch::Tensor>& pos,
                                    const c10::optional<torch::Tensor>& prefix) {
  TORCH_CHECK(tokens.device().is_cpu() && tokens.dim() == 3, "tokens must be a [B, N, D] CPU tensor");
  const int64_t B = tokens.size(0), N = tokens.size(1), D = tokens.size(2);
  TORCH_CHECK(idx.device().is_cpu() && idx.is_contiguous() && idx.dim() == 3 && idx.size(1) == B &&
                  (idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong),
              "idx must be a contiguous int32/int64 CPU tensor of shape [V, B=", B, ", K]");
  const int64_t V = idx.size(0), K = idx.size(2);
  if (pos.has_value()) {
    TORCH_CHECK(pos->device().is_cpu() && pos->scalar_type() == tokens.scalar_type(),
                "pos must be a CPU tensor of tokens' dtype");
    TORCH_CHECK((pos->dim() == 2 && pos->size(0) == N && pos->size(1) == D) ||
                    (pos->dim() == 3 && pos->size(0) == B && pos->size(1) == N && pos->size(2) == D),
                "pos must be [N, D] or [B, N, D] with N=", N, ", D=", D);
  }
  int64_t P = 0;
  if (prefix.has_value()) {
    TORCH_CHECK(prefix->device().is_cpu() && prefix->scalar_type() == tokens.scalar_type() &&
                    prefix->is_contiguous() && prefix->dim() == 2 && prefix->size(1) == D,
                "prefix must be a contiguous [P, D=", D, "] CPU tensor of tokens' dtype");
    P = prefix->size(0);
  }
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "masked_gather_check_cpu", [&] { check_index_values<index_t>(idx, N); });

  auto out = torch::empty({V * B, P + K, D}, tokens.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "masked_gather_cpu", [&] {
    const scalar_t* pos_ptr = pos.has_value() ? pos->data_ptr<scalar_t>() : nullptr;
    const TokenStrides pos_strides = pos.has_value() ? token_strides(*pos) : TokenStrides{0, 0, 0};
    const scalar_t* prefix_ptr = prefix.has_value() ? prefix->data_ptr<scalar_t>() : nullptr;
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "masked_gather_cpu_index", [&] {
      gather_views<scalar_t, index_t>(tokens.data_ptr<scalar_t>(), token_strides(tokens), idx.data_ptr<index_t>(),
                                      pos_ptr, pos_strides, prefix_ptr, out.data_ptr<scalar_t>(), V, B, K, P, D);
    });
  });
  return out;
}

void masked_gather_backward(const torch::Tensor& grad_out, const torch::Tensor& offsets, const torch::Tensor& sources,
                            int64_t num_views, const c10::optional<torch::Tensor>& grad_tokens,
                            const c10::optional<torch::Tensor>& grad_pos,
                            const c10::optional<torch::Tensor>& grad_prefix) {
  TORCH_CHECK(grad_out.device().is_cpu(), "grad_out must be a CPU tensor");
  const GatherBackwardShape shape = check_gather_backward(grad_out, offsets, sources, num_views, grad_tokens, grad_pos,
                                                          grad_prefix);
  check_inverse_index(offsets, sources, shape.V * shape.K);

  const BackwardGeometry& geometry = shape;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "masked_gather_backward_cpu", [&] {
    const auto tensors = gather_backward_pointers<scalar_t>(grad_out, offsets, sources, grad_tokens, grad_pos,
                                                            grad_prefix, shape.pos_per_sample);
    scatter_views(tensors, geometry);
  });
}

}  // namespace cpu
}  // namespace msd_fast
