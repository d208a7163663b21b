// Fused masked token gathering on CUDA, forward and backward; same contract as csrc/cpu/masked_gather.cpp.
//
// Forward: a grid-stride loop over the output's [V * B * (P + K)] token rows x (D / kVec) feature vectors; each
// thread copies one vector of kVec elements (16-byte loads/stores when D, the feature strides and the base pointers
// allow it, else one element) from the prefix or from tokens[b, idx[v, b, k]], adding pos in opmath (float32 for
// half/bfloat16, rounded once). Consecutive threads touch consecutive features, so loads and stores coalesce.
//
// Backward (no atomics, deterministic): block (x = work item, y = tile of kTileD features), kWarps warps. Item
// n < N: warp w takes samples b = w, w + kWarps, ...; for each it sums, in float32 and in the order of the inverse
// index (offsets, sources), the grad_out rows that read (b, n), writes grad_tokens[b, n] (and a per-sample
// grad_pos[b, n]) and keeps a running sum for a shared grad_pos[n]; the warps' running sums are then added in warp
// order through shared memory. Item N + p: warps stride over the V * B output rows summing column p (the prefix).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "../common/argument_checks.h"
#include "ops.h"

namespace msd_fast {
namespace cuda {
namespace {

constexpr int kForwardThreads = 256;
constexpr int kWarps = 8;
constexpr int kPerLane = 4;
constexpr int kTileD = 32 * kPerLane;

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Vector {
  scalar_t values[kVec];
};

// Strides (in elements) of a [B, N, D] token-like tensor; b is 0 for a position embedding shared by samples.
struct TokenStrides {
  int64_t b, n, d;
};

struct ForwardGeometry {
  int B, K, P, row_len, vectors_per_row;
  int64_t D;
};

// kVec consecutive elements; kVec > 1 is only launched for unit feature strides and 16-byte aligned rows.
template <typename scalar_t, int kVec>
__device__ __forceinline__ Vector<scalar_t, kVec> load_vector(const scalar_t* source) {
  return *reinterpret_cast<const Vector<scalar_t, kVec>*>(source);
}

template <typename scalar_t, typename index_t, int kVec, bool kHasPos>
__global__ void masked_gather_forward_kernel(const scalar_t* __restrict__ tokens, TokenStrides ts,
                                             const index_t* __restrict__ idx, const scalar_t* __restrict__ pos,
                                             TokenStrides ps, const scalar_t* __restrict__ prefix,
                                             scalar_t* __restrict__ out, ForwardGeometry g, int total_vectors) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t q64 = first; q64 < total_vectors; q64 += stride) {
    const int q = static_cast<int>(q64);  // 32-bit division below: total_vectors < 2^31
    // 1. Vector q -> output token row (v * B + b, t) and its first feature d.
    const int token_row = q / g.vectors_per_row;
    const int64_t d = static_cast<int64_t>(q - token_row * g.vectors_per_row) * kVec;
    const int r = token_row / g.row_len, t = token_row - r * g.row_len;
    Vector<scalar_t, kVec> value;
    // 2. Prefix tokens copy prefix[t]; the others load tokens[b, idx[v, b, t - P]] (+ pos, summed in opmath).
    if (t < g.P) {
      value = load_vector<scalar_t, kVec>(prefix + t * g.D + d);
    } else {
      const int b = r % g.B;
      const int64_t n = static_cast<int64_t>(idx[static_cast<int64_t>(r) * g.K + t - g.P]);
      value = load_vector<scalar_t, kVec>(tokens + b * ts.b + n * ts.n + d * ts.d);
      if constexpr (kHasPos) {
        const Vector<scalar_t, kVec> add = load_vector<scalar_t, kVec>(pos + b * ps.b + n * ps.n + d * ps.d);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          value.values[e] =
              static_cast<scalar_t>(static_cast<opmath_t>(value.values[e]) + static_cast<opmath_t>(add.values[e]));
        }
      }
    }
    *reinterpret_cast<Vector<scalar_t, kVec>*>(out + static_cast<int64_t>(token_row) * g.D + d) = value;
  }
}

using BackwardGeometry = GatherBackwardShape;
template <typename scalar_t>
using BackwardTensors = GatherBackwardPointers<scalar_t>;

