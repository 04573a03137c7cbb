// attn/ops/topk.hpp — top-k (and hard) attention: each query row takes the
// softmax over its k_best highest scores only.
//
// For each task (batch b, query head h, query tile of Br rows):
//
//   selection   for each key tile the mask does not rule out:
//                 S = mask(score_mod(scale · Qs · K[k0:k0+Bc]ᵀ))       (Br, Bc)
//                 each row appends the (score, key) pairs that beat its
//                 current k-th best to a buffer of about 2·k_best + 32; a
//                 full buffer is cut back to its k_best best (a branch-free
//                 bitwise search for the k-th best), which raises the
//                 threshold, so after the first tiles almost every score
//                 costs one vectorised comparison
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

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

/// Scores compared with the threshold at once (one bit each of a mask).
inline constexpr index_t kTopkChunk = 16;

/// Bit i set iff x[i] > t, for i < 16 (false for NaN). The compiler does not
/// vectorise the bit-building loop in context, so x86 gets the compare and
/// mask instructions of the widest ISA the translation unit is compiled for.
inline std::uint32_t greater_mask16(const float* x, float t) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(x), _mm512_set1_ps(t), _CMP_GT_OQ);
#elif defined(__AVX__)
  const __m256 vt = _mm256_set1_ps(t);
  return static_cast<std::uint32_t>(
      _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x), vt, _CMP_GT_OQ)) |
      (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8), vt, _CMP_GT_OQ)) << 8));
#elif defined(__SSE2__)
  const __m128 vt = _mm_set1_ps(t);
  std::uint32_t m = 0;
  for (int i = 0; i < 4; ++i)
    m |= static_cast<std::uint32_t>(_mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(x + 4 * i), vt)))
         << (4 * i);
  return m;
#else
  std::uint32_t m = 0;
  for (int i = 0; i < 16; ++i) m |= static_cast<std::uint32_t>(x[i] > t) << i;
  return m;
#endif
}
inline std::uint32_t greater_mask16(const double* x, double t) {
  std::uint32_t m = 0;
  for (int i = 0; i < 16; ++i) m |= static_cast<std::uint32_t>(x[i] > t) << i;
  return m;
}

/// One candidate of a row's selection.
template <class Acc>
struct TopkCandidate {
  Acc score;
  index_t key;
};

/// The selection order, best first: higher score first; among equal scores
/// the lower key index first. A strict total order on distinct keys, so the
/// selection does not depend on how candidates arrive.
template <class Acc>
struct TopkBetter {
  bool operator()(const TopkCandidate<Acc>& a, const TopkCandidate<Acc>& b) const {
    return a.score > b.score || (a.score == b.score && a.key < b.key);
  }
};

/// Unsigned integers whose order is the order of the floating-point scores of
/// type Acc (for every value but NaN, which never enters a selection).
template <class Acc>
using TopkOrderedBits = std::conditional_t<sizeof(Acc) == 4, std::uint32_t, std::uint64_t>;

/// x as an ordered integer: a ≤ b iff ordered(a) ≤ ordered(b), and a == b iff
/// ordered(a) == ordered(b) (-0 is first made +0). The sign bit flips for
/// positive numbers and every bit flips for negative ones.
template <class Acc>
TopkOrderedBits<Acc> topk_ordered(Acc x) {
  using U = TopkOrderedBits<Acc>;
  static_assert(sizeof(U) == sizeof(Acc), "one integer per score");
  constexpr U top = U(1) << (8 * sizeof(U) - 1);
  const Acc canonical = x + Acc(0);  // -0 + 0 = +0 under round-to-nearest
  U b;
  std::memcpy(&b, &canonical, sizeof b);
  return (b & top) ? U(~b) : U(b | top);
}

