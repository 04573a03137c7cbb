// attn/scaled_dot_product.hpp — dense scaled dot-product attention.
#pragma once

#include "attn/engine/forward.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

namespace attn {

/// out = softmax(scale · q·kᵀ) · v on [batch, heads, seq, dim] views.
///
/// q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D], v: [B, Hkv, Lk, Dv], out: [B, Hq, Lq, Dv];
/// Hkv divides Hq and query head h reads key/value head h / (Hq / Hkv).
/// Element types float, double, Eigen::half or Eigen::bfloat16 (mixed
/// storage allowed; accumulation is double if any operand is double, float
/// otherwise). Throws attn::Error before writing anything if an argument is
/// wrong. Runs in O(Lq·Lk·(D+Dv)) time and never allocates anything that
/// grows with Lq·Lk.
template <class Q, class K, class V, class O>
void scaled_dot_product_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                                  const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                                  const AttentionOptions& options = {}) {
  detail::attention_entry(q, k, v, out, no_mask(), no_score_mod(), options);
}

}  // namespace attn