template <typename scalar_t>
__global__ void __launch_bounds__(32 * kWarps)
    masked_gather_backward_kernel(BackwardTensors<scalar_t> t, BackwardGeometry g, int64_t first_item) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ double warp_sums[kWarps][kTileD];  // sums over samples / rows: float64, they add hundreds of terms
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int64_t item = first_item + blockIdx.x, d0 = static_cast<int64_t>(blockIdx.y) * kTileD + lane;
  const int64_t row_len = g.P + g.K;
  double total[kPerLane] = {};
  scalar_t* reduced_out = nullptr;
  // 1. Token item n: each warp sums, per sample b, the grad_out rows the inverse index lists for (b, n), in
  //    table order; writes grad_tokens[b, n] / a per-sample grad_pos[b, n]; keeps a float64 running total.
  if (item < g.N) {
    const int64_t n = item;
    const bool shared_pos = t.grad_pos != nullptr && !t.pos_per_sample;
    for (int64_t b = warp; b < g.B; b += kWarps) {
      opmath_t sum[kPerLane] = {};
      const int64_t* slots = t.sources + b * g.V * g.K;
      const int64_t begin = t.offsets[b * (g.N + 1) + n], end = t.offsets[b * (g.N + 1) + n + 1];
      for (int64_t o = begin; o < end; ++o) {
        const int64_t v = slots[o] / g.K, k = slots[o] - v * g.K;
        const scalar_t* row = t.grad_out + ((v * g.B + b) * row_len + g.P + k) * g.D;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int64_t d = d0 + 32 * j;
          if (d < g.D) sum[j] += static_cast<opmath_t>(row[d]);
        }
      }
      const int64_t token = (b * g.N + n) * g.D;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int64_t d = d0 + 32 * j;
        if (d >= g.D) continue;
        if (t.grad_tokens != nullptr) t.grad_tokens[token + d] = static_cast<scalar_t>(sum[j]);
        if (t.grad_pos != nullptr && t.pos_per_sample) t.grad_pos[token + d] = static_cast<scalar_t>(sum[j]);
        total[j] += sum[j];
      }
    }
    if (!shared_pos) return;  // block-uniform: every thread of the block leaves here
    reduced_out = t.grad_pos + n * g.D;
  } else {
    // 2. Prefix item p: the warps stride over all V * B output rows, summing column p in float64.
    const int64_t p = item - g.N;
#pragma unroll 4
    for (int64_t r = warp; r < g.V * g.B; r += kWarps) {
      const scalar_t* row = t.grad_out + (r * row_len + p) * g.D;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int64_t d = d0 + 32 * j;
        if (d < g.D) total[j] += static_cast<double>(row[d]);
      }
    }
    reduced_out = t.grad_prefix + p * g.D;
  }
  // 3. The warps' totals meet in shared memory; warp 0 adds them in warp order (deterministic) and writes the
  //    shared grad_pos[n] or grad_prefix[p].
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) warp_sums[warp][lane + 32 * j] = total[j];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int64_t d = d0 + 32 * j;
    double sum = 0;
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][lane + 32 * j];
    if (d < g.D) reduced_out[d] = static_cast<scalar_t>(sum);
  }
}

