// attn/engine/forward.hpp — the tiled online-softmax ("flash") forward.
//
// Every softmax-attention variant of attn (dense, masked, causal, sliding
// window, block-sparse) is this function with another mask policy and score
// modifier. The call picks its kernels once (kernels/dispatch.hpp), packs K
// and V in their layouts (kv/packed.hpp: once for the call when query tiles
// or GQA heads share them), then each task of the schedule (batch b, query
// head h, query tile of Br rows) scales its query rows once, walks the key
// tiles its mask allows (engine/walk.hpp) into a Partial
// (engine/partial.hpp), and finalizes:
//
//   out = O / l;  lse = m + log(l)  (zeros and -inf for rows that see no key)
//
// Scratch is O(Br·Bc + Br·(D+Dv) + Bc·(D+Dv)) per worker, allocated once per
// call, plus at most one packed copy of K and V (O(N·D)); nothing grows with
// Lq·Lk. A task's arithmetic depends only on the task and the instruction
// set, so results are bitwise identical for any thread count.
#pragma once

#include "attn/core/types.hpp"
#include "attn/detail/checks.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/engine/partial.hpp"
#include "attn/engine/schedule.hpp"
#include "attn/engine/segments.hpp"
#include "attn/engine/walk.hpp"
#include "attn/kernels/dispatch.hpp"
#include "attn/kv/packed.hpp"
#include "attn/kv/strided.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include "attn/core/eigen.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace attn {
namespace detail {

/// Tile constants (see PERF.md: 128 × 256 was the best simple choice at
/// D = 64 and 128 on the target machine; 128 rows split into register-tile
/// blocks of 13 and 12 rows on AVX-512, see kernels/body.inl RowBlocks).
/// block_q_wide: rows per tile of the forward when keys are many (below).
struct TileTraits {
  static constexpr index_t block_q = 128;
  static constexpr index_t block_k = 256;
  static constexpr index_t block_q_wide = 256;
  static_assert(block_q > 0 && block_k > 0, "tiles must be non-empty");
};

/// Rows per query tile of the forward when AttentionOptions::block_q is 0.
/// Each query tile reads every key and value tile it may see; once K and V
/// outgrow L2 they come from L3, so twice the rows per tile halves that
/// traffic per FLOP: 256-row tiles ran dense and causal calls 2-29% faster
/// than 128 (one thread, N = 2048-4096, D = 64-128, Emerald Rapids). They are
/// used when a tile in the middle of the queries sees at least 1024 keys (so
/// a window or a band does not visit more masked keys) and the call still
/// has 16 or more tasks. A causal diagonal costs no more at 256 rows: the
/// walk computes a partial tile in 64-row groups, each only up to its last
/// visible key (walk.hpp). The choice depends on the shape and mask only,
/// never on the thread count, so results stay bitwise identical for any count.
template <class Mask>
index_t default_block_q(const AttentionShape& shape, const Mask& mask, index_t q_offset) {
  constexpr index_t wide = TileTraits::block_q_wide;
  const index_t tiles = (shape.lq + wide - 1) / wide;
  if (shape.lq < 2 * wide || shape.batch * shape.q_heads * tiles < 16) return TileTraits::block_q;
  const index_t q0 = q_offset + shape.lq / 2 / wide * wide;
  const KeyRange keys = mask.key_range(0, 0, q0, std::min(q0 + wide, q_offset + shape.lq));
  return keys.end - keys.begin >= 4 * wide ? wide : TileTraits::block_q;
}

/// Per-worker scratch of the forward.
template <class Acc>
struct ForwardScratch {
  RowMatrix<Acc> q;  // (Br, D) scaled query tile (fp products)
  Partial<Acc> part;
  WalkScratch<Acc> walk;
  template <class PKV>
  ForwardScratch(index_t br, index_t bc, const PKV& kv)
      : q(kv.bf16 ? 0 : br, kv.d), part(br, kv.dv, kv.dvp), walk(br, bc, kv) {}
};

/// The engine. Arguments are already checked; mask and mod are bound to the
/// global shape (AttentionOptions::positions).
template <class Acc, class Q, class K, class V, class O, class Mask, class Mod>
void flash_forward(const TensorView<const Q, 4>& q, const StridedKV<K, V>& src,
                   const TensorView<O, 4>& out, const AttentionShape& shape, const Mask& mask,
                   const Mod& mod, const AttentionOptions& opt) {
  const Isa isa = active_isa();
  const kernels::KernelSet<Acc>& ks = kernels::kernel_set<Acc>(isa);
  using Packed = PackedKV<Acc, StridedKV<K, V>>;
  // bf16 q, k and v on an AVX512-BF16 CPU: products on bf16 pairs (vdpbf16ps),
  // or on AMX tiles (tdpbf16ps) when the head dim is whole 32-element steps.
  constexpr bool bf16_storage = Packed::bf16_storage && std::is_same<Q, Eigen::bfloat16>::value;
  const bool use_bf16 =
      ATTN_KERNELS_X86 && bf16_storage && (isa == Isa::avx512_bf16 || isa == Isa::amx_bf16);

  const Acc scale =
      static_cast<Acc>(opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(shape.d))));
  const index_t br =
      std::min(opt.block_q > 0 ? opt.block_q : default_block_q(shape, mask, opt.positions.q_offset),
               shape.lq);
  const index_t bc = std::min(opt.block_k > 0 ? opt.block_k : TileTraits::block_k, shape.lk);
  const AttentionShape global = global_shape(shape, opt.positions);
  const DropoutGen drop =
      DropoutGen::bind(opt.dropout, shape.batch, shape.q_heads, global.lq, global.lk);
  // Few query rows per GQA group (decoding), or sinks: the segment schedule,
  // which reads each K/V tile once per group and splits long key ranges.
  if (shape.lq * (shape.q_heads / shape.kv_heads) <= SplitTraits::stack_rows ||
      !opt.sinks.is_null()) {
    std::vector<Segment<Mask, Mod>> segs(static_cast<std::size_t>(shape.batch));
    for (index_t b = 0; b < shape.batch; ++b) {
      Segment<Mask, Mod>& sg = segs[static_cast<std::size_t>(b)];
      sg.q_batch = sg.kv_batch = sg.mask_batch = b;
      sg.rows = shape.lq;
      sg.k_len = shape.lk;
      sg.q_pos = opt.positions.q_offset;
      sg.k_pos = opt.positions.k_offset;
      sg.mask = &mask;
      sg.mod = &mod;
      sg.dropout = &drop;
    }
    segment_forward<Acc, Q>(q, src, out, segs, shape.q_heads, shape.kv_heads, shape.d, shape.dv, br,
                            bc, opt);
    return;
  }
  const Schedule schedule(shape, br);
  const index_t tasks = schedule.tasks();
  const int threads = resolve_threads(opt.num_threads, tasks);
  const bool want_lse = !opt.lse.is_null();

  // Pack once for the call when more than one query tile or query head reads each key.
  Packed kv(src, ks, use_bf16, shape.d, shape.dv, bc,
            schedule.q_tiles() * (shape.q_heads / shape.kv_heads) > 1, shape.kv_heads);
