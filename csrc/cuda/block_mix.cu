// Dense key-derived block transform ("block mixing") on CUDA; same contract as csrc/cpu/block_mix.cpp.
//
// A tiled GEMM whose left operand is gathered from the image: rows are output blocks r = (b, n) (B*N of them),
// columns the L output values. A thread block computes a kTileM x kTileN tile of out (kThreads threads, each a
// kMicro x kMicro micro-tile) and walks the L inputs in steps of kTileK: it stages the source values of its rows
// (read through src_block and x's strides, converted to opmath) and the matching tile of matrix in shared memory,
// then accumulates with plain FMAs in opmath (float32, or float64 for float64 x; no tensor cores or TF32, so the
// result is the reference's to float rounding). The epilogue computes scale * acc + bias with two roundings (as the
// reference) and stores the tile in image layout, rounded to out_dtype.
// Index math: int64 for the base address of each row's source and output block (computed once per tile), int32
// within a block and for the table lookups (the launcher checks the sizes).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/block_mix.h"
#include "ops.h"

namespace msd_fast {
namespace cuda {
namespace {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kMicro = 4;
constexpr int kThreads = (kTileM / kMicro) * (kTileN / kMicro);  // 256
static_assert(kThreads % kTileK == 0 && (kTileM * kTileK) % kThreads == 0 && (kTileN * kTileK) % kThreads == 0,
              "each loader thread must keep one k column of a tile");

// Multiply and add rounded separately (nvcc would otherwise fuse them into one FMA, unlike the reference).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

struct BlockMixGeometry {
  int C, H, W, p, grid_w, N, L;
  int64_t rows;                          // B * N
  int64_t stride_b;                      // x's strides
  int stride_c, stride_h, stride_w;      // fit in int32 within a block (checked)
  int64_t block_table_stride;            // N for a per-sample src_block, else 0
};

// In-block offset of value e = (c, u, v) for strides (sc, sh, sw).
__device__ __forceinline__ int value_offset(int e, int p, int pp, int sc, int sh, int sw) {
  const int c = e / pp, rest = e - c * pp, u = rest / p, v = rest - u * p;
  return c * sc + u * sh + v * sw;
}

template <typename scalar_t, typename opmath_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    block_mix_kernel(const scalar_t* __restrict__ x, const opmath_t* __restrict__ matrix,
                     const int64_t* __restrict__ src_block, const opmath_t* __restrict__ bias, opmath_t scale,
                     out_t* __restrict__ out, BlockMixGeometry g) {
  __shared__ opmath_t x_tile[kTileK][kTileM];       // x_tile[k][row]: source value k of a row's block
  __shared__ opmath_t m_tile[kTileK][kTileN];       // m_tile[k][col] = matrix[col, k]
  __shared__ int64_t source_base[kTileM], out_base[kTileM];
  __shared__ bool row_valid[kTileM];

  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int col0 = blockIdx.y * kTileN;
  const int pp = g.p * g.p;
  // 1. Per tile row r = (b, n), once: the int64 base address of its source block src_block[(b,) n] in x and of
  //    output block n in out (shared memory, read by every loader and by the epilogue).
  if (tid < kTileM) {
    const int64_t r = row0 + tid;
    const bool valid = r < g.rows;
    const int64_t b = valid ? r / g.N : 0;
    const int n = valid ? static_cast<int>(r - b * g.N) : 0;
    const int m = static_cast<int>(src_block[b * g.block_table_stride + n]);
    const int m_i = m / g.grid_w, m_j = m - m_i * g.grid_w, n_i = n / g.grid_w, n_j = n - n_i * g.grid_w;
    source_base[tid] = b * g.stride_b + static_cast<int64_t>(m_i) * g.p * g.stride_h +
                       static_cast<int64_t>(m_j) * g.p * g.stride_w;
    out_base[tid] = b * g.C * g.H * g.W + static_cast<int64_t>(n_i) * g.p * g.W + n_j * g.p;
    row_valid[tid] = valid;
  }

  // Loader roles: this thread always loads input column k_load of a tile (kThreads is a multiple of kTileK).
  const int k_load = tid % kTileK, first_load = tid / kTileK;
  constexpr int kLoadStride = kThreads / kTileK;
  // Compute roles: rows ty + i * kRowStep, columns tx + j * kColStep (conflict-free shared-memory reads).
  constexpr int kColStep = kTileN / kMicro, kRowStep = kTileM / kMicro;
  const int tx = tid % kColStep, ty = tid / kColStep;
  opmath_t acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = opmath_t(0);
  }
  __syncthreads();

  // 2. Walk the L inputs in steps of kTileK: stage x_tile[k][row] (gathered through the row's base and value k's
  //    in-block offset, converted to opmath, 0 past the edges) and m_tile[k][col] = matrix[col0 + col, k].
  for (int k0 = 0; k0 < g.L; k0 += kTileK) {
    const int k = k0 + k_load;
    const bool k_valid = k < g.L;
    const int in_block = k_valid ? value_offset(k, g.p, pp, g.stride_c, g.stride_h, g.stride_w) : 0;
#pragma unroll
    for (int row = first_load; row < kTileM; row += kLoadStride) {
      x_tile[k_load][row] = (k_valid && row_valid[row]) ? static_cast<opmath_t>(x[source_base[row] + in_block])
                                                        : opmath_t(0);
    }
#pragma unroll
    for (int col = first_load; col < kTileN; col += kLoadStride) {
      const int i = col0 + col;
      m_tile[k_load][col] = (k_valid && i < g.L) ? matrix[static_cast<int64_t>(i) * g.L + k] : opmath_t(0);
    }
    __syncthreads();
    // 3. Each thread accumulates its kMicro x kMicro outputs: acc[i][j] += x[row_i, k] * matrix[col_j, k].
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      opmath_t a[kMicro], w[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) a[i] = x_tile[kk][ty + i * kRowStep];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) w[j] = m_tile[kk][tx + j * kColStep];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] += a[i] * w[j];
      }
    }
    __syncthreads();
  }

  // 4. Epilogue: output value i_out = (c, u, v) of row r goes to out_base[r] + c*H*W + u*W + v, as
  //    round(round(scale * acc) + bias) like the reference (mul_rn/add_rn keep nvcc from fusing them).
  const int HW = g.H * g.W;
