// Dense key-derived block transform ("block mixing") on CPU.
//
// x: [B, C, H, W] uint8/float16/bfloat16/float32/float64, any strides; p | H and p | W, gw = W / p,
// N = (H / p) * gw blocks of L = C * p * p values, value index e = c * p * p + u * p + v, blocks row-major.
// matrix: [L, L] contiguous, bias: [L] contiguous, both opmath (float64 for float64 x, else float32).
// src_block: int64 [N] or [B, N] (one block order per image), values in [0, N).
//   out[b, block n, value i] = scale * sum_j matrix[i, j] * x[b, block src_block[(b,) n], value j] + bias[i]
// computed in opmath and rounded once to out_dtype (float16/bfloat16/float32/float64); out is a contiguous
// [B, C, H, W] in image layout (block n's value e at channel c, row (n / gw) * p + u, column (n % gw) * p + v).
//
// Rows (a row is one output block (b, n)) are split into chunks; at::parallel_for hands each thread whole chunks,
// and a thread runs three passes per chunk, so the chunk stays in its cache and threads never wait for each other:
//   gather   the source block's L values of each row, converted to opmath, into a [rows, L] buffer;
//   multiply one BLAS GEMM (at::mm, single-threaded inside the parallel region): [rows, L] x matrix^T;
//   scatter  scale * product + bias, rounded to out_dtype, into image layout.
// (One multi-threaded GEMM per chunk between parallel gather and scatter passes was 2-3x slower on a loaded 2-core
// machine: every pass ends in a barrier where spinning threads wait for a descheduled one.)
// The scale and bias are applied after the GEMM, in the reference's order (multiply, then add).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/block_mix.h"
#include "ops.h"

namespace msd_fast {
namespace cpu {
namespace {

// Rows per chunk: at most about this many opmath values in each of a thread's two scratch buffers (1 MiB in
// float32: they stay in L2 between the passes), at least enough rows to keep the GEMM efficient.
constexpr int64_t kChunkValues = int64_t{1} << 18;
constexpr int64_t kMinChunkRows = 32;

// buffer[r, e] = x[b, value e of block src_block[(b,) n]] for rows r = row0 .. row0 + rows - 1, (b, n) = r / N, r % N.
template <typename scalar_t, typename opmath_t>
void gather_rows(const scalar_t* x, opmath_t* buffer, const int64_t* block_offset, const int64_t* value_offset,
                 const BlockMixShape& s, int64_t x_stride_b, int64_t stride_w, int64_t row0, int64_t rows) {
  const int64_t L = s.L, p = s.p, segments = s.C * p;
  for (int64_t k = 0; k < rows; ++k) {
    const int64_t r = row0 + k, b = r / s.N, n = r - b * s.N;
    const int64_t m = s.per_sample ? block_offset[b * s.N + n] : block_offset[n];
    const scalar_t* source = x + b * x_stride_b + m;
    opmath_t* target = buffer + k * L;
    // value_offset[segment] locates the first value of each (channel, block row) run of p values.
    for (int64_t segment = 0; segment < segments; ++segment) {
      const scalar_t* run = source + value_offset[segment];
      opmath_t* out = target + segment * p;
      if (stride_w == 1) {
        for (int64_t v = 0; v < p; ++v) out[v] = static_cast<opmath_t>(run[v]);
      } else {
        for (int64_t v = 0; v < p; ++v) out[v] = static_cast<opmath_t>(run[v * stride_w]);
      }
    }
  }
}

// out[b, c, i * p + u, j * p + v] = scale * product[r, e] + bias[e] for the rows of the chunk, (i, j) = n's grid cell.
template <typename out_t, typename opmath_t>
void scatter_rows(const opmath_t* product, const opmath_t* bias, opmath_t scale, out_t* out, const BlockMixShape& s,
                  int64_t row0, int64_t rows) {
  const int64_t L = s.L, p = s.p, C = s.C, HW = s.H * s.W;
  for (int64_t k = 0; k < rows; ++k) {
    const int64_t r = row0 + k, b = r / s.N, n = r - b * s.N, i = n / s.gw, j = n - i * s.gw;
    const opmath_t* values = product + k * L;
    out_t* block = out + b * C * HW + i * p * s.W + j * p;
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t u = 0; u < p; ++u) {
        const int64_t e0 = (c * p + u) * p;
        out_t* target = block + c * HW + u * s.W;
        for (int64_t v = 0; v < p; ++v) {
          const opmath_t scaled = scale * values[e0 + v];  // rounded before the add, as in the reference
          target[v] = block_mix_output<out_t>(scaled + bias[e0 + v]);
        }
      }
    }
  }
}

template <typename scalar_t, typename opmath_t, typename out_t>
void block_mix_impl(const torch::Tensor& x, const torch::Tensor& matrix, const torch::Tensor& bias, double scale,
                    const std::vector<int64_t>& block_offset, const std::vector<int64_t>& value_offset,
                    const BlockMixShape& s, torch::Tensor& out) {
  const int64_t rows_total = s.B * s.N;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (rows_total + threads - 1) / threads;
  // 1. Chunk size: at most one chunk's worth of rows per thread, buffers of about kChunkValues values (in L2),
  //    but never under kMinChunkRows rows (the GEMM's efficiency).
  const int64_t chunk = std::min(per_thread, std::max(kMinChunkRows, kChunkValues / s.L));
  const int64_t n_chunks = (rows_total + chunk - 1) / chunk;
  const torch::Tensor matrix_t = matrix.t();  // a view: the GEMM reads matrix^T without copying it
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  const opmath_t* bias_data = bias.data_ptr<opmath_t>();
  out_t* out_data = out.data_ptr<out_t>();
  at::parallel_for(0, n_chunks, 1, [&](int64_t first, int64_t last) {
    torch::Tensor gathered = torch::empty({chunk, s.L}, matrix.options());
    torch::Tensor product = torch::empty({chunk, s.L}, matrix.options());
    for (int64_t index = first; index < last; ++index) {
      const int64_t row0 = index * chunk, rows = std::min(chunk, rows_total - row0);
      torch::Tensor gathered_rows = gathered.narrow(0, 0, rows), product_rows = product.narrow(0, 0, rows);
      // 2. Gather: row r of the buffer = the L values of its source block, in opmath.
      gather_rows<scalar_t, opmath_t>(x_data, gathered_rows.data_ptr<opmath_t>(), block_offset.data(),
                                      value_offset.data(), s, x.stride(0), x.stride(3), row0, rows);
      // 3. Multiply: product[r, i] = sum_j gathered[r, j] * matrix[i, j] (one single-threaded GEMM).
      at::mm_out(product_rows, gathered_rows, matrix_t);
      // 4. Scatter: scale * product + bias, rounded once, into block n's cell of the image layout.
      scatter_rows<out_t, opmath_t>(product_rows.data_ptr<opmath_t>(), bias_data, static_cast<opmath_t>(scale),
                                    out_data, s, row0, rows);
    }
  });
}

template <typename scalar_t, typename opmath_t>
void block_mix_any_out(const torch::Tensor& x, const torch::Tensor& matrix, const torch::Tensor& bias, double scale,
                       const std::vector<int64_t>& block_offset, const std::vector<int64_t>& value_offset,
                       const BlockMixShape& s, torch::Tensor& out) {
  switch (out.scalar_type()) {
    case at::kHalf:
      return block_mix_impl<scalar_t, opmath_t, at::Half>(x, matrix, bias, scale, block_offset, value_offset, s, out);
    case at::kBFloat16:
      return block_mix_impl<scalar_t, opmath_t, at::BFloat16>(x, matrix, bias, scale, block_offset, value_offset, s,
                                                              out);
    case at::kFloat:
      return block_mix_impl<scalar_t, opmath_t, float>(x, matrix, bias, scale, block_offset, value_offset, s, out);
    case at::kDouble:
      return block_mix_impl<scalar_t, opmath_t, double>(x, matrix, bias, scale, block_offset, value_offset, s, out);
    default:
      TORCH_CHECK(false, "out_dtype must be float16, bfloat16, float32 or float64");
  }
}

}  // namespace

