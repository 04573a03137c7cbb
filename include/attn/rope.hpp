// attn/rope.hpp — rotary position embedding (RoPE) on a [B, H, L, D] view.
//
// The first R dims of each row (R = rotary_dim, the whole head dim by
// default) are split into R/2 pairs (x0, x1). Pair i of the row at position
// p is turned by the angle p·θ_i, θ_i = theta^(-2i/R):
//
//   x0' = x0·cos(p·θ_i) - x1·sin(p·θ_i)
//   x1' = x0·sin(p·θ_i) + x1·cos(p·θ_i)
//
// so q_m·k_n after rotation depends on m and n only through m - n. Two
// pairings are in use: half-split (GPT-NeoX, LLaMA: pair i = (x[i], x[i+R/2]))
// and interleaved (GPT-J: pair i = (x[2i], x[2i+1])). Row l of the view sits
// at position offset + l. Dims R..D-1 are left as they are.
#pragma once

#include "attn/detail/checks.hpp"
#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <cmath>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attn {

/// Which dims of a row form a rotated pair.
enum class RopePairing {
  half_split,   ///< (x[i], x[i + R/2]): GPT-NeoX, LLaMA, Hugging Face `rotate_half`
  interleaved,  ///< (x[2i], x[2i + 1]): GPT-J, the original RoFormer
};

/// Settings of a rotary position embedding.
struct Rope {
  /// Base of the frequencies: θ_i = theta^(-2i/R). 10000 in most models.
  double theta = 10000.0;
  /// Position of row 0 (the number of tokens before this call, when a
  /// sequence is continued).
  index_t offset = 0;
  /// How dims pair up.
  RopePairing pairing = RopePairing::half_split;
  /// Number of leading dims rotated (even); 0 = the whole head dim.
  index_t rotary_dim = 0;
};

namespace detail {

/// Checks a Rope against head dim `d`; returns the rotary dim R.
inline index_t check_rope(const Rope& r, index_t d) {
  if (!(r.theta > 0) || !std::isfinite(r.theta))
    fail("rope theta is ", r.theta, ", must be finite and > 0");
  if (r.offset < 0) fail("rope offset is ", r.offset, ", must be >= 0");
  const index_t rd = r.rotary_dim == 0 ? d : r.rotary_dim;
  if (rd < 0 || rd > d)
    fail("rope rotary_dim is ", r.rotary_dim, ", must be in [0, head dim ", d, "]");
  if (rd % 2 != 0)
    fail("rope rotates pairs of dims, but the rotary dim is ", rd, " (odd); head dim is ", d);
  return rd;
}

/// Positions [offset, offset + len) must fit index_t (the last is offset + len - 1).
inline void check_rope_positions(const Rope& r, index_t len) {
  index_t last = 0;
  if (!add_fits(r.offset, len - 1, last))
    fail("rope offset ", r.offset, " plus ", len, " rows overflows a 64-bit position");
}

/// cos and sin of p·θ_i for a window of positions p in [first, first + len)
/// and pairs i < R/2, row-major [len, R/2]. Angles are formed and evaluated
/// in double, then stored in T. A layer keeps one table and rebuilds it only
/// when theta, R or a position outside the window is asked for.
template <class T>
class RopeTable {
 public:
  /// Makes the table cover positions [first, first + len) of `rope` with
  /// rotary dim `rd`; keeps the current table when it already does.
  void ensure(const Rope& rope, index_t rd, index_t first, index_t len) {
    if (rope.theta == theta_ && rd == 2 * half_ && first >= first_ &&
        first - first_ <= len_ - len)  // first + len <= first_ + len_, without overflow
      return;
    theta_ = rope.theta;
    half_ = rd / 2;
    first_ = first;
    len_ = len;
    const auto n = static_cast<std::size_t>(len * half_);
    if (cos_.size() < n) {
      cos_.resize(n);
      sin_.resize(n);
    }
    for (index_t i = 0; i < half_; ++i) {
      // θ_i = theta^(-2i/R)
      const double inv_freq =
          std::pow(rope.theta, -2.0 * static_cast<double>(i) / static_cast<double>(rd));
      for (index_t l = 0; l < len; ++l) {
        const double angle = static_cast<double>(first + l) * inv_freq;  // p·θ_i
        cos_[static_cast<std::size_t>(l * half_ + i)] = static_cast<T>(std::cos(angle));
        sin_[static_cast<std::size_t>(l * half_ + i)] = static_cast<T>(std::sin(angle));
      }
    }
  }
  index_t half() const { return half_; }
  /// cos(p·θ_i), i < R/2, for position p (inside the window).
  const T* cos_at(index_t p) const { return cos_.data() + (p - first_) * half_; }
  /// sin(p·θ_i), i < R/2, for position p (inside the window).
  const T* sin_at(index_t p) const { return sin_.data() + (p - first_) * half_; }

