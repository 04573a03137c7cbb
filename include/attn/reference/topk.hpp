// attn/reference/topk.hpp — naive top-k attention and its gradients: every
// row's scores in double, sorted, the k best kept. Written for clarity, not speed.
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
#include <type_traits>
#include <utility>
#include <vector>

namespace attn {
namespace reference {
namespace detail_topk {

/// One selectable key of a row: its modified score, its raw score scale·q·k.
struct Entry {
  double score, x;
  index_t key;
};

/// Row i of (b, h): the keys the mask keeps whose modified score is neither
/// -inf nor NaN, sorted by score, descending, ties by ascending key (a stable
/// sort of the keys in index order), into `row`.
template <class Q, class K, class Mask, class Mod>
void select_row(const TensorView<Q, 4>& q, const TensorView<K, 4>& k, const AttentionShape& s,
                const Mask& m, const Mod& mod, index_t qp, index_t kp, double scale, index_t b,
                index_t h, index_t i, std::vector<Entry>& row) {
  const index_t hk = s.kv_head(h);
  row.clear();
  for (index_t j = 0; j < s.lk; ++j) {
    if (!m.keep(b, h, qp + i, kp + j)) continue;
    double dot = 0;
    for (index_t c = 0; c < s.d; ++c)
      dot += static_cast<double>(q(b, h, i, c)) * static_cast<double>(k(b, hk, j, c));
    const double score = mod(b, h, qp + i, kp + j, scale * dot);
    if (score == -std::numeric_limits<double>::infinity() || std::isnan(score)) continue;
    row.push_back({score, scale * dot, j});
  }
  std::stable_sort(row.begin(), row.end(),
                   [](const Entry& x, const Entry& y) { return x.score > y.score; });
}

}  // namespace detail_topk

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
  std::vector<detail_topk::Entry> row;
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.q_heads; ++h) {
      const index_t hk = s.kv_head(h);
      for (index_t i = 0; i < s.lq; ++i) {
        detail_topk::select_row(q, k, s, m, mod, qp, kp, scale, b, h, i, row);
        const index_t n = std::min<index_t>(k_best, static_cast<index_t>(row.size()));
        const double mx = n > 0 ? row[0].score : 0.0;
        double sum = 0;
        for (index_t j = 0; j < n; ++j)
          sum += std::exp(row[static_cast<std::size_t>(j)].score - mx);
        for (index_t c = 0; c < s.dv; ++c) {
          double acc = 0;
          for (index_t j = 0; j < n; ++j) {
            const auto& e = row[static_cast<std::size_t>(j)];
            acc += std::exp(e.score - mx) / sum * static_cast<double>(v(b, hk, e.key, c));
          }
          out(b, h, i, c) = static_cast<O>(acc);
        }
        if (!opt.lse.is_null())
          opt.lse.set(b, h, i,
                      n > 0 ? mx + std::log(sum) : -std::numeric_limits<double>::infinity());
        if (!indices.is_null())
          for (index_t j = 0; j < indices.extent(3); ++j)
            indices(b, h, i, j) =
                j < n ? static_cast<std::int64_t>(row[static_cast<std::size_t>(j)].key) : -1;
      }
    }
}

/// Reference of topk_attention_backward: per row, the same selection as
/// topk_attention above (in double), the selected weights P materialised, and
/// the softmax backward over them alone:
///
///   dP_j = dO_i · v_j,   dY_j = P_j (dP_j - Σ_J P_j' dP_j'),   dX_j = score_mod'(x_j) · dY_j
///   dq_i = scale · Σ_J dX_j k_j,   dk_j += scale · dX_j q_i,   dv_j += P_j dO_i
///
/// dk, dv sum over the query heads of a GQA group; keys no row selected get
/// zeros. It needs neither the forward's output nor its selection: it
/// recomputes both. dbias (or a bias table's gradient) of the modifier is
/// zeroed and then receives dY.
template <class Q, class K, class V, class DO, class DQ, class DK, class DV, class Mask = NoMask,
          class Mod = NoScoreMod>
