// Key-based patch permutation/encryption on CUDA: one fused pass, same contract as csrc/cpu/patch_permute.cpp.
// Grid: blockIdx.x = output row (b, c, h) of B*C*H; threads stride over the row's W columns, so stores are
// coalesced and each thread gathers its source value through the block and value permutations.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/negpos.h"
#include "ops.h"

namespace msd_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, bool kFlip>
__global__ void patch_permute_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                     const int64_t* __restrict__ src_block, const int64_t* __restrict__ src_elem,
                                     const uint8_t* __restrict__ flip, NegPos<scalar_t> negpos, int C, int H, int W,
                                     int p, int64_t stride_b, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                                     int64_t block_table_stride) {
  // 1. This block's output row (b, c, h): block row i = h / p, row u = h % p inside it.
  const int64_t row = blockIdx.x;
  const int h = static_cast<int>(row % H);
  const int64_t bc = row / H;
  const int c = static_cast<int>(bc % C);
  const int64_t b = bc / C;
  const int grid_w = W / p, pp = p * p, i = h / p, u = h - i * p;
  const int64_t* row_blocks = src_block + b * block_table_stride + static_cast<int64_t>(i) * grid_w;
  const scalar_t* image = x + b * stride_b;
  scalar_t* out_row = out + row * W;
  for (int w = blockIdx.y * blockDim.x + threadIdx.x; w < W; w += gridDim.y * blockDim.x) {
    // 2. Output column w: block j = w / p of the row, value e = (c, u, v) of that block.
    const int j = w / p, v = w - j * p, e = c * pp + u * p + v;
    // 3. Its source: block m = src_block[(b,) i * gw + j], value s = src_elem[e] = (sc, su, sv) of block m.
    const int m = static_cast<int>(row_blocks[j]);
    const int s = static_cast<int>(src_elem[e]);
    const int sc = s / pp, su = (s - sc * pp) / p, sv = s - sc * pp - su * p;
    const int mi = m / grid_w, mj = m - mi * grid_w;
    const scalar_t value = image[sc * stride_c + static_cast<int64_t>(mi * p + su) * stride_h +
                                 static_cast<int64_t>(mj * p + sv) * stride_w];
    // 4. The negative-positive transform where flip[e], else a copy.
    if constexpr (kFlip) {
      out_row[w] = flip[e] ? negpos(value) : value;
    } else {
      out_row[w] = value;
    }
  }
}

void check_table(const torch::Tensor& t, const torch::Tensor& x, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device() == x.device(), name,
              " must be a contiguous ", c10::toString(dtype), " tensor on ", x.device());
}

}  // namespace

torch::Tensor patch_permute(const torch::Tensor& x, const torch::Tensor& src_block, const torch::Tensor& src_elem,
                            const c10::optional<torch::Tensor>& flip, int64_t patch_size, double max_value) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4, "x must be [B, C, H, W], got ", x.dim(), " dims");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), p = patch_size;
  TORCH_CHECK(p > 0 && H % p == 0 && W % p == 0, "patch_size ", p, " must divide H=", H, " and W=", W);
  TORCH_CHECK(C * p * p < (int64_t{1} << 31) && H < (int64_t{1} << 31) && W < (int64_t{1} << 31),
              "image too large for the CUDA kernel's 32-bit in-image indexing");
  const int64_t n_blocks = (H / p) * (W / p);
  check_table(src_block, x, at::kLong, "src_block");
  check_table(src_elem, x, at::kLong, "src_elem");
  const bool per_sample = src_block.dim() == 2;
  TORCH_CHECK((src_block.dim() == 1 && src_block.size(0) == n_blocks) ||
                  (per_sample && src_block.size(0) == B && src_block.size(1) == n_blocks),
              "src_block must be [N] or [B, N] with N=", n_blocks);
  TORCH_CHECK(src_elem.dim() == 1 && src_elem.size(0) == C * p * p, "src_elem must have length C*p*p=", C * p * p);
  if (flip.has_value()) {
    check_table(*flip, x, at::kByte, "flip");
    TORCH_CHECK(flip->dim() == 1 && flip->size(0) == C * p * p, "flip must have length C*p*p=", C * p * p);
  }

  auto out = torch::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (W + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>(B * C * H), static_cast<unsigned>(std::min<int64_t>((W + threads - 1) / threads, 65535)));
  TORCH_CHECK(B * C * H < (int64_t{1} << 31), "B*C*H too large for one launch");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "patch_permute_cuda", [&] {
    const NegPos<scalar_t> negpos(max_value);
    const int64_t table_stride = per_sample ? n_blocks : 0;
    if (flip.has_value()) {
      patch_permute_kernel<scalar_t, true><<<grid, threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), src_block.data_ptr<int64_t>(),
          src_elem.data_ptr<int64_t>(), flip->data_ptr<uint8_t>(), negpos, C, H, W, p, x.stride(0), x.stride(1),
          x.stride(2), x.stride(3), table_stride);
    } else {
      patch_permute_kernel<scalar_t, false><<<grid, threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), src_block.data_ptr<int64_t>(),
          src_elem.data_ptr<int64_t>(), nullptr, negpos, C, H, W, p, x.stride(0), x.stride(1), x.stride(2),
          x.stride(3), table_stride);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace msd_fast
