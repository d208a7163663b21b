// Key-based patch permutation/encryption on CPU: one fused, multi-threaded pass from x to out.
//
// x: [B, C, H, W] (any strides), p | H and p | W, gw = W / p, N = (H / p) * gw blocks, L = C * p * p values per
// block, value index e = c * p * p + u * p + v (the order of a ViT patch embedding's weight).
// src_block: int64 [N] (one block permutation) or [B, N] (per sample); src_elem: int64 [L]; flip: uint8 [L] or none.
// out (contiguous) block n, value e = NegPos(x block src_block[n], value src_elem[e]) where flip[e], else the copy.
// Threads split (image, block row); sources are read through two small offset tables (value offsets within a block,
// block offsets within an image) built once per call.
#include <omp.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/negpos.h"
#include "ops.h"

namespace msd_fast {
namespace cpu {
namespace {

// Below this many values a single thread is faster than waking the OpenMP team.
constexpr int64_t kParallelMinValues = int64_t{1} << 16;

// One output row segment: p values of one (channel, block row) of a block, gathered from its source block, then
// the negative-positive transform applied where flip is non-zero. kP > 0 fixes p at compile time so the loops
// unroll; kP == 0 is the generic path.
template <int kP, typename scalar_t, bool kFlip>
inline void gather_segment(const scalar_t* __restrict__ source, scalar_t* __restrict__ target,
                           const int32_t* __restrict__ offsets, const uint8_t* __restrict__ flip,
                           NegPos<scalar_t> negpos, int64_t p) {
  const int64_t n = kP > 0 ? kP : p;
  for (int64_t v = 0; v < n; ++v) {
    const scalar_t value = source[offsets[v]];
    if constexpr (kFlip) {
      target[v] = flip[v] ? negpos(value) : value;
    } else {
      target[v] = value;
    }
  }
}

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the byte path packs values little-endian");

// uint8 with p a multiple of 8: gather 8 bytes into a 64-bit word (one store instead of eight) and apply the
// negative-positive transform to the 8 bytes at once: max - v == (v ^ 0xFF) + max + 1 (mod 256), added per byte
// without carries crossing bytes. flip holds 0xFF (flipped) or 0 per value.
template <int kP, bool kFlip>
inline void gather_byte_segment(const uint8_t* __restrict__ source, uint8_t* __restrict__ target,
                                const int32_t* __restrict__ offsets, const uint8_t* __restrict__ flip,
                                uint64_t add_bytes) {
  constexpr uint64_t kLow7 = 0x7F7F7F7F7F7F7F7FULL, kHigh1 = 0x8080808080808080ULL;
  for (int w = 0; w < kP / 8; ++w) {
    uint64_t word = 0;
    // 1. Pack the 8 gathered source bytes into one little-endian word.
    for (int b = 0; b < 8; ++b) {
      word |= static_cast<uint64_t>(source[offsets[8 * w + b]]) << (8 * b);
    }
    if constexpr (kFlip) {
      uint64_t mask;
      std::memcpy(&mask, flip + 8 * w, sizeof(mask));
      // 2. Flipped bytes: v ^ 0xFF = 255 - v, plus (max + 1) mod 256 gives max - v; unflipped bytes add 0.
      // 3. A per-byte add without carries between bytes: add the low 7 bits, then xor in the top bits' sum bit.
      const uint64_t lhs = word ^ mask, rhs = add_bytes & mask;
      word = ((lhs & kLow7) + (rhs & kLow7)) ^ ((lhs ^ rhs) & kHigh1);
    }
    std::memcpy(target + 8 * w, &word, sizeof(word));
  }
}

// Block-major: a source block stays in L1 while its C*p output row segments are written. A segment whose sources
// are one contiguous run (no pixel shuffling, no flips in it) is a memcpy.
template <int kP, typename scalar_t, bool kFlip>
void permute_blocks(const scalar_t* x, scalar_t* out, const int64_t* block_offset, const int32_t* value_offset,
                    const uint8_t* flip, const uint8_t* segment_is_copy, NegPos<scalar_t> negpos, int64_t B,
                    int64_t C, int64_t H, int64_t W, int64_t p, int64_t x_stride_b, bool per_sample) {
  const int64_t grid_h = H / p, grid_w = W / p, n_blocks = grid_h * grid_w;
  const bool parallel = B * C * H * W >= kParallelMinValues;
#pragma omp parallel for collapse(2) schedule(static) num_threads(at::get_num_threads()) if (parallel)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < grid_h; ++i) {
      const scalar_t* image = x + b * x_stride_b;
      const int64_t* row_blocks = block_offset + (per_sample ? b * n_blocks : 0) + i * grid_w;
      scalar_t* out_rows = out + b * C * H * W + i * p * W;
      for (int64_t j = 0; j < grid_w; ++j) {
        // 1. Output block (i, j) of image b reads source block src_block[(b,) i * gw + j] (offset table).
        const scalar_t* source = image + row_blocks[j];
        for (int64_t segment = 0; segment < C * p; ++segment) {
          const int64_t c = segment / p, u = segment - c * p, e0 = segment * p;
          scalar_t* target = out_rows + c * H * W + u * W + j * p;
          // 2. Each of its C * p row segments (p values of one channel and block row) is a memcpy where the sources run
          //    contiguously, else 8-byte word gathers (uint8, p % 8 == 0), else a value-by-value gather.
          if (segment_is_copy[segment]) {
            std::memcpy(target, source + value_offset[e0], static_cast<size_t>(kP > 0 ? kP : p) * sizeof(scalar_t));
          } else if constexpr (std::is_same_v<scalar_t, uint8_t> && kP > 0 && kP % 8 == 0) {
            gather_byte_segment<kP, kFlip>(source, target, value_offset + e0, flip + (kFlip ? e0 : 0),
                                           0x0101010101010101ULL * static_cast<uint8_t>(negpos.max_value + 1));
          } else {
            gather_segment<kP, scalar_t, kFlip>(source, target, value_offset + e0, flip + (kFlip ? e0 : 0),
                                                negpos, p);
          }
        }
      }
    }
  }
}

template <typename scalar_t, bool kFlip>
void permute_blocks_any_p(const scalar_t* x, scalar_t* out, const int64_t* block_offset, const int32_t* value_offset,
                          const uint8_t* flip, const uint8_t* segment_is_copy, NegPos<scalar_t> negpos, int64_t B,
                          int64_t C, int64_t H, int64_t W, int64_t p, int64_t x_stride_b, bool per_sample) {
  switch (p) {
    case 16:
      return permute_blocks<16, scalar_t, kFlip>(x, out, block_offset, value_offset, flip, segment_is_copy, negpos,
                                                 B, C, H, W, p, x_stride_b, per_sample);
    case 14:
      return permute_blocks<14, scalar_t, kFlip>(x, out, block_offset, value_offset, flip, segment_is_copy, negpos,
                                                 B, C, H, W, p, x_stride_b, per_sample);
    case 8:
      return permute_blocks<8, scalar_t, kFlip>(x, out, block_offset, value_offset, flip, segment_is_copy, negpos,
                                                B, C, H, W, p, x_stride_b, per_sample);
    default:
      return permute_blocks<0, scalar_t, kFlip>(x, out, block_offset, value_offset, flip, segment_is_copy, negpos,
                                                B, C, H, W, p, x_stride_b, per_sample);
  }
}

}  // namespace

