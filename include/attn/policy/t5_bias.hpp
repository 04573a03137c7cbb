// attn/policy/t5_bias.hpp — T5's learned relative position bias as a score
// modifier, computed from positions (never an Lq × Lk tensor).
//
// score(i, j) += table[bucket(j - (i + Lk - Lq)), h]
//
// The relative position of key j to query i is bottom-right aligned like
// attn::causal() and attn::alibi(): query i sits at key position i + Lk - Lq,
// so with a KV cache the newest query is at the newest key. T5's bucketing
// (t5_bucket below) maps a relative position n = j - i' to one of num_buckets
// buckets: exact buckets for small |n|, logarithmic ones up to max_distance,
// one shared bucket beyond.
//
// Binding precomputes, per head, the bias of every relative position the
// problem has (Lq + Lk - 1 of them), so a tile adds one contiguous slice of
// that row per query row: the same memory traffic as a row of ALiBi, and no
// logarithm in the tile loop.
#pragma once

#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

namespace attn {

/// T5's bucket of relative position n = key position - query position.
///
/// bidirectional (encoder): half the buckets are for n > 0 (offset by
/// num_buckets / 2), half for n <= 0, and the magnitude is |n|; otherwise
/// (decoder) only n <= 0 is told apart and the magnitude is max(-n, 0). With
/// B the buckets of one side and E = B / 2: a magnitude a < E is its own
/// bucket; a larger one goes to
///
///   E + trunc(log(a / E) / log(max_distance / E) · (B - E)),   at most B - 1,
///
/// evaluated in float32 as T5's reference code does (log(max_distance / E) in
/// double, then rounded to float), so the boundaries agree with checkpoints
/// trained with it.
inline index_t t5_bucket(index_t n, bool bidirectional, index_t num_buckets, index_t max_distance) {
  index_t bucket = 0;
  index_t side = num_buckets;  // B
  index_t a = 0;               // magnitude
  if (bidirectional) {
    side = num_buckets / 2;
    if (n > 0) bucket += side;
    a = n < 0 ? -n : n;
  } else {
    a = n < 0 ? -n : 0;
  }
  const index_t exact = side / 2;  // E
  if (a < exact) return bucket + a;
  const float log_ratio = std::log(static_cast<float>(a) / static_cast<float>(exact));
  const float log_max =
      static_cast<float>(std::log(static_cast<double>(max_distance) / static_cast<double>(exact)));
  const float scaled = log_ratio / log_max * static_cast<float>(side - exact);
  const index_t large = exact + static_cast<index_t>(scaled);  // truncation, as T5's .to(long)
  return bucket + std::min(large, side - 1);
}

/// score += table[bucket, h] with T5's bucket of the key's position relative
/// to the query's (see t5_bucket). Build it with attn::t5_bias(...).
struct T5Bias : ScoreModPolicy {
  static constexpr bool is_identity = false;
  static constexpr bool unit_grad = true;  // dscore passes through; the table takes it too
  std::vector<double> table;  ///< [num_buckets, heads], row-major (T5's Embedding weight)
  index_t num_buckets = 32;
  index_t max_distance = 128;
  bool bidirectional = true;

  // Set by bind(): per head, the bias of relative position n at n + (Lk - 1),
  // n in [-(Lk - 1), Lq - 1]; and the bucket of each of those positions.
  index_t heads = 0, lk = 0, offset = 0, span = 0;
  std::shared_ptr<const std::vector<float>> lut_f;
  std::shared_ptr<const std::vector<double>> lut_d;
  std::shared_ptr<const std::vector<std::int32_t>> buckets;

  T5Bias bind(const AttentionShape& s) const {
    if (num_buckets < 2) detail::fail("t5_bias num_buckets is ", num_buckets, ", must be >= 2");
    const index_t side = bidirectional ? num_buckets / 2 : num_buckets;
    if (side / 2 < 1)
      detail::fail("t5_bias num_buckets is ", num_buckets, ", too few for exact buckets (",
                   bidirectional ? "bidirectional needs >= 4" : "needs >= 2", ")");
    if (max_distance <= side / 2)
      detail::fail("t5_bias max_distance is ", max_distance, ", must be > the ", side / 2,
                   " exact buckets");
    if (table.empty() || static_cast<index_t>(table.size()) % num_buckets != 0)
      detail::fail("t5_bias table has ", table.size(), " entries, not a multiple of num_buckets ",
                   num_buckets, " ([num_buckets, heads])");
    T5Bias m = *this;
    m.heads = static_cast<index_t>(table.size()) / num_buckets;
    if (m.heads != s.q_heads)
      detail::fail("t5_bias table has ", m.heads, " heads ([", num_buckets, ", ", m.heads,
                   "]), but q has ", s.q_heads, " heads");
    for (std::size_t i = 0; i < table.size(); ++i)
      if (!std::isfinite(table[i])) detail::fail("t5_bias table entry ", i, " is ", table[i]);
    m.lk = s.lk;
    m.offset = s.diagonal_offset();
    m.span = s.lq + s.lk - 1;
    std::vector<std::int32_t> bk(static_cast<std::size_t>(m.span));
    for (index_t p = 0; p < m.span; ++p)
      bk[static_cast<std::size_t>(p)] = static_cast<std::int32_t>(
          t5_bucket(p - (s.lk - 1), bidirectional, num_buckets, max_distance));
    std::vector<float> lf(static_cast<std::size_t>(m.heads * m.span));
    std::vector<double> ld(lf.size());
    for (index_t h = 0; h < m.heads; ++h)
      for (index_t p = 0; p < m.span; ++p) {
        const double v =
            table[static_cast<std::size_t>(bk[static_cast<std::size_t>(p)] * m.heads + h)];
        ld[static_cast<std::size_t>(h * m.span + p)] = v;
        lf[static_cast<std::size_t>(h * m.span + p)] = static_cast<float>(v);
      }
    m.buckets = std::make_shared<const std::vector<std::int32_t>>(std::move(bk));
    m.lut_f = std::make_shared<const std::vector<float>>(std::move(lf));
    m.lut_d = std::make_shared<const std::vector<double>>(std::move(ld));
    bind_table_grad(m, s, m.num_buckets);
    return m;
  }

