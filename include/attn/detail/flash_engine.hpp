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
// Scratch is O(Br·Bc + Br·(D+Dv) + Bc·(D+Dv)) per worker, allocated once per
// call; nothing grows with Lq·Lk. A task's arithmetic depends only on the
// task, so results are bitwise identical for any thread count.
#pragma once

#include "attn/detail/checks.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/detail/softmax.hpp"
#include "attn/kernels/dispatch.hpp"
#include "attn/kernels/pack.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

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
  Mat q;                    // (Br, D)  scaled query tile
  std::vector<Acc> s;       // (Br, lds) scores, then probabilities
  std::vector<Acc> o;       // (Br, dvp) output accumulator
  std::vector<Acc> m, l;    // (Br) running row max and row sum
  std::vector<Acc> kp, vp;  // one packed key / value tile, when the call does not pack them all
  std::vector<Acc> row;     // (D) one converted key row while packing
  // bf16 products (vdpbf16ps): Q and P as bf16 bits, one packed K / V tile
  std::vector<std::uint16_t> qb, pb, kb, vb;
  AttentionStats stats;  // this worker's share of the call's counters

  FlashScratch(index_t br, index_t lds, index_t d, index_t dvp, index_t kp_size, index_t vp_size)
      : q(br, d), s(static_cast<std::size_t>(br * lds)), o(static_cast<std::size_t>(br * dvp)),
        m(static_cast<std::size_t>(br)), l(static_cast<std::size_t>(br)),
        kp(static_cast<std::size_t>(kp_size)), vp(static_cast<std::size_t>(vp_size)),
        row(static_cast<std::size_t>(d)) {}
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

/// Key tiles start on multiples of this (the widest K panel of any kernel
/// set), so a tile's panels sit whole inside the keys packed once per call.
inline constexpr index_t key_tile_align = 32;

