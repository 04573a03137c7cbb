// attn/reference/topk.hpp — naive top-k attention: every row's scores in
// double, sorted, the k best kept. Written for clarity, not speed.
#pragma once

#include "attn/detail/checks.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace attn {
namespace reference {

/// Reference of topk_attention: per row, the scores scale·q·k → score_mod →
/// mask in double; the selectable keys (kept, score neither -inf nor NaN)
/// sorted by score, descending, ties by ascending key (a stable sort of the
/// keys in index order); the first k_best kept; out = softmax over them · v.
/// `indices` (optional, [B, Hq, Lq, k_best]) receives them, -1 past the last;
/// `lse` (optional) their log-sum-exp.
template <class Q, class K, class V, class O, class Mask = NoMask, class Mod = NoScoreMod>
void topk_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k, const TensorView<V, 4>& v,
                    const TensorView<O, 4>& out, index_t k_best, const Mask& mask = {},
                    const Mod& score_mod = {}, const AttentionOptions& opt = {},
                    const TensorView<std::int64_t, 4>& indices = {}) {
  const AttentionShape s = detail::check_attention(q, k, v, out, opt);
  if (k_best < 1) detail::fail("k_best is ", k_best, ", must be >= 1");
  const AttentionShape global = detail::global_shape(s, opt.positions);
  const Mask m = mask.bind(global);
  const Mod mod = score_mod.bind(global);
  const index_t qp = opt.positions.q_offset, kp = opt.positions.k_offset;
  const double scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(s.d)));
  const double neg_inf = -std::numeric_limits<double>::infinity();
  std::vector<std::pair<double, index_t>> row;
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.q_heads; ++h) {
      const index_t hk = s.kv_head(h);
      for (index_t i = 0; i < s.lq; ++i) {
        row.clear();
        for (index_t j = 0; j < s.lk; ++j) {
          if (!m.keep(b, h, qp + i, kp + j)) continue;
          double dot = 0;
          for (index_t c = 0; c < s.d; ++c)
            dot += static_cast<double>(q(b, h, i, c)) * static_cast<double>(k(b, hk, j, c));
          const double score = mod(b, h, qp + i, kp + j, scale * dot);
          if (score == neg_inf || std::isnan(score)) continue;
          row.emplace_back(score, j);
        }
        std::stable_sort(row.begin(), row.end(),
                         [](const auto& x, const auto& y) { return x.first > y.first; });
        const index_t n = std::min<index_t>(k_best, static_cast<index_t>(row.size()));
        const double mx = n > 0 ? row[0].first : 0.0;
        double sum = 0;
        for (index_t j = 0; j < n; ++j)
          sum += std::exp(row[static_cast<std::size_t>(j)].first - mx);
        for (index_t c = 0; c < s.dv; ++c) {
          double acc = 0;
          for (index_t j = 0; j < n; ++j) {
            const auto& e = row[static_cast<std::size_t>(j)];
            acc += std::exp(e.first - mx) / sum * static_cast<double>(v(b, hk, e.second, c));
          }
          out(b, h, i, c) = static_cast<O>(acc);
        }
        if (!opt.lse.is_null())
          opt.lse(b, h, i) = n > 0 ? static_cast<float>(mx + std::log(sum))
                                   : -std::numeric_limits<float>::infinity();
        if (!indices.is_null())
          for (index_t j = 0; j < indices.extent(3); ++j)
            indices(b, h, i, j) =
                j < n ? static_cast<std::int64_t>(row[static_cast<std::size_t>(j)].second) : -1;
      }
    }
}

}  // namespace reference
}  // namespace attn