void topk_attention_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                             const TensorView<V, 4>& v, const TensorView<DO, 4>& dout,
                             const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                             const TensorView<DV, 4>& dv, index_t k_best, const Mask& mask = {},
                             const Mod& score_mod = {}, const AttentionOptions& opt = {}) {
  AttentionOptions o = opt;
  o.lse = {};
  const AttentionShape s = detail::check_attention(q, k, v, dout, o);
  if (k_best < 1) detail::fail("k_best is ", k_best, ", must be >= 1");
  const AttentionShape global = detail::global_shape(s, opt.positions);
  const Mask m = mask.bind(global);
  const Mod mod = score_mod.bind(global);
  detail::for_each_grad_view(mod, [](const auto& g, const char*) {
    for (index_t a = 0; a < g.extent(0); ++a)
      for (index_t b = 0; b < g.extent(1); ++b)
        for (index_t i = 0; i < g.extent(2); ++i)
          for (index_t j = 0; j < g.extent(3); ++j) g(a, b, i, j) = 0;
  });
  const index_t qp = opt.positions.q_offset, kp = opt.positions.k_offset;
  const double scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(s.d)));
  const auto d = static_cast<std::size_t>(s.d), dvd = static_cast<std::size_t>(s.dv),
             lk = static_cast<std::size_t>(s.lk);
  std::vector<double> gk(static_cast<std::size_t>(s.batch * s.kv_heads) * lk * d),
      gv(static_cast<std::size_t>(s.batch * s.kv_heads) * lk * dvd);
  std::vector<detail_topk::Entry> row;
  std::vector<double> p, dp;
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.q_heads; ++h) {
      const index_t hk = s.kv_head(h);
      const std::size_t kv = static_cast<std::size_t>(b * s.kv_heads + hk);
      for (index_t i = 0; i < s.lq; ++i) {
        detail_topk::select_row(q, k, s, m, mod, qp, kp, scale, b, h, i, row);
        const auto n =
            static_cast<std::size_t>(std::min<index_t>(k_best, static_cast<index_t>(row.size())));
        p.assign(n, 0.0);
        dp.assign(n, 0.0);
        double sum = 0, dsum = 0;
        for (std::size_t j = 0; j < n; ++j) sum += std::exp(row[j].score - row[0].score);
        for (std::size_t j = 0; j < n; ++j) {
          p[j] = std::exp(row[j].score - row[0].score) / sum;  // P_j
          for (index_t c = 0; c < s.dv; ++c)                   // dP_j = dO_i · v_j
            dp[j] += static_cast<double>(dout(b, h, i, c)) *
                     static_cast<double>(v(b, hk, row[j].key, c));
          dsum += p[j] * dp[j];
        }
        std::vector<double> gq(d, 0.0);
        for (std::size_t j = 0; j < n; ++j) {
          const std::size_t key = static_cast<std::size_t>(row[j].key);
          const double dy = p[j] * (dp[j] - dsum);
          const double dx = mod.grad(b, h, qp + i, kp + row[j].key, row[j].x, dy);
          for (index_t c = 0; c < s.d; ++c) {
            const auto cc = static_cast<std::size_t>(c);
            gq[cc] += scale * dx * static_cast<double>(k(b, hk, row[j].key, c));
            gk[(kv * lk + key) * d + cc] += scale * dx * static_cast<double>(q(b, h, i, c));
          }
          for (index_t c = 0; c < s.dv; ++c)
            gv[(kv * lk + key) * dvd + static_cast<std::size_t>(c)] +=
                p[j] * static_cast<double>(dout(b, h, i, c));
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
          dk(b, hk, j, c) = static_cast<DK>(gk[r * d + static_cast<std::size_t>(c)]);
        for (index_t c = 0; c < s.dv; ++c)
          dv(b, hk, j, c) = static_cast<DV>(gv[r * dvd + static_cast<std::size_t>(c)]);
      }
    }
}

}  // namespace reference
}  // namespace attn
