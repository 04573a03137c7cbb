// attn/sliding_window.hpp — the (left, right) window mask and local attention
// in O(Lq·W) time.
//
// FlashAttention's `window_size = (left, right)`, aligned to the bottom-right
// like attn::causal(): with offset = Lk - Lq, query i sees key j iff
//
//   i + offset - left  <=  j  <=  i + offset + right
//
// and a negative bound means unbounded on that side, so window(-1, 0) is
// causal() and window(-1, -1) is no mask. The mask gives the engine the band
// as its key range, so key tiles outside the band are never visited, and it
// classifies each visited tile by index arithmetic: work is O(Lq·(W + Br + Bc))
// with W = left + right + 1, not O(Lq·Lk).
#pragma once

#include "attn/engine/forward.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <type_traits>

namespace attn {

// ----------------------------------------------------------------- window --

/// Sliding-window mask: query i sees key j iff
/// i + (Lk-Lq) - left <= j <= i + (Lk-Lq) + right; a negative bound is
/// unbounded on that side. Build it with attn::window(left, right).
struct Window : MaskPolicy {
  static constexpr bool always_full = false;
  index_t left = -1;   ///< keys before the diagonal; < 0: unbounded
  index_t right = -1;  ///< keys after the diagonal; < 0: unbounded
  index_t offset = 0;  ///< Lk - Lq once bound
  index_t lk = 0;      ///< Lk once bound
  index_t lq = 0;      ///< Lq once bound

  /// Binds to the problem. A bound of Lq + Lk or more reaches past every key,
  /// so it is stored as unbounded (this also keeps the index arithmetic
  /// below free of overflow for huge bounds).
  Window bind(const AttentionShape& s) const {
    Window m = *this;
    const index_t reach = s.lq + s.lk;
    if (m.left >= reach) m.left = -1;
    if (m.right >= reach) m.right = -1;
    m.offset = s.diagonal_offset();
    m.lk = s.lk;
    m.lq = s.lq;
    return m;
  }

  /// First key row q may see: q + offset - left (or 0 when unbounded on the left).
  index_t lo(index_t q) const { return left < 0 ? 0 : q + offset - left; }
  /// Last key row q may see: q + offset + right (or Lk - 1 when unbounded on the right).
  index_t hi(index_t q) const { return right < 0 ? lk - 1 : q + offset + right; }

  bool keep(index_t, index_t, index_t q, index_t k) const { return lo(q) <= k && k <= hi(q); }

  /// Queries that see a key of [k0, k1): key k lies in row q's band iff
  /// k - offset - right <= q <= k - offset + left (for the backward's key-tile walk).
  KeyRange query_range(index_t, index_t, index_t k0, index_t k1) const {
    const index_t first = right < 0 ? 0 : k0 - offset - right;
    const index_t last = left < 0 ? lq - 1 : k1 - 1 - offset + left;
    return {std::clamp<index_t>(first, 0, lq), std::clamp<index_t>(last + 1, 0, lq)};
  }

  /// The keys row q sees, exactly: [lo(q), hi(q) + 1] cut to [0, Lk), so the
  /// engine masks a partial tile by filling outside one interval per row.
  KeyRange row_keys(index_t, index_t, index_t q) const {
    return {std::clamp<index_t>(lo(q), 0, lk), std::clamp<index_t>(hi(q) + 1, 0, lk)};
  }

  /// Keys any row of [q0, q1) sees: [lo(q0), hi(q1 - 1)], both bounds grow with q.
  KeyRange key_range(index_t, index_t, index_t q0, index_t q1) const {
    return {std::clamp<index_t>(lo(q0), 0, lk), std::clamp<index_t>(hi(q1 - 1) + 1, 0, lk)};
  }

  /// The band is monotone in q, so the corners decide: empty when the tile
  /// lies wholly left of the first row's band or right of the last row's;
  /// full when the last row's band starts at or before k0 and the first
  /// row's band ends at or after k1 - 1.
  TileKind classify(index_t, index_t, index_t q0, index_t q1, index_t k0, index_t k1) const {
    if (k1 - 1 < lo(q0) || k0 > hi(q1 - 1)) return TileKind::empty;
    if (lo(q1 - 1) <= k0 && k1 - 1 <= hi(q0)) return TileKind::full;
    return TileKind::partial;
  }
};

/// Sliding window (left, right) in FlashAttention's convention: query i sees
/// keys i + (Lk-Lq) - left ... i + (Lk-Lq) + right; a negative bound is
/// unbounded on that side. window(W - 1, 0) is a causal window of W keys;
/// window(-1, 0) is causal(); window(w, w) is a symmetric band of 2w + 1 keys.
inline Window window(index_t left, index_t right) {
  Window w;
  w.left = left;
  w.right = right;
  return w;
}

// ------------------------------------------------------------ entry point --

/// Attention restricted to a sliding window, in O(Lq·(W + Br + Bc)·(D + Dv))
/// time for a window of W = left + right + 1 keys.
///
/// `mask` (optional) further restricts which keys are seen (e.g.
/// key_padding(...), causal()): a key is kept iff the window and the mask
/// both keep it. `score_mod` as in masked_attention. Shapes, types and errors
/// as in scaled_dot_product_attention. A row whose window holds no key (only
/// possible when Lq > Lk, or under an extra mask) outputs zeros and lse -inf.
/// options.stats counts the computed tiles: the tiles outside the band are
/// never visited.
template <class Q, class K, class V, class O, class Mask = NoMask, class Mod = NoScoreMod>
void sliding_window_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                              const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                              const Window& window, const Mask& mask = {},
                              const Mod& score_mod = {}, const AttentionOptions& options = {}) {
  static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
  detail::check_stats_policy_views(options.stats, mask, score_mod);
  detail::attention_entry(q, k, v, out, window & mask, score_mod, options);
}

/// Same, with options and no extra mask or score modifier.
template <class Q, class K, class V, class O>
void sliding_window_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                              const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                              const Window& window, const AttentionOptions& options) {
  detail::attention_entry(q, k, v, out, window, no_score_mod(), options);
}

}  // namespace attn
