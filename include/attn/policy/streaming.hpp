// attn/policy/streaming.hpp — StreamingLLM's mask: the first tokens plus a
// sliding window, for streams longer than any cache.
//
// Query i (bottom-right aligned, at key position p = i + Lk - Lq) sees key j iff
//   j <= p  and  (j < sink_tokens  or  j >= p - window)
// i.e. the first sink_tokens keys (the "attention sinks" that absorb weight)
// and itself with the `window` keys before it. Tiles between the sinks and a
// query tile's window are skipped (key_range + next_key), so a step costs
// O(sink_tokens + window), whatever the stream's length.
#pragma once

#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>

namespace attn {

struct StreamingMask : MaskPolicy {
  static constexpr bool always_full = false;
  index_t sink_tokens = 0;
  index_t window = 0;
  index_t offset = 0;  // Lk - Lq
  index_t lk = 0;

  StreamingMask bind(const AttentionShape& s) const {
    if (sink_tokens < 0) detail::fail("streaming sink_tokens is ", sink_tokens, ", must be >= 0");
    if (window < 0) detail::fail("streaming window is ", window, ", must be >= 0");
    StreamingMask m = *this;
    m.offset = s.diagonal_offset();
    m.lk = s.lk;
    return m;
  }
  bool keep(index_t, index_t, index_t q, index_t k) const {
    const index_t p = q + offset;
    return k <= p && (k < sink_tokens || k >= p - window);
  }
  KeyRange key_range(index_t, index_t, index_t, index_t q1) const {
    return {0, std::clamp<index_t>(q1 - 1 + offset + 1, 0, lk)};
  }
  /// First key >= k that a row of [q0, q1) may see: k among the sinks, else
  /// no earlier than the first row's window.
  index_t next_key(index_t, index_t, index_t q0, index_t, index_t k) const {
    return k < sink_tokens ? k : std::max(k, q0 + offset - window);
  }
  TileKind classify(index_t, index_t, index_t q0, index_t q1, index_t k0, index_t k1) const {
    const index_t p0 = q0 + offset, p1 = q1 - 1 + offset;  // first and last row's position
    if (k0 > p1) return TileKind::empty;                   // past every row's diagonal
    if (k0 >= sink_tokens && k1 - 1 < p0 - window) return TileKind::empty;  // before every window
    const bool causal_full = k1 - 1 <= p0;
    const bool band_full = k1 <= sink_tokens || k0 >= p1 - window;
    return causal_full && band_full ? TileKind::full : TileKind::partial;
  }
};

/// StreamingLLM: keep the first `sink_tokens` keys and a causal window of
/// `window` keys before each query (plus itself).
inline StreamingMask streaming(index_t sink_tokens, index_t window) {
  StreamingMask m;
  m.sink_tokens = sink_tokens;
  m.window = window;
  return m;
}

}  // namespace attn
