// attn/ops/topk.hpp — top-k (and hard) attention: each query row takes the
// softmax over its k_best highest scores only.
//
// For each task (batch b, query head h, query tile of Br rows):
//
//   selection   for each key tile the mask does not rule out:
//                 S = mask(score_mod(scale · Qs · K[k0:k0+Bc]ᵀ))       (Br, Bc)
//                 each row keeps its k_best best (score, key) in a bounded
//                 min-heap; a score enters only if it beats the row's
//                 current k-th best, so after the first tiles almost every
//                 score costs one comparison
//   output      for each row: p = softmax(selected scores),
//                 out = Σ p_j · V[j] over the selected j only            (Dv)
//
// Ties are broken by the lower key index (keys arrive in increasing order and
// an equal score never displaces a kept one). A key is selectable iff the
// mask keeps it and its modified score is neither -inf nor NaN. Extra memory
// is O(Br · k_best) per worker; nothing grows with Lq·Lk. A task's
// arithmetic depends only on the task, so results are bitwise identical for
// any thread count.
#pragma once

#include "attn/detail/checks.hpp"
#include "attn/detail/flash_engine.hpp"
#include "attn/detail/gemm.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace attn {

/// Options of topk_attention: the common ones, plus the optional output of
/// the selected keys.
struct TopkOptions : AttentionOptions {
  /// Optional output [B, Hq, Lq, k_best]: the selected key indices of each
  /// row, best score first (ties: lower index first), -1 past the number of
  /// selectable keys. Leave default-constructed to skip it.
  TensorView<std::int64_t, 4> indices;

  TopkOptions() = default;
  TopkOptions(const AttentionOptions& o) : AttentionOptions(o) {}  // NOLINT: widening is intended
};

