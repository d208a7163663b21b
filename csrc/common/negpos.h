// The negative-positive transform v -> max - v, computed identically in every backend so that results are
// bit-identical: float16/bfloat16/float32 in float32 arithmetic rounded once to the dtype, float64 in double,
// uint8 modulo 256 (an exact involution for any integer max in [0, 255]). Shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/macros/Macros.h>

namespace msd_fast {

template <typename scalar_t>
struct NegPos {
  float max_value;
  C10_HOST_DEVICE explicit NegPos(double m) : max_value(static_cast<float>(m)) {}
  C10_HOST_DEVICE scalar_t operator()(scalar_t v) const { return static_cast<scalar_t>(max_value - static_cast<float>(v)); }
};

template <>
struct NegPos<double> {
  double max_value;
  C10_HOST_DEVICE explicit NegPos(double m) : max_value(m) {}
  C10_HOST_DEVICE double operator()(double v) const { return max_value - v; }
};

template <>
struct NegPos<uint8_t> {
  int max_value;
  C10_HOST_DEVICE explicit NegPos(double m) : max_value(static_cast<int>(m)) {}
  C10_HOST_DEVICE uint8_t operator()(uint8_t v) const { return static_cast<uint8_t>((max_value - static_cast<int>(v)) & 0xFF); }
};

}  // namespace msd_fast
