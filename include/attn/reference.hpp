// attn/reference.hpp — naive O(N²) attention, written for clarity, not speed.
//
// Every fast path of attn is tested against these. They materialise the full
// [Lq, Lk] score matrix of each (batch, head) and compute in double whatever
// the storage type, so with double inputs they are the fp64 reference.
#pragma once

#include "attn/detail/checks.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/policy/dropout.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <cmath>
#include <limits>
#include <vector>

namespace attn {
namespace reference {

/// Softmax probabilities of one (batch, query head): p[i][j], [Lq][Lk], with
/// the mask and score modifier applied; an all-masked row is all zeros.
/// Also returns each row's log-sum-exp (-inf for an all-masked row).
template <class Q, class K, class Mask, class Mod>
void probabilities(const TensorView<Q, 4>& q, const TensorView<K, 4>& k, const AttentionShape& s,
                   const Mask& mask, const Mod& mod, double scale, index_t b, index_t h,
                   std::vector<double>& p, std::vector<double>& lse) {
  const index_t hk = s.kv_head(h);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  p.assign(static_cast<std::size_t>(s.lq * s.lk), 0.0);
  lse.assign(static_cast<std::size_t>(s.lq), neg_inf);
  for (index_t i = 0; i < s.lq; ++i) {
    double* row = &p[static_cast<std::size_t>(i * s.lk)];
    double mx = neg_inf;
    for (index_t j = 0; j < s.lk; ++j) {
      double dot = 0;
      for (index_t c = 0; c < s.d; ++c)
        dot += static_cast<double>(q(b, h, i, c)) * static_cast<double>(k(b, hk, j, c));
      double score = mod(b, h, i, j, scale * dot);
      if (!mask.keep(b, h, i, j)) score = neg_inf;
      row[j] = score;
      if (score > mx || std::isnan(score)) mx = score;  // a NaN score makes the row NaN
    }
    if (mx == neg_inf) {  // the row sees no key
      for (index_t j = 0; j < s.lk; ++j) row[j] = 0;
      continue;
    }
    double sum = 0;
    for (index_t j = 0; j < s.lk; ++j) sum += (row[j] = std::exp(row[j] - mx));
    for (index_t j = 0; j < s.lk; ++j) row[j] /= sum;
    lse[static_cast<std::size_t>(i)] = mx + std::log(sum);
  }
}

/// Reference of masked_attention (and of scaled_dot_product_attention with
/// no_mask()): out = softmax(mask(score_mod(scale · q·kᵀ))) · v. With
/// options.dropout, out = (P ∘ M / (1 - p)) · v with M = dropout_mask(...);
/// lse is that of the undropped P.
template <class Q, class K, class V, class O, class Mask = NoMask, class Mod = NoScoreMod>
void attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k, const TensorView<V, 4>& v,
               const TensorView<O, 4>& out, const Mask& mask = {}, const Mod& score_mod = {},
               const AttentionOptions& opt = {}) {
  detail::check_stats_policy_views(opt.stats, mask, score_mod);
  const AttentionShape s = detail::check_attention(q, k, v, out, opt);
  const Mask m = mask.bind(s);
  const Mod mod = score_mod.bind(s);
  detail::check_policy_views(m, out, opt.lse);
  detail::check_policy_views(mod, out, opt.lse);
  const double scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(s.d)));
  const detail::DropoutGen drop =
      detail::DropoutGen::bind(opt.dropout, s.batch, s.q_heads, s.lq, s.lk);
  std::vector<double> p, lse;
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.q_heads; ++h) {
      probabilities(q, k, s, m, mod, scale, b, h, p, lse);
      if (drop.enabled)
        for (index_t i = 0; i < s.lq; ++i)
          for (index_t j = 0; j < s.lk; ++j) {
            double& pij = p[static_cast<std::size_t>(i * s.lk + j)];
            pij = drop.keep(b, h, i, j) ? pij * drop.inv_keep : 0.0;
          }
      const index_t hk = s.kv_head(h);
      for (index_t i = 0; i < s.lq; ++i) {
        for (index_t c = 0; c < s.dv; ++c) {
          double acc = 0;
          for (index_t j = 0; j < s.lk; ++j)
            acc += p[static_cast<std::size_t>(i * s.lk + j)] * static_cast<double>(v(b, hk, j, c));
          out(b, h, i, c) = static_cast<O>(acc);
        }
        if (!opt.lse.is_null()) opt.lse.set(b, h, i, lse[static_cast<std::size_t>(i)]);
      }
    }
}

}  // namespace reference
}  // namespace attn