/// The score whose ordered integer is u (the inverse of topk_ordered).
template <class Acc>
Acc topk_from_ordered(TopkOrderedBits<Acc> u) {
  using U = TopkOrderedBits<Acc>;
  constexpr U top = U(1) << (8 * sizeof(U) - 1);
  const U b = (u & top) ? U(u ^ top) : U(~u);
  Acc x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

/// Candidates compared at once by the counts of topk_compact; a row's
/// candidate buffer is padded to a multiple of it.
inline constexpr index_t kTopkCountBlock = 16;

/// How many of u[0, n) are ≥ t; n is a multiple of kTopkCountBlock. The fixed
/// inner trip count lets the compiler turn each block into a few vector
/// compares and adds, with one horizontal sum at the end and no branches.
template <class U>
index_t topk_count_at_least(const U* u, index_t n, U t) {
  U lanes[kTopkCountBlock] = {};
  for (index_t i = 0; i < n; i += kTopkCountBlock)
    for (index_t j = 0; j < kTopkCountBlock; ++j) lanes[j] += u[i + j] >= t ? U(1) : U(0);
  U count = 0;
  for (index_t j = 0; j < kTopkCountBlock; ++j) count += lanes[j];
  return static_cast<index_t>(count);
}

/// The same for 32-bit integers (float scores), with the compare-and-count
/// instructions of the widest ISA the translation unit is compiled for: the
/// compiler otherwise sums the lanes one by one after every count.
inline index_t topk_count_at_least(const std::uint32_t* u, index_t n, std::uint32_t t) {
#if defined(__AVX512F__)
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(t));
  index_t count = 0;
  for (index_t i = 0; i < n; i += 16)
    count += __builtin_popcount(
        _mm512_cmpge_epu32_mask(_mm512_loadu_si512(reinterpret_cast<const void*>(u + i)), vt));
  return count;
#elif defined(__AVX2__)
  const __m256i vt = _mm256_set1_epi32(static_cast<int>(t));
  index_t count = 0;
  for (index_t i = 0; i < n; i += 8) {  // u ≥ t iff max(u, t) == u
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + i));
    count += __builtin_popcount(static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(x, vt), x)))));
  }
  return count;
#else
  return topk_count_at_least<std::uint32_t>(u, n, t);
#endif
}

/// Keeps the kb best of the n > kb candidates (u[i], key[i]) in the first kb
/// places, in their order, and returns the kb-th best as an ordered integer.
/// Candidates are held in increasing key order, so among the scores equal to
/// the kb-th best the first ones are the lower keys; the filter is stable, so
/// the order holds afterwards. u has room for n rounded up to a multiple of
/// kTopkCountBlock; every u[i] is ≥ 1 (topk_ordered of a score that is not NaN).
///
/// The kb-th best is found bit by bit, from the top bit down: the largest t
/// with at least kb integers ≥ t is the kb-th largest. Each step is one
/// branch-free count over the buffer (a selection algorithm such as
/// nth_element mispredicts on about half its comparisons of random scores).
template <class U>
U topk_compact(U* u, index_t* key, index_t n, index_t kb) {
  const index_t padded = (n + kTopkCountBlock - 1) / kTopkCountBlock * kTopkCountBlock;
  U lo = u[0], hi = u[0];
  for (index_t i = 1; i < n; ++i) {
    lo = std::min(lo, u[i]);
    hi = std::max(hi, u[i]);
  }
  for (index_t i = n; i < padded; ++i) u[i] = 0;  // below every t tried (t ≥ lo ≥ 1)
  // The kb-th best lies in [lo, hi], so it has their common leading bits: the
  // search starts below them (random scores share sign and most of the exponent).
  int bit = 8 * static_cast<int>(sizeof(U)) - 1;
  while (bit >= 0 && ((lo ^ hi) >> bit) == 0) --bit;
  U t = bit >= 0 ? U(lo & ~((U(2) << bit) - 1)) : lo;  // (U(2) << 63 wraps to 0: t = 0)
  for (; bit >= 0; --bit) {
    const U c = t | (U(1) << bit);
    if (topk_count_at_least(u, padded, c) >= kb) t = c;
  }
  index_t kept = 0;
  if (topk_count_at_least(u, padded, t) == kb) {  // no tie crosses the cut (the usual case)
    for (index_t i = 0; i < n; ++i) {             // branch-free stable filter
      const U ui = u[i];
      const index_t ki = key[i];
      u[kept] = ui;
      key[kept] = ki;
      kept += static_cast<index_t>(ui >= t);
    }
    return t;
  }
  // Scores equal to the kb-th best that fit, lowest keys first.
  index_t ties = kb - topk_count_at_least(u, padded, U(t + 1));
  for (index_t i = 0; i < n; ++i) {  // branch-free stable filter
    const U ui = u[i];
    const index_t ki = key[i];
    const index_t tie = static_cast<index_t>(ui == t) & static_cast<index_t>(ties > 0);
    ties -= tie;
    u[kept] = ui;
    key[kept] = ki;
    kept += static_cast<index_t>(ui > t) | tie;
  }
  return t;
}

