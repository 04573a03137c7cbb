// attn/ops/backward.hpp — gradients of softmax attention: attn::attention_backward
// and its sliding-window and block-sparse forms.
#pragma once

#include "attn/core/types.hpp"
#include "attn/detail/checks.hpp"
#include "attn/engine/backward.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/policy/dropout.hpp"
#include "attn/score_mod.hpp"
#include "attn/sliding_window.hpp"
#include "attn/sparse.hpp"
#include "attn/tensor_view.hpp"

#include <cmath>
#include <limits>
#include <type_traits>

namespace attn {
namespace detail {

/// Every check of a backward call, before anything is written: the forward's
/// shapes (q, k, v, out), lse [B, Hq, Lq] (unless null), dout like out, dq like q, dk like k,
/// dv like v; each gradient output (dq, dk, dv and a modifier's dbias) is not
/// self-overlapping and overlaps no input and no other output.
template <class Q, class K, class V, class O, class L, class DO, class DQ, class DK, class DV,
          class Mask, class Mod>
AttentionShape check_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                              const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                              const TensorView<L, 3>& lse, const TensorView<DO, 4>& dout,
                              const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                              const TensorView<DV, 4>& dv, const Mask& mask, const Mod& mod,
                              const AttentionOptions& options) {
  AttentionOptions opt = options;
  opt.lse = {};  // the forward's lse output is not used here
  const AttentionShape s = check_attention(q, k, v, out, opt);
  auto same = [](const auto& a, const char* an, const auto& b, const char* bn) {
    check_view(a, an);
    for (int i = 0; i < b.rank; ++i)
      if (a.extent(i) != b.extent(i))
        fail(an, " has shape ", shape_str(a), ", expected ", shape_str(b), " (the shape of ", bn,
             ")");
  };
  const bool has_lse = !lse.is_null();  // null: a backward that needs none (top-k)
  if (has_lse) {
    check_view(lse, "lse");
    if (lse.extent(0) != s.batch || lse.extent(1) != s.q_heads || lse.extent(2) != s.lq)
      fail("lse has shape ", shape_str(lse), ", expected [", s.batch, ", ", s.q_heads, ", ", s.lq,
           "] (batch, q heads, Lq)");
  }
  same(dout, "dout", out, "out");
  same(dq, "dq", q, "q");
  same(dk, "dk", k, "k");
  same(dv, "dv", v, "v");
  check_not_self_overlapping(dq, "dq");
  check_not_self_overlapping(dk, "dk");
  check_not_self_overlapping(dv, "dv");
  const AttentionShape global = global_shape(s, opt.positions);
  DropoutGen::bind(opt.dropout, s.batch, s.q_heads, global.lq, global.lk);

  // Each output against every input and every other output.
  auto against_all = [&](const auto& g, const char* gn) {
    check_no_overlap(g, gn, q, "q");
    check_no_overlap(g, gn, k, "k");
    check_no_overlap(g, gn, v, "v");
    check_no_overlap(g, gn, out, "out");
    if (has_lse) check_no_overlap(g, gn, lse, "lse");
    check_no_overlap(g, gn, dout, "dout");
    for_each_view(mask,
                  [&](const auto& view, const char* name) { check_no_overlap(g, gn, view, name); });
    for_each_view(mod,
                  [&](const auto& view, const char* name) { check_no_overlap(g, gn, view, name); });
  };
  against_all(dq, "dq");
  against_all(dk, "dk");
  against_all(dv, "dv");
  check_no_overlap(dq, "dq", dk, "dk");
  check_no_overlap(dq, "dq", dv, "dv");
  check_no_overlap(dk, "dk", dv, "dv");
  for_each_grad_view(mod, [&](const auto& g, const char* gn) {
    against_all(g, gn);
    check_no_overlap(g, gn, dq, "dq");
    check_no_overlap(g, gn, dk, "dk");
    check_no_overlap(g, gn, dv, "dv");
  });
  int n = 0;  // two gradient views of one modifier (a bias given twice) must not overlap either
  for_each_grad_view(mod, [&](const auto& a, const char* an) {
    int m = 0;
    for_each_grad_view(mod, [&](const auto& b, const char* bn) {
      if (m++ > n) check_no_overlap(a, an, b, bn);
    });
    ++n;
  });
  return s;
}

/// Entry of every backward form: checks, binds, zeroes dbias, runs the engine.
template <class Q, class K, class V, class O, class L, class DO, class DQ, class DK, class DV,
          class Mask, class Mod>
void backward_entry(const TensorView<Q, 4>& q, const TensorView<K, 4>& k, const TensorView<V, 4>& v,
                    const TensorView<O, 4>& out, const TensorView<L, 3>& lse,
                    const TensorView<DO, 4>& dout, const TensorView<DQ, 4>& dq,
                    const TensorView<DK, 4>& dk, const TensorView<DV, 4>& dv, const Mask& mask,
                    const Mod& mod, const AttentionOptions& opt) {
  static_assert(is_storage_type_v<std::remove_cv_t<Q>> && is_storage_type_v<std::remove_cv_t<K>> &&
                    is_storage_type_v<std::remove_cv_t<V>> &&
                    is_storage_type_v<std::remove_cv_t<O>> &&
                    is_storage_type_v<std::remove_cv_t<DO>> && is_storage_type_v<DQ> &&
                    is_storage_type_v<DK> && is_storage_type_v<DV>,
                "attn: element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(std::is_same<std::remove_cv_t<L>, float>::value ||
                    std::is_same<std::remove_cv_t<L>, double>::value,
                "attn: lse is float (what the forward writes) or double");
  static_assert(!std::is_const<DQ>::value && !std::is_const<DK>::value && !std::is_const<DV>::value,
                "attn: the gradient views dq, dk, dv must be writable");
  static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
  static_assert(is_score_mod_v<Mod>,
                "attn: the score_mod argument must be a score modifier (attn/score_mod.hpp)");
  AttentionOptions probe_opt;
  probe_opt.positions = opt.positions;
  const AttentionShape probe = check_attention(q, k, v, out, probe_opt);
  const AttentionShape global =
      global_shape(probe, opt.positions);  // policies see global positions
  const Mask bound_mask = mask.bind(global);
  const Mod bound_mod = mod.bind(global);
  check_view(lse, "lse");  // check_backward lets a null lse pass (for backwards without one)
  const AttentionShape shape =
      check_backward(q, k, v, out, lse, dout, dq, dk, dv, bound_mask, bound_mod, opt);
  for_each_grad_view(bound_mod, [](const auto& g, const char*) {
    for (index_t a = 0; a < g.extent(0); ++a)
      for (index_t b = 0; b < g.extent(1); ++b)
        for (index_t i = 0; i < g.extent(2); ++i)
          for (index_t j = 0; j < g.extent(3); ++j) g(a, b, i, j) = 0;
  });
  using Acc = accum_t<Q, K, V, O, DO, DQ, DK, DV>;
  flash_backward<Acc, std::remove_cv_t<Q>, std::remove_cv_t<K>, std::remove_cv_t<V>,
                 std::remove_cv_t<O>, std::remove_cv_t<L>, std::remove_cv_t<DO>>(
      q, k, v, out, lse, dout, dq, dk, dv, shape, bound_mask, bound_mod, opt);
}

}  // namespace detail

