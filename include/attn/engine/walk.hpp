// attn/engine/walk.hpp — one query tile over a range of keys.
//
// The walk is the inner loop of every softmax-attention variant. For a tile of
// `rows` scaled query rows of (batch b, query head h) it visits the key tiles of
// [k_begin, k_end) that the mask does not rule out and folds each into a
// Partial:
//
//   classify the tile (empty: skip; full: no per-element test; partial)
//   S = Qs · K[k0:k0+Bc]ᵀ                                     (rows, Bc)
//   S = score_mod(S); masked entries = -inf (partial tiles only)
//   online softmax (Partial::update); O += P · V[k0:k0+Bc]     (rows, Dv)
//
// With dropout, the P that multiplies V is P ∘ M / (1 - p) (M the Philox keep
// decisions at global positions); l and lse keep the undropped P, as
// FlashAttention does.
//
// Keys and values come from a source (kv/strided.hpp); masks and modifiers see
// global positions: query row r of the tile is q_pos + r, key j of the source
// is k_pos + j (AttentionOptions::positions).
#pragma once

#include "attn/detail/gemm.hpp"
#include "attn/engine/partial.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/policy/dropout.hpp"
#include "attn/tensor_view.hpp"

#include "attn/core/eigen.hpp"

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>

namespace attn {
namespace detail {

/// Optional mask hook: `next_key(b, h, q0, q1, k)` returns the first key
/// position >= k that any row of [q0, q1) may see (anything >= Lk if none).
/// A mask whose key range is wide but mostly empty (block-sparse layouts with
/// global key blocks) provides it, so the walk jumps over runs of empty
/// tiles instead of classifying each one.
template <class M, class = void>
struct has_next_key : std::false_type {};
template <class M>
struct has_next_key<M, std::void_t<decltype(std::declval<const M&>().next_key(
                           index_t{}, index_t{}, index_t{}, index_t{}, index_t{}))>>
    : std::true_type {};

/// Sets the scores of a partial tile that the mask hides to -inf: by interval
/// when the mask knows each row's keys, element by element otherwise. q0 and k0
/// are global positions.
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

/// Per-worker scratch of the walk, allocated once per call.
template <class Acc>
struct WalkScratch {
  RowMatrix<Acc> s;     // (Br, Bc) scores, then probabilities
  RowMatrix<Acc> k, v;  // (Bc, D), (Bc, Dv) key/value tiles, when a source cannot be read in place
  TileGemm<Acc> qk, pv;
  AttentionStats stats;  // this worker's share of the call's counters

  WalkScratch(index_t br, index_t bc, index_t d, index_t dv, bool pack_k, bool pack_v)
      : s(br, bc), k(pack_k ? bc : 0, d), v(pack_v ? bc : 0, dv), qk(br, bc, d), pv(br, dv, bc) {}

  void add_to(AttentionStats* total) const {
    if (!total) return;
    total->full_tiles += stats.full_tiles;
    total->partial_tiles += stats.partial_tiles;
    total->skipped_tiles += stats.skipped_tiles;
    total->scores += stats.scores;
  }
};

/// The bound pieces of one call that every walk of it shares.
template <class Acc, class KV, class Mask, class Mod>
struct Walk {
  const KV& kv;
  const Mask& mask;  // bound to the global shape
  const Mod& mod;
  index_t bc;                           // keys per tile
  index_t d, dv;                        // head dims
  index_t k_pos;                        // global position of the source's key 0
  const DropoutGen* dropout = nullptr;  // bound to the global shape; null or disabled: none

  /// The source's keys [begin, end) that any query of global rows [q0, q1) may see.
  KeyRange key_range(index_t b, index_t h, index_t q0, index_t q1) const {
    const KeyRange g = mask.key_range(b, h, q0, q1);
    return {std::clamp<index_t>(g.begin - k_pos, 0, kv.length()),
            std::clamp<index_t>(g.end - k_pos, 0, kv.length())};
  }

  /// Folds keys [k_begin, k_end) of the source (a grid of Bc-key tiles from
  /// k_begin) into `part`, whose rows are the scaled query rows `qs` (ld D) of
  /// (b, h) at global positions q_pos, q_pos + 1, ...
  void run(WalkScratch<Acc>& sc, Partial<Acc>& part, index_t b, index_t h, index_t hk,
           index_t q_pos, const Acc* qs, index_t k_begin, index_t k_end) const {
    const index_t rows = part.rows;
    const index_t q_end = q_pos + rows;
    for (index_t k0 = k_begin; k0 < k_end; k0 += bc) {
      if constexpr (has_next_key<Mask>::value) {
        // Jump whole tiles (the grid stays k_begin + n·Bc) to the one holding the next visible key.
        const index_t next =
            std::clamp(mask.next_key(b, h, q_pos, q_end, k_pos + k0) - k_pos, k0, k_end);
        const index_t jump = (next - k0) / bc;
        sc.stats.skipped_tiles += jump;
        k0 += jump * bc;
        if (k0 >= k_end) break;
      }
      const index_t cols = std::min(bc, k_end - k0);
      const index_t gk0 = k_pos + k0;
      const TileKind kind =
          Mask::always_full ? TileKind::full : mask.classify(b, h, q_pos, q_end, gk0, gk0 + cols);
      if (kind == TileKind::empty) {
        ++sc.stats.skipped_tiles;
        continue;
      }
      ++(kind == TileKind::full ? sc.stats.full_tiles : sc.stats.partial_tiles);
      sc.stats.scores += rows * cols;

      // S = Qs · Kᵀ                                                          (rows, cols)
      index_t ldk = 0;
      const Acc* kt = kv.template keys<Acc>(b, hk, k0, cols, sc.k, ldk);
      Acc* s = sc.s.data();
      const index_t lds = cols;
      Eigen::Map<RowMatrix<Acc>>(s, rows, cols).setZero();
      sc.qk.add_abt(rows, cols, d, qs, d, kt, ldk, s, lds, Acc(1));

      mod.apply_tile(b, h, q_pos, gk0, s, lds, rows, cols);
      if (kind == TileKind::partial) mask_partial_tile(mask, b, h, q_pos, gk0, s, lds, rows, cols);

      part.update(s, lds, cols);        // S -> P
      if (dropout && dropout->enabled)  // P -> P ∘ M / (1 - p) for O only
        for (index_t r = 0; r < rows; ++r)
          dropout->apply_row(b, h, q_pos + r, gk0, s + r * lds, cols);

      // O += P · V                                                           (rows, Dv)
      index_t ldv = 0;
      const Acc* vt = kv.template values<Acc>(b, hk, k0, cols, sc.v, ldv);
      sc.pv.add_ab(rows, dv, cols, s, lds, vt, ldv, part.o.data(), dv, Acc(1));
    }
  }
};

}  // namespace detail
}  // namespace attn
