// attn/masked.hpp — attention under any mask policy and score modifier.
#pragma once

#include "attn/engine/forward.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

namespace attn {

/// Attention with a mask policy (attn/mask.hpp: causal(), key_padding(...),
/// bool_mask(view), ... combined with &) and a score modifier
/// (attn/score_mod.hpp: additive_bias, alibi, softcap, compose(...)).
///
/// score = scale · q·k, then `score_mod`, then the mask; a row that sees no
/// key outputs zeros (and lse = -inf). Shapes and types as in
/// scaled_dot_product_attention. Tiles the mask rules out are skipped, so a
/// causal mask costs about half of dense attention.
template <class Q, class K, class V, class O, class Mask, class Mod = NoScoreMod>
void masked_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                      const TensorView<V, 4>& v, const TensorView<O, 4>& out, const Mask& mask,
                      const Mod& score_mod = {}, const AttentionOptions& options = {}) {
  detail::check_stats_policy_views(options.stats, mask, score_mod);
  detail::attention_entry(q, k, v, out, mask, score_mod, options);
}

/// Same, without a score modifier.
template <class Q, class K, class V, class O, class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
void masked_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                      const TensorView<V, 4>& v, const TensorView<O, 4>& out, const Mask& mask,
                      const AttentionOptions& options) {
  detail::check_stats_policy_views(options.stats, mask);
  detail::attention_entry(q, k, v, out, mask, no_score_mod(), options);
}

}  // namespace attn
