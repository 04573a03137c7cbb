// attn/reference/backward.hpp — naive gradients of softmax attention, the
// oracle of attn::attention_backward.
//
// For each (batch, query head) it materialises the [Lq, Lk] raw scores
// x = scale · q·kᵀ and probabilities P (mask, score modifier, dropout applied)
// and computes, in double whatever the storage type:
//
//   Pd  = P ∘ M / (1 - p)          (M the dropout decisions; Pd = P without dropout)
//   dV  = Pdᵀ · dO                 dPd = dO · Vᵀ,   dP = dPd ∘ M / (1 - p)
//   dY  = P ∘ (dP - rowsum(P ∘ dP))                         (softmax backward)
//   dX  = score_mod'(x) ∘ dY       (the modifier's grad; dbias receives dY at the bias)
//   dQ  = scale · dX · K,          dK = scale · dXᵀ · Q
//
// dK and dV sum over the query heads of a GQA group. Masked entries and rows
// that see no key contribute nothing. It needs neither the forward's output
// nor its lse: it recomputes everything.
#pragma once

#include "attn/detail/checks.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/policy/dropout.hpp"
#include "attn/reference.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

namespace attn {
namespace reference {

/// Reference of attn::attention_backward: writes dq, dk, dv (and dbias of an
/// additive_bias(bias, dbias) modifier) for the loss gradient `dout`.
template <class Q, class K, class V, class DO, class DQ, class DK, class DV, class Mask = NoMask,
          class Mod = NoScoreMod>
void attention_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                        const TensorView<V, 4>& v, const TensorView<DO, 4>& dout,
                        const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                        const TensorView<DV, 4>& dv, const Mask& mask = {},
                        const Mod& score_mod = {}, const AttentionOptions& opt = {}) {
  const AttentionShape s = detail::check_attention(q, k, v, dout, opt);
  const Mask m = mask.bind(s);
  const Mod mod = score_mod.bind(s);
  const double scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(s.d)));
  const detail::DropoutGen drop =
      detail::DropoutGen::bind(opt.dropout, s.batch, s.q_heads, s.lq, s.lk);
  detail::for_each_grad_view(mod, [](const auto& g, const char*) {
    for (index_t a = 0; a < g.extent(0); ++a)
      for (index_t b = 0; b < g.extent(1); ++b)
        for (index_t i = 0; i < g.extent(2); ++i)
          for (index_t j = 0; j < g.extent(3); ++j) g(a, b, i, j) = 0;
  });

  const auto lq = static_cast<std::size_t>(s.lq), lk = static_cast<std::size_t>(s.lk);
  std::vector<double> gk(static_cast<std::size_t>(s.batch * s.kv_heads) * lk *
                         static_cast<std::size_t>(s.d)),
      gv(static_cast<std::size_t>(s.batch * s.kv_heads) * lk * static_cast<std::size_t>(s.dv));
  std::vector<double> p, lse, x(lq * lk), dp(lq * lk);
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.q_heads; ++h) {
      const index_t hk = s.kv_head(h);
      const std::size_t kv = static_cast<std::size_t>(b * s.kv_heads + hk);
      probabilities(q, k, s, m, mod, scale, b, h, p, lse);
      for (index_t i = 0; i < s.lq; ++i)
        for (index_t j = 0; j < s.lk; ++j) {
          const std::size_t ij = static_cast<std::size_t>(i) * lk + static_cast<std::size_t>(j);
          double dot = 0, dpo = 0;
          for (index_t c = 0; c < s.d; ++c)
            dot += static_cast<double>(q(b, h, i, c)) * static_cast<double>(k(b, hk, j, c));
          for (index_t c = 0; c < s.dv; ++c)
            dpo += static_cast<double>(dout(b, h, i, c)) * static_cast<double>(v(b, hk, j, c));
          x[ij] = scale * dot;
          const double keep = drop.enabled ? (drop.keep(b, h, i, j) ? drop.inv_keep : 0.0) : 1.0;
          dp[ij] = dpo * keep;  // dP = dPd ∘ M / (1 - p)
          const double pd = p[ij] * keep;
          for (index_t c = 0; c < s.dv; ++c)  // dV += Pdᵀ · dO
            gv[(kv * lk + static_cast<std::size_t>(j)) * static_cast<std::size_t>(s.dv) +
               static_cast<std::size_t>(c)] += pd * static_cast<double>(dout(b, h, i, c));
        }
      for (index_t i = 0; i < s.lq; ++i) {
        const std::size_t row = static_cast<std::size_t>(i) * lk;
        double dsum = 0;  // rowsum(P ∘ dP)
        for (std::size_t j = 0; j < lk; ++j) dsum += p[row + j] * dp[row + j];
        std::vector<double> gq(static_cast<std::size_t>(s.d), 0.0);
        for (index_t j = 0; j < s.lk; ++j) {
          const std::size_t ij = row + static_cast<std::size_t>(j);
          if (p[ij] == 0 && !m.keep(b, h, i, j)) continue;  // masked: no gradient anywhere
          if (lse[static_cast<std::size_t>(i)] == -std::numeric_limits<double>::infinity())
            continue;
          const double dy = p[ij] * (dp[ij] - dsum);
          const double dx = mod.grad(b, h, i, j, x[ij], dy);
          for (index_t c = 0; c < s.d; ++c) {
            gq[static_cast<std::size_t>(c)] += scale * dx * static_cast<double>(k(b, hk, j, c));
            gk[(kv * lk + static_cast<std::size_t>(j)) * static_cast<std::size_t>(s.d) +
               static_cast<std::size_t>(c)] += scale * dx * static_cast<double>(q(b, h, i, c));
          }
        }
        for (index_t c = 0; c < s.d; ++c)
          dq(b, h, i, c) = static_cast<std::remove_cv_t<DQ>>(gq[static_cast<std::size_t>(c)]);
      }
    }
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t hk = 0; hk < s.kv_heads; ++hk) {
      const std::size_t kv = static_cast<std::size_t>(b * s.kv_heads + hk);
      for (index_t j = 0; j < s.lk; ++j) {
        const std::size_t r = kv * lk + static_cast<std::size_t>(j);
        for (index_t c = 0; c < s.d; ++c)
          dk(b, hk, j, c) =
              static_cast<DK>(gk[r * static_cast<std::size_t>(s.d) + static_cast<std::size_t>(c)]);
        for (index_t c = 0; c < s.dv; ++c)
          dv(b, hk, j, c) =
              static_cast<DV>(gv[r * static_cast<std::size_t>(s.dv) + static_cast<std::size_t>(c)]);
      }
    }
}

}  // namespace reference
}  // namespace attn