#pragma unroll
  for (int j = 0; j < kMicro; ++j) {
    const int i_out = col0 + tx + j * kColStep;
    if (i_out >= g.L) continue;
    const int c = i_out / pp, rest = i_out - c * pp, u = rest / g.p, v = rest - u * g.p;
    const int out_offset = c * HW + u * g.W + v;
    const opmath_t b_i = bias[i_out];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int row = ty + i * kRowStep;
      if (!row_valid[row]) continue;
      out[out_base[row] + out_offset] = block_mix_output<out_t>(add_rn(mul_rn(scale, acc[i][j]), b_i));
    }
  }
}

template <typename scalar_t, typename opmath_t, typename out_t>
void launch(const torch::Tensor& x, const torch::Tensor& matrix, const torch::Tensor& src_block,
            const torch::Tensor& bias, double scale, torch::Tensor& out, const BlockMixGeometry& g) {
  const dim3 grid(static_cast<unsigned>((g.rows + kTileM - 1) / kTileM),
                  static_cast<unsigned>((g.L + kTileN - 1) / kTileN));
  block_mix_kernel<scalar_t, opmath_t, out_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<scalar_t>(), matrix.data_ptr<opmath_t>(), src_block.data_ptr<int64_t>(),
      bias.data_ptr<opmath_t>(), static_cast<opmath_t>(scale), out.data_ptr<out_t>(), g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename opmath_t>
void launch_any_out(const torch::Tensor& x, const torch::Tensor& matrix, const torch::Tensor& src_block,
                    const torch::Tensor& bias, double scale, torch::Tensor& out, const BlockMixGeometry& g) {
  switch (out.scalar_type()) {
    case at::kHalf:
      return launch<scalar_t, opmath_t, at::Half>(x, matrix, src_block, bias, scale, out, g);
    case at::kBFloat16:
      return launch<scalar_t, opmath_t, at::BFloat16>(x, matrix, src_block, bias, scale, out, g);
    case at::kFloat:
      return launch<scalar_t, opmath_t, float>(x, matrix, src_block, bias, scale, out, g);
    case at::kDouble:
      return launch<scalar_t, opmath_t, double>(x, matrix, src_block, bias, scale, out, g);
    default:
      TORCH_CHECK(false, "out_dtype must be float16, bfloat16, float32 or float64");
  }
}

}  // namespace

torch::Tensor block_mix(const torch::Tensor& x, const torch::Tensor& matrix, const torch::Tensor& src_block,
                        const torch::Tensor& bias, double scale, int64_t patch_size, at::ScalarType out_dtype) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  const BlockMixShape s = check_block_mix(x, matrix, src_block, bias, patch_size, out_dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({s.B, s.C, s.H, s.W}, x.options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  constexpr int64_t kInt32Limit = int64_t{1} << 31;
  TORCH_CHECK(s.C * s.H * s.W < kInt32Limit && s.L < kInt32Limit,
              "image too large for the CUDA kernel's 32-bit in-image indexing");
  TORCH_CHECK(x.stride(1) >= 0 && x.stride(2) >= 0 && x.stride(3) >= 0 &&
                  (s.C - 1) * x.stride(1) + (s.p - 1) * (x.stride(2) + x.stride(3)) < kInt32Limit,
              "x strides too large for 32-bit in-block offsets");
  TORCH_CHECK((s.B * s.N + kTileM - 1) / kTileM < kInt32Limit, "too many blocks for one launch");
  // The table's values decide which memory is read: check them here (one reduction and one synchronisation), as the
  // CPU kernel does, so that a bad direct call raises instead of faulting the device.
  if (src_block.numel() > 0) {
    const auto [low, high] = at::aminmax(src_block);
    const int64_t min_value = low.item<int64_t>(), max_value = high.item<int64_t>();
    TORCH_CHECK(min_value >= 0 && max_value < s.N, "src_block has values outside [0, ", s.N, "): min ", min_value,
                ", max ", max_value);
  }
  const BlockMixGeometry g{static_cast<int>(s.C), static_cast<int>(s.H), static_cast<int>(s.W),
                           static_cast<int>(s.p), static_cast<int>(s.gw), static_cast<int>(s.N),
                           static_cast<int>(s.L), s.B * s.N, x.stride(0), static_cast<int>(x.stride(1)),
                           static_cast<int>(x.stride(2)), static_cast<int>(x.stride(3)),
                           s.per_sample ? s.N : 0};
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "block_mix_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      launch_any_out<scalar_t, double>(x, matrix, src_block, bias, scale, out, g);
    } else {
      launch_any_out<scalar_t, float>(x, matrix, src_block, bias, scale, out, g);
    }
  });
  return out;
}

}  // namespace cuda
}  // namespace msd_fast