namespace detail {

/// One candidate of a row's selection.
template <class Acc>
struct TopkCandidate {
  Acc score;
  index_t key;
};

/// Heap order with the worst candidate on top: lower score is worse; among
/// equal scores the higher key index is worse.
template <class Acc>
struct TopkWorseFirst {
  bool operator()(const TopkCandidate<Acc>& a, const TopkCandidate<Acc>& b) const {
    return a.score > b.score || (a.score == b.score && a.key < b.key);
  }
};

template <class Acc>
struct TopkScratch {
  RowMatrix<Acc> q, s, k;  // (Br, D) scaled queries, (Br, Bc) scores, (Bc, D) packed keys
  std::vector<TopkCandidate<Acc>> heap;  // (Br, kb) selections, row-major
  std::vector<index_t> count;            // (Br) selected so far
  std::vector<Acc> threshold;            // (Br) score to beat: the k-th best once full, else -inf
  Eigen::Matrix<Acc, 1, Eigen::Dynamic> o;  // (Dv) one output row
  TileGemm<Acc> qk;
  AttentionStats stats;
  TopkScratch(index_t br, index_t bc, index_t d, index_t dv, index_t kb, bool pack_k)
      : q(br, d), s(br, bc), k(pack_k ? bc : 0, d), heap(static_cast<std::size_t>(br * kb)),
        count(static_cast<std::size_t>(br)), threshold(static_cast<std::size_t>(br)), o(dv),
        qk(br, bc, d) {}
};

/// Sets the scores of a partial tile that the mask hides to -inf.
template <class Mask, class Acc>
void topk_mask_tile(const Mask& mask, index_t b, index_t h, index_t q0, index_t k0, Acc* s,
                    index_t lds, index_t rows, index_t cols) {
  constexpr Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  for (index_t r = 0; r < rows; ++r) {
    Acc* row = s + r * lds;
    if constexpr (has_row_keys_v<Mask>) {
      const KeyRange keys = mask.row_keys(b, h, q0 + r);
      const index_t lo = std::clamp<index_t>(keys.begin - k0, 0, cols);
      const index_t hi = std::clamp<index_t>(keys.end - k0, lo, cols);
      std::fill(row, row + lo, neg_inf);
      std::fill(row + hi, row + cols, neg_inf);
    } else {
      for (index_t c = 0; c < cols; ++c)
        if (!mask.keep(b, h, q0 + r, k0 + c)) row[c] = neg_inf;
    }
  }
}

/// The two passes. Arguments are checked; mask and mod are bound; kb <= Lk.
template <class Acc, class Q, class K, class V, class O, class Mask, class Mod>
void topk_forward(const TensorView<const Q, 4>& q, const TensorView<const K, 4>& k,
                  const TensorView<const V, 4>& v, const TensorView<O, 4>& out,
                  const AttentionShape& shape, index_t k_best, const Mask& mask, const Mod& mod,
                  const TopkOptions& opt) {
  constexpr Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const Acc scale =
      static_cast<Acc>(opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(shape.d))));
  const index_t br = std::min(opt.block_q > 0 ? opt.block_q : TileTraits::block_q, shape.lq);
  const index_t bc = std::min(opt.block_k > 0 ? opt.block_k : TileTraits::block_k, shape.lk);
  const index_t kb = std::min(k_best, shape.lk);
  const index_t q_tiles = (shape.lq + br - 1) / br;
  const index_t heads = shape.batch * shape.q_heads;
  const index_t tasks = heads * q_tiles;
  const int threads = resolve_threads(opt.num_threads, tasks);
  const bool pack_k = !std::is_same<K, Acc>::value || k.stride(3) != 1;
  const bool want_lse = !opt.lse.is_null(), want_idx = !opt.indices.is_null();
  const TopkWorseFirst<Acc> worse_first;

  auto make_scratch = [&] {
    return std::make_unique<TopkScratch<Acc>>(br, bc, shape.d, shape.dv, kb, pack_k);
  };

  auto run_task = [&](TopkScratch<Acc>& sc, index_t t) {
    const index_t qt = q_tiles - 1 - t / heads;
    const index_t b = (t % heads) / shape.q_heads;
    const index_t h = t % shape.q_heads;
    const index_t hk = shape.kv_head(h);
    const index_t q0 = qt * br;
    const index_t rows = std::min(br, shape.lq - q0);
    const index_t d = shape.d;

    auto qs = sc.q.topRows(rows);
    qs = matrix(q, b, h).middleRows(q0, rows).template cast<Acc>() * scale;  // (rows, D)
    std::fill(sc.count.begin(), sc.count.begin() + rows, index_t(0));
    std::fill(sc.threshold.begin(), sc.threshold.begin() + rows, neg_inf);

    // ---- selection: one Q·Kᵀ pass with a bounded heap per row
    KeyRange kr = mask.key_range(b, h, q0, q0 + rows);
    kr.begin = std::max<index_t>(kr.begin, 0);
    kr.end = std::min(kr.end, shape.lk);
    for (index_t k0 = kr.begin; k0 < kr.end; k0 += bc) {
      const index_t cols = std::min(bc, kr.end - k0);
      const TileKind kind =
          Mask::always_full ? TileKind::full : mask.classify(b, h, q0, q0 + rows, k0, k0 + cols);
      if (kind == TileKind::empty) {
        ++sc.stats.skipped_tiles;
        continue;
      }
      ++(kind == TileKind::full ? sc.stats.full_tiles : sc.stats.partial_tiles);
      sc.stats.scores += rows * cols;

      index_t ldk = 0;
      const Acc* kt = load_tile<Acc>(k, b, hk, k0, cols, sc.k, ldk);
      Acc* s = sc.s.data();
      const index_t lds = cols;
      Eigen::Map<RowMatrix<Acc>>(s, rows, cols).setZero();
      sc.qk.add_abt(rows, cols, d, qs.data(), d, kt, ldk, s, lds, Acc(1));  // S = Qs·Kᵀ
      mod.apply_tile(b, h, q0, k0, s, lds, rows, cols);
      if (kind == TileKind::partial) topk_mask_tile(mask, b, h, q0, k0, s, lds, rows, cols);

      for (index_t r = 0; r < rows; ++r) {
        const Acc* row = s + r * lds;
        TopkCandidate<Acc>* heap = sc.heap.data() + r * kb;
        index_t& n = sc.count[static_cast<std::size_t>(r)];
        Acc& thr = sc.threshold[static_cast<std::size_t>(r)];
        for (index_t c = 0; c < cols; ++c) {
          if (!(row[c] > thr)) continue;  // not better than the k-th best (or -inf / NaN)
          if (n < kb) {
            heap[n++] = {row[c], k0 + c};
            std::push_heap(heap, heap + n, worse_first);
            if (n == kb) thr = heap[0].score;
          } else {
            std::pop_heap(heap, heap + kb, worse_first);  // drop the worst
            heap[kb - 1] = {row[c], k0 + c};
            std::push_heap(heap, heap + kb, worse_first);
            thr = heap[0].score;
          }
        }
      }
    }

    // ---- output: softmax over the selected scores, V rows of the selected keys only
    auto dst = matrix(out, b, h).middleRows(q0, rows);
    for (index_t r = 0; r < rows; ++r) {
      TopkCandidate<Acc>* heap = sc.heap.data() + r * kb;
      const index_t n = sc.count[static_cast<std::size_t>(r)];
      std::sort_heap(heap, heap + n, worse_first);  // best first, ties by lower key
      sc.o.setZero();
      Acc l = 0;
      const Acc m = n > 0 ? heap[0].score : Acc(0);
      for (index_t j = 0; j < n; ++j) {
        const Acc p = std::exp(heap[j].score - m);  // exp(s_j - max)
        l += p;
        const V* vrow = v.data() + b * v.stride(0) + hk * v.stride(1) + heap[j].key * v.stride(2);
        for (index_t c = 0; c < shape.dv; ++c)
          sc.o(c) += p * static_cast<Acc>(vrow[c * v.stride(3)]);
      }
      const Acc inv = n > 0 ? Acc(1) / l : Acc(0);  // a row with nothing selected gives zeros
      dst.row(r) = (sc.o * inv).template cast<O>();
      if (want_lse)
        opt.lse(b, h, q0 + r) =
            n > 0 ? static_cast<float>(m + std::log(l)) : -std::numeric_limits<float>::infinity();
      if (want_idx)
        for (index_t j = 0; j < opt.indices.extent(3); ++j)
          opt.indices(b, h, q0 + r, j) = j < n ? static_cast<std::int64_t>(heap[j].key) : -1;
    }
  };

  auto merge_stats = [&](const TopkScratch<Acc>& sc) {
    if (!opt.stats) return;
    opt.stats->full_tiles += sc.stats.full_tiles;
    opt.stats->partial_tiles += sc.stats.partial_tiles;
    opt.stats->skipped_tiles += sc.stats.skipped_tiles;
    opt.stats->scores += sc.stats.scores;
  };
  if (opt.stats) *opt.stats = AttentionStats{};
  parallel_tasks(tasks, threads, make_scratch, run_task, merge_stats);
}

}  // namespace detail

