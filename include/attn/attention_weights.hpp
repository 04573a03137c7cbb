// attn/attention_weights.hpp — the softmax probabilities themselves, for
// attention-map plots and explainability.
//
// This is the one deliberately O(Lq·Lk)-memory call of attn: it fills a
// [B, Hq, Lq, Lk] view with
//
//   P[b, h, i, j] = softmax_j( mask(score_mod(scale · q_i·k_j)) )
//
// under exactly the semantics of masked_attention (same scale default, same
// modifier order, bottom-right masks, GQA head mapping; a row that sees no key
// is all zeros). The attention entry points never materialise P; call this
// only when the map itself is wanted.
#pragma once

#include "attn/detail/checks.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/engine/forward.hpp"
#include "attn/kernels/dispatch.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

namespace attn {
namespace detail {

/// Checks q [B,Hq,Lq,D], k [B,Hkv,Lk,D], weights [B,Hq,Lq,Lk] and the
/// options; returns the sizes (dv = d: no values are involved).
template <class Q, class K, class W>
AttentionShape check_weights(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                             const TensorView<W, 4>& w, const AttentionOptions& opt) {
  check_view(q, "q");
  check_view(k, "k");
  check_view(w, "weights");
  AttentionShape s;
  s.batch = q.extent(0);
  s.q_heads = q.extent(1);
  s.lq = q.extent(2);
  s.d = s.dv = q.extent(3);
  s.kv_heads = k.extent(1);
  s.lk = k.extent(2);
  if (k.extent(0) != s.batch) fail("k has batch ", k.extent(0), ", but q has batch ", s.batch);
  if (k.extent(3) != s.d) fail("k has head dim ", k.extent(3), ", but q has head dim ", s.d);
  if (s.q_heads % s.kv_heads != 0)
    fail("k has ", s.kv_heads, " heads, which does not divide q's ", s.q_heads, " heads");
  if (w.extent(0) != s.batch || w.extent(1) != s.q_heads || w.extent(2) != s.lq ||
      w.extent(3) != s.lk)
    fail("weights has shape ", shape_str(w), ", expected [", s.batch, ", ", s.q_heads, ", ", s.lq,
         ", ", s.lk, "] (batch, q heads, Lq, Lk)");
  check_not_self_overlapping(w, "weights");
  check_no_overlap(w, "weights", q, "q");
  check_no_overlap(w, "weights", k, "k");
  s.accum_max = accum_max_v<Q, K>;
  if (opt.scale) check_finite_in(*opt.scale, s.accum_max, "scale");
  if (opt.num_threads < 0) fail("num_threads is ", opt.num_threads, ", must be >= 0");
  return s;
}

/// Per-worker scratch of attention_weights.
template <class Acc>
struct WeightsScratch {
  RowMatrix<Acc> q, s, k;  // (Br, D) scaled queries, (Br, Lk) scores, (Lk, D) converted keys
  WeightsScratch(index_t br, index_t lk, index_t d, bool pack_k)
      : q(br, d), s(br, lk), k(pack_k ? lk : 0, d) {}
};

}  // namespace detail

/// Fills weights [B, Hq, Lq, Lk] with the softmax probabilities of attention
/// of q [B, Hq, Lq, D] over k [B, Hkv, Lk, D] (Hkv divides Hq) under `mask`
/// and `score_mod`, as masked_attention computes them internally. Each
/// non-empty row sums to 1; a row that sees no key is all zeros; a row with a
/// NaN (or +inf) score among its kept keys is all NaN, as the forward's
/// output row is. Uses
/// options.scale and options.num_threads (tiles, lse and stats are ignored).
/// O(Lq·Lk·D) time and O(Lq·Lk) output: a diagnostic, not a fast path.
template <class Q, class K, class Mask = NoMask, class Mod = NoScoreMod>
void attention_weights(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                       const TensorView<float, 4>& weights, const Mask& mask = {},
                       const Mod& score_mod = {}, const AttentionOptions& options = {}) {
  static_assert(detail::is_storage_type_v<std::remove_cv_t<Q>> &&
                    detail::is_storage_type_v<std::remove_cv_t<K>>,
                "attn: element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
  static_assert(is_score_mod_v<Mod>,
                "attn: the score_mod argument must be a score modifier (attn/score_mod.hpp)");
  using Acc = detail::accum_t<Q, K>;
  using QT = std::remove_cv_t<Q>;
  using KT = std::remove_cv_t<K>;
  constexpr Acc neg_inf = -std::numeric_limits<Acc>::infinity();

  const AttentionShape shape = detail::check_weights(q, k, weights, options);
  const Mask m = mask.bind(shape);
  const Mod mod = score_mod.bind(shape);
  auto check_reads = [&](const auto& view, const char* name) {
    detail::check_no_overlap(weights, "weights", view, name);
  };
  detail::for_each_view(m, check_reads);
  detail::for_each_view(mod, check_reads);
  const TensorView<const QT, 4> qc = q;
  const TensorView<const KT, 4> kc = k;

  const Acc scale =
      static_cast<Acc>(options.scale.value_or(1.0 / std::sqrt(static_cast<double>(shape.d))));
  const index_t br = std::min<index_t>(64, shape.lq);
  const index_t q_tiles = (shape.lq + br - 1) / br;
  const index_t heads = shape.batch * shape.q_heads;
  const index_t tasks = heads * q_tiles;
  const bool pack_k = !std::is_same<KT, Acc>::value || k.stride(3) != 1;
  // The engine's row kernel (K read as rows, in place when it can be): no panels
  // to pack for a diagnostic that reads each key once per query tile.
  const kernels::KernelSet<Acc>& ks = kernels::kernel_set<Acc>(active_isa());

  auto make_scratch = [&] {
    return std::make_unique<detail::WeightsScratch<Acc>>(br, shape.lk, shape.d, pack_k);
  };
  auto run_task = [&](detail::WeightsScratch<Acc>& sc, index_t t) {
    const index_t b = t / (shape.q_heads * q_tiles);
    const index_t h = (t / q_tiles) % shape.q_heads;
    const index_t q0 = (t % q_tiles) * br;
    const index_t rows = std::min(br, shape.lq - q0);
    const index_t hk = shape.kv_head(h);
    const index_t lk = shape.lk;

    auto qs = sc.q.topRows(rows);
    qs = matrix(qc, b, h).middleRows(q0, rows).template cast<Acc>() * scale;  // (rows, D)
    KeyRange kr = m.key_range(b, h, q0, q0 + rows);
    kr.begin = std::clamp<index_t>(kr.begin, 0, lk);
    kr.end = std::clamp<index_t>(kr.end, kr.begin, lk);
    const index_t cols = kr.end - kr.begin;

    // S = scale · Q · Kᵀ over the keys any row may see                   (rows, cols)
    Acc* s = sc.s.data();
    const index_t lds = lk;
    if (cols > 0) {
      index_t ldk = 0;
      const Acc* kt = detail::load_tile<Acc>(kc, b, hk, kr.begin, cols, sc.k, ldk);
      ks.score_rows(rows, cols, shape.d, qs.data(), shape.d, kt, ldk, s, lds, {});
      mod.apply_tile(b, h, q0, kr.begin, s, lds, rows, cols);
    }

    // P = softmax over the kept keys of each row; zeros outside. As in the
    // forward, a row that sees no key is all zeros, and a NaN (or +inf) kept
    // score makes the whole row NaN (the forward's output row is NaN then).
    for (index_t r = 0; r < rows; ++r) {
      Acc* row = s + r * lds;
      if (!Mask::always_full)
        for (index_t c = 0; c < cols; ++c)
          if (!m.keep(b, h, q0 + r, kr.begin + c)) row[c] = neg_inf;
      Acc mx = neg_inf;  // NaN once a score is NaN
      for (index_t c = 0; c < cols; ++c)
        if (row[c] > mx || std::isnan(row[c])) mx = row[c];
      Acc sum = 0;  // >= 1 for a finite max; NaN for a NaN or +inf one
      if (mx != neg_inf)
        for (index_t c = 0; c < cols; ++c) sum += (row[c] = std::exp(row[c] - mx));  // exp(s - max)
      const bool nan_row = std::isnan(sum);
      const float fill = nan_row ? std::numeric_limits<float>::quiet_NaN() : 0.f;
      const Acc inv = mx == neg_inf || nan_row ? Acc(0) : Acc(1) / sum;
      float* dst = weights.data() + b * weights.stride(0) + h * weights.stride(1) +
                   (q0 + r) * weights.stride(2);
      const index_t sw = weights.stride(3);
      for (index_t j = 0; j < kr.begin; ++j) dst[j * sw] = fill;
      for (index_t c = 0; c < cols; ++c)
        dst[(kr.begin + c) * sw] =
            mx == neg_inf || nan_row ? fill : static_cast<float>(row[c] * inv);
      for (index_t j = kr.end; j < lk; ++j) dst[j * sw] = fill;
    }
  };
  detail::parallel_tasks(tasks, detail::resolve_threads(options.num_threads, tasks), make_scratch,
                         run_task, [](const detail::WeightsScratch<Acc>&) {});
}

}  // namespace attn
