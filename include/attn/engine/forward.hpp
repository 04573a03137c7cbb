// attn/engine/forward.hpp — the tiled online-softmax ("flash") forward.
//
// Every softmax-attention variant of attn (dense, masked, causal, sliding
// window, block-sparse) is this function with another mask policy and score
// modifier. Each task of the schedule (batch b, query head h, query tile of
// Br rows) scales its query rows once, walks the key tiles its mask allows
// (engine/walk.hpp) into a Partial (engine/partial.hpp), and finalizes:
//
//   out = O / l;  lse = m + log(l)  (zeros and -inf for rows that see no key)
//
// Scratch is O(Br·Bc + Br·(D+Dv) + Bc·(D+Dv)) per worker, allocated once per
// call; nothing grows with Lq·Lk. A task's arithmetic depends only on the
// task, so results are bitwise identical for any thread count.
#pragma once

#include "attn/core/types.hpp"
#include "attn/detail/checks.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/engine/partial.hpp"
#include "attn/engine/schedule.hpp"
#include "attn/engine/walk.hpp"
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

namespace attn {
namespace detail {

/// Tile constants (see PERF.md: 128 × 256 was the best simple choice at
/// D = 64 and 128 on the target machine).
struct TileTraits {
  static constexpr index_t block_q = 128;
  static constexpr index_t block_k = 256;
  static_assert(block_q > 0 && block_k > 0, "tiles must be non-empty");
};

/// Per-worker scratch of the forward.
template <class Acc>
struct ForwardScratch {
  RowMatrix<Acc> q;  // (Br, D) scaled query tile
  Partial<Acc> part;
  WalkScratch<Acc> walk;
  ForwardScratch(index_t br, index_t bc, index_t d, index_t dv, bool pack_k, bool pack_v)
      : q(br, d), part(br, dv), walk(br, bc, d, dv, pack_k, pack_v) {}
};

/// The engine. Arguments are already checked; mask and mod are bound to the
/// global shape (AttentionOptions::positions).
template <class Acc, class Q, class KV, class O, class Mask, class Mod>
void flash_forward(const TensorView<const Q, 4>& q, const KV& kv, const TensorView<O, 4>& out,
                   const AttentionShape& shape, const Mask& mask, const Mod& mod,
                   const AttentionOptions& opt) {
  const Acc scale =
      static_cast<Acc>(opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(shape.d))));
  const index_t br = std::min(opt.block_q > 0 ? opt.block_q : TileTraits::block_q, shape.lq);
  const index_t bc = std::min(opt.block_k > 0 ? opt.block_k : TileTraits::block_k, shape.lk);
  const Schedule schedule(shape, br);
  const index_t tasks = schedule.tasks();
  const int threads = resolve_threads(opt.num_threads, tasks);
  const bool want_lse = !opt.lse.is_null();
  const bool pack_k = kv.template packs_keys<Acc>(), pack_v = kv.template packs_values<Acc>();
  const AttentionShape global = global_shape(shape, opt.positions);
  const DropoutGen drop =
      DropoutGen::bind(opt.dropout, shape.batch, shape.q_heads, global.lq, global.lk);
  const Walk<Acc, KV, Mask, Mod> walk{
      kv, mask, mod, bc, shape.d, shape.dv, opt.positions.k_offset, &drop};

  auto make_scratch = [&] {
    return std::make_unique<ForwardScratch<Acc>>(br, bc, shape.d, shape.dv, pack_k, pack_v);
  };

  auto run_task = [&](ForwardScratch<Acc>& sc, index_t t) {
    const Task task = schedule(t);
    const index_t b = task.b, h = task.h, rows = task.rows;
    const index_t q_pos = opt.positions.q_offset + task.q0;  // global position of the first row

    auto qs = sc.q.topRows(rows);
    qs = matrix(q, b, h).middleRows(task.q0, rows).template cast<Acc>() * scale;  // (rows, D)
    sc.part.reset(rows);
    const KeyRange kr = walk.key_range(b, h, q_pos, q_pos + rows);
    walk.run(sc.walk, sc.part, b, h, shape.kv_head(h), q_pos, qs.data(), kr.begin, kr.end);

    // out = O / l; rows that saw no key (l = 0) give zeros and lse = -inf;
    // a NaN score makes l NaN, and the row and its lse stay NaN.
    auto dst = matrix(out, b, h).middleRows(task.q0, rows);
    for (index_t r = 0; r < rows; ++r) {
      sc.part.write_row(r, dst.row(r));
      if (want_lse) opt.lse(b, h, task.q0 + r) = static_cast<float>(sc.part.lse(r));
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