torch::Tensor block_mix(const torch::Tensor& x, const torch::Tensor& matrix, const torch::Tensor& src_block,
                        const torch::Tensor& bias, double scale, int64_t patch_size, at::ScalarType out_dtype) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  const BlockMixShape s = check_block_mix(x, matrix, src_block, bias, patch_size, out_dtype);
  auto out = torch::empty({s.B, s.C, s.H, s.W}, x.options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous));

  // Element offsets of every source block within its image (checking the table's values), and of the first value
  // of every (channel, block row) run of p values within a block.
  // 1. Offsets (below), so the gather needs no division by the grid width per value.
  const int64_t sC = x.stride(1), sH = x.stride(2), sW = x.stride(3), p = s.p;
  const int64_t n_entries = src_block.numel();
  std::vector<int64_t> block_offset(n_entries);
  const int64_t* blocks = src_block.data_ptr<int64_t>();
  for (int64_t k = 0; k < n_entries; ++k) {
    const int64_t m = blocks[k];
    TORCH_CHECK(m >= 0 && m < s.N, "src_block value ", m, " at index ", k, " is out of range [0, ", s.N, ")");
    block_offset[k] = (m / s.gw) * p * sH + (m % s.gw) * p * sW;
  }
  if (out.numel() == 0) return out;
  std::vector<int64_t> value_offset(s.C * p);
  for (int64_t c = 0; c < s.C; ++c) {
    for (int64_t u = 0; u < p; ++u) value_offset[c * p + u] = c * sC + u * sH;
  }

  // 2. Dispatch on the input dtype (opmath: float64 for float64, float32 otherwise), then on out_dtype.
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "block_mix_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      block_mix_any_out<scalar_t, double>(x, matrix, bias, scale, block_offset, value_offset, s, out);
    } else {
      block_mix_any_out<scalar_t, float>(x, matrix, bias, scale, block_offset, value_offset, s, out);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace msd_fast
