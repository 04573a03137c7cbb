// attn/options.hpp — options shared by every entry point, the problem shape,
// and the one exception type.
#pragma once

#include "attn/tensor_view.hpp"

#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

namespace attn {

/// Thrown for every invalid argument, before any output is written. The
/// message names the argument and the numbers.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
/// Builds "attn: <parts...>" and throws attn::Error.
template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  os << "attn: ";
  (os << ... << parts);
  throw Error(os.str());
}
}  // namespace detail

/// What one call computed, for FLOP accounting (filled when
/// AttentionOptions::stats is set). Counts are summed over all tasks.
struct AttentionStats {
  std::int64_t full_tiles = 0;     ///< tiles computed without a per-element mask test
  std::int64_t partial_tiles = 0;  ///< tiles computed with a per-element mask test
  std::int64_t skipped_tiles = 0;  ///< tiles inside the key range that the mask ruled out
  std::int64_t scores = 0;         ///< computed q·k scores (rows × keys over computed tiles)
  /// Multiply-adds ×2 of the two GEMMs: 2·scores·(D + Dv).
  double flops(index_t d, index_t dv) const {
    return 2.0 * static_cast<double>(scores) * static_cast<double>(d + dv);
  }
};

/// Where a call's queries and keys sit in a longer sequence (a KV cache, a
/// ring shard, a varlen segment). Query row i of the call is global query
/// q_offset + i of a sequence of q_length queries; key j is global key
/// k_offset + j of k_length keys. A length of 0 means offset + the call's own
/// length. Masks and score modifiers are bound to the global lengths and see
/// global indices, so a sharded or cached computation equals the one-shot one
/// (bool_mask and additive_bias views are indexed globally too).
struct Positions {
  index_t q_offset = 0;
  index_t k_offset = 0;
  index_t q_length = 0;
  index_t k_length = 0;
};

/// Options common to the attention entry points. Every field has a default
/// that is right for most callers.
struct AttentionOptions {
  /// Multiplier of q·k. Not set: 1/sqrt(D), D the head dim of q and k.
  std::optional<double> scale;
  /// Worker threads. 0: all that OpenMP offers (1 without OpenMP).
  int num_threads = 0;
  /// Query rows per tile. 0: chosen by the library (see detail::TileTraits).
  index_t block_q = 0;
  /// Keys per tile. 0: chosen by the library.
  index_t block_k = 0;
  /// Optional output: natural-log log-sum-exp of each row's scaled, modified,
  /// masked scores, [B, Hq, Lq]; -inf for a row that sees no key. Leave
  /// default-constructed to skip it.
  TensorView<float, 3> lse;
  /// Optional output: what was computed (tiles, scores). Not thread-safe to
  /// share between concurrent calls.
  AttentionStats* stats = nullptr;
  /// Global positions of the queries and keys (default: the call is the whole sequence).
  Positions positions;
};

/// The sizes of one attention problem, as read from q, k, v.
struct AttentionShape {
  index_t batch = 0;     ///< B
  index_t q_heads = 0;   ///< Hq
  index_t kv_heads = 0;  ///< Hkv, divides Hq
  index_t lq = 0;        ///< query length
  index_t lk = 0;        ///< key/value length
  index_t d = 0;         ///< head dim of q and k
  index_t dv = 0;        ///< head dim of v and the output

  /// Key/value head read by query head `h` (GQA/MQA).
  index_t kv_head(index_t h) const { return h / (q_heads / kv_heads); }
  /// Alignment offset Lk - Lq of bottom-right masks: query i sits at key position i + offset.
  index_t diagonal_offset() const { return lk - lq; }
};

}  // namespace attn