  /// Index into a head's row of the bound lookup of the pair (q, k): its
  /// relative position k - (q + offset), shifted by Lk - 1.
  index_t slot(index_t q, index_t k) const { return k - q - offset + lk - 1; }

  template <class Acc>
  const Acc* lut(index_t h) const {
    if constexpr (std::is_same<Acc, float>::value)
      return lut_f->data() + h * span;
    else
      return lut_d->data() + h * span;
  }

  template <class Acc>
  Acc operator()(index_t, index_t h, index_t q, index_t k, Acc s) const {
    return s + lut<Acc>(h)[slot(q, k)];
  }
  template <class Acc>
  void apply_tile(index_t, index_t h, index_t q0, index_t k0, Acc* s, index_t ld, index_t rows,
                  index_t cols) const {
    const Acc* base = lut<Acc>(h);
    for (index_t r = 0; r < rows; ++r) {
      const Acc* bias = base + slot(q0 + r, k0);  // ascends with the key
      Acc* out = s + r * ld;
      for (index_t c = 0; c < cols; ++c) out[c] += bias[c];
    }
  }

  /// Gradient output of the table (see with_table_grad), null: not wanted;
  /// bound as [1, Hkv, num_buckets, group] over the same memory so the
  /// backward's checks, zeroing and task schedule (one task per KV head
  /// covering every batch, so no two tasks add into one entry) apply.
  TensorView<double, 2> dtable;
  TensorView<double, 4> dtable_bound;

  /// The same modifier, with attention_backward adding dL/dtable into `g`
  /// (num_buckets × heads, row-major and contiguous like the table; zeroed by the backward).
  T5Bias with_table_grad(TensorView<double, 2> g) const {
    T5Bias m = *this;
    m.dtable = g;
    return m;
  }
  void bind_table_grad(T5Bias& m, const AttentionShape& s, index_t rows) const {
    if (dtable.is_null()) return;
    if (dtable.data() == nullptr) detail::fail("t5_bias dtable has null data");
    if (dtable.extent(0) != rows || dtable.extent(1) != m.heads || dtable.stride(1) != 1 ||
        dtable.stride(0) != m.heads)
      detail::fail("t5_bias dtable has shape ", detail::shape_str(dtable), " and strides ",
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

  /// The derivative with respect to the table, for the backward pass: given
  /// the tile ds[r*ld + c] = dL/dscore(q0 + r, k0 + c) of head h (the gradient
  /// of the modified score, i.e. after the modifiers that follow this one
  /// have been differentiated), adds each ds to dtable[bucket, h], dtable
  /// laid out like the table ([num_buckets, heads]). The bias does not depend
  /// on the score, so dL/dscore passes through unchanged. Elements must be
  /// finite (zero where the mask hid the score). Not thread-safe on one
  /// dtable: give each worker its own and sum them in a fixed order.
  template <class Acc>
  void accumulate_table_grad(index_t, index_t h, index_t q0, index_t k0, const Acc* ds, index_t ld,
                             index_t rows, index_t cols, double* dtable) const {
    const std::int32_t* bk = buckets->data();
    for (index_t r = 0; r < rows; ++r) {
      const std::int32_t* row = bk + slot(q0 + r, k0);
      const Acc* g = ds + r * ld;
      for (index_t c = 0; c < cols; ++c) dtable[row[c] * heads + h] += static_cast<double>(g[c]);
    }
  }
};

/// T5 relative position bias. `table` is [num_buckets, heads] row-major (the
/// weight of T5's relative_attention_bias embedding), one column per query
/// head; T5 uses num_buckets = 32, max_distance = 128, bidirectional in the
/// encoder and not in the decoder.
template <class S>
T5Bias t5_bias(const std::vector<S>& table, index_t num_buckets = 32, index_t max_distance = 128,
               bool bidirectional = true) {
  T5Bias m;
  m.table.assign(table.begin(), table.end());
  m.num_buckets = num_buckets;
  m.max_distance = max_distance;
  m.bidirectional = bidirectional;
  return m;
}

}  // namespace attn
