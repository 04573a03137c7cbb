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
//   online softmax (m, l, O rescaled where m moved); O += P · V[k0:k0+Bc]  (rows, Dv)
//
// The three products are attn's micro-kernels (kernels/) of the instruction
// set dispatch chose for the call. Keys and values come packed in the
// kernels' layouts (kv/packed.hpp); masks and modifiers see global positions:
// query row r of the tile is q_pos + r, key j of the source is k_pos + j
// (AttentionOptions::positions).
//
// With dropout, the P that multiplies V is P ∘ M / (1 - p) (M the Philox keep
// decisions at global positions); l and lse keep the undropped P, as
// FlashAttention does.
#pragma once

#include "attn/engine/partial.hpp"
#include "attn/kernels/dispatch.hpp"
#include "attn/kernels/prefetch.hpp"
#include "attn/kv/packed.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/policy/dropout.hpp"
#include "attn/tensor_view.hpp"

#include "attn/core/eigen.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

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
  index_t lds;            // row stride of S
  std::vector<Acc> s;     // (Br, lds) scores, then probabilities
  std::vector<Acc> k, v;  // one packed key / value tile, when the call does not pack once
  std::vector<Acc> row;   // (D) one converted key row while packing
  std::vector<std::uint16_t> qb, pb, kb, vb;  // bf16 pairs: Q, P, one K / V tile
  AttentionStats stats;                       // this worker's share of the call's counters

  RowMatrix<Acc> gather;    // one tile from a source that is not a strided view (kv/packed.hpp)
  RowMatrix<Acc> gather_v;  // its values, when keys are read as rows (PackedKV::rows)
  std::vector<RowRun> k_runs, v_runs;  // caches: one tile's rows in runs, in place

  // int8 caches with float accumulation: integer products (body.inl)
  std::vector<std::int16_t> q16, w16;  // (Br, D) queries, (Br, ldw) P times the values' scales
  std::vector<float> qscale, wscale;   // their scales per row
  std::vector<std::int32_t> acc;       // (Br, Dv) int32 sums of one tile's P·V
  index_t ldq16 = 0, ldw = 0;          // even: quantize_rows pads odd rows with a 0
  bool q16_done = false;               // q16 holds this walk's query rows (run_heads resets it)
  bool q16_ok = false;                 // and they were finite

  template <class Src>
  WalkScratch(index_t br, index_t bc, const PackedKV<Acc, Src>& kv)
      // S rows 32 floats longer than the tile (whole panels from a tile start rounded down),
      // so no two rows are a multiple of 4 KiB apart: 1 KiB rows of a 256-key tile made the
      // products 20% slower by cache aliasing.
      : lds((bc + 2 * PackedKV<Acc, Src>::tile_align - 1) / 32 * 32),
        s(static_cast<std::size_t>(br * lds)), row(static_cast<std::size_t>(kv.d)),
        gather(kv.whole ? RowMatrix<Acc>() : kv.gather_buffer(bc + PackedKV<Acc, Src>::tile_align)),
        gather_v(gather.rows(), gather.cols()) {
    const index_t keys = bc + PackedKV<Acc, Src>::tile_align;
    if (!std::is_void<run_rows_t<Src>>::value) {
      k_runs.resize(static_cast<std::size_t>(keys));
      v_runs.resize(static_cast<std::size_t>(keys));
    }
    if (std::is_same<run_rows_t<Src>, std::int8_t>::value && std::is_same<Acc, float>::value) {
      ldw = (lds + 2) / 2 * 2;  // even, and one past a tile's columns
      ldq16 = (kv.d + 1) / 2 * 2;
      q16.resize(static_cast<std::size_t>(br * ldq16));
      w16.resize(static_cast<std::size_t>(br * ldw));
      qscale.resize(static_cast<std::size_t>(br));
      wscale.resize(static_cast<std::size_t>(br));
      acc.resize(static_cast<std::size_t>(br * kv.dv));
    }
    if (!kv.whole) {
      if (kv.bf16) {
        kb.resize(static_cast<std::size_t>(kv.tile_k_size(keys)));
        vb.resize(static_cast<std::size_t>(kv.tile_v_size(keys)));
      } else {
        k.resize(static_cast<std::size_t>(kv.tile_k_size(keys)));
        if (!kv.v_in_place) v.resize(static_cast<std::size_t>(kv.tile_v_size(keys)));
      }
    }
    if (kv.bf16) {
      qb.resize(static_cast<std::size_t>(br * kv.dpad));
      pb.resize(static_cast<std::size_t>(br * lds));
    }
  }

  void add_to(AttentionStats* total) const {
    if (!total) return;
    total->add(stats);
  }
};