 private:
  std::vector<T> cos_, sin_;
  double theta_ = 0;
  index_t half_ = 0, first_ = 0, len_ = 0;
};

/// Rotates one row x (element stride `s`) by the table row (c, sn).
template <class T>
void rotate_row(T* x, index_t s, const T* c, const T* sn, index_t half, RopePairing pairing) {
  if (pairing == RopePairing::half_split) {
    T* x0 = x;
    T* x1 = x + half * s;
    if (s == 1) {
      for (index_t i = 0; i < half; ++i) {  // contiguous: vectorises
        const T a = x0[i], b = x1[i];
        x0[i] = a * c[i] - b * sn[i];
        x1[i] = a * sn[i] + b * c[i];
      }
    } else {
      for (index_t i = 0; i < half; ++i) {
        const T a = x0[i * s], b = x1[i * s];
        x0[i * s] = a * c[i] - b * sn[i];
        x1[i * s] = a * sn[i] + b * c[i];
      }
    }
  } else {
    for (index_t i = 0; i < half; ++i) {
      const T a = x[2 * i * s], b = x[(2 * i + 1) * s];
      x[2 * i * s] = a * c[i] - b * sn[i];
      x[(2 * i + 1) * s] = a * sn[i] + b * c[i];
    }
  }
}

/// Rotates one row back by the table row (c, sn): the transpose of
/// rotate_row, i.e. the turn by -p·θ_i. It maps dL/d(rotated row) to
/// dL/d(row), so it is RoPE's backward pass.
template <class T>
void unrotate_row(T* x, index_t s, const T* c, const T* sn, index_t half, RopePairing pairing) {
  for (index_t i = 0; i < half; ++i) {
    T* p0 = pairing == RopePairing::half_split ? x + i * s : x + 2 * i * s;
    T* p1 = pairing == RopePairing::half_split ? x + (half + i) * s : x + (2 * i + 1) * s;
    const T a = *p0, b = *p1;
    *p0 = a * c[i] + b * sn[i];  // x0 =  x0'·cos + x1'·sin
    *p1 = b * c[i] - a * sn[i];  // x1 = -x0'·sin + x1'·cos
  }
}

/// Rotates every row of x [B, H, L, D], row l at position offset + l, with a
/// table that covers those positions (back, by -p·θ_i, when `backward`: the
/// gradient pass); parallel over (batch, position).
template <class T>
void apply_rope_table(const TensorView<T, 4>& x, const RopeTable<T>& table, RopePairing pairing,
                      index_t offset, int num_threads, bool backward = false) {
  const index_t B = x.extent(0), H = x.extent(1), L = x.extent(2);
  const index_t rows = B * L;
  auto body = [&](index_t r) {
    const index_t b = r / L, l = r % L;
    for (index_t h = 0; h < H; ++h) {
      T* row = x.data() + b * x.stride(0) + h * x.stride(1) + l * x.stride(2);
      if (backward)
        unrotate_row(row, x.stride(3), table.cos_at(offset + l), table.sin_at(offset + l),
                     table.half(), pairing);
      else
        rotate_row(row, x.stride(3), table.cos_at(offset + l), table.sin_at(offset + l),
                   table.half(), pairing);
    }
  };
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (threads > 1 && rows * H * table.half() >= 16384) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (index_t r = 0; r < rows; ++r) body(r);
    return;
  }
#else
  (void)num_threads;
#endif
  for (index_t r = 0; r < rows; ++r) body(r);
}

}  // namespace detail

/// Applies rotary position embedding in place to x, a [B, H, L, D] view of
/// queries or keys (bshd(...) views work; any strides). Row l of every batch
/// and head sits at position rope.offset + l. Throws attn::Error for a
/// non-positive theta, a negative offset, or an odd or too large rotary dim.
/// O(B·H·L·D) time, O(L·R) extra memory for the cos/sin table.
template <class T>
void apply_rope(const TensorView<T, 4>& x, const Rope& rope, int num_threads = 0) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "attn::apply_rope works on float or double views");
  detail::check_view(x, "x");
  detail::check_not_self_overlapping(x, "x");
  const index_t rd = detail::check_rope(rope, x.extent(3));
  detail::check_rope_positions(rope, x.extent(2));
  detail::RopeTable<T> table;
  table.ensure(rope, rd, rope.offset, x.extent(2));
  detail::apply_rope_table(x, table, rope.pairing, rope.offset, num_threads);
}

/// The backward pass of apply_rope: turns every row of g [B, H, L, D]
/// (dL/d of the rotated rows) back by -p·θ_i in place, giving dL/d of the
/// rows before rotation. Same arguments and checks as apply_rope.
template <class T>
void apply_rope_backward(const TensorView<T, 4>& g, const Rope& rope, int num_threads = 0) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "attn::apply_rope_backward works on float or double views");
  detail::check_view(g, "g");
  detail::check_not_self_overlapping(g, "g");
  const index_t rd = detail::check_rope(rope, g.extent(3));
  detail::check_rope_positions(rope, g.extent(2));
  detail::RopeTable<T> table;
  table.ensure(rope, rd, rope.offset, g.extent(2));
  detail::apply_rope_table(g, table, rope.pairing, rope.offset, num_threads, /*backward=*/true);
}

}  // namespace attn
