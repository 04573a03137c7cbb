// attn/policy/relative_bias_2d.hpp — the 2-D relative position bias of vision
// transformers (Swin) as a score modifier, computed from patch positions.
//
// Tokens are the patches of a grid_h × grid_w grid in row-major order, token
// t at (y, x) = (t / grid_w, t % grid_w); q and k both hold the whole grid
// (Lq = Lk = grid_h·grid_w; windows of an image go in the batch dimension).
// With (dy, dx) = (y_q - y_k, x_q - x_k):
//
//   score(q, k) += table[(dy + grid_h - 1)·(2·grid_w - 1) + (dx + grid_w - 1), h]
//
// the table being Swin's relative_position_bias_table, [(2·grid_h - 1)·(2·grid_w - 1), heads].
// Binding lays out each head's table with dx reversed, so the keys of one grid
// row read one contiguous slice of it: a tile adds slices, as T5 bias does.
#pragma once

#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

namespace attn {

/// Swin-style 2-D relative position bias over a grid of patch tokens. Build
/// it with attn::relative_bias_2d(...).
struct RelativeBias2d : ScoreModPolicy {
  static constexpr bool is_identity = false;
  static constexpr bool unit_grad = true;  // dscore passes through; the table takes it too
  std::vector<double> table;               ///< [(2·grid_h - 1)·(2·grid_w - 1), heads], row-major
  index_t grid_h = 0, grid_w = 0;

  // Set by bind(): per head, the table as rows of dy, each with dx reversed:
  // rev[h][(dy + gh - 1)·(2gw - 1) + (gw - 1 - dx)].
  index_t heads = 0, row_len = 0, per_head = 0;
  std::shared_ptr<const std::vector<float>> rev_f;
  std::shared_ptr<const std::vector<double>> rev_d;

  index_t entries() const { return (2 * grid_h - 1) * (2 * grid_w - 1); }

  RelativeBias2d bind(const AttentionShape& s) const {
    if (grid_h < 1 || grid_w < 1)
      detail::fail("relative_bias_2d grid is ", grid_h, " x ", grid_w, ", both must be >= 1");
    const index_t tokens = grid_h * grid_w;
    if (s.lq != tokens || s.lk != tokens)
      detail::fail("relative_bias_2d grid ", grid_h, " x ", grid_w, " has ", tokens,
                   " tokens, but Lq = ", s.lq, " and Lk = ", s.lk, " (both must be ", tokens, ")");
    const index_t n = entries();
    if (table.empty() || static_cast<index_t>(table.size()) % n != 0)
      detail::fail("relative_bias_2d table has ", table.size(), " entries, not a multiple of (2·",
                   grid_h, " - 1)·(2·", grid_w, " - 1) = ", n, " ([", n, ", heads])");
    RelativeBias2d m = *this;
    m.heads = static_cast<index_t>(table.size()) / n;
    if (m.heads != s.q_heads)
      detail::fail("relative_bias_2d table has ", m.heads, " heads ([", n, ", ", m.heads,
                   "]), but q has ", s.q_heads, " heads");
    for (std::size_t i = 0; i < table.size(); ++i)
      if (!std::isfinite(table[i]))
        detail::fail("relative_bias_2d table entry ", i, " is ", table[i]);
    m.row_len = 2 * grid_w - 1;
    m.per_head = n;
    std::vector<double> rd(static_cast<std::size_t>(m.heads * n));
    std::vector<float> rf(rd.size());
    for (index_t h = 0; h < m.heads; ++h)
      for (index_t dyi = 0; dyi < 2 * grid_h - 1; ++dyi)
        for (index_t dxi = 0; dxi < m.row_len; ++dxi) {
          const double v = table[static_cast<std::size_t>((dyi * m.row_len + dxi) * m.heads + h)];
          const auto at = static_cast<std::size_t>(h * n + dyi * m.row_len + (m.row_len - 1 - dxi));
          rd[at] = v;
          rf[at] = static_cast<float>(v);
        }
    m.rev_d = std::make_shared<const std::vector<double>>(std::move(rd));
    m.rev_f = std::make_shared<const std::vector<float>>(std::move(rf));
    bind_table_grad(m, s, n);
    return m;
  }

  /// Row of the table (Swin's relative_position_index) of the pair (q, k).
  index_t table_row(index_t q, index_t k) const {
    const index_t dy = q / grid_w - k / grid_w, dx = q % grid_w - k % grid_w;
    return (dy + grid_h - 1) * row_len + (dx + grid_w - 1);
  }

  template <class Acc>
  const Acc* rev(index_t h) const {
    if constexpr (std::is_same<Acc, float>::value)
      return rev_f->data() + h * per_head;
    else
      return rev_d->data() + h * per_head;
  }

  template <class Acc>
  Acc operator()(index_t, index_t h, index_t q, index_t k, Acc s) const {
    return s + static_cast<Acc>(table[static_cast<std::size_t>(table_row(q, k) * heads + h)]);
  }

