// attn/detail/flash_engine.hpp — the one tiled online-softmax ("flash") engine.
//
// Every softmax-attention variant of attn (dense, masked, causal, sliding
// window, block-sparse) is this function with another mask policy and score
// modifier. For each task (batch b, query head h, query tile of Br rows):
//
//   Qs = scale · Q[q0:q0+Br]                                  (Br, D)
//   for each key tile [k0, k0+Bc) that the mask does not rule out:
//     S  = Qs · K[k0:k0+Bc]ᵀ                                  (Br, Bc)
//     S  = score_mod(S); masked entries = -inf (partial tiles only)
//     m' = max(m, rowmax(S));  P = exp(S - m')
//     l  = l · exp(m - m') + rowsum(P)
//     O  = O · exp(m - m') + P · V[k0:k0+Bc]                  (Br, Dv)
//   out = O / l;  lse = m + log(l)  (zeros and -inf for rows that see no key)
//
// With dropout, P · V uses P ∘ M / (1 - p) (M the Philox keep decisions);
// l and lse use the undropped P, as FlashAttention does.
//
// Scratch is O(Br·Bc + Br·(D+Dv) + Bc·(D+Dv)) per worker, allocated once per
// call; nothing grows with Lq·Lk. A task's arithmetic depends only on the
// task, so results are bitwise identical for any thread count.
#pragma once

#include "attn/detail/checks.hpp"
#include "attn/detail/gemm.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/detail/softmax.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/policy/dropout.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>

namespace attn {
namespace detail {

/// Element types the engine stores and loads.
template <class T>
inline constexpr bool is_storage_type_v =
    std::is_same<T, float>::value || std::is_same<T, double>::value ||
    std::is_same<T, Eigen::half>::value || std::is_same<T, Eigen::bfloat16>::value;

/// Accumulation type: double if any operand is double, float otherwise
/// (half and bfloat16 storage accumulate in float).
template <class... T>
using accum_t =
    std::conditional_t<(std::is_same<std::remove_cv_t<T>, double>::value || ...), double, float>;

/// Tile constants (see PERF.md: 128 × 256 was the best simple choice at
/// D = 64 and 128 on the target machine).
struct TileTraits {
  static constexpr index_t block_q = 128;
  static constexpr index_t block_k = 256;
  static_assert(block_q > 0 && block_k > 0, "tiles must be non-empty");
};

/// Optional mask hook: `next_key(b, h, q0, q1, k)` returns the first key
/// position >= k that any row of [q0, q1) may see (anything >= Lk if none).
/// A mask whose key range is wide but mostly empty (block-sparse layouts with
/// global key blocks) provides it, so the engine jumps over runs of empty
/// tiles instead of classifying each one.
template <class M, class = void>
struct has_next_key : std::false_type {};
template <class M>
struct has_next_key<M, std::void_t<decltype(std::declval<const M&>().next_key(
                           index_t{}, index_t{}, index_t{}, index_t{}, index_t{}))>>
    : std::true_type {};

/// Per-worker scratch of the engine.
template <class Acc>
struct FlashScratch {
  using Mat = RowMatrix<Acc>;
  using Vec = Eigen::Array<Acc, Eigen::Dynamic, 1>;
  Mat q;     // (Br, D)  scaled query tile
  Mat s;     // (Br, Bc) scores, then probabilities
  Mat o;     // (Br, Dv) output accumulator
  Mat k, v;  // (Bc, D), (Bc, Dv) packed key/value tiles, when a view cannot be used in place
  Vec m, l;  // (Br) running row max and row sum
  TileGemm<Acc> qk, pv;
  AttentionStats stats;  // this worker's share of the call's counters

