// attn/policy/neighborhood.hpp — neighbourhood attention on 1-D, 2-D and 3-D
// grids (NATTEN's semantics) as a mask policy.
//
// Tokens are the points of a grid (extents n_0 × ... × n_{d-1}, row-major,
// the last dimension fastest); q and k both hold the whole grid. Along each
// dimension with kernel K and dilation δ, the points split into δ groups of
// equal residue mod δ; a query at coordinate i (group g = i mod δ, n_g points,
// index i / δ within it) sees the K points of its group starting at
//
//   s = g + δ · clamp(i / δ - K / 2, 0, n_g - K)
//
// that is s, s + δ, ..., s + (K - 1)·δ. Inside the grid the window is centred
// on the query; at a border it shifts inward instead of shrinking, so every
// query sees exactly K keys per dimension (K^d in all). A query sees a key iff
// every coordinate of the key is in that dimension's window.
//
// The mask gives the engine, per query tile, the keys between its first and
// last visible one, and classifies tiles exactly by counting visible keys
// run by run along the last dimension, so tiles outside every window are
// skipped: work is O(N · K^(d-1) · n_last) for the masked_attention path at
// most, O(N·K^d) plus tile rounding. attn::neighborhood_attention
// (attn/ops/neighborhood.hpp) adds a fast path for the boundary tiles.
#pragma once

#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

namespace attn {

/// Neighbourhood mask on a grid of up to 3 dimensions. Build it with attn::neighborhood(...).
struct Neighborhood : MaskPolicy {
  static constexpr bool always_full = false;
  static constexpr int max_dims = 3;
  int dims = 0;
  std::array<index_t, max_dims> grid{}, kernel{}, dilation{};
  std::array<index_t, max_dims> pitch{};  ///< tokens per step along each dimension

  Neighborhood bind(const AttentionShape& s) const {
    if (dims < 1 || dims > max_dims)
      detail::fail("neighborhood grid has ", dims, " dimensions, must have 1 to ", max_dims);
    index_t tokens = 1;
    for (int d = 0; d < dims; ++d) {
      if (grid[d] < 1)
        detail::fail("neighborhood grid extent ", d, " is ", grid[d], ", must be >= 1");
      if (kernel[d] < 1)
        detail::fail("neighborhood kernel ", d, " is ", kernel[d], ", must be >= 1");
      if (dilation[d] < 1)
        detail::fail("neighborhood dilation ", d, " is ", dilation[d], ", must be >= 1");
      if (kernel[d] * dilation[d] > grid[d])
        detail::fail("neighborhood kernel ", kernel[d], " x dilation ", dilation[d], " = ",
                     kernel[d] * dilation[d], " exceeds grid extent ", d, " = ", grid[d]);
      tokens *= grid[d];
    }
    if (s.lq != tokens || s.lk != tokens)
      detail::fail("neighborhood grid has ", tokens, " tokens, but Lq = ", s.lq, " and Lk = ", s.lk,
                   " (both must be ", tokens, ")");
    Neighborhood m = *this;
    index_t p = 1;
    for (int d = dims - 1; d >= 0; --d) {
      m.pitch[d] = p;
      p *= grid[d];
    }
    return m;
  }

  /// First coordinate of the window of coordinate i along dimension d.
  index_t start(int d, index_t i) const {
    const index_t dil = dilation[d], g = i % dil;
    const index_t n_g = (grid[d] - g + dil - 1) / dil;  // points of group g
    return g + dil * std::clamp<index_t>(i / dil - kernel[d] / 2, 0, n_g - kernel[d]);
  }
  /// Is coordinate c in the window that starts at s along dimension d?
  bool in_window(int d, index_t s, index_t c) const {
    const index_t off = c - s;
    return off >= 0 && off < kernel[d] * dilation[d] && off % dilation[d] == 0;
  }
  /// Coordinates of token t.
  std::array<index_t, max_dims> coords(index_t t) const {
    std::array<index_t, max_dims> c{};
    for (int d = 0; d < dims; ++d) c[d] = (t / pitch[d]) % grid[d];
    return c;
  }

  bool keep(index_t, index_t, index_t q, index_t k) const {
    const auto cq = coords(q), ck = coords(k);
    for (int d = 0; d < dims; ++d)
      if (!in_window(d, start(d, cq[d]), ck[d])) return false;
    return true;
  }