template <class Acc>
struct TopkScratch {
  using U = TopkOrderedBits<Acc>;
  RowMatrix<Acc> q, s, k;  // (Br, D) scaled queries, (Br, Bc) scores, (Bc, D) packed keys
  // (Br, cap padded) candidates, row-major, in key order: scores as ordered integers, keys
  std::vector<U> u;
  std::vector<index_t> key;
  std::vector<TopkCandidate<Acc>> sel;  // (kb) one row's selection, to be sorted best first
  std::vector<index_t> count;           // (Br) candidates held
  std::vector<Acc> threshold;  // (Br) score to beat: the k-th best after a compaction, else -inf
  Eigen::Matrix<Acc, 1, Eigen::Dynamic> o;  // (Dv) one output row
  TileGemm<Acc> qk;
  AttentionStats stats;
  TopkScratch(index_t br, index_t bc, index_t d, index_t dv, index_t cap, index_t kb, bool pack_k)
      : q(br, d), s(br, bc), k(pack_k ? bc : 0, d), u(static_cast<std::size_t>(br * cap)),
        key(static_cast<std::size_t>(br * cap)), sel(static_cast<std::size_t>(kb)),
        count(static_cast<std::size_t>(br)), threshold(static_cast<std::size_t>(br)), o(dv),
        qk(br, bc, d) {}
};

/// Rows per query tile of top-k when TopkOptions::block_q is 0: 256 where a
/// head has at least two such tiles and a tile in the middle of the queries
/// sees at least 1024 keys, else 128. The selection pass runs Eigen's GEMM
/// per (query tile, key tile), which packs the key tile for every query tile,
/// so taller tiles pack each key once for twice the rows: at Lq 512, Lk 65536,
/// D 64, 2 heads, top-k took 1.25-1.26x the Q·Kᵀ half with 256 rows against
/// 1.34 with 128 (paired runs, 2 threads, Emerald Rapids). Unlike the
/// engine's rule (default_block_q) it asks for no minimum number of tasks. It
/// depends on the shape and mask only, never on the thread count.
template <class Mask>
index_t topk_default_block_q(const AttentionShape& shape, const Mask& mask, index_t q_offset) {
  constexpr index_t wide = TileTraits::block_q_wide;
  if (shape.lq < 2 * wide) return TileTraits::block_q;
  const index_t q0 = q_offset + shape.lq / 2 / wide * wide;
  const KeyRange keys = mask.key_range(0, 0, q0, std::min(q0 + wide, q_offset + shape.lq));
  return keys.end - keys.begin >= 4 * wide ? wide : TileTraits::block_q;
}