torch::Tensor patch_permute(const torch::Tensor& x, const torch::Tensor& src_block, const torch::Tensor& src_elem,
                            const c10::optional<torch::Tensor>& flip, int64_t patch_size, double max_value) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4, "x must be [B, C, H, W], got ", x.dim(), " dims");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), p = patch_size;
  TORCH_CHECK(p > 0 && H % p == 0 && W % p == 0, "patch_size ", p, " must divide H=", H, " and W=", W);
  const int64_t grid_w = W / p, n_blocks = (H / p) * grid_w, block_values = C * p * p;
  TORCH_CHECK(src_block.scalar_type() == at::kLong && src_block.is_contiguous() && src_block.device().is_cpu(),
              "src_block must be a contiguous int64 CPU tensor");
  const bool per_sample = src_block.dim() == 2;
  TORCH_CHECK((src_block.dim() == 1 && src_block.size(0) == n_blocks) ||
                  (per_sample && src_block.size(0) == B && src_block.size(1) == n_blocks),
              "src_block must be [N] or [B, N] with N=", n_blocks);
  TORCH_CHECK(src_elem.scalar_type() == at::kLong && src_elem.is_contiguous() && src_elem.device().is_cpu() &&
                  src_elem.dim() == 1 && src_elem.size(0) == block_values,
              "src_elem must be a contiguous int64 CPU tensor of length C*p*p=", block_values);
  // Flip table as 0xFF / 0 bytes (the byte path uses them as masks), or none.
  std::vector<uint8_t> flip_mask;
  const uint8_t* flip_ptr = nullptr;
  if (flip.has_value()) {
    TORCH_CHECK(flip->scalar_type() == at::kByte && flip->is_contiguous() && flip->device().is_cpu() &&
                    flip->dim() == 1 && flip->size(0) == block_values,
                "flip must be a contiguous uint8 CPU tensor of length C*p*p=", block_values);
    const uint8_t* raw = flip->data_ptr<uint8_t>();
    flip_mask.resize(block_values);
    for (int64_t e = 0; e < block_values; ++e) flip_mask[e] = raw[e] != 0 ? 0xFF : 0x00;
    flip_ptr = flip_mask.data();
  }

  const int64_t sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  TORCH_CHECK((C - 1) * sC + (p - 1) * (sH + sW) < (int64_t{1} << 31),
              "x strides too large for 32-bit in-block offsets");
  // 1. value_offset[e]: where value src_elem[e] of a block lies relative to the block's corner (x's strides).
  std::vector<int32_t> value_offset(block_values);
  const int64_t* elem = src_elem.data_ptr<int64_t>();
  for (int64_t e = 0; e < block_values; ++e) {
    const int64_t s = elem[e];
    TORCH_CHECK(s >= 0 && s < block_values, "src_elem[", e, "]=", s, " is out of range [0, ", block_values, ")");
    value_offset[e] = static_cast<int32_t>((s / (p * p)) * sC + ((s / p) % p) * sH + (s % p) * sW);
  }
  // 2. A segment is a plain copy when its p sources are consecutive in memory and none is flipped.
  std::vector<uint8_t> segment_is_copy(C * p, 0);
  for (int64_t segment = 0; segment < C * p; ++segment) {
    bool copy = sW == 1;
    for (int64_t v = 0; v < p && copy; ++v) {
      const int64_t e = segment * p + v;
      copy = value_offset[e] == value_offset[segment * p] + v && (flip_ptr == nullptr || flip_ptr[e] == 0);
    }
    segment_is_copy[segment] = copy;
  }
  // 3. block_offset[(b,) n]: the corner of source block src_block[(b,) n] within its image.
  const int64_t n_offsets = src_block.numel();
  std::vector<int64_t> block_offset(n_offsets);
  const int64_t* blocks = src_block.data_ptr<int64_t>();
  for (int64_t k = 0; k < n_offsets; ++k) {
    const int64_t m = blocks[k];
    TORCH_CHECK(m >= 0 && m < n_blocks, "src_block value ", m, " is out of range [0, ", n_blocks, ")");
    block_offset[k] = (m / grid_w) * p * sH + (m % grid_w) * p * sW;
  }

  // 4. One pass over the output, specialised on dtype, flips and p (16, 14, 8 unrolled).
  auto out = torch::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "patch_permute_cpu", [&] {
    const NegPos<scalar_t> negpos(max_value);
    if (flip_ptr != nullptr) {
      permute_blocks_any_p<scalar_t, true>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), block_offset.data(),
                                           value_offset.data(), flip_ptr, segment_is_copy.data(), negpos, B, C, H,
                                           W, p, x.stride(0), per_sample);
    } else {
      permute_blocks_any_p<scalar_t, false>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), block_offset.data(),
                                            value_offset.data(), flip_ptr, segment_is_copy.data(), negpos, B, C, H,
                                            W, p, x.stride(0), per_sample);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace msd_fast
