// fuzz/fuzz_bytes.hpp — what every fuzz target shares: how it reads its input,
// and the sizes of views its tolerances are derived from.
#pragma once

#include <attn/tensor_view.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace attn_fuzz {

/// Reads the fuzz input a byte at a time; zeros once it runs out.
class Bytes {
 public:
  Bytes(const std::uint8_t* data, std::size_t size) : p_(data), n_(size) {}
  std::uint8_t byte() {
    if (n_ == 0) return 0;
    --n_;
    return *p_++;
  }
  /// An integer in [lo, hi].
  attn::index_t range(attn::index_t lo, attn::index_t hi) {
    return lo + static_cast<attn::index_t>(byte()) % (hi - lo + 1);
  }
  bool flag() { return byte() & 1; }

 private:
  const std::uint8_t* p_;
  std::size_t n_;
};

/// Largest Euclidean norm of a row of a [B, H, L, D] view (bounds |q·k|).
template <class T>
double max_row_norm(const attn::Tensor4<T>& v) {
  double m = 0;
  for (attn::index_t b = 0; b < v.extent(0); ++b)
    for (attn::index_t h = 0; h < v.extent(1); ++h)
      for (attn::index_t l = 0; l < v.extent(2); ++l) {
        double s = 0;
        for (attn::index_t c = 0; c < v.extent(3); ++c)
          s += std::pow(static_cast<double>(v(b, h, l, c)), 2);
        m = std::max(m, std::sqrt(s));
      }
  return m;
}

/// Largest |x| of a [B, H, L, D] view.
template <class T>
double max_abs(const attn::Tensor4<T>& v) {
  double m = 0;
  for (attn::index_t b = 0; b < v.extent(0); ++b)
    for (attn::index_t h = 0; h < v.extent(1); ++h)
      for (attn::index_t l = 0; l < v.extent(2); ++l)
        for (attn::index_t c = 0; c < v.extent(3); ++c)
          m = std::max(m, std::abs(static_cast<double>(v(b, h, l, c))));
  return m;
}

}  // namespace attn_fuzz
