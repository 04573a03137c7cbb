// attn/options.hpp — options shared by every entry point, the problem shape,
// and the one exception type.
#pragma once

#include "attn/core/error.hpp"
#include "attn/tensor_view.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

namespace attn {

/// What one call computed, for FLOP accounting (filled when
/// AttentionOptions::stats is set). Counts are summed over all tasks.
struct AttentionStats {
  std::int64_t full_tiles = 0;     ///< tiles computed without a per-element mask test
  std::int64_t partial_tiles = 0;  ///< tiles computed with a per-element mask test
  std::int64_t skipped_tiles = 0;  ///< tiles inside the key range that the mask ruled out
  std::int64_t scores = 0;         ///< computed q·k scores (rows × keys over computed tiles)
  /// Adds another share of the same call's counters (one worker's).
  void add(const AttentionStats& o) {
    full_tiles += o.full_tiles;
    partial_tiles += o.partial_tiles;
    skipped_tiles += o.skipped_tiles;
    scores += o.scores;
  }
  /// Multiply-adds ×2 of the two GEMMs: 2·scores·(D + Dv).
  double flops(index_t d, index_t dv) const {
    return 2.0 * static_cast<double>(scores) * static_cast<double>(d + dv);
  }
};

/// Dropout on the attention probabilities: each probability is kept with
/// probability 1 - p and then scaled by 1 / (1 - p). The keep decision of
/// (batch, query head, query, key) is a pure function of (seed, offset, batch,
/// head, query, key) from the counter-based Philox-4x32-10 generator, so the
/// backward regenerates it and nothing depends on threads or tiles. p = 0
/// (the default) is no dropout.
struct Dropout {
  double p = 0;              ///< drop probability, in [0, 1)
  std::uint64_t seed = 0;    ///< the generator's key
  std::uint64_t offset = 0;  ///< a counter word, < 2^32: e.g. the step or layer number
  bool enabled() const { return p > 0; }
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

/// Where a forward writes each row's log-sum-exp, [B, Hq, Lq]: a float view
/// (what a float or half/bf16 call keeps; FlashAttention's softmax_lse) or a
/// double one, which keeps a double call's lse to double rounding, so that a
/// double backward recomputes P = exp(s - lse) to double precision (a float lse
/// of a row whose lse is 1000 is off by up to 3e-5, and P with it). Either
/// converts implicitly: `options.lse = TensorView<double, 3>(...)`. The null
/// view (default) asks for no lse.
class LseView {
 public:
  LseView() = default;
  LseView(const TensorView<float, 3>& v) : f_(v) {}   // NOLINT(google-explicit-constructor)
  LseView(const TensorView<double, 3>& v) : d_(v) {}  // NOLINT(google-explicit-constructor)

  bool is_null() const { return f_.is_null() && d_.is_null(); }
  bool is_double() const { return !d_.is_null(); }
  index_t extent(int i) const { return is_double() ? d_.extent(i) : f_.extent(i); }
  /// The view held: float_view() is null when this holds a double view, and
  /// double_view() when it holds a float one.
  const TensorView<float, 3>& float_view() const { return f_; }
  const TensorView<double, 3>& double_view() const { return d_; }
  /// Calls f with the view this holds (the float one when null); returns what f returns.
  template <class F>
  decltype(auto) visit(F&& f) const {
    return is_double() ? f(d_) : f(f_);
  }
  /// Writes element (b, h, i), rounded to the view's type.
  void set(index_t b, index_t h, index_t i, double x) const {
    if (is_double())
      d_(b, h, i) = x;
    else
      f_(b, h, i) = static_cast<float>(x);
  }
  /// The same rows, query positions [i0, i0 + n) of the last dimension.
  LseView columns(index_t i0, index_t n) const {
    return visit([&](const auto& v) -> LseView {
      using View = std::decay_t<decltype(v)>;
      return View(v.data() + i0 * v.stride(2), {v.extent(0), v.extent(1), n}, v.strides());
    });
  }

 private:
  TensorView<float, 3> f_;
  TensorView<double, 3> d_;
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
  /// masked scores, [B, Hq, Lq], float or double (LseView); -inf for a row
  /// that sees no key. Leave default-constructed to skip it.
  LseView lse;
  /// Optional output: what was computed (tiles, scores). Not thread-safe to
  /// share between concurrent calls.
  AttentionStats* stats = nullptr;
  /// Dropout on the probabilities (training); off by default.
  Dropout dropout;
  /// Global positions of the queries and keys (default: the call is the whole sequence).
  Positions positions;
  /// Optional attention sinks: one logit per query head, [Hq], that joins
  /// each row's softmax denominator and nothing else (gpt-oss):
  /// out = Σ exp(s_j - m)·v_j / (exp(sink - m) + Σ exp(s_j - m)), and lse
  /// includes it. In score units (after scale and modifiers); -inf is no sink.
  TensorView<const float, 1> sinks;
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
  /// Largest finite value of the type the kernel accumulates in (FLT_MAX for
  /// float, DBL_MAX for double): policies check their parameters against it.
  double accum_max = std::numeric_limits<double>::max();

  /// Key/value head read by query head `h` (GQA/MQA).
  index_t kv_head(index_t h) const { return h / (q_heads / kv_heads); }
  /// Alignment offset Lk - Lq of bottom-right masks: query i sits at key position i + offset.
  index_t diagonal_offset() const { return lk - lq; }
};

}  // namespace attn