/// Gradients of masked_attention(q, k, v, out, mask, score_mod, options)
/// for the loss gradient `dout` = dL/dout: writes dq = dL/dq, dk = dL/dk,
/// dv = dL/dv (and dL/dbias into an additive_bias(bias, dbias) modifier).
///
/// `out` and `lse` are what the forward wrote (options.lse of the forward,
/// float); P is recomputed from q, k and lse (FlashAttention 2), so memory
/// beyond the gradients is O(tile) per thread. The mask, score modifier,
/// scale, dropout (same seed and offset) and tiles must be those of the
/// forward. Shapes: dq like q, dk like k, dv like v, dout like out; with GQA,
/// dk and dv sum over the query heads of a group. Rows that see no key get
/// zero gradients. Results are bitwise identical for any thread count.
/// A custom_score_mod needs its derivative (custom_score_mod(f, df)).
template <class Q, class K, class V, class O, class L, class DO, class DQ, class DK, class DV,
          class Mask, class Mod = NoScoreMod>
void attention_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                        const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                        const TensorView<L, 3>& lse, const TensorView<DO, 4>& dout,
                        const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                        const TensorView<DV, 4>& dv, const Mask& mask, const Mod& score_mod = {},
                        const AttentionOptions& options = {}) {
  detail::backward_entry(q, k, v, out, lse, dout, dq, dk, dv, mask, score_mod, options);
}

/// Same, with a mask and options, no score modifier.
template <class Q, class K, class V, class O, class L, class DO, class DQ, class DK, class DV,
          class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
void attention_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                        const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                        const TensorView<L, 3>& lse, const TensorView<DO, 4>& dout,
                        const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                        const TensorView<DV, 4>& dv, const Mask& mask,
                        const AttentionOptions& options) {
  detail::backward_entry(q, k, v, out, lse, dout, dq, dk, dv, mask, no_score_mod(), options);
}

/// Dense attention (scaled_dot_product_attention) gradients.
template <class Q, class K, class V, class O, class L, class DO, class DQ, class DK, class DV>
void attention_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                        const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                        const TensorView<L, 3>& lse, const TensorView<DO, 4>& dout,
                        const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                        const TensorView<DV, 4>& dv, const AttentionOptions& options = {}) {
  detail::backward_entry(q, k, v, out, lse, dout, dq, dk, dv, no_mask(), no_score_mod(), options);
}

/// Gradients of sliding_window_attention: the same engine with window & mask.
template <class Q, class K, class V, class O, class L, class DO, class DQ, class DK, class DV,
          class Mask = NoMask, class Mod = NoScoreMod>