/// The engine. Arguments are already checked; mask and mod are bound.
template <class Acc, class Q, class K, class V, class O, class Mask, class Mod>
void flash_forward(const TensorView<const Q, 4>& q, const TensorView<const K, 4>& k,
                   const TensorView<const V, 4>& v, const TensorView<O, 4>& out,
                   const AttentionShape& shape, const Mask& mask, const Mod& mod,
                   const AttentionOptions& opt) {
  const Isa isa = active_isa();
  const kernels::KernelSet<Acc>& ks = kernels::kernel_set<Acc>(isa);
  // bf16 q, k and v on a CPU with AVX512-BF16: products on bf16 pairs (vdpbf16ps).
  constexpr bool bf16_storage =
      std::is_same<Q, Eigen::bfloat16>::value && std::is_same<K, Eigen::bfloat16>::value &&
      std::is_same<V, Eigen::bfloat16>::value && std::is_same<Acc, float>::value;
  const bool use_bf16 = ATTN_KERNELS_X86 && bf16_storage && isa == Isa::avx512_bf16;
  const Acc scale =
      static_cast<Acc>(opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(shape.d))));
  const index_t br = std::min(opt.block_q > 0 ? opt.block_q : TileTraits::block_q, shape.lq);
  const index_t bc = std::min(opt.block_k > 0 ? opt.block_k : TileTraits::block_k, shape.lk);
  const index_t q_tiles = (shape.lq + br - 1) / br;
  const index_t heads = shape.batch * shape.q_heads;
  const index_t tasks = heads * q_tiles;
  const int threads = resolve_threads(opt.num_threads, tasks);
  const bool want_lse = !opt.lse.is_null();
  const index_t d = shape.d, dv = shape.dv, dvp = kernels::padded_dv(dv);
  const index_t nr = use_bf16 ? 32 : ks.k_panel;
  const index_t dpad = d + (d & 1);  // bf16: head dim in whole pairs
  // A tile may start up to key_tile_align - 1 keys before its first visible key.
  const index_t bc_max = bc + key_tile_align;
  // Rows of S 32 floats longer than the tile: whole panels, and no row a multiple of 4 KiB
  // apart (1 KiB rows of a 256-key tile made the products 20% slower, by cache aliasing).
  const index_t lds = (bc_max + key_tile_align - 1) / key_tile_align * key_tile_align;

  // K and V in the kernels' layouts, packed once per (batch, KV head) for the
  // whole call when more than one query tile or query head reads them; else
  // each tile is packed where it is used. V is read in place when it already
  // is what the P·V kernel wants.
  const bool v_in_place = std::is_same<V, Acc>::value && v.stride(3) == 1 && dv == dvp && !use_bf16;
  // (Tiles then start on multiples of the panel width: key_tile_align and Bc are multiples.)
  const bool pack_all = q_tiles * (shape.q_heads / shape.kv_heads) > 1 && bc % nr == 0;
  const index_t kv_slices = shape.batch * shape.kv_heads;
  const index_t k_slice = use_bf16 ? kernels::packed_kb_size(shape.lk, d)
                                   : kernels::packed_k_size(shape.lk, d, static_cast<int>(nr));
  const index_t v_slice = (shape.lk + 1) / 2 * 2 * dvp;
  const auto packed_size = [&](bool wanted, index_t slice) {
    return wanted ? static_cast<std::size_t>(kv_slices * slice) : std::size_t{0};
  };
  std::vector<Acc> packed_k(packed_size(pack_all && !use_bf16, k_slice));
  std::vector<Acc> packed_v(packed_size(pack_all && !use_bf16 && !v_in_place, v_slice));
  std::vector<std::uint16_t> packed_kb(packed_size(pack_all && use_bf16, k_slice));
  std::vector<std::uint16_t> packed_vb(packed_size(pack_all && use_bf16, v_slice));
  // Element `off` of a pack, null for a pack this call does not use.
  const auto at = [](auto& pack, std::size_t off) {
    return pack.empty() ? nullptr : pack.data() + off;
  };
  // Packs keys [k0, k0 + cols) of one (batch, KV head) into kp / kb and the values into vp / vb.
  const auto pack_tile = [&](index_t b, index_t hk, index_t k0, index_t cols, Acc* row, Acc* kp,
                             Acc* vp, std::uint16_t* kb, std::uint16_t* vb) {
    const K* ksrc = k.data() + b * k.stride(0) + hk * k.stride(1) + k0 * k.stride(2);
    const V* vsrc = v.data() + b * v.stride(0) + hk * v.stride(1) + k0 * v.stride(2);
    if constexpr (bf16_storage) {
      if (use_bf16) {
        kernels::pack_kb(ksrc, k.stride(2), k.stride(3), cols, d, kb);
        kernels::pack_vb(vsrc, v.stride(2), v.stride(3), cols, dv, dvp, vb);
        return;
      }
    }
    (void)kb;
    (void)vb;
    kernels::pack_k(ks, ksrc, k.stride(2), k.stride(3), cols, d, row, kp);
    if (!v_in_place) kernels::pack_v(ks, vsrc, v.stride(2), v.stride(3), cols, dv, dvp, vp);
  };
  if (pack_all) {
    const index_t chunk = 1024;  // keys per packing task (a multiple of every panel width)
    const index_t chunks = (shape.lk + chunk - 1) / chunk;
    parallel_tasks(
        kv_slices * chunks, resolve_threads(opt.num_threads, kv_slices * chunks),
        [&] { return std::make_unique<std::vector<Acc>>(static_cast<std::size_t>(d)); },
        [&](std::vector<Acc>& row, index_t t) {
          const index_t slice = t / chunks, k0 = (t % chunks) * chunk;
          const index_t b = slice / shape.kv_heads, hk = slice % shape.kv_heads;
          const index_t cols = std::min(chunk, shape.lk - k0);
          const std::size_t ko = static_cast<std::size_t>(slice * k_slice +
                                                          k0 * (use_bf16 ? dpad : d)),
                            vo = static_cast<std::size_t>(slice * v_slice + k0 * dvp);
          pack_tile(b, hk, k0, cols, row.data(), at(packed_k, ko), at(packed_v, vo),
                    at(packed_kb, ko), at(packed_vb, vo));
        },
        [](const std::vector<Acc>&) {});
  }

  auto make_scratch = [&] {
    auto sc = std::make_unique<FlashScratch<Acc>>(
        br, lds, d, dvp,
        pack_all || use_bf16 ? 0 : kernels::packed_k_size(bc_max, d, static_cast<int>(nr)),
        pack_all || use_bf16 || v_in_place ? 0 : bc_max * dvp);
    if (use_bf16) {
      sc->qb.resize(static_cast<std::size_t>(br * dpad));
      sc->pb.resize(static_cast<std::size_t>(br * lds));
      if (!pack_all) {
        sc->kb.resize(static_cast<std::size_t>(kernels::packed_kb_size(bc_max, d)));
        sc->vb.resize(static_cast<std::size_t>((bc_max + 1) / 2 * 2 * dvp));
      }
    }
    return sc;
  };

  auto run_task = [&](FlashScratch<Acc>& sc, index_t t) {
    constexpr Acc neg_inf = -std::numeric_limits<Acc>::infinity();
    // Last query tiles first: under causal masks they carry the most work.
    const index_t qt = q_tiles - 1 - t / heads;
    const index_t b = (t % heads) / shape.q_heads;
    const index_t h = t % shape.q_heads;
    const index_t hk = shape.kv_head(h);
    const index_t slice = b * shape.kv_heads + hk;
    const index_t q0 = qt * br;
    const index_t rows = std::min(br, shape.lq - q0);

    auto qs = sc.q.topRows(rows);
    if (use_bf16) {
      if constexpr (bf16_storage)  // unscaled bf16 pairs; the kernel scales the fp32 sums
        kernels::pack_qb(q.data() + b * q.stride(0) + h * q.stride(1) + q0 * q.stride(2),
                         q.stride(2), q.stride(3), rows, d, sc.qb.data(), dpad);
    } else {
      qs = matrix(q, b, h).middleRows(q0, rows).template cast<Acc>() * scale;  // (rows, D)
    }
    Acc* o = sc.o.data();  // (rows, dvp)
    std::fill(o, o + rows * dvp, Acc(0));
    std::fill(sc.m.begin(), sc.m.begin() + rows, neg_inf);
    std::fill(sc.l.begin(), sc.l.begin() + rows, Acc(0));

    KeyRange kr = mask.key_range(b, h, q0, q0 + rows);
    kr.begin = std::max<index_t>(kr.begin, 0) / key_tile_align * key_tile_align;
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

      // Packed K and V of this tile: from the call's packs (k0 is a multiple of nr) or packed now.
      const std::size_t ko = static_cast<std::size_t>(slice * k_slice + k0 * (use_bf16 ? dpad : d)),
                        vo = static_cast<std::size_t>(slice * v_slice + k0 * dvp);
      const Acc *kp = at(packed_k, ko), *vp = at(packed_v, vo);
      const std::uint16_t *kb = at(packed_kb, ko), *vb = at(packed_vb, vo);
      if (!pack_all) {
        pack_tile(b, hk, k0, cols, sc.row.data(), sc.kp.data(), sc.vp.data(), sc.kb.data(),
                  sc.vb.data());
        kp = at(sc.kp, 0);
        vp = at(sc.vp, 0);
        kb = at(sc.kb, 0);
        vb = at(sc.vb, 0);
      }
      index_t ldv = dvp;
      if constexpr (std::is_same<V, Acc>::value) {
        if (v_in_place) {
          vp = v.data() + b * v.stride(0) + hk * v.stride(1) + k0 * v.stride(2);
          ldv = v.stride(2);
        }
      }

      // S = Qs · Kᵀ                                                          (rows, cols)
      Acc* s = sc.s.data();
#if ATTN_KERNELS_X86
      if constexpr (bf16_storage) {
        if (use_bf16)
          kernels::avx512_bf16::score(rows, cols, d, sc.qb.data(), dpad, kb, s, lds, scale);
      }
#endif
      if (!use_bf16) ks.score(rows, cols, d, qs.data(), d, kp, s, lds);

      mod.apply_tile(b, h, q0, k0, s, lds, rows, cols);
      if (kind == TileKind::partial) mask_partial_tile(mask, b, h, q0, k0, s, lds, rows, cols);

      // m' = max(m, rowmax(S)); P = exp(S - m'); l = l·exp(m - m') + rowsum(P); O = O·exp(m - m')
      ks.softmax(rows, cols, s, lds, sc.m.data(), sc.l.data(), o, dvp, dvp);

      // O += P · V                                                           (rows, Dv)
#if ATTN_KERNELS_X86
      if constexpr (bf16_storage) {
        if (use_bf16) {  // P rounded to bf16 pairs of adjacent keys
          kernels::avx512_bf16::round_to_bf16(rows, cols, s, lds, sc.pb.data(), lds);
          kernels::avx512_bf16::accumulate_pv(rows, dvp, cols, sc.pb.data(), lds, vb, o, dvp);
        }
      }
#endif
      (void)kb;
      (void)vb;
      if (!use_bf16) ks.pv(rows, dvp, cols, s, lds, vp, ldv, o, dvp);
    }

    // out = O / l; rows that saw no key (l = 0) give zeros and lse = -inf;
    // a NaN score makes l NaN, and the row and its lse stay NaN.
    auto dst = matrix(out, b, h).middleRows(q0, rows);
    for (index_t r = 0; r < rows; ++r) {
      const Acc l = sc.l[r];
      const bool saw_none = l == Acc(0);
      const Acc inv = saw_none ? Acc(0) : Acc(1) / l;
      dst.row(r) = (Eigen::Map<const Eigen::Matrix<Acc, 1, Eigen::Dynamic>>(o + r * dvp, dv) * inv)
                       .template cast<O>();
      if (want_lse)
        opt.lse(b, h, q0 + r) = saw_none ? -std::numeric_limits<float>::infinity()
                                         : static_cast<float>(sc.m[r] + std::log(l));
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