/// The bound pieces of one call that every walk of it shares.
template <class Acc, class KV, class Mask, class Mod>
struct Walk {
  const KV& kv;      // packed keys and values (kv/packed.hpp)
  const Mask& mask;  // bound to the global shape
  const Mod& mod;
  index_t bc;     // keys per tile
  index_t d, dv;  // head dims
  index_t k_pos;  // global position of the source's key 0
  Acc scale;      // bf16 products: applied to the fp32 sums (fp paths scale Q beforehand)
  const DropoutGen* dropout = nullptr;  // bound to the global shape; null or disabled: none

  /// The source's keys [begin, end) that any query of global rows [q0, q1) may see;
  /// begin rounded down to a multiple of KV::tile_align (tiles start on panel boundaries).
  KeyRange key_range(index_t b, index_t h, index_t q0, index_t q1) const {
    const KeyRange g = mask.key_range(b, h, q0, q1);
    const index_t begin = std::clamp<index_t>(g.begin - k_pos, 0, kv.length());
    return {begin / KV::tile_align * KV::tile_align,
            std::clamp<index_t>(g.end - k_pos, 0, kv.length())};
  }

  static index_t row_bytes(index_t dim, bool int8) {
    return dim * (int8 ? index_t{1} : static_cast<index_t>(sizeof(Acc)));
  }
  /// Asks for a run's rows (dim elements each) into L2 before the kernels read
  /// them, at most `most` bytes.
  static void prefetch_run(const RowRun& run, index_t dim, bool int8, index_t most = 1 << 30) {
    kernels::prefetch_bytes(run.rows, std::min(most, run.n * row_bytes(dim, int8)));
  }
  /// Run i + 1 of `runs` for the kernel that reads run i: its look-ahead runs on
  /// into it (the blocks of a paged cache lie anywhere in its pool). A run
  /// shorter than the look-ahead cannot reach all of the next one, which is
  /// then asked for here, at once.
  static kernels::NextRows next_run(const RowRun* runs, index_t count, index_t i, index_t dim,
                                    bool int8) {
    if (i + 1 >= count) return {};
    const RowRun& next = runs[i + 1];
    if (runs[i].n < kernels::stream_ahead(row_bytes(dim, int8))) prefetch_run(next, dim, int8);
    return {next.rows, next.n};
  }

  /// Rows per group of a partial tile (run_heads).
  static constexpr index_t diag_rows = 64;