  FlashScratch(index_t br, index_t bc, index_t d, index_t dv, bool pack_k, bool pack_v)
      : q(br, d), s(br, bc), o(br, dv), k(pack_k ? bc : 0, d), v(pack_v ? bc : 0, dv), m(br), l(br),
        qk(br, bc, d), pv(br, dv, bc) {}
};

/// A tile of a [L, D] slice as (pointer, leading dimension): in place when
/// the storage type is the accumulation type and rows are contiguous,
/// otherwise converted into `pack`.
template <class Acc, class T>
const Acc* load_tile(const TensorView<const T, 4>& t, index_t b, index_t h, index_t row0,
                     index_t rows, RowMatrix<Acc>& pack, index_t& ld) {
  const T* base = t.data() + b * t.stride(0) + h * t.stride(1) + row0 * t.stride(2);
  if constexpr (std::is_same<T, Acc>::value) {
    if (t.stride(3) == 1) {
      ld = t.stride(2);
      return base;
    }
  }
  const index_t cols = t.extent(3);
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c)
      pack(r, c) = static_cast<Acc>(base[r * t.stride(2) + c * t.stride(3)]);
  ld = pack.cols();
  return pack.data();
}

/// Sets the scores of a partial tile that the mask hides to -inf: by interval
/// when the mask knows each row's keys, element by element otherwise.
template <class Mask, class Acc>
void mask_partial_tile(const Mask& mask, index_t b, index_t h, index_t q0, index_t k0, Acc* s,
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

/// The engine. Arguments are already checked; mask and mod are bound.
template <class Acc, class Q, class K, class V, class O, class Mask, class Mod>
void flash_forward(const TensorView<const Q, 4>& q, const TensorView<const K, 4>& k,
                   const TensorView<const V, 4>& v, const TensorView<O, 4>& out,
                   const AttentionShape& shape, const Mask& mask, const Mod& mod,
                   const AttentionOptions& opt) {
  constexpr Acc neg_inf = -std::numeric_limits<Acc>::infinity();

  const Acc scale =
      static_cast<Acc>(opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(shape.d))));
  const index_t br = std::min(opt.block_q > 0 ? opt.block_q : TileTraits::block_q, shape.lq);
  const index_t bc = std::min(opt.block_k > 0 ? opt.block_k : TileTraits::block_k, shape.lk);
  const index_t q_tiles = (shape.lq + br - 1) / br;
  const index_t heads = shape.batch * shape.q_heads;
  const index_t tasks = heads * q_tiles;
  const int threads = resolve_threads(opt.num_threads, tasks);
  const bool pack_k = !std::is_same<K, Acc>::value || k.stride(3) != 1;
  const bool pack_v = !std::is_same<V, Acc>::value || v.stride(3) != 1;
  const bool want_lse = !opt.lse.is_null();
  const DropoutGen drop =
      DropoutGen::bind(opt.dropout, shape.batch, shape.q_heads, shape.lq, shape.lk);

  auto make_scratch = [&] {
    return std::make_unique<FlashScratch<Acc>>(br, bc, shape.d, shape.dv, pack_k, pack_v);
  };