  /// Calls f(c0, n, lo, hi) for the keys [k0, k1) seen from query q, run by
  /// run along the last dimension: the run is tile columns [c0, c0 + n)
  /// (relative to k0); if its outer coordinates are outside q's window, lo =
  /// hi = 0 (nothing visible), otherwise the visible keys of the run are the
  /// columns c0 + lo, c0 + lo + δ, ... below c0 + hi (δ the last dilation).
  template <class F>
  void for_each_run(index_t q, index_t k0, index_t k1, F&& f) const {
    const int last = dims - 1;
    const auto cq = coords(q);
    std::array<index_t, max_dims> st{};
    for (int d = 0; d < dims; ++d) st[d] = start(d, cq[d]);
    const index_t w = grid[last], dil = dilation[last], ks = st[last];
    const index_t ke = ks + (kernel[last] - 1) * dil + 1;  // one past the last visible coordinate
    index_t k = k0;
    while (k < k1) {
      const index_t x = k % w, n = std::min(w - x, k1 - k);
      bool outer = true;
      for (int d = 0; d < last && outer; ++d) outer = in_window(d, st[d], (k / pitch[d]) % grid[d]);
      index_t lo = 0, hi = 0;
      if (outer) {
        // first visible coordinate >= x: ks + δ·ceil((x - ks)/δ), or ks when x <= ks
        const index_t first = x <= ks ? ks : ks + (x - ks + dil - 1) / dil * dil;
        lo = std::min(first - x, n);
        hi = std::clamp<index_t>(ke - x, lo, n);
      }
      f(k - k0, n, lo, hi);
      k += n;
    }
  }

  /// Visible keys of query q among [k0, k1).
  index_t count(index_t q, index_t k0, index_t k1) const {
    const index_t dil = dilation[dims - 1];
    index_t total = 0;
    for_each_run(q, k0, k1, [&](index_t, index_t, index_t lo, index_t hi) {
      if (hi > lo) total += (hi - lo + dil - 1) / dil;
    });
    return total;
  }

  /// First and one past the last key that any row of [q0, q1) sees.
  KeyRange key_range(index_t, index_t, index_t q0, index_t q1) const {
    KeyRange r{std::numeric_limits<index_t>::max(), 0};
    for (index_t q = q0; q < q1; ++q) {
      const auto cq = coords(q);
      index_t first = 0, last = 0;
      for (int d = 0; d < dims; ++d) {
        const index_t s = start(d, cq[d]);
        first += s * pitch[d];
        last += (s + (kernel[d] - 1) * dilation[d]) * pitch[d];
      }
      r.begin = std::min(r.begin, first);
      r.end = std::max(r.end, last + 1);
    }
    return r;
  }

  /// Could any row of [q0, q1) see a key of [k0, k1) along the first
  /// dimension? (A cheap test that rules out most empty tiles: the rows of
  /// [q0, q1) span few first-dimension coordinates.)
  bool outer_overlaps(index_t q0, index_t q1, index_t k0, index_t k1) const {
    const index_t p = pitch[0];
    index_t lo = grid[0], hi = -1;  // union of the windows of the rows' first coordinates
    for (index_t y = q0 / p; y <= (q1 - 1) / p; ++y) {
      const index_t s = start(0, y);
      lo = std::min(lo, s);
      hi = std::max(hi, s + (kernel[0] - 1) * dilation[0]);
    }
    return k0 / p <= hi && (k1 - 1) / p >= lo;
  }

  /// Exact: counts the visible keys of each row in the tile, stopping as soon
  /// as the tile is known to be partial.
  TileKind classify(index_t, index_t, index_t q0, index_t q1, index_t k0, index_t k1) const {
    if (!outer_overlaps(q0, q1, k0, k1)) return TileKind::empty;
    bool some = false, all = true;
    for (index_t q = q0; q < q1; ++q) {
      const index_t c = count(q, k0, k1);
      some = some || c > 0;
      all = all && c == k1 - k0;
      if (some && !all) return TileKind::partial;
    }
    return some ? TileKind::full : TileKind::empty;
  }
};

/// Neighbourhood attention mask on a grid of 1 to 3 dimensions (extents in
/// `grid`, row-major tokens, last dimension fastest): each query sees the
/// kernel[d] points around it along every dimension d, spaced dilation[d]
/// apart, the window shifted inward at borders (NATTEN). `kernel` and
/// `dilation` give one value per dimension, or one value for all.
inline Neighborhood neighborhood(const std::vector<index_t>& grid,
                                 const std::vector<index_t>& kernel,
                                 const std::vector<index_t>& dilation = {1}) {
  Neighborhood m;
  const auto n = grid.size();
  if (n < 1 || n > static_cast<std::size_t>(Neighborhood::max_dims))
    detail::fail("neighborhood grid has ", n, " dimensions, must have 1 to ",
                 Neighborhood::max_dims);
  if (kernel.size() != 1 && kernel.size() != n)
    detail::fail("neighborhood kernel has ", kernel.size(), " values for a grid of ", n,
                 " dimensions (give 1 or ", n, ")");
  if (dilation.size() != 1 && dilation.size() != n)
    detail::fail("neighborhood dilation has ", dilation.size(), " values for a grid of ", n,
                 " dimensions (give 1 or ", n, ")");
  m.dims = static_cast<int>(n);
  for (std::size_t d = 0; d < n; ++d) {
    m.grid[d] = grid[d];
    m.kernel[d] = kernel.size() == 1 ? kernel[0] : kernel[d];
    m.dilation[d] = dilation.size() == 1 ? dilation[0] : dilation[d];
  }
  return m;
}

/// Same with one kernel size and dilation for every dimension.
inline Neighborhood neighborhood(const std::vector<index_t>& grid, index_t kernel,
                                 index_t dilation = 1) {
  return neighborhood(grid, std::vector<index_t>{kernel}, std::vector<index_t>{dilation});
}

}  // namespace attn