/// The two passes. Arguments are checked; mask and mod are bound; kb <= Lk.
/// A null `out` runs the selection alone (options.indices must then be set):
/// what topk_attention_backward does when it is not given the forward's selection.
template <class Acc, class Q, class K, class V, class O, class Mask, class Mod>
void topk_forward(const TensorView<const Q, 4>& q, const TensorView<const K, 4>& k,
                  const TensorView<const V, 4>& v, const TensorView<O, 4>& out,
                  const AttentionShape& shape, index_t k_best, const Mask& mask, const Mod& mod,
                  const TopkOptions& opt) {
  constexpr Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const Acc scale =
      static_cast<Acc>(opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(shape.d))));
  const index_t br = std::min(
      opt.block_q > 0 ? opt.block_q : topk_default_block_q(shape, mask, opt.positions.q_offset),
      shape.lq);
  const index_t bc = std::min(opt.block_k > 0 ? opt.block_k : TileTraits::block_k, shape.lk);
  const index_t kb = std::min(k_best, shape.lk);
  const index_t q_tiles = (shape.lq + br - 1) / br;
  const index_t heads = shape.batch * shape.q_heads;
  const index_t tasks = heads * q_tiles;
  const int threads = resolve_threads(opt.num_threads, tasks);
  const bool pack_k = !std::is_same<K, Acc>::value || k.stride(3) != 1;
  const bool want_out = !out.is_null();
  const bool want_lse = !opt.lse.is_null(), want_idx = !opt.indices.is_null();
  // Each row appends the scores that beat its threshold to a buffer of cap ≥ 2·kb + 32;
  // when it fills, the kb best are kept (topk_compact, O(cap)) and the threshold
  // rises to the kb-th best. Amortised O(1) per candidate, no heap upkeep.
  const index_t cap = (2 * kb + 32 + kTopkCountBlock - 1) / kTopkCountBlock * kTopkCountBlock;
  const TopkBetter<Acc> better;
  using U = TopkOrderedBits<Acc>;

  auto make_scratch = [&] {
    return std::make_unique<TopkScratch<Acc>>(br, bc, shape.d, shape.dv, cap, kb, pack_k);
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

    // ---- selection: one Q·Kᵀ pass, a bounded candidate buffer per row
    // Masks and modifiers see global positions (options.positions): query row q0 + r of the
    // call is global query q_pos + r, key k0 + c is global key k_pos + k0 + c.
    const index_t q_pos = opt.positions.q_offset + q0, k_pos = opt.positions.k_offset;
    const KeyRange g = mask.key_range(b, h, q_pos, q_pos + rows);
    const index_t k_begin = std::clamp<index_t>(g.begin - k_pos, 0, shape.lk);
    const index_t k_end = std::clamp<index_t>(g.end - k_pos, 0, shape.lk);
    for (index_t k0 = k_begin; k0 < k_end; k0 += bc) {
      const index_t cols = std::min(bc, k_end - k0);
      const index_t gk0 = k_pos + k0;
      const TileKind kind = Mask::always_full
                                ? TileKind::full
                                : mask.classify(b, h, q_pos, q_pos + rows, gk0, gk0 + cols);
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
      mod.apply_tile(b, h, q_pos, gk0, s, lds, rows, cols);
      if (kind == TileKind::partial) mask_partial_tile(mask, b, h, q_pos, gk0, s, lds, rows, cols);

      for (index_t r = 0; r < rows; ++r) {
        const Acc* row = s + r * lds;
        U* ubuf = sc.u.data() + r * cap;
        index_t* kbuf = sc.key.data() + r * cap;
        index_t n = sc.count[static_cast<std::size_t>(r)];
        Acc thr = sc.threshold[static_cast<std::size_t>(r)];
        // Appends key k0 + c if it beats the threshold (an equal score never displaces a kept
        // one: the kept key has the lower index); a full buffer keeps its kb best, and the
        // kb-th best becomes the score to beat.
        auto offer = [&](index_t c) {
          if (!(row[c] > thr)) return;
          ubuf[n] = topk_ordered(row[c]);
          kbuf[n++] = k0 + c;
          if (n == cap) {
            thr = topk_from_ordered<Acc>(topk_compact(ubuf, kbuf, cap, kb));
            n = kb;
          }
        };
        auto offer_chunk = [&](index_t c0, std::uint32_t hits) {
          for (; hits != 0; hits &= hits - 1) offer(c0 + __builtin_ctz(hits));
        };
        // Which scores beat the threshold? One vector compare per chunk (NaN never does),
        // and one branch per four chunks: after the first tiles, hits are rare.
        index_t c0 = 0;
        for (; c0 + 4 * kTopkChunk <= cols; c0 += 4 * kTopkChunk) {
          const std::uint32_t m0 = greater_mask16(row + c0, thr);
          const std::uint32_t m1 = greater_mask16(row + c0 + kTopkChunk, thr);
          const std::uint32_t m2 = greater_mask16(row + c0 + 2 * kTopkChunk, thr);
          const std::uint32_t m3 = greater_mask16(row + c0 + 3 * kTopkChunk, thr);
          if ((m0 | m1 | m2 | m3) == 0) continue;
          offer_chunk(c0, m0);  // offer() compares again: a compaction may raise thr
          offer_chunk(c0 + kTopkChunk, m1);
          offer_chunk(c0 + 2 * kTopkChunk, m2);
          offer_chunk(c0 + 3 * kTopkChunk, m3);
        }
        for (; c0 + kTopkChunk <= cols; c0 += kTopkChunk)
          offer_chunk(c0, greater_mask16(row + c0, thr));
        for (index_t c = c0; c < cols; ++c) offer(c);
        sc.count[static_cast<std::size_t>(r)] = n;
        sc.threshold[static_cast<std::size_t>(r)] = thr;
      }
    }

    // ---- each row's selection, best first (ties by lower key), back into its buffer
    for (index_t r = 0; r < rows; ++r) {
      U* ubuf = sc.u.data() + r * cap;
      index_t* kbuf = sc.key.data() + r * cap;
      index_t n = sc.count[static_cast<std::size_t>(r)];
      if (n > kb) {
        topk_compact(ubuf, kbuf, n, kb);
        n = kb;
      }
      TopkCandidate<Acc>* sel = sc.sel.data();
      for (index_t j = 0; j < n; ++j) sel[j] = {topk_from_ordered<Acc>(ubuf[j]), kbuf[j]};
      std::sort(sel, sel + n, better);
      for (index_t j = 0; j < n; ++j) {
        ubuf[j] = topk_ordered(sel[j].score);
        kbuf[j] = sel[j].key;
      }
      sc.count[static_cast<std::size_t>(r)] = n;
      if (want_idx)
        for (index_t j = 0; j < opt.indices.extent(3); ++j)
          opt.indices(b, h, q0 + r, j) = j < n ? static_cast<std::int64_t>(kbuf[j]) : -1;
    }
    if (!want_out) return;

    // ---- output: softmax over the selected scores, V rows of the selected keys only.
    // The selected rows are scattered over V: those of row r + 1 are fetched while row r
    // is summed.
    const V* vbase = v.data() + b * v.stride(0) + hk * v.stride(1);
    auto fetch = [&](index_t r) {
      const index_t* kbuf = sc.key.data() + r * cap;
      for (index_t j = 0; j < sc.count[static_cast<std::size_t>(r)]; ++j)
        for (index_t c = 0; c < shape.dv; c += 64 / static_cast<index_t>(sizeof(V)))
          __builtin_prefetch(vbase + kbuf[j] * v.stride(2) + c * v.stride(3));
    };
    if (rows > 0) fetch(0);
    for (index_t r = 0; r < rows; ++r) {
      if (r + 1 < rows) fetch(r + 1);
      const U* ubuf = sc.u.data() + r * cap;
      const index_t* kbuf = sc.key.data() + r * cap;
      const index_t n = sc.count[static_cast<std::size_t>(r)];
      sc.o.setZero();
      Acc l = 0;
      const Acc m = n > 0 ? topk_from_ordered<Acc>(ubuf[0]) : Acc(0);
      for (index_t j = 0; j < n; ++j) {
        const Acc p = std::exp(topk_from_ordered<Acc>(ubuf[j]) - m);  // exp(s_j - max)
        l += p;
        const V* vrow = vbase + kbuf[j] * v.stride(2);
        for (index_t c = 0; c < shape.dv; ++c)
          sc.o(c) += p * static_cast<Acc>(vrow[c * v.stride(3)]);
      }
      const Acc inv = n > 0 ? Acc(1) / l : Acc(0);  // a row with nothing selected gives zeros
      matrix(out, b, h).row(q0 + r) = (sc.o * inv).template cast<O>();
      if (want_lse)
        opt.lse.set(b, h, q0 + r,
                    n > 0 ? static_cast<double>(m + std::log(l))
                          : -std::numeric_limits<double>::infinity());
    }
  };

  auto merge_stats = [&](const TopkScratch<Acc>& sc) {
    if (!opt.stats) return;
    opt.stats->add(sc.stats);
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
  if (options.dropout.enabled())
    detail::fail("dropout.p is ", options.dropout.p, ", but top-k attention has no dropout");
  if (!options.sinks.is_null())
    detail::fail("sinks are given, but top-k attention has no attention sinks");
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
  const AttentionShape global = detail::global_shape(shape, options.positions);
  const Mask bound_mask = mask.bind(global);
  const Mod bound_mod = score_mod.bind(global);
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