  auto run_task = [&](FlashScratch<Acc>& sc, index_t t) {
    // Last query tiles first: under causal masks they carry the most work.
    const index_t qt = q_tiles - 1 - t / heads;
    const index_t b = (t % heads) / shape.q_heads;
    const index_t h = t % shape.q_heads;
    const index_t hk = shape.kv_head(h);
    const index_t q0 = qt * br;
    const index_t rows = std::min(br, shape.lq - q0);
    const index_t d = shape.d, dv = shape.dv;

    auto qs = sc.q.topRows(rows);
    qs = matrix(q, b, h).middleRows(q0, rows).template cast<Acc>() * scale;  // (rows, D)
    auto o = sc.o.topRows(rows);                                             // (rows, Dv)
    o.setZero();
    sc.m.head(rows).setConstant(neg_inf);
    sc.l.head(rows).setZero();

    KeyRange kr = mask.key_range(b, h, q0, q0 + rows);
    kr.begin = std::max<index_t>(kr.begin, 0);
    kr.end = std::min(kr.end, shape.lk);
    for (index_t k0 = kr.begin; k0 < kr.end; k0 += bc) {
      if constexpr (has_next_key<Mask>::value) {
        // Jump whole tiles (the grid stays kr.begin + n·Bc) to the one holding the next visible
        // key.
        const index_t next = std::clamp(mask.next_key(b, h, q0, q0 + rows, k0), k0, kr.end);
        const index_t jump = (next - k0) / bc;
        sc.stats.skipped_tiles += jump;
        k0 += jump * bc;
        if (k0 >= kr.end) break;
      }
      const index_t cols = std::min(bc, kr.end - k0);
      const TileKind kind =
          Mask::always_full ? TileKind::full : mask.classify(b, h, q0, q0 + rows, k0, k0 + cols);
      if (kind == TileKind::empty) {
        ++sc.stats.skipped_tiles;
        continue;
      }
      ++(kind == TileKind::full ? sc.stats.full_tiles : sc.stats.partial_tiles);
      sc.stats.scores += rows * cols;

      // S = Qs · Kᵀ                                                          (rows, cols)
      index_t ldk = 0;
      const Acc* kt = load_tile<Acc>(k, b, hk, k0, cols, sc.k, ldk);
      Acc* s = sc.s.data();
      const index_t lds = cols;
      Eigen::Map<RowMatrix<Acc>>(s, rows, cols).setZero();
      sc.qk.add_abt(rows, cols, d, qs.data(), d, kt, ldk, s, lds, Acc(1));

      mod.apply_tile(b, h, q0, k0, s, lds, rows, cols);
      if (kind == TileKind::partial) mask_partial_tile(mask, b, h, q0, k0, s, lds, rows, cols);

      // Online softmax, one row at a time while it is in L1:
      // m' = max(m, rowmax(S)); P = exp(S - m'); l = l·exp(m - m') + rowsum(P); O = O·exp(m - m')
      for (index_t r = 0; r < rows; ++r) {
        Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>> row(s + r * lds, cols);
        const Acc m_old = sc.m(r);
        const Acc m_new = std::max(m_old, row.maxCoeff());
        const Acc m_use = m_new == neg_inf ? Acc(0) : m_new;  // a row with nothing seen yet stays 0
        if (m_old != m_new) {
          const Acc alpha = std::exp(m_old - m_use);  // 0 when m_old = -inf
          sc.l(r) *= alpha;
          o.row(r) *= alpha;
        }
        sc.l(r) += exp_shift_sum(row.data(), cols, m_use);
        sc.m(r) = m_new;
        // Dropout acts on the P that multiplies V; l keeps the undropped sum.
        if (drop.enabled) drop.apply_row(b, h, q0 + r, k0, row.data(), cols);
      }

      // O += P · V                                                           (rows, Dv)
      index_t ldv = 0;
      const Acc* vt = load_tile<Acc>(v, b, hk, k0, cols, sc.v, ldv);
      sc.pv.add_ab(rows, dv, cols, s, lds, vt, ldv, o.data(), dv, Acc(1));
    }

    // out = O / l; rows that saw no key (l = 0) give zeros and lse = -inf;
    // a NaN score makes l NaN, and the row and its lse stay NaN.
    auto dst = matrix(out, b, h).middleRows(q0, rows);
    for (index_t r = 0; r < rows; ++r) {
      const Acc l = sc.l(r);
      const bool saw_none = l == Acc(0);
      const Acc inv = saw_none ? Acc(0) : Acc(1) / l;
      dst.row(r) = (o.row(r) * inv).template cast<O>();
      if (want_lse)
        opt.lse(b, h, q0 + r) = saw_none ? -std::numeric_limits<float>::infinity()
                                         : static_cast<float>(sc.m(r) + std::log(l));
    }
  };

  auto merge_stats = [&](const FlashScratch<Acc>& sc) {
    if (!opt.stats) return;
    opt.stats->full_tiles += sc.stats.full_tiles;
    opt.stats->partial_tiles += sc.stats.partial_tiles;
    opt.stats->skipped_tiles += sc.stats.skipped_tiles;
    opt.stats->scores += sc.stats.scores;
  };
  if (opt.stats) *opt.stats = AttentionStats{};
  parallel_tasks(tasks, threads, make_scratch, run_task, merge_stats);
}

/// Entry used by every softmax-attention variant: checks everything, binds
/// the policies (which check themselves), then runs the engine.
template <class Q, class K, class V, class O, class Mask, class Mod>
void attention_entry(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                     const TensorView<V, 4>& v, const TensorView<O, 4>& out, const Mask& mask,
                     const Mod& mod, const AttentionOptions& opt) {
  static_assert(is_storage_type_v<std::remove_cv_t<Q>> && is_storage_type_v<std::remove_cv_t<K>> &&
                    is_storage_type_v<std::remove_cv_t<V>> && is_storage_type_v<O>,
                "attn: element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(!std::is_const<O>::value, "attn: the output view must be writable");
  static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
  static_assert(is_score_mod_v<Mod>,
                "attn: the score_mod argument must be a score modifier (attn/score_mod.hpp)");
  const AttentionShape shape = check_attention(q, k, v, out, opt);
  const Mask bound_mask = mask.bind(shape);
  const Mod bound_mod = mod.bind(shape);
  check_policy_views(bound_mask, out, opt.lse);
  check_policy_views(bound_mod, out, opt.lse);
  using Acc = accum_t<Q, K, V, O>;
  flash_forward<Acc, std::remove_cv_t<Q>, std::remove_cv_t<K>, std::remove_cv_t<V>, O>(
      q, k, v, out, shape, bound_mask, bound_mod, opt);
}

}  // namespace detail
}  // namespace attn