/// Top-k attention: each query row attends, with softmax weights, to its
/// k_best highest-scoring keys only; k_best = 1 is hard attention (the value
/// of the best key). Scores are formed as in masked_attention (scale · q·k,
/// then `score_mod`, then `mask`); the selection is exact, ties broken by the
/// lower key index; a key is selectable iff the mask keeps it and its score
/// is neither -inf nor NaN. A row with fewer selectable keys than k_best
/// takes all of them; one with none outputs zeros (lse -inf). options.lse is
/// the log-sum-exp over the selected scores; options.indices (optional,
/// [B, Hq, Lq, k_best], int64) receives the selected keys, best first, -1
/// past the last. Cost: one Q·Kᵀ pass over the tiles the mask keeps, plus
/// Lq·k_best·Dv for the output; extra memory O(Br·k_best) per thread.
template <class Q, class K, class V, class O, class Mask = NoMask, class Mod = NoScoreMod,
          class = std::enable_if_t<is_mask_v<Mask>>>
void topk_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k, const TensorView<V, 4>& v,
                    const TensorView<O, 4>& out, index_t k_best, const Mask& mask = {},
                    const Mod& score_mod = {}, const TopkOptions& options = {}) {
  static_assert(detail::is_storage_type_v<std::remove_cv_t<Q>> &&
                    detail::is_storage_type_v<std::remove_cv_t<K>> &&
                    detail::is_storage_type_v<std::remove_cv_t<V>> && detail::is_storage_type_v<O>,
                "attn: element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(!std::is_const<O>::value, "attn: the output view must be writable");
  static_assert(is_score_mod_v<Mod>,
                "attn: the score_mod argument must be a score modifier (attn/score_mod.hpp)");
  const AttentionShape shape = detail::check_attention(q, k, v, out, options);
  if (k_best < 1) detail::fail("k_best is ", k_best, ", must be >= 1");
  if (!options.indices.is_null()) {
    const auto& ix = options.indices;
    if (ix.extent(0) != shape.batch || ix.extent(1) != shape.q_heads || ix.extent(2) != shape.lq ||
        ix.extent(3) != k_best)
      detail::fail("indices has shape ", detail::shape_str(ix), ", expected [", shape.batch, ", ",
                   shape.q_heads, ", ", shape.lq, ", ", k_best, "] (batch, q heads, Lq, k_best)");
    detail::check_view(ix, "indices");
    detail::check_not_self_overlapping(ix, "indices");
    detail::check_no_overlap(ix, "indices", q, "q");
    detail::check_no_overlap(ix, "indices", k, "k");
    detail::check_no_overlap(ix, "indices", v, "v");
    detail::check_no_overlap(ix, "indices", out, "out");
    if (!options.lse.is_null()) detail::check_no_overlap(ix, "indices", options.lse, "lse");
  }
  const Mask bound_mask = mask.bind(shape);
  const Mod bound_mod = score_mod.bind(shape);
  detail::check_policy_views(bound_mask, out, options.lse);
  detail::check_policy_views(bound_mod, out, options.lse);
  if (!options.indices.is_null()) {
    auto check_idx = [&](const auto& view, const char* name) {
      detail::check_no_overlap(options.indices, "indices", view, name);
    };
    detail::for_each_view(bound_mask, check_idx);
    detail::for_each_view(bound_mod, check_idx);
  }
  using Acc = detail::accum_t<Q, K, V, O>;
  detail::topk_forward<Acc, std::remove_cv_t<Q>, std::remove_cv_t<K>, std::remove_cv_t<V>, O>(
      q, k, v, out, shape, k_best, bound_mask, bound_mod, options);
}

/// Same, with options and no mask or score modifier.
template <class Q, class K, class V, class O>
void topk_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k, const TensorView<V, 4>& v,
                    const TensorView<O, 4>& out, index_t k_best, const TopkOptions& options) {
  topk_attention(q, k, v, out, k_best, no_mask(), no_score_mod(), options);
}

}  // namespace attn
