// attn/engine/segments.hpp — the forward over a list of segments: split-KV
// decoding, varlen batches and caches.
//
// A segment is one sequence's piece of a call: `rows` query rows of q/out and
// the keys [k_begin, k_begin + k_len) of one sequence of a key/value source,
// at global positions q_pos and k_pos, with its own bound mask and modifier.
// masked_attention on a decode shape is B segments; a varlen batch is one
// segment per sequence; attention against a cache is one segment per cached
// sequence.
//
// Work units, chosen from shapes only (never from the thread count):
//  - stacked: when G·rows <= SplitTraits::stack_rows (G = Hq / Hkv), the G query
//    heads of a group are the row blocks of one tile, so every key/value tile
//    is read once for the whole group (Walk::run_heads);
//  - otherwise one unit per (query head, tile of Br rows), as the forward.
// A unit of at most SplitTraits::row_keys rows (a decoding step) reads each
// key tile as rows with the score_rows kernel and its values in place: a
// handful of rows per key cannot pay for transposing K into panels, which
// took more time than the products and kept decoding off memory bandwidth.
// When a call has fewer than SplitTraits::target_tasks units, the key range of
// each stacked unit is cut into splits of a fixed length (a multiple of Bc,
// at least SplitTraits::min_split): each split walks its keys into its own
// partial result (normalised out, lse), and the splits are merged by their
// log-sum-exp in split order (merge_row), so the result does not depend on
// the thread count. Tasks run longest first. When the source's blocks are
// shorter than a tile (a paged cache), one task walks the same split of
// several KV groups tile by tile, reading each block's heads close together.
//
// A per-head sink logit (AttentionOptions::sinks) joins each row's softmax
// denominator only, as a partial result with lse = sink and output 0:
//   out = Σ_j exp(s_j - m)·v_j / (exp(sink - m) + Σ_j exp(s_j - m)),
//   lse = logaddexp(lse_keys, sink).
#pragma once

#include "attn/detail/parallel.hpp"
#include "attn/engine/partial.hpp"
#include "attn/engine/walk.hpp"
#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include "attn/core/eigen.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace attn {
namespace detail {

/// Constants of the segment schedule.
struct SplitTraits {
  static constexpr index_t stack_rows = 64;    // rows of a stacked tile at most (G · query rows)
  static constexpr index_t target_tasks = 64;  // split keys while the call has fewer units
  static constexpr index_t min_split = 1024;   // keys per split at least
  static constexpr index_t row_keys = 8;       // stacked rows at most that read keys as rows
  static constexpr index_t max_fuse = 16;      // split units walked together by one task at most
  static_assert(stack_rows > 0 && target_tasks > 0 && min_split > 0, "positive constants");
};

/// One sequence's piece of a call. Mask and Mod are bound to its global shape.
template <class Mask, class Mod>
struct Segment {
  index_t q_batch = 0;     // batch index of q / out / lse
  index_t q_begin = 0;     // first query row in q / out / lse
  index_t rows = 0;        // query rows
  index_t kv_batch = 0;    // sequence index of the key/value source
  index_t k_begin = 0;     // first key of the source
  index_t k_len = 0;       // keys
  index_t q_pos = 0;       // global position of the first query row
  index_t k_pos = 0;       // global position of key k_begin
  index_t mask_batch = 0;  // batch index the mask and modifier see
  const Mask* mask = nullptr;
  const Mod* mod = nullptr;
  const DropoutGen* dropout = nullptr;  // bound to the global shape; null: none
};

/// A segment's keys as a source of their own: key j is key k_begin + j of
/// sequence `batch` of the underlying source.
template <class KV>
struct SegmentKV {
  const KV& kv;
  index_t batch, k_begin, len;

