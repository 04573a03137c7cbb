// attn/policy/dropout.hpp — dropout on attention probabilities from a
// counter-based generator.
//
// The keep decision of (batch b, query head h, query q, key k) under
// Dropout{p, seed, offset} is word (k mod 4) of
//
//   Philox-4x32-10(counter = (k / 4, q, b·Hq + h, offset), key = (seed low, seed high))
//
// kept iff that word >= floor(p · 2^32), i.e. with probability 1 - p (to
// within 2^-32). Nothing is stored: the forward, the backward, the reference
// and attn::dropout_mask all recompute the same decisions, for any thread
// count or tile size. Philox-4x32-10 is the generator of Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3" (SC 2011), with its published
// multipliers and Weyl key increments.
#pragma once

#include "attn/detail/checks.hpp"
#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <array>
#include <cmath>
#include <cstdint>

namespace attn {
namespace detail {

/// Philox-4x32 with 10 rounds: a bijection of 128-bit counters for each 64-bit key.
inline std::array<std::uint32_t, 4> philox4x32_10(std::array<std::uint32_t, 4> c,
                                                  std::array<std::uint32_t, 2> key) {
  constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;  // round multipliers
  constexpr std::uint32_t w0 = 0x9E3779B9u,
                          w1 = 0xBB67AE85u;  // key increments (golden ratio, √3−1)
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key[0] += w0;
      key[1] += w1;
    }
    const std::uint64_t p0 = static_cast<std::uint64_t>(m0) * c[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(m1) * c[2];
    const auto hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
    const auto hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
    c = {hi1 ^ c[1] ^ key[0], lo1, hi0 ^ c[3] ^ key[1], lo0};
  }
  return c;
}

/// Dropout bound to a problem: answers keep(b, h, q, k) and applies the
/// decisions to a row of probabilities.
struct DropoutGen {
  std::array<std::uint32_t, 2> key{};
  std::uint32_t offset = 0;
  std::uint32_t threshold = 0;  // keep iff word >= threshold
  index_t q_heads = 1;
  double inv_keep = 1;  // 1 / (1 - p)
  bool enabled = false;

  /// Checks p, offset and the index ranges the counter holds.
  static DropoutGen bind(const Dropout& d, index_t batch, index_t q_heads, index_t lq, index_t lk) {
    if (!(d.p >= 0 && d.p < 1)) fail("dropout p is ", d.p, ", must be in [0, 1)");
    DropoutGen g;
    if (d.p == 0) return g;
    if (d.offset > 0xFFFFFFFFu) fail("dropout offset is ", d.offset, ", must be < 2^32");
    constexpr index_t max32 = index_t{1} << 32;
    if (batch * q_heads >= max32 || lq >= max32 || lk >= 4 * max32)
      fail("dropout counters hold batch·heads, Lq < 2^32 and Lk < 2^34; got batch·heads = ",
           batch * q_heads, ", Lq = ", lq, ", Lk = ", lk);
    g.enabled = true;
    g.key = {static_cast<std::uint32_t>(d.seed), static_cast<std::uint32_t>(d.seed >> 32)};
    g.offset = static_cast<std::uint32_t>(d.offset);
    g.threshold = static_cast<std::uint32_t>(std::floor(d.p * 4294967296.0));
    g.q_heads = q_heads;
    g.inv_keep = 1.0 / (1.0 - d.p);
    return g;
  }

  std::array<std::uint32_t, 4> words(index_t b, index_t h, index_t q, index_t k4) const {
    return philox4x32_10({static_cast<std::uint32_t>(k4), static_cast<std::uint32_t>(q),
                          static_cast<std::uint32_t>(b * q_heads + h), offset},
                         key);
  }

  bool keep(index_t b, index_t h, index_t q, index_t k) const {
    return words(b, h, q, k >> 2)[static_cast<std::size_t>(k & 3)] >= threshold;
  }

  /// row[c] (key k0 + c of query q) = keep ? row[c] / (1 - p) : 0, for c < cols.
  template <class Acc>
  void apply_row(index_t b, index_t h, index_t q, index_t k0, Acc* row, index_t cols) const {
    const Acc inv = static_cast<Acc>(inv_keep);
    index_t c = 0;
    while (c < cols) {
      const index_t k = k0 + c;
      const auto w = words(b, h, q, k >> 2);
      for (index_t j = k & 3; j < 4 && c < cols; ++j, ++c)
        row[c] = w[static_cast<std::size_t>(j)] >= threshold ? row[c] * inv : Acc(0);
    }
  }
};

}  // namespace detail

/// Writes the keep decisions of `dropout` into `mask` [B, Hq, Lq, Lk] (true =
/// kept), the ones attention with options.dropout = dropout applies: for
/// tests, plots, or a reference implementation elsewhere.
inline void dropout_mask(const TensorView<bool, 4>& mask, const Dropout& dropout) {
  detail::check_view(mask, "dropout mask");
  detail::check_not_self_overlapping(mask, "dropout mask");
  const detail::DropoutGen g = detail::DropoutGen::bind(dropout, mask.extent(0), mask.extent(1),
                                                        mask.extent(2), mask.extent(3));
  for (index_t b = 0; b < mask.extent(0); ++b)
    for (index_t h = 0; h < mask.extent(1); ++h)
      for (index_t q = 0; q < mask.extent(2); ++q)
        for (index_t k = 0; k < mask.extent(3); ++k)
          mask(b, h, q, k) = !g.enabled || g.keep(b, h, q, k);
}

}  // namespace attn
