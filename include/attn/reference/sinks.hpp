// attn/reference/sinks.hpp — naive attention with a per-head sink logit, in double.
//
// out_i = Σ_j exp(s_ij - m)·v_j / (exp(sink_h - m) + Σ_j exp(s_ij - m)),
// m = max(sink_h, max_j s_ij), lse_i = m + log(exp(sink_h - m) + Σ_j exp(s_ij - m)).
// Scores as in reference::attention (scale, modifiers, then the mask).
#pragma once

#include "attn/reference.hpp"

#include <cmath>
#include <limits>
#include <vector>

namespace attn {
namespace reference {

template <class Q, class K, class V, class O, class Mask = NoMask, class Mod = NoScoreMod>
void attention_with_sinks(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                          const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                          const std::vector<double>& sinks, const Mask& mask = {},
                          const Mod& score_mod = {}, const AttentionOptions& opt = {}) {
  AttentionOptions plain = opt;
  plain.sinks = {};
  const AttentionShape s = detail::check_attention(q, k, v, out, plain);
  const AttentionShape g = detail::global_shape(s, opt.positions);
  const Mask m = mask.bind(g);
  const Mod mod = score_mod.bind(g);
  const double scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(s.d)));
  const double neg_inf = -std::numeric_limits<double>::infinity();
  const index_t qo = opt.positions.q_offset, ko = opt.positions.k_offset;
  std::vector<double> row(static_cast<std::size_t>(s.lk));
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.q_heads; ++h) {
      const index_t hk = s.kv_head(h);
      const double sink = sinks[static_cast<std::size_t>(h)];
      for (index_t i = 0; i < s.lq; ++i) {
        double mx = sink;
        for (index_t j = 0; j < s.lk; ++j) {
          double dot = 0;
          for (index_t c = 0; c < s.d; ++c)
            dot += static_cast<double>(q(b, h, i, c)) * static_cast<double>(k(b, hk, j, c));
          double score = mod(b, h, qo + i, ko + j, scale * dot);
          if (!m.keep(b, h, qo + i, ko + j)) score = neg_inf;
          row[static_cast<std::size_t>(j)] = score;
          mx = std::max(mx, score);
        }
        double sum = mx == neg_inf ? 0.0 : std::exp(sink - mx);
        for (index_t j = 0; j < s.lk; ++j)
          sum += mx == neg_inf ? 0.0
                               : (row[static_cast<std::size_t>(j)] =
                                      std::exp(row[static_cast<std::size_t>(j)] - mx));
        for (index_t c = 0; c < s.dv; ++c) {
          double acc = 0;
          if (mx != neg_inf)
            for (index_t j = 0; j < s.lk; ++j)
              acc += row[static_cast<std::size_t>(j)] * static_cast<double>(v(b, hk, j, c));
          out(b, h, i, c) = static_cast<O>(mx == neg_inf ? 0.0 : acc / sum);
        }
        if (!opt.lse.is_null()) opt.lse.set(b, h, i, mx == neg_inf ? neg_inf : mx + std::log(sum));
      }
    }
}

}  // namespace reference
}  // namespace attn
