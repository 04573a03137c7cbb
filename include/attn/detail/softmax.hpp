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

/// exp(x) for float, x <= ~88; exactly 0 for x < -87.3 (so exp(-inf) = 0),
/// NaN for NaN. Relative error about 2 ulp: Cody–Waite reduction
/// x = n·ln2 + r, |r| <= ln2/2, a degree-6 polynomial for exp(r), and 2^n
/// written into the exponent bits. Branch-free so that loops over it vectorise.
inline float exp_nonpositive(float x) {
  const float below = -87.3f;  // exp(below) ~ 1.2e-38, just above FLT_MIN
  // No clamp: for x below the range the arithmetic may give garbage or NaN,
  // and the result is masked to 0 at the end.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;  // 1.5·2^23 + round(x·log2 e)
  const float n = shifted - 12582912.0f;
  float r = x - n * 0.693359375f;  // ln2 in two parts
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  std::uint32_t bits;  // the low mantissa bits of `shifted` hold n; 2^n = (n + 127) << 23
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B400000u + 127u) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  // Zero below the range by masking bits: an integer select vectorises, a
  // float one may not under -ftrapping-math. NaN fails the test and stays NaN.
  const float e = p * two_n;
  std::uint32_t ebits;
  std::memcpy(&ebits, &e, sizeof ebits);
  ebits &= ~(0u - static_cast<std::uint32_t>(x < below));
  float result;
  std::memcpy(&result, &ebits, sizeof result);
  return result;
}

/// row[i] = exp(row[i] - m) for i < n; returns the sum. m is finite.
/// Two passes over an L1-resident row: the exp loop has no reduction, so it
/// vectorises without -ffast-math or OpenMP; the sum is Eigen's vectorised one.
inline float exp_shift_sum(float* row, index_t n, float m) {
  for (index_t i = 0; i < n; ++i) row[i] = exp_nonpositive(row[i] - m);
  return Eigen::Map<const Eigen::ArrayXf>(row, n).sum();
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
