// attn/ops/varlen.hpp — attention over a packed batch of sequences of
// different lengths (FlashAttention's varlen interface).
//
// Sequence s owns query rows [cu_seqlens_q[s], cu_seqlens_q[s+1]) and keys
// [cu_seqlens_k[s], cu_seqlens_k[s+1]) of one packed buffer, with no padding.
// Every mask and score modifier applies within each sequence, bound to that
// sequence's own lengths (Lq_s, Lk_s) as a call of batch 1: causal() is
// bottom-right aligned per sequence, key 0 is the sequence's first key. The
// result equals one masked_attention call per sequence.
#pragma once

#include "attn/core/types.hpp"
#include "attn/detail/checks.hpp"
#include "attn/engine/forward.hpp"
#include "attn/engine/segments.hpp"
#include "attn/kv/strided.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <type_traits>
#include <vector>

namespace attn {

namespace detail {

/// Checks cumulative lengths: n + 1 entries, starting at 0, non-decreasing, ending at `total`.
template <class Int>
void check_cu_seqlens(const std::vector<Int>& cu, index_t total, const char* name) {
  static_assert(std::is_integral<Int>::value, "attn: cu_seqlens hold integers");
  if (cu.size() < 2) fail(name, " has ", cu.size(), " entries, needs at least 2 (n sequences + 1)");
  if (cu.front() != 0) fail(name, "[0] is ", cu.front(), ", must be 0");
  for (std::size_t s = 0; s + 1 < cu.size(); ++s)
    if (cu[s + 1] < cu[s])
      fail(name, "[", s + 1, "] = ", cu[s + 1], " is less than ", name, "[", s, "] = ", cu[s]);
  if (static_cast<index_t>(cu.back()) != total)
    fail(name, " ends at ", cu.back(), ", but the packed length is ", total);
}

}  // namespace detail

/// Packed varlen attention. q [1, Hq, total_q, D], k [1, Hkv, total_k, D],
/// v [1, Hkv, total_k, Dv], out [1, Hq, total_q, Dv] (bshd(ptr, 1, total, H, D)
/// views a FlashAttention [total, H, D] buffer); options.lse [1, Hq, total_q].
/// cu_seqlens_q / cu_seqlens_k: n + 1 offsets each. options.positions must be
/// left default (each sequence starts at position 0).
template <class Q, class K, class V, class O, class Int, class Mask = NoMask,
          class Mod = NoScoreMod>
void varlen_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                      const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                      const std::vector<Int>& cu_seqlens_q, const std::vector<Int>& cu_seqlens_k,
                      const Mask& mask = {}, const Mod& score_mod = {},
                      const AttentionOptions& options = {}) {
  static_assert(detail::is_storage_type_v<std::remove_cv_t<Q>> &&
                    detail::is_storage_type_v<std::remove_cv_t<K>> &&
                    detail::is_storage_type_v<std::remove_cv_t<V>> && detail::is_storage_type_v<O>,
                "attn: element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(!std::is_const<O>::value, "attn: the output view must be writable");
  static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
  static_assert(is_score_mod_v<Mod>,
                "attn: the score_mod argument must be a score modifier (attn/score_mod.hpp)");
  using detail::fail;
  const AttentionShape shape = detail::check_attention(q, k, v, out, options);
  if (shape.batch != 1)
    fail("varlen_attention takes packed sequences as batch 1, but q has batch ", shape.batch);
  const Positions none{};
  if (options.positions.q_offset != none.q_offset || options.positions.k_offset != none.k_offset ||
      options.positions.q_length != none.q_length || options.positions.k_length != none.k_length)
    fail("varlen_attention takes positions from cu_seqlens; options.positions must be default");
  if (options.dropout.p != 0)
    fail("this entry point has no dropout (inference); options.dropout.p is ", options.dropout.p);
  detail::check_cu_seqlens(cu_seqlens_q, shape.lq, "cu_seqlens_q");
  detail::check_cu_seqlens(cu_seqlens_k, shape.lk, "cu_seqlens_k");
  if (cu_seqlens_q.size() != cu_seqlens_k.size())
    fail("cu_seqlens_q has ", cu_seqlens_q.size(), " entries, cu_seqlens_k ", cu_seqlens_k.size(),
         "; both need n + 1");

  // Bind the policies per sequence (they check themselves), then schedule.
  const std::size_t n = cu_seqlens_q.size() - 1;
  std::vector<Mask> masks;
  std::vector<Mod> mods;
  masks.reserve(n);
  mods.reserve(n);
  for (std::size_t s = 0; s < n; ++s) {
    AttentionShape g = shape;
    g.lq = static_cast<index_t>(cu_seqlens_q[s + 1] - cu_seqlens_q[s]);
    g.lk = static_cast<index_t>(cu_seqlens_k[s + 1] - cu_seqlens_k[s]);
    masks.push_back(mask.bind(g));
    mods.push_back(score_mod.bind(g));
    detail::check_policy_views(masks.back(), out, options.lse);
    detail::check_policy_views(mods.back(), out, options.lse);
  }
  std::vector<detail::Segment<Mask, Mod>> segs(n);
  for (std::size_t s = 0; s < n; ++s) {
    auto& sg = segs[s];
    sg.q_begin = static_cast<index_t>(cu_seqlens_q[s]);
    sg.rows = static_cast<index_t>(cu_seqlens_q[s + 1] - cu_seqlens_q[s]);
    sg.k_begin = static_cast<index_t>(cu_seqlens_k[s]);
    sg.k_len = static_cast<index_t>(cu_seqlens_k[s + 1] - cu_seqlens_k[s]);
    sg.mask = &masks[s];
    sg.mod = &mods[s];
  }
  using Acc = detail::accum_t<Q, K, V, O>;
  const detail::StridedKV<std::remove_cv_t<K>, std::remove_cv_t<V>> kv{k, v};
  const index_t br = options.block_q > 0 ? options.block_q : detail::TileTraits::block_q;
  const index_t bc = options.block_k > 0 ? options.block_k : detail::TileTraits::block_k;
  detail::segment_forward<Acc, std::remove_cv_t<Q>>(q, kv, out, segs, shape.q_heads, shape.kv_heads,
                                                    shape.d, shape.dv, br, bc, options);
}

}  // namespace attn