TokenStrides token_strides(const torch::Tensor& t) {
  if (t.dim() == 2) return {0, t.stride(0), t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

bool aligned(const void* pointer, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(pointer) % bytes == 0; }

// The widest vector (16 bytes, else 1 element) that every row of tokens, pos, prefix and out can be read/written by.
int vector_width(const torch::Tensor& tokens, const c10::optional<torch::Tensor>& pos,
                 const c10::optional<torch::Tensor>& prefix, const torch::Tensor& out) {
  const int64_t vec = 16 / static_cast<int64_t>(tokens.element_size());
  const int64_t bytes = 16;
  const int64_t D = tokens.size(2);
  bool ok = vec > 1 && D % vec == 0 && aligned(out.data_ptr(), bytes);
  for (const torch::Tensor* t : {&tokens, pos.has_value() ? &*pos : nullptr, prefix.has_value() ? &*prefix : nullptr}) {
    if (t == nullptr) continue;
    ok = ok && t->stride(t->dim() - 1) == 1 && aligned(t->data_ptr(), bytes);
    for (int64_t i = 0; i + 1 < t->dim(); ++i) ok = ok && t->stride(i) % vec == 0;
  }
  return ok ? static_cast<int>(vec) : 1;
}

template <typename scalar_t, typename index_t, int kVec, bool kHasPos>
void launch_forward(const torch::Tensor& tokens, const torch::Tensor& idx, const c10::optional<torch::Tensor>& pos,
                    const c10::optional<torch::Tensor>& prefix, torch::Tensor& out, const ForwardGeometry& g,
                    int total_vectors) {
  const int blocks = static_cast<int>(std::min<int64_t>((total_vectors + kForwardThreads - 1) / kForwardThreads,
                                                        int64_t{1} << 20));
  const TokenStrides pos_strides = pos.has_value() ? token_strides(*pos) : TokenStrides{0, 0, 0};
  masked_gather_forward_kernel<scalar_t, index_t, kVec, kHasPos>
      <<<blocks, kForwardThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          tokens.data_ptr<scalar_t>(), token_strides(tokens), idx.data_ptr<index_t>(),
          pos.has_value() ? pos->data_ptr<scalar_t>() : nullptr, pos_strides,
          prefix.has_value() ? prefix->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), g, total_vectors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t, bool kHasPos>
void dispatch_vector_width(int vec, const torch::Tensor& tokens, const torch::Tensor& idx,
                           const c10::optional<torch::Tensor>& pos, const c10::optional<torch::Tensor>& prefix,
                           torch::Tensor& out, ForwardGeometry g) {
  const int64_t total = out.numel() / vec;
  TORCH_CHECK(total < (int64_t{1} << 31), "output too large for the CUDA kernel's 32-bit indexing");
  g.vectors_per_row = static_cast<int>(g.D / vec);
  constexpr int kWide = 16 / static_cast<int>(sizeof(scalar_t));
  if (vec == kWide) {
    launch_forward<scalar_t, index_t, kWide, kHasPos>(tokens, idx, pos, prefix, out, g, static_cast<int>(total));
  } else {
    launch_forward<scalar_t, index_t, 1, kHasPos>(tokens, idx, pos, prefix, out, g, static_cast<int>(total));
  }
}

void check_on(const torch::Tensor& t, const torch::Tensor& reference, const char* name) {
  TORCH_CHECK(t.device() == reference.device(), name, " must be on ", reference.device(), ", got ", t.device());
}

}  // namespace

torch::Tensor masked_gather_forward(const torch::Tensor& tokens, const torch::Tensor& idx,
                                    const c10::optional<torch::Tensor>& pos,
                                    const c10::optional<torch::Tensor>& prefix) {
  TORCH_CHECK(tokens.is_cuda() && tokens.dim() == 3, "tokens must be a [B, N, D] CUDA tensor");
  const int64_t B = tokens.size(0), N = tokens.size(1), D = tokens.size(2);
  check_on(idx, tokens, "idx");
  TORCH_CHECK(idx.is_contiguous() && idx.dim() == 3 && idx.size(1) == B &&
                  (idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong),
              "idx must be a contiguous int32/int64 tensor of shape [V, B=", B, ", K] (values checked in Python)");
  const int64_t V = idx.size(0), K = idx.size(2);
  if (pos.has_value()) {
    check_on(*pos, tokens, "pos");
    TORCH_CHECK(pos->scalar_type() == tokens.scalar_type(), "pos must have tokens' dtype");
    TORCH_CHECK((pos->dim() == 2 && pos->size(0) == N && pos->size(1) == D) ||
                    (pos->dim() == 3 && pos->size(0) == B && pos->size(1) == N && pos->size(2) == D),
                "pos must be [N, D] or [B, N, D] with N=", N, ", D=", D);
  }
  int64_t P = 0;
  if (prefix.has_value()) {
    check_on(*prefix, tokens, "prefix");
    TORCH_CHECK(prefix->scalar_type() == tokens.scalar_type() && prefix->is_contiguous() && prefix->dim() == 2 &&
                    prefix->size(1) == D,
                "prefix must be a contiguous [P, D=", D, "] tensor of tokens' dtype");
    P = prefix->size(0);
  }
  TORCH_CHECK(V * B < (int64_t{1} << 31) && P + K < (int64_t{1} << 31), "too many views or tokens for one launch");

  auto out = torch::empty({V * B, P + K, D}, tokens.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(tokens.device());
  const ForwardGeometry geometry{static_cast<int>(B), static_cast<int>(K), static_cast<int>(P),
                                 static_cast<int>(P + K), 0, D};
  const int vec = vector_width(tokens, pos, prefix, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "masked_gather_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "masked_gather_cuda_index", [&] {
      if (pos.has_value()) {
        dispatch_vector_width<scalar_t, index_t, true>(vec, tokens, idx, pos, prefix, out, geometry);
      } else {
        dispatch_vector_width<scalar_t, index_t, false>(vec, tokens, idx, pos, prefix, out, geometry);
      }
    });
  });
  return out;
}

void masked_gather_backward(const torch::Tensor& grad_out, const torch::Tensor& offsets, const torch::Tensor& sources,
                            int64_t num_views, const c10::optional<torch::Tensor>& grad_tokens,
                            const c10::optional<torch::Tensor>& grad_pos,
                            const c10::optional<torch::Tensor>& grad_prefix) {
  TORCH_CHECK(grad_out.is_cuda(), "grad_out must be a CUDA tensor");
  const GatherBackwardShape shape = check_gather_backward(grad_out, offsets, sources, num_views, grad_tokens, grad_pos,
                                                          grad_prefix);
  const int64_t N = shape.N, P = shape.P, D = shape.D;

  const bool token_items = grad_tokens.has_value() || grad_pos.has_value();
  const int64_t first_item = token_items ? 0 : N;
  const int64_t items = N + (grad_prefix.has_value() ? P : 0) - first_item;
  const int64_t tiles = (D + kTileD - 1) / kTileD;
  if (items == 0 || tiles == 0) return;
  TORCH_CHECK(items < (int64_t{1} << 31) && tiles < 65536, "too many tokens or features for one launch");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const BackwardGeometry& geometry = shape;
  const dim3 grid(static_cast<unsigned>(items), static_cast<unsigned>(tiles));
  const dim3 block(32, kWarps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "masked_gather_backward_cuda", [&] {
    const auto tensors = gather_backward_pointers<scalar_t>(grad_out, offsets, sources, grad_tokens, grad_pos,
                                                            grad_prefix, shape.pos_per_sample);
    masked_gather_backward_kernel<scalar_t>
        <<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(tensors, geometry, first_item);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace msd_fast