  index_t length() const { return len; }
  template <class Acc>
  bool packs_keys() const {
    return kv.template packs_keys<Acc>();
  }
  template <class Acc>
  bool packs_values() const {
    return kv.template packs_values<Acc>();
  }
  template <class Acc>
  const Acc* keys(index_t, index_t hk, index_t k0, index_t rows, RowMatrix<Acc>& pack,
                  index_t& ld) const {
    return kv.template keys<Acc>(batch, hk, k_begin + k0, rows, pack, ld);
  }
  template <class Acc>
  const Acc* values(index_t, index_t hk, index_t k0, index_t rows, RowMatrix<Acc>& pack,
                    index_t& ld) const {
    return kv.template values<Acc>(batch, hk, k_begin + k0, rows, pack, ld);
  }
  template <class F>
  void key_runs(index_t, index_t hk, index_t k0, index_t rows, F&& f) const {
    kv.key_runs(batch, hk, k_begin + k0, rows, f);
  }
  template <class F>
  void value_runs(index_t, index_t hk, index_t k0, index_t rows, F&& f) const {
    kv.value_runs(batch, hk, k_begin + k0, rows, f);
  }
};
template <class KV>
struct run_rows<SegmentKV<KV>> : run_rows<KV> {};

/// Keys per block of a source read through block tables (kv/blocks.hpp); other
/// sources hold each head's keys in one run.
template <class KV, class = void>
struct has_block_size : std::false_type {};
template <class KV>
struct has_block_size<KV, std::void_t<decltype(std::declval<const KV&>().bs)>> : std::true_type {};
template <class KV>
index_t block_keys(const KV& kv) {
  if constexpr (has_block_size<KV>::value)
    return kv.bs;
  else
    return std::numeric_limits<index_t>::max();
}

/// Folds a sink logit into a normalised row (out[0..n), lse).
template <class Acc>
void apply_sink(Acc* out, index_t n, Acc& lse, Acc sink) {
  constexpr Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  if (sink == neg_inf) return;
  if (lse == neg_inf) {  // no key: the sink takes all the weight, the output stays 0
    lse = sink;
    return;
  }
  const Acc both = std::max(lse, sink) + std::log1p(std::exp(-std::abs(lse - sink)));
  const Acc w = std::exp(lse - both);
  for (index_t c = 0; c < n; ++c) out[c] *= w;
  lse = both;
}

/// The segment forward. q [*, Hq, *, D], out [*, Hq, *, Dv], lse (optional) as
/// options.lse; everything is checked and the masks bound.
template <class Acc, class Q, class KV, class O, class Mask, class Mod>
void segment_forward(const TensorView<const Q, 4>& q, const KV& kv, const TensorView<O, 4>& out,
                     const std::vector<Segment<Mask, Mod>>& segs, index_t q_heads, index_t kv_heads,
                     index_t d, index_t dv, index_t br, index_t bc, const AttentionOptions& opt) {
  using Seg = Segment<Mask, Mod>;
  using Packed = PackedKV<Acc, SegmentKV<KV>>;  // tiles packed where they are used
  const kernels::KernelSet<Acc>& ks = kernels::kernel_set<Acc>(active_isa());
  const Acc scale = static_cast<Acc>(opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(d))));
  const index_t group = q_heads / kv_heads;
  const bool want_lse = !opt.lse.is_null();
  const bool sinks = !opt.sinks.is_null();

  // ---- units: (segment, heads, query rows, key range) -------------------------------------
  struct Unit {
    index_t seg, h0, heads, q0, n, k_begin, k_end, splits, split_len, slot;
  };
  std::vector<Unit> units;
  index_t max_rows = 1;
  for (index_t si = 0; si < static_cast<index_t>(segs.size()); ++si) {
    const Seg& sg = segs[static_cast<std::size_t>(si)];
    if (sg.rows == 0) continue;
    const SegmentKV<KV> skv{kv, sg.kv_batch, sg.k_begin, sg.k_len};
    const Packed pkv(skv, ks, false, d, dv, bc, false, kv_heads);
    const Walk<Acc, Packed, Mask, Mod> walk{pkv, *sg.mask, *sg.mod, bc,        d,
                                            dv,  sg.k_pos, scale,   sg.dropout};
    auto add = [&](index_t h0, index_t heads, index_t q0, index_t n) {
      KeyRange r{sg.k_len, 0};
      for (index_t g = 0; g < heads; ++g) {
        const KeyRange kr = walk.key_range(sg.mask_batch, h0 + g, sg.q_pos + q0, sg.q_pos + q0 + n);
        if (kr.empty()) continue;
        r.begin = std::min(r.begin, kr.begin);
        r.end = std::max(r.end, kr.end);
      }
      if (r.empty()) r = {0, 0};
      units.push_back({si, h0, heads, q0, n, r.begin, r.end, 1, 0, -1});
      max_rows = std::max(max_rows, heads * n);
    };
    if (group * sg.rows <= SplitTraits::stack_rows) {
      for (index_t hk = 0; hk < kv_heads; ++hk) add(hk * group, group, 0, sg.rows);
    } else {
      for (index_t h = 0; h < q_heads; ++h)
        for (index_t q0 = 0; q0 < sg.rows; q0 += br) add(h, 1, q0, std::min(br, sg.rows - q0));
    }
  }

  // ---- key splits of stacked units, from shapes only ---------------------------------------
  const index_t n_units = static_cast<index_t>(units.size());
  index_t slots = 0;
  if (n_units < SplitTraits::target_tasks) {
    const index_t per = (SplitTraits::target_tasks + n_units - 1) / std::max<index_t>(n_units, 1);
    for (Unit& u : units) {
      const index_t keys = u.k_end - u.k_begin;
      if (u.heads * u.n > SplitTraits::stack_rows || keys <= SplitTraits::min_split) continue;
      const index_t want = std::max(SplitTraits::min_split, (keys + per - 1) / per);
      u.split_len = (want + bc - 1) / bc * bc;
      u.splits = (keys + u.split_len - 1) / u.split_len;
      if (u.splits == 1) continue;
      u.slot = slots;
      slots += u.splits;
    }
  }

  // ---- tasks: (units, split), longest first -------------------------------------------------
  // Split units of one segment with the same keys and splits (the KV groups of
  // a decoding step) are walked together, `fuse` groups per task, tile by
  // tile: each key tile of every group is read before the next tile, so a
  // task reads a paged cache's blocks whole ([Hkv, bs, D] each) instead of
  // one head's 8 KiB slice of each. Each group's arithmetic is unchanged, so
  // the bits do not depend on `fuse`, which may follow the thread count: it
  // leaves at least 4 tasks per thread.
  struct Task {
    index_t unit, split;
    index_t work;
    index_t count;  // units unit, unit + 1, ... walked together
  };
  index_t unfused = 0;
  for (const Unit& u : units) unfused += u.splits;
  const int threads = resolve_threads(opt.num_threads, std::max<index_t>(unfused, 1));
  const index_t fuse =
      block_keys(kv) < bc  // one head's tile spans blocks (contiguous heads stream better alone)
          ? std::clamp<index_t>(unfused / (4 * static_cast<index_t>(threads)), 1,
                                SplitTraits::max_fuse)
          : 1;
  auto same_keys = [&](const Unit& a, const Unit& b) {
    return a.seg == b.seg && a.splits > 1 && b.splits == a.splits && a.k_begin == b.k_begin &&
           a.k_end == b.k_end && a.split_len == b.split_len;
  };
  std::vector<Task> tasks;
  for (index_t ui = 0; ui < n_units;) {
    const Unit& u = units[static_cast<std::size_t>(ui)];
    index_t count = 1;
    while (count < fuse && ui + count < n_units &&
           same_keys(u, units[static_cast<std::size_t>(ui + count)]))
      ++count;
    for (index_t sp = 0; sp < u.splits; ++sp) {
      const index_t k0 = u.splits == 1 ? u.k_begin : u.k_begin + sp * u.split_len;
      const index_t k1 = u.splits == 1 ? u.k_end : std::min(u.k_end, k0 + u.split_len);
      tasks.push_back({ui, sp, count * u.heads * u.n * std::max<index_t>(k1 - k0, 1), count});
    }
    ui += count;
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.work > b.work; });
  index_t max_count = 1;
  for (const Task& t : tasks) max_count = std::max(max_count, t.count);

  // Partial results of split units: normalised out (rows, Dv) and lse per split.
  std::vector<Acc> part_out(static_cast<std::size_t>(slots * max_rows * dv));
  std::vector<Acc> part_lse(static_cast<std::size_t>(slots * max_rows));

  // Scratch sizes come from the packing layout, which is the same for every segment.
  const SegmentKV<KV> any_segment{kv, 0, 0, 0};
  const Packed layout(any_segment, ks, false, d, dv, bc, false, kv_heads);
  struct Scratch {
    RowMatrix<Acc> q;                // (count · rows, D): each unit's rows, scaled
    std::vector<Partial<Acc>> part;  // one per unit of a task
    WalkScratch<Acc> walk;
    Eigen::Matrix<Acc, 1, Eigen::Dynamic> row;
    Scratch(index_t rows, index_t count, index_t bc_, const Packed& pk)
        : q(count * rows, pk.d),
          part(static_cast<std::size_t>(count), Partial<Acc>(rows, pk.dv, pk.dvp)),
          walk(rows, bc_, pk), row(pk.dv) {}
  };
  auto make_scratch = [&] { return std::make_unique<Scratch>(max_rows, max_count, bc, layout); };

  // Writes a finished row (normalised, in Acc) of unit u: sink, then out and lse.
  auto finish_row = [&](const Unit& u, index_t r, Acc* row, Acc lse) {
    const Seg& sg = segs[static_cast<std::size_t>(u.seg)];
    const index_t h = u.h0 + r / u.n, i = sg.q_begin + u.q0 + r % u.n;
    if (sinks) apply_sink(row, dv, lse, static_cast<Acc>(opt.sinks(h)));
    for (index_t c = 0; c < dv; ++c) out(sg.q_batch, h, i, c) = static_cast<O>(row[c]);
    if (want_lse) opt.lse.set(sg.q_batch, h, i, static_cast<double>(lse));
  };

  auto run_task = [&](Scratch& sc, index_t t) {
    const Task& task = tasks[static_cast<std::size_t>(t)];
    const Unit& first = units[static_cast<std::size_t>(task.unit)];
    const Seg& sg = segs[static_cast<std::size_t>(first.seg)];
    const index_t rows = first.heads * first.n;
    for (index_t ui = 0; ui < task.count; ++ui) {
      const Unit& u = units[static_cast<std::size_t>(task.unit + ui)];
      for (index_t g = 0; g < u.heads; ++g)  // (rows, D): head g's rows, scaled
        sc.q.middleRows(ui * rows + g * u.n, u.n) = matrix(q, sg.q_batch, u.h0 + g)
                                                        .middleRows(sg.q_begin + u.q0, u.n)
                                                        .template cast<Acc>() *
                                                    scale;
      sc.part[static_cast<std::size_t>(ui)].reset(rows);
    }
    const SegmentKV<KV> skv{kv, sg.kv_batch, sg.k_begin, sg.k_len};
    Packed pkv(skv, ks, false, d, dv, bc, false, kv_heads);
    pkv.rows = rows <= SplitTraits::row_keys;
    const Walk<Acc, Packed, Mask, Mod> walk{pkv, *sg.mask, *sg.mod, bc,        d,
                                            dv,  sg.k_pos, scale,   sg.dropout};
    const index_t k0 =
        first.splits == 1 ? first.k_begin : first.k_begin + task.split * first.split_len;
    const index_t k1 =
        first.splits == 1 ? first.k_end : std::min(first.k_end, k0 + first.split_len);
    auto walk_unit = [&](index_t ui, index_t from, index_t to) {
      const Unit& u = units[static_cast<std::size_t>(task.unit + ui)];
      walk.run_heads(sc.walk, sc.part[static_cast<std::size_t>(ui)], sg.mask_batch, u.h0, u.heads,
                     u.h0 / group, sg.q_pos + u.q0, sc.q.data() + ui * rows * d, from, to);
    };
    if (task.count == 1)
      walk_unit(0, k0, k1);
    else  // tile by tile, every unit (the same grid from k0 as one walk over [k0, k1))
      for (index_t kt = k0; kt < k1; kt += bc)
        for (index_t ui = 0; ui < task.count; ++ui) walk_unit(ui, kt, std::min(k1, kt + bc));
    for (index_t ui = 0; ui < task.count; ++ui) {
      const Unit& u = units[static_cast<std::size_t>(task.unit + ui)];
      const Partial<Acc>& part = sc.part[static_cast<std::size_t>(ui)];
      for (index_t r = 0; r < rows; ++r) {
        if (u.splits == 1) {
          part.write_row(r, sc.row);
          finish_row(u, r, sc.row.data(), part.lse(r));
        } else {
          const index_t at = (u.slot + task.split) * max_rows + r;
          Eigen::Map<Eigen::Matrix<Acc, 1, Eigen::Dynamic>> dst(&part_out[at * dv], dv);
          part.write_row(r, dst);
          part_lse[static_cast<std::size_t>(at)] = part.lse(r);
        }
      }
    }
  };

  if (opt.stats) *opt.stats = AttentionStats{};
  const index_t n_tasks = static_cast<index_t>(tasks.size());
  parallel_tasks(n_tasks, std::min<index_t>(threads, n_tasks), make_scratch, run_task,
                 [&](const Scratch& sc) { sc.walk.add_to(opt.stats); });
  if (slots == 0) return;

  // ---- merge the splits of each unit, in split order -----------------------------------------
  std::vector<index_t> split_units;
  for (index_t ui = 0; ui < n_units; ++ui)
    if (units[static_cast<std::size_t>(ui)].splits > 1) split_units.push_back(ui);
  struct None {};
  const index_t n_merge = static_cast<index_t>(split_units.size());
  // O(rows · splits · Dv) work: one thread, no second parallel region per call.
  parallel_tasks(
      n_merge, 1, [] { return std::make_unique<None>(); },
      [&](None&, index_t t) {
        const Unit& u = units[static_cast<std::size_t>(split_units[static_cast<std::size_t>(t)])];
        for (index_t r = 0; r < u.heads * u.n; ++r) {
          const index_t a = u.slot * max_rows + r;
          Acc* acc = &part_out[static_cast<std::size_t>(a * dv)];
          Acc lse = part_lse[static_cast<std::size_t>(a)];
          for (index_t sp = 1; sp < u.splits; ++sp) {
            const index_t bi = (u.slot + sp) * max_rows + r;
            merge_row<Acc>(acc, 1, lse, &part_out[static_cast<std::size_t>(bi * dv)], 1,
                           part_lse[static_cast<std::size_t>(bi)], dv);
          }
          finish_row(u, r, acc, lse);
        }
      },
      [](const None&) {});
}

}  // namespace detail
}  // namespace attn