void sliding_window_attention_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                                       const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                                       const TensorView<L, 3>& lse, const TensorView<DO, 4>& dout,
                                       const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                                       const TensorView<DV, 4>& dv, const Window& window,
                                       const Mask& mask = {}, const Mod& score_mod = {},
                                       const AttentionOptions& options = {}) {
  static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
  detail::backward_entry(q, k, v, out, lse, dout, dq, dk, dv, window & mask, score_mod, options);
}

/// Gradients of sparse_attention: the same engine with the layout's blocks as
/// tiles (options.block_q / block_k must be 0 or equal to them).
template <class Q, class K, class V, class O, class L, class DO, class DQ, class DK, class DV,
          class Mask = NoMask, class Mod = NoScoreMod>
void sparse_attention_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                               const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                               const TensorView<L, 3>& lse, const TensorView<DO, 4>& dout,
                               const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                               const TensorView<DV, 4>& dv, const BlockSparseLayout& layout,
                               const Mask& mask = {}, const Mod& score_mod = {},
                               const AttentionOptions& options = {}) {
  static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
  if (options.block_q != 0 && options.block_q != layout.block_q())
    detail::fail("block_q is ", options.block_q, ", but the layout's query blocks have ",
                 layout.block_q(), " rows (leave block_q at 0)");
  if (options.block_k != 0 && options.block_k != layout.block_k())
    detail::fail("block_k is ", options.block_k, ", but the layout's key blocks have ",
                 layout.block_k(), " keys (leave block_k at 0)");
  AttentionOptions opt = options;
  opt.block_q = layout.block_q();
  opt.block_k = layout.block_k();
  BlockSparseMask<Mask> m;
  m.layout = &layout;
  m.inner = mask;
  detail::backward_entry(q, k, v, out, lse, dout, dq, dk, dv, m, score_mod, opt);
}

/// Gradient of the loss with respect to the per-head sink logits of a forward
/// run with options.sinks (serving.md, "Attention sinks"):
///
///   dsinks[h] = -Σ_b Σ_i exp(sinks[h] - lse[b, h, i]) · Σ_c dout[b, h, i, c] · out[b, h, i, c]
///
/// (the sink's probability times its value 0 minus the row's D_i = dout_i · out_i).
/// `out` and `lse` are what that forward wrote: its lse includes the sink, so
/// attention_backward given them computes dq, dk and dv of the sink forward
/// as they are. A head without a sink (-inf) gets 0. Sums in double, rows in
/// order: the same bits on every call. dsinks [Hq] must not overlap an input.
template <class O, class L, class DO>
void sinks_backward(const TensorView<O, 4>& out, const TensorView<L, 3>& lse,
                    const TensorView<DO, 4>& dout, const TensorView<const float, 1>& sinks,
                    const TensorView<float, 1>& dsinks) {
  static_assert(std::is_same<std::remove_cv_t<L>, float>::value ||
                    std::is_same<std::remove_cv_t<L>, double>::value,
                "attn: lse is float (what the forward writes) or double");
  detail::check_view(out, "out");
  detail::check_view(lse, "lse");
  detail::check_view(dout, "dout");
  detail::check_view(sinks, "sinks");
  detail::check_view(dsinks, "dsinks");
  const index_t batch = out.extent(0), heads = out.extent(1), lq = out.extent(2),
                dv = out.extent(3);
  if (lse.extent(0) != batch || lse.extent(1) != heads || lse.extent(2) != lq)
    detail::fail("lse has shape ", detail::shape_str(lse), ", expected [", batch, ", ", heads, ", ",
                 lq, "] (the first three extents of out)");
  for (int i = 0; i < 4; ++i)
    if (dout.extent(i) != out.extent(i))
      detail::fail("dout has shape ", detail::shape_str(dout), ", expected ",
                   detail::shape_str(out), " (the shape of out)");
  detail::check_sinks(sinks, heads);
  if (dsinks.extent(0) != heads)
    detail::fail("dsinks has ", dsinks.extent(0), " entries, expected one per query head (", heads,
                 ")");
  detail::check_not_self_overlapping(dsinks, "dsinks");
  detail::check_no_overlap(dsinks, "dsinks", out, "out");
  detail::check_no_overlap(dsinks, "dsinks", lse, "lse");
  detail::check_no_overlap(dsinks, "dsinks", dout, "dout");
  detail::check_no_overlap(dsinks, "dsinks", sinks, "sinks");
  for (index_t h = 0; h < heads; ++h) {
    const double sink = static_cast<double>(sinks(h));
    double g = 0;
    if (sink != -std::numeric_limits<double>::infinity())
      for (index_t b = 0; b < batch; ++b)
        for (index_t i = 0; i < lq; ++i) {
          double d = 0;  // D_i = dout_i · out_i
          for (index_t c = 0; c < dv; ++c)
            d += static_cast<double>(dout(b, h, i, c)) * static_cast<double>(out(b, h, i, c));
          // lse >= sink always (the sink is one of its terms), so the exponent is <= 0.
          g -= std::exp(sink - static_cast<double>(lse(b, h, i))) * d;
        }
    dsinks(h) = static_cast<float>(g);
  }
}

}  // namespace attn