  /// Calls f(c0, n, at) for each run of the tile's keys [k0, k0 + cols) that
  /// lie in one grid row: columns [c0, c0 + n) of the tile read the reversed
  /// table of query q at [at, at + n).
  template <class F>
  void for_each_run(index_t q, index_t k0, index_t cols, F&& f) const {
    for_each_run_at(q / grid_w, q % grid_w, k0 / grid_w, k0 % grid_w, cols, f);
  }
  /// The same with the grid positions given: query at (yq, xq), key k0 at
  /// (yk, xk). The runs after the first start at column 0 of the next grid
  /// row, so a tile needs no division past its first query and key.
  template <class F>
  void for_each_run_at(index_t yq, index_t xq, index_t yk, index_t xk, index_t cols, F&& f) const {
    index_t c = 0;
    while (c < cols) {
      const index_t n = std::min(grid_w - xk, cols - c);
      // reversed slot (dy + gh - 1)·(2gw - 1) + (gw - 1 - dx) with dx = xq - xk: ascends with xk
      f(c, n, (yq - yk + grid_h - 1) * row_len + (grid_w - 1 - xq + xk));
      c += n;
      xk = 0;
      ++yk;
    }
  }
  /// Calls f(r, c0, n, at) for the runs of each row r < rows of the tile at
  /// (q0, k0): two divisions per tile, the query's grid position stepped per row.
  template <class F>
  void for_each_tile_run(index_t q0, index_t k0, index_t rows, index_t cols, F&& f) const {
    index_t yq = q0 / grid_w, xq = q0 % grid_w;
    const index_t yk = k0 / grid_w, xk = k0 % grid_w;
    for (index_t r = 0; r < rows; ++r) {
      for_each_run_at(yq, xq, yk, xk, cols,
                      [&](index_t c0, index_t n, index_t at) { f(r, c0, n, at); });
      if (++xq == grid_w) {
        xq = 0;
        ++yq;
      }
    }
  }

  template <class Acc>
  void apply_tile(index_t, index_t h, index_t q0, index_t k0, Acc* s, index_t ld, index_t rows,
                  index_t cols) const {
    const Acc* base = rev<Acc>(h);
    for_each_tile_run(q0, k0, rows, cols, [&](index_t r, index_t c0, index_t n, index_t at) {
      Acc* out = s + r * ld + c0;
      const Acc* bias = base + at;
      for (index_t c = 0; c < n; ++c) out[c] += bias[c];
    });
  }

  /// Gradient output of the table (see with_table_grad), null: not wanted;
  /// bound as [1, Hkv, (2·grid_h - 1)·(2·grid_w - 1), group] over the same memory so the
  /// backward's checks, zeroing and task schedule (one task per KV head
  /// covering every batch, so no two tasks add into one entry) apply.
  TensorView<double, 2> dtable;
  TensorView<double, 4> dtable_bound;

  /// The same modifier, with attention_backward adding dL/dtable into `g`
  /// ((2·grid_h - 1)·(2·grid_w - 1) × heads, row-major and contiguous like the table; zeroed by the
  /// backward).
  RelativeBias2d with_table_grad(TensorView<double, 2> g) const {
    RelativeBias2d m = *this;
    m.dtable = g;
    return m;
  }
  void bind_table_grad(RelativeBias2d& m, const AttentionShape& s, index_t rows) const {
    if (dtable.is_null()) return;
    if (dtable.data() == nullptr) detail::fail("relative_bias_2d dtable has null data");
    if (dtable.extent(0) != rows || dtable.extent(1) != m.heads || dtable.stride(1) != 1 ||
        dtable.stride(0) != m.heads)
      detail::fail("relative_bias_2d dtable has shape ", detail::shape_str(dtable), " and strides ",
                   detail::strides_str(dtable), ", expected a contiguous [", rows, ", ", m.heads,
                   "] like the table");
    const index_t group = s.q_heads / s.kv_heads;
    m.dtable_bound = TensorView<double, 4>(dtable.data(), {1, s.kv_heads, rows, group},
                                           {rows * m.heads, group, m.heads, 1});
  }
  template <class F>
  void for_each_grad_view(F&& f) const {
    if (!dtable_bound.is_null()) f(dtable_bound, "dtable");
  }
  template <class Acc>
  Acc grad(index_t b, index_t h, index_t q, index_t k, Acc, Acc g) const {
    if (!dtable_bound.is_null()) accumulate_table_grad(b, h, q, k, &g, 1, 1, 1, dtable.data());
    return g;
  }
  template <class Acc>
  void grad_tile(index_t b, index_t h, index_t q0, index_t k0, const Acc*, Acc* g, index_t ld,
                 index_t rows, index_t cols) const {
    if (!dtable_bound.is_null())
      accumulate_table_grad(b, h, q0, k0, static_cast<const Acc*>(g), ld, rows, cols,
                            dtable.data());
  }

  /// The derivative with respect to the table, for the backward pass: adds
  /// each ds[r*ld + c] = dL/dscore(q0 + r, k0 + c) of head h to
  /// dtable[table_row(q0 + r, k0 + c), h], dtable laid out like the table.
  /// Same contract as T5Bias::accumulate_table_grad.
  template <class Acc>
  void accumulate_table_grad(index_t, index_t h, index_t q0, index_t k0, const Acc* ds, index_t ld,
                             index_t rows, index_t cols, double* dtable) const {
    for_each_tile_run(q0, k0, rows, cols, [&](index_t r, index_t c0, index_t n, index_t at) {
      const Acc* g = ds + r * ld + c0;
      // reversed slot at + c is table row (dyi·row_len) + (row_len - 1 - (at + c) % row_len)
      const index_t dyi = at / row_len, rx = at % row_len;
      for (index_t c = 0; c < n; ++c)
        dtable[(dyi * row_len + (row_len - 1 - (rx + c))) * heads + h] += static_cast<double>(g[c]);
    });
  }
};

/// 2-D relative position bias over a grid_h × grid_w grid of patch tokens
/// (Swin). `table` is [(2·grid_h - 1)·(2·grid_w - 1), heads] row-major.
template <class S>
RelativeBias2d relative_bias_2d(const std::vector<S>& table, index_t grid_h, index_t grid_w) {
  RelativeBias2d m;
  m.table.assign(table.begin(), table.end());
  m.grid_h = grid_h;
  m.grid_w = grid_w;
  return m;
}

}  // namespace attn