  /// One key tile `t` (keys gk0, ..., gk0 + cols - 1) for rows [r0, r0 + m) of
  /// `part`: score, modifier, mask, online softmax, O += P·V. `heads` stacked
  /// query heads own m / heads rows each (r0 = 0 then).
  void tile(WalkScratch<Acc>& sc, Partial<Acc>& part, const PackedTile<Acc>& t, index_t b,
            index_t h0, index_t heads, index_t m, index_t r0, index_t q_pos, const Acc* qs,
            index_t gk0, index_t cols, bool all_full) const {
    const kernels::KernelSet<Acc>& ks = kv.ks;
    const index_t lds = sc.lds, dvp = kv.dvp, ldo = part.o.cols();
    const index_t n = m / heads;  // query rows per head
    const index_t q0 = q_pos + r0;
    Acc* s = sc.s.data() + r0 * lds;
    Acc* o = part.o.data() + r0 * ldo;

    // int8 rows with float accumulation: integer products, the walk's query
    // rows rounded to int16 at its first tile (float products if one is not finite).
    bool int_products = false;
    if constexpr (std::is_same<Acc, float>::value) {
      if (t.int8) {
        if (!sc.q16_done) {
          sc.q16_ok = ks.quantize_rows(part.rows, d, qs, d, kernels::int16_limit(d), sc.q16.data(),
                                       sc.ldq16, sc.qscale.data());
          sc.q16_done = true;
        }
        int_products = sc.q16_ok;
      }
    }

    // bf16 products (x86, float accumulation only): the softmax applies the score
    // scale and rounds P to bf16 row by row, unless a modifier must see the scaled
    // scores or dropout the fp32 P.
    const bool dropping = dropout && dropout->enabled;
    const bool fold_scale = ATTN_KERNELS_X86 && std::is_same<Acc, float>::value && kv.bf16 &&
                            Mod::is_identity && scale > Acc(0) && !dropping;

    // S = Qs · Kᵀ                                                            (m, cols)
    if (kv.bf16) {
#if ATTN_KERNELS_X86
      if constexpr (std::is_same<Acc, float>::value) {
        const std::uint16_t* qb = sc.qb.data() + r0 * kv.dpad;
        const float c = fold_scale ? 1.0f : scale;
        if (kv.amx)
          kernels::amx_bf16::score(m, cols, d, qb, kv.dpad, t.kb, s, lds, c);
        else
          kernels::avx512_bf16::score(m, cols, d, qb, kv.dpad, t.kb, s, lds, c);
      }
#endif
    } else if (t.kr) {  // rows in place, run by run (the bits do not depend on the runs)
      for (index_t i = 0; i < t.k_runs; ++i) {
        const RowRun& run = t.kr[i];
        const kernels::NextRows next = next_run(t.kr, t.k_runs, i, d, t.int8);
        if (i == 0) prefetch_run(t.vr[0], dv, t.int8, 4096);  // the first values, for O += P·V
        if (int_products) {
          if constexpr (std::is_same<Acc, float>::value)
            ks.score_rows_q16(m, run.n, d, sc.q16.data() + r0 * sc.ldq16, sc.ldq16,
                              sc.qscale.data() + r0, static_cast<const std::int8_t*>(run.rows), d,
                              run.scale, s + run.c0, lds, next);
        } else if (t.int8)
          ks.score_rows_i8(m, run.n, d, qs + r0 * d, d, static_cast<const std::int8_t*>(run.rows),
                           d, run.scale, s + run.c0, lds, next);
        else
          ks.score_rows(m, run.n, d, qs + r0 * d, d, static_cast<const Acc*>(run.rows), d,
                        s + run.c0, lds, next);
      }
    } else if (t.k_rows) {
      ks.score_rows(m, cols, d, qs + r0 * d, d, t.k, t.ldk, s, lds, {});
    } else {
      ks.score(m, cols, d, qs + r0 * d, d, t.k, s, lds);
    }

    for (index_t g = 0; g < heads; ++g) {
      Acc* sg = s + g * n * lds;  // head h0 + g's rows
      mod.apply_tile(b, h0 + g, q0, gk0, sg, lds, n, cols);
      if (!all_full) {
        const TileKind kind = mask.classify(b, h0 + g, q0, q0 + n, gk0, gk0 + cols);
        if (kind == TileKind::empty)
          for (index_t r = 0; r < n; ++r)
            std::fill(sg + r * lds, sg + r * lds + cols, -std::numeric_limits<Acc>::infinity());
        else if (kind == TileKind::partial)
          mask_partial_tile(mask, b, h0 + g, q0, gk0, sg, lds, n, cols);
      }
    }

    // m' = max(m, rowmax(S)); P = exp(S - m'); l = l·exp(m - m') + rowsum(P); O = O·exp(m - m')
    if (!fold_scale)
      ks.softmax(m, cols, s, lds, Acc(1), part.m.data() + r0, part.l.data() + r0, o, ldo, dvp);
    if (dropping)  // P -> P ∘ M / (1 - p) for O only
      for (index_t r = 0; r < m; ++r)
        dropout->apply_row(b, h0 + r / n, q0 + r % n, gk0, s + r * lds, cols);

    // O += P · V                                                             (m, Dv)
    if (kv.bf16) {
#if ATTN_KERNELS_X86
      if constexpr (std::is_same<Acc, float>::value) {  // P rounded to bf16 pairs of keys
        std::uint16_t* pb = sc.pb.data() + r0 * lds;
        if (fold_scale)
          kernels::avx512_bf16::softmax_to_bf16(m, cols, s, lds, scale, part.m.data() + r0,
                                                part.l.data() + r0, o, ldo, dvp, pb, lds);
        else
          kernels::avx512_bf16::round_to_bf16(m, cols, s, lds, pb, lds);
        if (kv.amx)
          kernels::amx_bf16::accumulate_pv(m, dvp, cols, pb, lds, t.vb, o, ldo);
        else
          kernels::avx512_bf16::accumulate_pv(m, dvp, cols, pb, lds, t.vb, o, ldo);
      }
#endif
    } else if (t.vr) {  // run by run; int8: P's columns times the values' scales first
      if (t.int8)
        for (index_t i = 0; i < t.v_runs; ++i) {
          const RowRun& run = t.vr[i];
          if constexpr (std::is_same<Acc, float>::value) {
            ks.scale_columns(m, run.n, s + run.c0, lds, run.scale);
          } else {
            for (index_t r = 0; r < m; ++r) {
              Acc* pr = s + r * lds + run.c0;
              for (index_t c = 0; c < run.n; ++c) pr[c] *= static_cast<Acc>(run.scale[c]);
            }
          }
        }
      // Integer sums over the whole tile, then one float update of O per row.
      bool q16_pv = false;
      if constexpr (std::is_same<Acc, float>::value)
        q16_pv = int_products &&
                 ks.quantize_rows(m, cols, s, lds, kernels::int16_limit(cols),
                                  sc.w16.data() + r0 * sc.ldw, sc.ldw, sc.wscale.data() + r0);
      std::int32_t* acc = q16_pv ? sc.acc.data() + r0 * dv : nullptr;
      if (acc) std::fill(acc, acc + m * dv, 0);
      for (index_t i = 0; i < t.v_runs; ++i) {
        const RowRun& run = t.vr[i];
        const kernels::NextRows next = next_run(t.vr, t.v_runs, i, dv, t.int8);
        if (acc) {
          ks.pv_q16(m, dv, run.n, sc.w16.data() + r0 * sc.ldw + run.c0, sc.ldw,
                    static_cast<const std::int8_t*>(run.rows), dv, acc, dv, next);
        } else if (t.int8) {
          ks.pv_i8(m, dvp, run.n, s + run.c0, lds, static_cast<const std::int8_t*>(run.rows), dv, o,
                   ldo, next);
        } else {
          ks.pv(m, dvp, run.n, s + run.c0, lds, static_cast<const Acc*>(run.rows), dv, o, ldo,
                next);
        }
      }
      if constexpr (std::is_same<Acc, float>::value)
        if (acc) ks.pv_q16_finish(m, dv, acc, dv, sc.wscale.data() + r0, o, ldo);
    } else {
      ks.pv(m, dvp, cols, s, lds, t.v, t.ldv, o, ldo, {});
    }
  }

