// attn/kv/quant.hpp — how a cache stores one key or value row: element types
// and the 8-bit form with a scale per (token, head).
//
// int8 rows:  scale = max_c |x_c| / 127 (0 for an all-zero row),
//             x̂_c   = round(x_c / scale) ∈ [-127, 127],
//             x_c ≈ scale · x̂_c,  |x_c − scale·x̂_c| ≤ scale / 2 = max|x| / 254.
// Rows of float, double, half and bfloat16 caches are stored rounded to the
// cache's type (round to nearest even).
#pragma once

#include "attn/tensor_view.hpp"

#include "attn/core/eigen.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace attn {
namespace detail {

/// Element types a KV cache can hold.
template <class T>
inline constexpr bool is_cache_type_v =
    std::is_same<T, float>::value || std::is_same<T, double>::value ||
    std::is_same<T, Eigen::half>::value || std::is_same<T, Eigen::bfloat16>::value ||
    std::is_same<T, std::int8_t>::value;

/// True for caches that keep a scale per (token, head).
template <class T>
inline constexpr bool is_quantized_v = std::is_same<T, std::int8_t>::value;

/// The element type of the rows a source hands the walk as runs of rows in
/// place (kv/blocks.hpp: caches), so the kernels read them where they lie; void
/// for sources that only hand over whole tiles.
template <class Src>
struct run_rows {
  using type = void;
};
template <class Src>
using run_rows_t = typename run_rows<Src>::type;

/// A run of rows in place: tile columns [c0, c0 + n), rows at `rows` (of the
/// source's element type, ld = the row's dim), for int8 one scale per row.
struct RowRun {
  index_t c0 = 0, n = 0;
  const void* rows = nullptr;
  const float* scale = nullptr;
};

/// Writes row x[0..n) (stride sx) into dst[0..n) in the cache type; for int8
/// also returns the row's scale (1 for the other types).
template <class T, class U>
float store_row(const U* x, index_t sx, index_t n, T* dst) {
  if constexpr (is_quantized_v<T>) {
    double amax = 0;
    for (index_t c = 0; c < n; ++c) amax = std::max(amax, std::abs(static_cast<double>(x[c * sx])));
    const float scale = static_cast<float>(amax / 127.0);
    const float inv = scale > 0 ? 1.0f / scale : 0.0f;
    for (index_t c = 0; c < n; ++c) {
      const float q = std::nearbyint(static_cast<float>(x[c * sx]) * inv);
      dst[c] = static_cast<std::int8_t>(std::clamp(q, -127.0f, 127.0f));
    }
    return scale;
  } else {
    for (index_t c = 0; c < n; ++c) dst[c] = static_cast<T>(x[c * sx]);
    return 1.0f;
  }
}

}  // namespace detail
}  // namespace attn