#if ATTN_KERNELS_X86
  kv.amx = use_bf16 && isa == Isa::amx_bf16 && kernels::amx_bf16::takes_depth(shape.d);
#endif
  kv.pack_all(shape.batch, opt.num_threads);
  const Walk<Acc, Packed, Mask, Mod> walk{
      kv, mask, mod, bc, shape.d, shape.dv, opt.positions.k_offset, scale, &drop};

  auto make_scratch = [&] { return std::make_unique<ForwardScratch<Acc>>(br, bc, kv); };

  auto run_task = [&](ForwardScratch<Acc>& sc, index_t t) {
    const Task task = schedule(t);
    const index_t b = task.b, h = task.h, rows = task.rows;
    const index_t q_pos = opt.positions.q_offset + task.q0;  // global position of the first row

    if (use_bf16) {
      if constexpr (bf16_storage)  // as stored; the kernel scales the fp32 sums
        kernels::pack_qb(q.data() + b * q.stride(0) + h * q.stride(1) + task.q0 * q.stride(2),
                         q.stride(2), q.stride(3), rows, shape.d, sc.walk.qb.data(), kv.dpad);
    } else {
      sc.q.topRows(rows) =
          matrix(q, b, h).middleRows(task.q0, rows).template cast<Acc>() * scale;  // (rows, D)
    }
    sc.part.reset(rows);
    const KeyRange kr = walk.key_range(b, h, q_pos, q_pos + rows);
    walk.run(sc.walk, sc.part, b, h, shape.kv_head(h), q_pos, sc.q.data(), kr.begin, kr.end);

    // out = O / l; rows that saw no key (l = 0) give zeros and lse = -inf;
    // a NaN score makes l NaN, and the row and its lse stay NaN.
    auto dst = matrix(out, b, h).middleRows(task.q0, rows);
    for (index_t r = 0; r < rows; ++r) {
      sc.part.write_row(r, dst.row(r));
      if (want_lse) opt.lse.set(b, h, task.q0 + r, static_cast<double>(sc.part.lse(r)));
    }
  };

  if (opt.stats) *opt.stats = AttentionStats{};
  parallel_tasks(tasks, threads, make_scratch, run_task,
                 [&](const ForwardScratch<Acc>& sc) { sc.walk.add_to(opt.stats); });
}

/// Entry used by every softmax-attention variant: checks everything, binds
/// the policies to the global shape (which check themselves), then runs the
/// engine.
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
  const AttentionShape global = global_shape(shape, opt.positions);
  const Mask bound_mask = mask.bind(global);
  const Mod bound_mod = mod.bind(global);
  check_policy_views(bound_mask, out, opt.lse);
  check_policy_views(bound_mod, out, opt.lse);
  using Acc = accum_t<Q, K, V, O>;
  using KT = std::remove_cv_t<K>;
  using VT = std::remove_cv_t<V>;
  const StridedKV<KT, VT> kv{k, v};
  flash_forward<Acc, std::remove_cv_t<Q>>(q, kv, out, shape, bound_mask, bound_mod, opt);
}

}  // namespace detail
}  // namespace attn