  /// Folds keys [k_begin, k_end) of the source (a grid of Bc-key tiles from
  /// k_begin, a multiple of KV::tile_align when the call packs once) into
  /// `part`, whose rows are the query rows of (b, h) at global positions q_pos,
  /// q_pos + 1, ...: `qs` (ld D) scaled, or for bf16 products sc.qb as stored.
  void run(WalkScratch<Acc>& sc, Partial<Acc>& part, index_t b, index_t h, index_t hk,
           index_t q_pos, const Acc* qs, index_t k_begin, index_t k_end) const {
    run_heads(sc, part, b, h, 1, hk, q_pos, qs, k_begin, k_end);
  }

  /// The same for `heads` query heads h0, h0 + 1, ... of one GQA group stacked
  /// as the rows of one tile: head h0 + g owns rows [g·n, (g + 1)·n), n =
  /// part.rows / heads, at global positions q_pos, ..., q_pos + n - 1. Each
  /// key/value tile is read once for all of them (decoding reads K and V once
  /// per group, not once per query head).
  void run_heads(WalkScratch<Acc>& sc, Partial<Acc>& part, index_t b, index_t h0, index_t heads,
                 index_t hk, index_t q_pos, const Acc* qs, index_t k_begin, index_t k_end) const {
    const index_t rows = part.rows, dvp = kv.dvp;
    const index_t n = rows / heads;  // query rows per head
    const index_t q_end = q_pos + n;
    sc.q16_done = false;  // new query rows
    for (index_t k0 = k_begin; k0 < k_end; k0 += bc) {
      if constexpr (has_next_key<Mask>::value) {
        // Jump whole tiles (the grid stays k_begin + n·Bc) to the one holding the next visible key.
        index_t next = k_end;
        for (index_t g = 0; g < heads; ++g)
          next = std::min(
              next,
              std::clamp(mask.next_key(b, h0 + g, q_pos, q_end, k_pos + k0) - k_pos, k0, k_end));
        const index_t jump = (next - k0) / bc;
        sc.stats.skipped_tiles += jump;
        k0 += jump * bc;
        if (k0 >= k_end) break;
      }
      const index_t cols = std::min(bc, k_end - k0);
      const index_t gk0 = k_pos + k0;
      // The tile is empty when it is empty for every head, full when full for every head.
      bool any = Mask::always_full, all_full = true;
      if constexpr (!Mask::always_full)
        for (index_t g = 0; g < heads; ++g) {
          const TileKind kind = mask.classify(b, h0 + g, q_pos, q_end, gk0, gk0 + cols);
          any = any || kind != TileKind::empty;
          all_full = all_full && kind == TileKind::full;
        }
      if (!any) {
        ++sc.stats.skipped_tiles;
        continue;
      }
      ++(all_full ? sc.stats.full_tiles : sc.stats.partial_tiles);
      sc.stats.scores += rows * cols;

      // This tile's keys and values: from the call's pack, or packed now.
      PackedTile<Acc> t;
      if (kv.whole) {
        t = kv.tile_at(b, hk, k0);
      } else if (kv.rows) {
        t = kv.load_rows(b, hk, k0, cols, KV::at(sc.v, 0), sc.gather, sc.gather_v, sc.k_runs.data(),
                         sc.v_runs.data());
      } else {
        kv.pack(b, hk, k0, cols, sc.row.data(), KV::at(sc.k, 0), KV::at(sc.v, 0), KV::at(sc.kb, 0),
                KV::at(sc.vb, 0), sc.gather);
        t = {KV::at(sc.k, 0), KV::at(sc.v, 0), KV::at(sc.kb, 0), KV::at(sc.vb, 0), dvp};
      }
      if constexpr (std::is_same<typename KV::value_type, Acc>::value) {
        if (kv.v_in_place) {
          const auto& vv = kv.src.v;
          t.v = vv.data() + b * vv.stride(0) + hk * vv.stride(1) + k0 * vv.stride(2);
          t.ldv = vv.stride(2);
        }
      }

      // A partial tile of one head: rows in groups of diag_rows, each group
      // only up to the last key one of its rows sees (a causal diagonal
      // computes a staircase, not the whole square). The groups and their
      // key counts follow from the mask and the tile alone, so results stay
      // bitwise the same for any thread count.
      if (heads == 1 && !all_full && rows > diag_rows) {
        for (index_t r0 = 0; r0 < rows; r0 += diag_rows) {
          const index_t m = std::min(diag_rows, rows - r0);
          const KeyRange kr = mask.key_range(b, h0, q_pos + r0, q_pos + r0 + m);
          const index_t c = std::clamp<index_t>(kr.end - gk0, 0, cols);
          if (c > 0 && kr.begin < gk0 + c)
            tile(sc, part, t, b, h0, 1, m, r0, q_pos, qs, gk0, c, false);
        }
      } else {
        tile(sc, part, t, b, h0, heads, rows, 0, q_pos, qs, gk0, cols, all_full);
      }
    }
  }
};

}  // namespace detail
}  // namespace attn
