// What the CPU and CUDA kernels of block_mix share (the contract is in csrc/cpu/block_mix.cpp): the argument
// checks and the rounding of an opmath result to the output dtype. Each check failure is a TORCH_CHECK, i.e. a Python RuntimeError naming the argument. The launcher checks x's device
// itself; these checks require every table to be on x's device. The value range of src_block is checked by the
// launcher (on CPU while it reads the table, on CUDA with one reduction).
#pragma once
#include <type_traits>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

namespace msd_fast {

// Geometry of one block_mix call: B images of C x H x W, patch size p, gw = W / p blocks per block row,
// N = (H / p) * gw blocks of L = C * p * p values; per_sample when src_block is [B, N].
struct BlockMixShape {
  int64_t B, C, H, W, p, gw, N, L;
  bool per_sample;
};

// Rounds an opmath value to out_t like torch's .to(): float16 and bfloat16 round to nearest even from float32 (a
// float64 value is rounded to float32 first, as torch's own cast does).
template <typename out_t, typename opmath_t>
C10_HOST_DEVICE inline out_t block_mix_output(opmath_t value) {
  if constexpr (std::is_same_v<out_t, opmath_t>) {
    return value;
  } else if constexpr (std::is_same_v<out_t, double> || std::is_same_v<out_t, float>) {
    return static_cast<out_t>(value);
  } else {
    return static_cast<out_t>(static_cast<float>(value));
  }
}

inline at::ScalarType block_mix_opmath(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline BlockMixShape check_block_mix(const torch::Tensor& x, const torch::Tensor& matrix,
                                     const torch::Tensor& src_block, const torch::Tensor& bias, int64_t patch_size,
                                     at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() == 4, "x must be [B, C, H, W], got ", x.dim(), " dims");
  const at::ScalarType x_dtype = x.scalar_type();
  TORCH_CHECK(x_dtype == at::kByte || x_dtype == at::kHalf || x_dtype == at::kBFloat16 || x_dtype == at::kFloat ||
                  x_dtype == at::kDouble,
              "x must be uint8, float16, bfloat16, float32 or float64, got ", x_dtype);
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16 || out_dtype == at::kFloat ||
                  out_dtype == at::kDouble,
              "out_dtype must be float16, bfloat16, float32 or float64, got ", out_dtype);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), p = patch_size;
  TORCH_CHECK(p > 0 && H % p == 0 && W % p == 0, "patch_size ", p, " must be positive and divide H=", H, " and W=",
              W);
  const int64_t gw = W / p, N = (H / p) * gw, L = C * p * p;
  const at::ScalarType opmath = block_mix_opmath(x_dtype);
  TORCH_CHECK(matrix.device() == x.device(), "matrix must be on ", x.device(), ", got ", matrix.device());
  TORCH_CHECK(matrix.scalar_type() == opmath && matrix.dim() == 2 && matrix.size(0) == L && matrix.size(1) == L,
              "matrix must be ", opmath, " [L, L] with L=C*p*p=", L, ", got ", matrix.scalar_type(), " ",
              matrix.sizes());
  TORCH_CHECK(matrix.is_contiguous(), "matrix must be contiguous");
  TORCH_CHECK(bias.device() == x.device(), "bias must be on ", x.device(), ", got ", bias.device());
  TORCH_CHECK(bias.scalar_type() == opmath && bias.dim() == 1 && bias.size(0) == L, "bias must be ", opmath,
              " [L] with L=", L, ", got ", bias.scalar_type(), " ", bias.sizes());
  TORCH_CHECK(bias.is_contiguous(), "bias must be contiguous");
  TORCH_CHECK(src_block.device() == x.device(), "src_block must be on ", x.device(), ", got ", src_block.device());
  TORCH_CHECK(src_block.scalar_type() == at::kLong && src_block.is_contiguous(),
              "src_block must be a contiguous int64 tensor, got ", src_block.scalar_type());
  const bool per_sample = src_block.dim() == 2;
  TORCH_CHECK((src_block.dim() == 1 && src_block.size(0) == N) ||
                  (per_sample && src_block.size(0) == B && src_block.size(1) == N),
              "src_block must be [N] or [B, N] with B=", B, ", N=", N, ", got ", src_block.sizes());
  return {B, C, H, W, p, gw, N, L, per_sample};
}

}  // namespace msd_fast
