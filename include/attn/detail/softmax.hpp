// attn/detail/softmax.hpp — the exp sweep of the online softmax.
//
// p = exp(s - m) over a score row, with exp(-inf) exactly 0 (masked keys must
// contribute nothing, and Eigen's vectorised exp returns ~3e-39 there). The
// float version is a branch-free polynomial that compilers vectorise.
#pragma once

#include "attn/tensor_view.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace attn {
namespace detail {

/// exp(x) for float, x <= ~88; 0 for x < -87.3 (so exp(-inf) = 0). Relative
/// error about 2 ulp: Cody–Waite reduction x = n·ln2 + r, |r| <= ln2/2, then a
/// degree-6 polynomial for exp(r) and 2^n built in the exponent bits.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.3f ? -87.3f : x;
  const float t = clamped * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5·2^23 trick)
  float r = clamped - n * 0.693359375f;             // ln2 in two parts
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.0f : p * scale;
}

/// row[i] = exp(row[i] - m) for i < n; returns the sum. m is finite.
inline float exp_shift_sum(float* row, index_t n, float m) {
  float sum = 0;
#if defined(_OPENMP)
#pragma omp simd reduction(+ : sum)
#endif
  for (index_t i = 0; i < n; ++i) {
    const float p = exp_nonpositive(row[i] - m);
    row[i] = p;
    sum += p;
  }
  return sum;
}

inline double exp_shift_sum(double* row, index_t n, double m) {
  double sum = 0;
  for (index_t i = 0; i < n; ++i) {
    const double p = std::exp(row[i] - m);  // std::exp(-inf) is exactly 0
    row[i] = p;
    sum += p;
  }
  return sum;
}

}  // namespace detail
}  // namespace attn
