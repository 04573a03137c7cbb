// attn/multi_head.hpp — a full attention layer: projections, heads, GQA/MQA,
// rotary positions, output projection.
//
// For x [B, L, d_model] (rows x_t):
//
//   Q = x·Wq + bq       [B·L, Hq·D]    = [B, L, Hq, D]   (bshd, no copy)
//   K = x·Wk + bk       [B·L, Hkv·D]   = [B, L, Hkv, D]
//   V = x·Wv + bv       [B·L, Hkv·Dv]  = [B, L, Hkv, Dv]
//   Q, K = RoPE(Q), RoPE(K)            (optional)
//   A_h = softmax(mask(score_mod(scale · Q_h·K_{g(h)}ᵀ))) · V_{g(h)},  g(h) = h / (Hq/Hkv)
//   out = concat_h(A_h)·Wo + bo   [B·L, Hq·Dv]·[Hq·Dv, d_model]
//
// Each projection is one GEMM over all B·L rows. A row-major [B·L, H·D]
// buffer is exactly the [B, L, H, D] layout, so the engine reads it through a
// bshd view and writes A the same way: no transposes, no head split/merge
// copies. Hkv = Hq is multi-head, 1 < Hkv < Hq grouped-query, Hkv = 1
// multi-query attention.
#pragma once

#include "attn/attention_weights.hpp"
#include "attn/detail/checks.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/kv/cache.hpp"
#include "attn/layers/grad_gemm.hpp"
#include "attn/layers/projection.hpp"
#include "attn/mask.hpp"
#include "attn/masked.hpp"
#include "attn/ops/backward.hpp"
#include "attn/ops/cache.hpp"
#include "attn/options.hpp"
#include "attn/rope.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include "attn/core/eigen.hpp"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

namespace attn {

// ------------------------------------------------------------ configuration --

/// Sizes of an attention layer. Zero means "derive it": kv_heads = q_heads,
/// head_dim = d_model / q_heads, v_head_dim = head_dim, d_kv_in = d_model.
struct MultiHeadConfig {
  index_t d_model = 0;     ///< width of the query-side input and of the output
  index_t q_heads = 0;     ///< Hq
  index_t kv_heads = 0;    ///< Hkv, divides Hq (Hq: MHA, 1: MQA, between: GQA)
  index_t head_dim = 0;    ///< D of q and k
  index_t v_head_dim = 0;  ///< Dv of v and of each head's output
  index_t d_kv_in = 0;     ///< width of the key/value-side input (the memory in cross attention)
  /// Rotary position embedding of q and k, if set (self-attention only).
  std::optional<Rope> rope;
};

namespace detail {

/// Checks a config and fills in the derived sizes.
inline MultiHeadConfig resolve_config(MultiHeadConfig c) {
  if (c.d_model <= 0) fail("d_model is ", c.d_model, ", must be > 0");
  if (c.q_heads <= 0) fail("q_heads is ", c.q_heads, ", must be > 0");
  if (c.kv_heads < 0) fail("kv_heads is ", c.kv_heads, ", must be >= 0 (0 = q_heads)");
  if (c.kv_heads == 0) c.kv_heads = c.q_heads;
  if (c.q_heads % c.kv_heads != 0)
    fail("kv_heads ", c.kv_heads, " does not divide q_heads ", c.q_heads);
  if (c.head_dim < 0) fail("head_dim is ", c.head_dim, ", must be >= 0 (0 = d_model / q_heads)");
  if (c.head_dim == 0) {
    if (c.d_model % c.q_heads != 0)
      fail("d_model ", c.d_model, " is not divisible by q_heads ", c.q_heads,
           "; set head_dim explicitly");
    c.head_dim = c.d_model / c.q_heads;
  }
  if (c.v_head_dim < 0) fail("v_head_dim is ", c.v_head_dim, ", must be >= 0 (0 = head_dim)");
  if (c.v_head_dim == 0) c.v_head_dim = c.head_dim;
  if (c.d_kv_in < 0) fail("d_kv_in is ", c.d_kv_in, ", must be >= 0 (0 = d_model)");
  if (c.d_kv_in == 0) c.d_kv_in = c.d_model;
  if (c.rope) check_rope(*c.rope, c.head_dim);
  return c;
}

}  // namespace detail

// ----------------------------------------------------------------- weights --

/// Views of the weights of an attention layer, for callers that keep their
/// own. `layout` says how every weight below is stored:
///   WeightLayout::in_out  wq [d_model, Hq·D], wk [d_kv_in, Hkv·D], wv [d_kv_in, Hkv·Dv],
///                         wo [Hq·Dv, d_model]                         (y = x·W)
///   WeightLayout::out_in  the transposes, as PyTorch's nn.Linear.weight stores
///                         them: wq [Hq·D, d_model], ..., wo [d_model, Hq·Dv]
/// Biases bq [Hq·D], bk [Hkv·D], bv [Hkv·Dv], bo [d_model] are optional (a
/// default-constructed view means "no bias"). Instead of wq, wk, wv a fused
/// wqkv (self-attention only) holds the three stacked along `out`:
/// [(Hq·D + Hkv·D + Hkv·Dv), d_model] in out_in (PyTorch's fused in_proj /
/// c_attn / qkv_proj), its transpose in in_out; bqkv likewise. Any strides,
/// zero and negative included: every form is packed and takes the same
/// deterministic product.
template <class T>
struct MultiHeadWeights {
  TensorView<const T, 2> wq, wk, wv, wo;
  TensorView<const T, 1> bq, bk, bv, bo;
  TensorView<const T, 2> wqkv;  ///< fused q, k, v weight (leave wq, wk, wv empty)
  TensorView<const T, 1> bqkv;  ///< fused q, k, v bias (leave bq, bk, bv empty)
  WeightLayout layout = WeightLayout::in_out;
};

namespace detail {

/// The weights of a layer as logical [in, out] views, fused parts split.
template <class T>
struct InOutWeights {
  TensorView<const T, 2> wq, wk, wv, wo;
  TensorView<const T, 1> bq, bk, bv, bo;
  /// f(view, name) for every weight and bias, in the names errors use.
  template <class F>
  void for_each(F&& f) const {
    f(wq, "Wq");
    f(wk, "Wk");
    f(wv, "Wv");
    f(wo, "Wo");
    f(bq, "bq");
    f(bk, "bk");
    f(bv, "bv");
    f(bo, "bo");
  }
};

/// The weights packed for the projection kernel, and their biases.
template <class T>
struct PackedProjections {
  PackedWeight<T> q, k, v, o;
  TensorView<const T, 1> bq, bk, bv, bo;
  void pack(const InOutWeights<T>& w) {
    q.pack(w.wq);
    k.pack(w.wk);
    v.pack(w.wv);
    o.pack(w.wo);
    bq = w.bq;
    bk = w.bk;
    bv = w.bv;
    bo = w.bo;
  }
};

}  // namespace detail

/// Scratch of a layer: projected q, k, v and the heads' output, the RoPE
/// table and the packed weights of free-function calls. Everything only
/// grows, so repeated calls at one size allocate nothing after the first.
template <class T>
struct MultiHeadWorkspace {
  std::vector<T> q, k, v, heads;
  detail::RopeTable<T> rope;
  detail::PackedProjections<T> packed;
};

namespace detail {
/// Grows a buffer to at least n elements (never shrinks, so steady-state
/// calls do not allocate).
template <class T>
T* grow(std::vector<T>& buf, index_t n) {
  if (static_cast<index_t>(buf.size()) < n) buf.resize(static_cast<std::size_t>(n));
  return buf.data();
}

/// Checks one weight view, given in `layout`, against its [in, out] shape;
/// returns it as a logical [in, out] view.
template <class T>
TensorView<const T, 2> check_weight(const TensorView<const T, 2>& w, const char* name, index_t in,
                                    index_t out, const char* in_name, const char* out_name,
                                    WeightLayout layout) {
  if (w.data() == nullptr) fail(name, " has null data");
  const bool oi = layout == WeightLayout::out_in;
  const index_t r = oi ? out : in, c = oi ? in : out;
  if (w.extent(0) != r || w.extent(1) != c)
    fail(name, " has shape [", w.extent(0), ", ", w.extent(1), "], expected [", r, ", ", c, "] (",
         oi ? out_name : in_name, ", ", oi ? in_name : out_name, ") for ", layout_name(layout));
  return in_out_view(w, layout);
}

/// Checks one optional bias view against its expected length.
template <class T>
void check_bias(const TensorView<const T, 1>& b, const char* name, index_t n) {
  if (b.is_null()) return;
  if (b.data() == nullptr) fail(name, " has null data");
  if (b.extent(0) != n) fail(name, " has length ", b.extent(0), ", expected ", n);
}

/// Columns [c0, c0 + n) of an [in, out] view.
template <class T>
TensorView<const T, 2> columns(const TensorView<const T, 2>& w, index_t c0, index_t n) {
  return TensorView<const T, 2>(w.data() + c0 * w.stride(1), {w.extent(0), n}, w.strides());
}
/// Elements [i0, i0 + n) of a vector view (null stays null).
template <class T>
TensorView<const T, 1> slice(const TensorView<const T, 1>& b, index_t i0, index_t n) {
  if (b.is_null()) return b;
  return TensorView<const T, 1>(b.data() + i0 * b.stride(0), {n}, b.strides());
}

/// Checks all weights of a resolved config and returns them as [in, out]
/// views, a fused wqkv split into its three parts.
template <class T>
InOutWeights<T> check_weights(const MultiHeadConfig& c, const MultiHeadWeights<T>& w) {
  const index_t nq = c.q_heads * c.head_dim, nk = c.kv_heads * c.head_dim,
                nv = c.kv_heads * c.v_head_dim, no = c.q_heads * c.v_head_dim;
  InOutWeights<T> r;
  const bool fused = !w.wqkv.is_null() || !w.bqkv.is_null();
  if (fused) {
    if (!w.wq.is_null() || !w.wk.is_null() || !w.wv.is_null() || !w.bq.is_null() ||
        !w.bk.is_null() || !w.bv.is_null())
      fail("wqkv/bqkv (fused) and wq/wk/wv/bq/bk/bv (separate) are both given; give one form");
    if (c.d_kv_in != c.d_model)
      fail("a fused wqkv needs d_kv_in == d_model, but d_kv_in is ", c.d_kv_in, " and d_model is ",
           c.d_model);
    const TensorView<const T, 2> qkv =
        check_weight(w.wqkv, "Wqkv", c.d_model, nq + nk + nv, "d_model",
                     "q_heads*head_dim + 2*kv_heads*head_dim (+ v_head_dim)", w.layout);
    check_bias(w.bqkv, "bqkv", nq + nk + nv);
    r.wq = columns(qkv, 0, nq);
    r.wk = columns(qkv, nq, nk);
    r.wv = columns(qkv, nq + nk, nv);
    r.bq = slice(w.bqkv, 0, nq);
    r.bk = slice(w.bqkv, nq, nk);
    r.bv = slice(w.bqkv, nq + nk, nv);
  } else {
    r.wq = check_weight(w.wq, "Wq", c.d_model, nq, "d_model", "q_heads*head_dim", w.layout);
    r.wk = check_weight(w.wk, "Wk", c.d_kv_in, nk, "d_kv_in", "kv_heads*head_dim", w.layout);
    r.wv = check_weight(w.wv, "Wv", c.d_kv_in, nv, "d_kv_in", "kv_heads*v_head_dim", w.layout);
    check_bias(w.bq, "bq", nq);
    check_bias(w.bk, "bk", nk);
    check_bias(w.bv, "bv", nv);
    r.bq = w.bq;
    r.bk = w.bk;
    r.bv = w.bv;
  }
  r.wo = check_weight(w.wo, "Wo", no, c.d_model, "q_heads*v_head_dim", "d_model", w.layout);
  check_bias(w.bo, "bo", c.d_model);
  r.bo = w.bo;
  return r;
}

/// Checks a [B, L, width] sequence input.
template <class T>
void check_sequence(const TensorView<T, 3>& x, const char* name, index_t width,
                    const char* width_name) {
  check_view(x, name);
  if (x.extent(2) != width)
    fail(name, " has shape ", shape_str(x), ": last dim ", x.extent(2), ", but the layer's ",
         width_name, " is ", width);
}

/// Checks the output [B, L, d_model] against the query input's shape.
template <class T>
void check_output(const TensorView<T, 3>& out, const TensorView<const T, 3>& x, index_t d_model) {
  check_view(out, "out");
  if (out.extent(0) != x.extent(0) || out.extent(1) != x.extent(1) || out.extent(2) != d_model)
    fail("out has shape ", shape_str(out), ", expected [", x.extent(0), ", ", x.extent(1), ", ",
         d_model, "] (batch, length, d_model)");
  check_not_self_overlapping(out, "out");
}

/// A buffer of a workspace as a view (null when empty), for overlap checks.
template <class T>
TensorView<const T, 1> buffer_view(const std::vector<T>& v) {
  if (v.empty()) return {};
  return TensorView<const T, 1>(v.data(), {static_cast<index_t>(v.size())});
}

/// Checks what a layer call writes (out, options.lse, options.stats) against
/// everything it reads: the inputs x and memory (memory may be null), every
/// weight and bias, the views the mask and modifier read, and the workspace
/// buffers the call writes in between. Each output against each input, and
/// the outputs against each other.
template <class T, class O, int RO, class Mask, class Mod>
void check_layer_outputs(const TensorView<O, RO>& out, const AttentionOptions& opt,
                         const TensorView<const T, 3>& x, const TensorView<const T, 3>& memory,
                         const InOutWeights<T>& w, const Mask& mask, const Mod& mod,
                         const MultiHeadWorkspace<T>* ws) {
  const LseView& lse = opt.lse;
  const TensorView<const AttentionStats, 1> stats =
      opt.stats ? TensorView<const AttentionStats, 1>(opt.stats, {1})
                : TensorView<const AttentionStats, 1>();
  auto against = [&](const auto& in, const char* name) {
    if (in.is_null()) return;
    check_no_overlap(out, "out", in, name);
    if (!lse.is_null()) check_no_overlap(lse, "options.lse", in, name);
    if (!stats.is_null()) check_no_overlap(stats, "options.stats", in, name);
  };
  against(x, "x");
  against(memory, "memory");
  w.for_each(against);
  for_each_view(mask, against);
  for_each_view(mod, against);
  if (ws) {
    against(buffer_view(ws->q), "the workspace's q");
    against(buffer_view(ws->k), "the workspace's k");
    against(buffer_view(ws->v), "the workspace's v");
    against(buffer_view(ws->heads), "the workspace's heads");
  }
  if (!lse.is_null()) {
    check_view(lse, "options.lse");
    check_not_self_overlapping(lse, "options.lse");
    check_no_overlap(lse, "options.lse", out, "out");
    if (!stats.is_null()) check_no_overlap(stats, "options.stats", lse, "options.lse");
  }
  if (!stats.is_null()) check_no_overlap(stats, "options.stats", out, "out");
}

/// The attention problem of a layer call (for binding masks early, so a bad
/// mask throws before any work).
inline AttentionShape layer_shape(const MultiHeadConfig& c, index_t batch, index_t lq, index_t lk) {
  AttentionShape s;
  s.batch = batch;
  s.q_heads = c.q_heads;
  s.kv_heads = c.kv_heads;
  s.lq = lq;
  s.lk = lk;
  s.d = c.head_dim;
  s.dv = c.v_head_dim;
  return s;
}

/// A row-major [rows, width] buffer as a [B, L, width] view.
template <class T>
TensorView<T, 3> rows_view(T* data, index_t B, index_t L, index_t width) {
  return TensorView<T, 3>(data, {B, L, width});
}

/// Projects K and V of src [B, Lk, d_kv_in] into k [B·Lk, Hkv·D] and v [B·Lk, Hkv·Dv].
template <class T>
void project_kv(const MultiHeadConfig& c, const PackedProjections<T>& p,
                const TensorView<const T, 3>& src, std::vector<T>& k, std::vector<T>& v,
                int num_threads) {
  const index_t B = src.extent(0), L = src.extent(1);
  const index_t nk = c.kv_heads * c.head_dim, nv = c.kv_heads * c.v_head_dim;
  project_packed(src, p.k, p.bk, rows_view(grow(k, B * L * nk), B, L, nk), num_threads);
  project_packed(src, p.v, p.bv, rows_view(grow(v, B * L * nv), B, L, nv), num_threads);
}

/// Projects Q of x into ws.q [B·L, Hq·D]; returns the buffer.
template <class T>
T* project_q(const MultiHeadConfig& c, const PackedProjections<T>& p,
             const TensorView<const T, 3>& x, MultiHeadWorkspace<T>& ws, int num_threads) {
  const index_t B = x.extent(0), L = x.extent(1), nq = c.q_heads * c.head_dim;
  T* q = grow(ws.q, B * L * nq);
  project_packed(x, p.q, p.bq, rows_view(q, B, L, nq), num_threads);
  return q;
}

/// Everything after the projections: attention on bshd views of the
/// projected buffers, then the output projection into out.
template <class T, class Mask, class Mod>
void attend_and_project_out(const MultiHeadConfig& c, const PackedProjections<T>& p,
                            const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                            const TensorView<const T, 4>& v, const TensorView<T, 3>& out,
                            const Mask& mask, const Mod& mod, const AttentionOptions& opt,
                            MultiHeadWorkspace<T>& ws) {
  const index_t B = q.extent(0), L = q.extent(2), width = c.q_heads * c.v_head_dim;
  T* heads = grow(ws.heads, B * L * width);
  masked_attention(q, k, v, bshd(heads, B, L, c.q_heads, c.v_head_dim), mask, mod, opt);
  project_packed(TensorView<const T, 3>(rows_view(heads, B, L, width)), p.o, p.bo, out,
                 opt.num_threads);  // [B·L, Hq·Dv]·[Hq·Dv, d_model]
}

/// Applies the config's RoPE to q and k (bshd views of the projected rows).
template <class T>
void apply_layer_rope(const MultiHeadConfig& c, const Tensor4<T>& q, const Tensor4<T>& k, index_t L,
                      MultiHeadWorkspace<T>& ws, int num_threads) {
  if (!c.rope) return;
  const index_t rd = check_rope(*c.rope, c.head_dim);
  check_rope_positions(*c.rope, L);  // offset + L - 1 fits index_t
  ws.rope.ensure(*c.rope, rd, c.rope->offset, L);
  apply_rope_table(q, ws.rope, c.rope->pairing, c.rope->offset, num_threads);
  apply_rope_table(k, ws.rope, c.rope->pairing, c.rope->offset, num_threads);
}

/// The self-attention layer on checked arguments.
template <class T, class Mask, class Mod>
void self_attention_forward(const MultiHeadConfig& c, const PackedProjections<T>& p,
                            const TensorView<const T, 3>& x, const TensorView<T, 3>& out,
                            const Mask& mask, const Mod& mod, const AttentionOptions& opt,
                            MultiHeadWorkspace<T>& ws) {
  const index_t B = x.extent(0), L = x.extent(1);
  T* q = project_q(c, p, x, ws, opt.num_threads);  // [B·L, Hq·D] = [B, L, Hq, D]
  project_kv(c, p, x, ws.k, ws.v, opt.num_threads);
  const Tensor4<T> qv = bshd(q, B, L, c.q_heads, c.head_dim);
  const Tensor4<T> kv = bshd(ws.k.data(), B, L, c.kv_heads, c.head_dim);
  const Tensor4<T> vv = bshd(ws.v.data(), B, L, c.kv_heads, c.v_head_dim);
  apply_layer_rope(c, qv, kv, L, ws, opt.num_threads);
  attend_and_project_out<T>(c, p, qv, kv, vv, out, mask, mod, opt, ws);
}

/// Checks every argument of a self-attention call.
template <class T, class Mask, class Mod>
void check_self_attention(const MultiHeadConfig& c, const InOutWeights<T>& w,
                          const TensorView<const T, 3>& x, const TensorView<T, 3>& out,
                          const Mask& mask, const Mod& mod, const AttentionOptions& opt,
                          const MultiHeadWorkspace<T>* ws, bool bind_policies = true) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "attn: attention layers compute in float or double");
  static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
  static_assert(is_score_mod_v<Mod>,
                "attn: the score_mod argument must be a score modifier (attn/score_mod.hpp)");
  if (c.d_kv_in != c.d_model)
    fail("self-attention needs d_kv_in == d_model, but d_kv_in is ", c.d_kv_in, " and d_model is ",
         c.d_model, " (use attn::CrossAttention)");
  check_sequence(x, "x", c.d_model, "d_model");
  check_output(out, x, c.d_model);
  check_layer_outputs<T>(out, opt, x, TensorView<const T, 3>(), w, mask, mod, ws);
  if (!bind_policies) return;
  const AttentionShape s = layer_shape(c, x.extent(0), x.extent(1), x.extent(1));
  (void)mask.bind(s);
  (void)mod.bind(s);
}

// ------------------------------------------------ incremental decoding --

/// Checks a cached self-attention call: everything check_self_attention
/// checks, the cache's shape against the config, room for the new tokens,
/// their RoPE positions, the options cache attention refuses, and the
/// policies bound per sequence as cache_attention binds them. Nothing is
/// written before it returns.
template <class T, class C, class Mask, class Mod>
void check_cached_self_attention(const MultiHeadConfig& c, const InOutWeights<T>& w,
                                 const TensorView<const T, 3>& x, const KVCache<C>& cache,
                                 const TensorView<T, 3>& out, const Mask& mask, const Mod& mod,
                                 const AttentionOptions& opt, const MultiHeadWorkspace<T>* ws) {
  check_self_attention(c, w, x, out, mask, mod, opt, ws, /*bind_policies=*/false);
  const index_t B = x.extent(0), L = x.extent(1);
  if (cache.batch() != B)
    fail("the cache holds ", cache.batch(), " sequences, but x has batch ", B);
  if (cache.kv_heads() != c.kv_heads || cache.head_dim() != c.head_dim ||
      cache.head_dim_v() != c.v_head_dim)
    fail("the cache holds ", cache.kv_heads(), " kv heads of dims ", cache.head_dim(), " / ",
         cache.head_dim_v(), ", but the layer has ", c.kv_heads, " of dims ", c.head_dim, " / ",
         c.v_head_dim);
  check_cache_options(opt);
  if (!opt.lse.is_null() &&
      (opt.lse.extent(0) != B || opt.lse.extent(1) != c.q_heads || opt.lse.extent(2) != L))
    fail("options.lse has shape ", shape_str(opt.lse), ", expected [", B, ", ", c.q_heads, ", ", L,
         "] (batch, q heads, new tokens)");
  check_no_overlap(out, "out", cache.keys(), "the cache's keys");
  check_no_overlap(out, "out", cache.values(), "the cache's values");
  if (!opt.lse.is_null()) {
    check_no_overlap(opt.lse, "options.lse", cache.keys(), "the cache's keys");
    check_no_overlap(opt.lse, "options.lse", cache.values(), "the cache's values");
  }
  if (c.rope) {  // the table covers every position the cache can hold
    (void)check_rope(*c.rope, c.head_dim);
    check_rope_positions(*c.rope, cache.capacity());
  }
  for (index_t b = 0; b < B; ++b) {
    const index_t held = cache.length(b);
    if (L > cache.capacity() - held)
      fail("sequence ", b, " of the cache holds ", held, " of ", cache.capacity(),
           " tokens, no room for ", L, " more");
    AttentionShape g = layer_shape(c, 1, held + L, held + L);
    (void)mask.bind(g);
    (void)mod.bind(g);
  }
}

/// Cached self-attention on checked arguments: projections of the new rows,
/// RoPE at each sequence's positions, append, attention against the cache,
/// output projection.
template <class T, class C, class Mask, class Mod>
void cached_self_attention(const MultiHeadConfig& c, const PackedProjections<T>& p,
                           const TensorView<const T, 3>& x, KVCache<C>& cache,
                           const TensorView<T, 3>& out, const Mask& mask, const Mod& mod,
                           const AttentionOptions& opt, MultiHeadWorkspace<T>& ws) {
  const index_t B = x.extent(0), L = x.extent(1);
  const index_t nq = c.q_heads * c.head_dim, nk = c.kv_heads * c.head_dim,
                nv = c.kv_heads * c.v_head_dim;
  T* q = project_q(c, p, x, ws, opt.num_threads);
  project_kv(c, p, x, ws.k, ws.v, opt.num_threads);
  if (c.rope) {  // one table over every position the cache can hold, built once
    const index_t rd = check_rope(*c.rope, c.head_dim);
    ws.rope.ensure(*c.rope, rd, c.rope->offset, cache.capacity());
  }
  for (index_t b = 0; b < B; ++b) {
    const Tensor4<T> qb = bshd(q + b * L * nq, 1, L, c.q_heads, c.head_dim);
    const Tensor4<T> kb = bshd(ws.k.data() + b * L * nk, 1, L, c.kv_heads, c.head_dim);
    const Tensor4<T> vb = bshd(ws.v.data() + b * L * nv, 1, L, c.kv_heads, c.v_head_dim);
    if (c.rope) {
      const index_t first = c.rope->offset + cache.length(b);
      apply_rope_table(qb, ws.rope, c.rope->pairing, first, opt.num_threads);
      apply_rope_table(kb, ws.rope, c.rope->pairing, first, opt.num_threads);
    }
    cache.append(b, Tensor4<const T>(kb), Tensor4<const T>(vb));
  }
  const index_t width = c.q_heads * c.v_head_dim;
  T* heads = grow(ws.heads, B * L * width);
  cache_attention(Tensor4<const T>(bshd(q, B, L, c.q_heads, c.head_dim)), cache,
                  bshd(heads, B, L, c.q_heads, c.v_head_dim), mask, mod, opt);
  project_packed(TensorView<const T, 3>(rows_view(heads, B, L, width)), p.o, p.bo, out,
                 opt.num_threads);
}

// ------------------------------------------------------ varlen (packed) --

/// Checks cu_seqlens against `total` packed rows: cu[0] = 0, non-decreasing,
/// cu.back() = total.
inline void check_cu_seqlens(const std::vector<index_t>& cu, index_t total) {
  if (cu.size() < 2)
    fail("cu_seqlens has ", cu.size(), " entries, needs at least 2 (0 and the total)");
  if (cu.front() != 0) fail("cu_seqlens[0] is ", cu.front(), ", must be 0");
  for (std::size_t s = 1; s < cu.size(); ++s)
    if (cu[s] < cu[s - 1]) fail("cu_seqlens decreases at ", s, ": ", cu[s - 1], " then ", cu[s]);
  if (cu.back() != total) fail("cu_seqlens ends at ", cu.back(), ", but x has ", total, " rows");
}

/// A [rows, width] view as [1, rows, width].
template <class T>
TensorView<T, 3> as_batch1(const TensorView<T, 2>& v) {
  return TensorView<T, 3>(v.data(), {1, v.extent(0), v.extent(1)},
                          {v.extent(0) * v.stride(0), v.stride(0), v.stride(1)});
}

/// Attention of one packed sequence: query rows [r0, r0 + len) of q (rows of
/// Hq·D) against key and value rows [k0, k0 + klen) of k and v (rows of
/// Hkv·D, Hkv·Dv), into rows [r0, r0 + len) of heads (rows of Hq·Dv) and
/// columns [r0, r0 + len) of opt.lse ([1, Hq, total]), as a call of batch 1.
/// No key rows: zeros, lse −inf.
template <class T, class Mask, class Mod>
void attend_packed_sequence(const MultiHeadConfig& c, const T* q, const T* k, const T* v,
                            index_t r0, index_t len, index_t k0, index_t klen, T* heads,
                            const Mask& mask, const Mod& mod, const AttentionOptions& opt) {
  const index_t nq = c.q_heads * c.head_dim, nk = c.kv_heads * c.head_dim,
                nv = c.kv_heads * c.v_head_dim, no = c.q_heads * c.v_head_dim;
  if (klen == 0) {  // nothing to attend to
    std::fill(heads + r0 * no, heads + (r0 + len) * no, T(0));
    if (!opt.lse.is_null())
      for (index_t h = 0; h < c.q_heads; ++h)
        for (index_t i = 0; i < len; ++i)
          opt.lse.set(0, h, r0 + i, -std::numeric_limits<double>::infinity());
    return;
  }
  AttentionOptions o = opt;
  if (!opt.lse.is_null()) o.lse = opt.lse.columns(r0, len);
  masked_attention(bshd<const T>(q + r0 * nq, 1, len, c.q_heads, c.head_dim),
                   bshd<const T>(k + k0 * nk, 1, klen, c.kv_heads, c.head_dim),
                   bshd<const T>(v + k0 * nv, 1, klen, c.kv_heads, c.v_head_dim),
                   bshd(heads + r0 * no, index_t{1}, len, c.q_heads, c.v_head_dim), mask, mod, o);
}

/// Self-attention over packed sequences on checked arguments: the
/// projections over all rows at once, attention per sequence (its own
/// [len, len] problem), the output projection over all rows.
template <class T, class Mask, class Mod>
void self_attention_varlen(const MultiHeadConfig& c, const PackedProjections<T>& p,
                           const TensorView<const T, 3>& x, const std::vector<index_t>& cu,
                           const TensorView<T, 3>& out, const Mask& mask, const Mod& mod,
                           const AttentionOptions& opt, MultiHeadWorkspace<T>& ws) {
  const index_t total = x.extent(1);
  const index_t nq = c.q_heads * c.head_dim, nk = c.kv_heads * c.head_dim,
                no = c.q_heads * c.v_head_dim;
  T* q = project_q(c, p, x, ws, opt.num_threads);  // [total, Hq·D]
  project_kv(c, p, x, ws.k, ws.v, opt.num_threads);
  if (c.rope) {  // every sequence's positions, before the first one's lse is written
    index_t longest = 0;
    for (std::size_t s = 0; s + 1 < cu.size(); ++s) longest = std::max(longest, cu[s + 1] - cu[s]);
    check_rope_positions(*c.rope, longest);
  }
  T* heads = grow(ws.heads, total * no);
  for (std::size_t s = 0; s + 1 < cu.size(); ++s) {
    const index_t r0 = cu[s], len = cu[s + 1] - cu[s];
    if (len == 0) continue;
    const Tensor4<T> qs = bshd(q + r0 * nq, index_t{1}, len, c.q_heads, c.head_dim);
    const Tensor4<T> ks = bshd(ws.k.data() + r0 * nk, index_t{1}, len, c.kv_heads, c.head_dim);
    apply_layer_rope(c, qs, ks, len, ws, opt.num_threads);  // positions restart per sequence
    attend_packed_sequence(c, static_cast<const T*>(q), static_cast<const T*>(ws.k.data()),
                           static_cast<const T*>(ws.v.data()), r0, len, r0, len, heads, mask, mod,
                           opt);
  }
  project_packed(TensorView<const T, 3>(rows_view(heads, index_t{1}, total, no)), p.o, p.bo, out,
                 opt.num_threads);
}

template <class T>
struct identity {
  using type = T;
};
template <class T>
using identity_t = typename identity<T>::type;

}  // namespace detail

// ------------------------------------------------------- free function form --

/// Multi-head self-attention with caller-owned weights: out = MHA(x) with
/// x and out [B, L, d_model] (any strides). `config` gives the sizes (zeros
/// derived, see MultiHeadConfig), `weights` the projections in the layout
/// they name (weights.layout: in_out, or out_in for PyTorch checkpoints; a
/// fused wqkv allowed), `mask`/`score_mod` any policy the engine takes
/// (applied per head to the [L, L] scores), `options` as for
/// masked_attention (scale, threads, tiles, lse [B, Hq, L], stats).
/// `workspace`, if given, is reused across calls (no allocation at a
/// repeated size); otherwise scratch is allocated per call. The weights are
/// packed on every call (a layer object packs once). Throws attn::Error
/// before writing anything if a size or weight shape is wrong or an output
/// overlaps an input.
template <class T, class Mask = NoMask, class Mod = NoScoreMod>
void multi_head_attention(detail::identity_t<TensorView<const T, 3>> x,
                          detail::identity_t<TensorView<T, 3>> out, const MultiHeadConfig& config,
                          const MultiHeadWeights<T>& weights, const Mask& mask = {},
                          const Mod& score_mod = {}, const AttentionOptions& options = {},
                          MultiHeadWorkspace<T>* workspace = nullptr) {
  const MultiHeadConfig c = detail::resolve_config(config);
  const detail::InOutWeights<T> w = detail::check_weights(c, weights);
  detail::check_self_attention(c, w, x, out, mask, score_mod, options, workspace);
  MultiHeadWorkspace<T> local;
  MultiHeadWorkspace<T>& ws = workspace ? *workspace : local;
  ws.packed.pack(w);
  detail::self_attention_forward(c, ws.packed, x, out, mask, score_mod, options, ws);
}

// ---------------------------------------------------------------- training --

template <class T>
class AttentionProjections;
template <class T>
class MultiHeadAttention;
template <class T>
class CrossAttention;

/// Whether a layer's backward writes the parameter gradients or adds to them.
enum class GradMode {
  overwrite,   ///< grads = this call's gradients (sized by the call)
  accumulate,  ///< grads += this call's gradients (grads must have the layer's sizes:
               ///< layer.zero_grads(grads) once per optimizer step, as PyTorch's zero_grad)
};

/// Gradients of the parameters of an attention layer, in the layout the
/// layer holds its weights: [in, out] row-major (WeightLayout::in_out), so
/// wq has the shape of layer.wq() [d_model, Hq·D], wk and wv [d_kv_in,
/// Hkv·D or Hkv·Dv], wo [Hq·Dv, d_model]; transpose them for PyTorch's
/// [out, in] weights. Bias gradients have the biases' lengths and are empty
/// where the layer has no such bias. A fused wqkv's gradient is
/// [wq wk wv] side by side (in_out).
template <class T>
struct AttentionGrads {
  RowMatrix<T> wq, wk, wv, wo;
  Eigen::Matrix<T, Eigen::Dynamic, 1> bq, bk, bv, bo;
  GradMode mode = GradMode::overwrite;
};

/// What a layer's training forward keeps for its backward, and the
/// backward's scratch. Owned by the caller, one per layer call in flight
/// (a model keeps one per layer); buffers only grow, so steady-state steps
/// allocate nothing. Saved by forward(..., ctx):
///   q [B, Lq, Hq, D] and k [B, Lk, Hkv, D] after RoPE, v [B, Lk, Hkv, Dv],
///   the heads' output A [B, Lq, Hq, Dv] (before the output projection),
///   lse [B, Hq, Lq] (lse_type: double for a double layer, float otherwise),
/// i.e. B·Lq·Hq·(D + Dv) + B·Lk·Hkv·(D + Dv) values plus lse. The inputs x
/// (and memory) are not copied: backward takes them again. The backward adds
/// dA, dq, dk, dv of the same sizes (and copies of strided inputs).
/// forward_varlen(..., ctx) saves the same with B = 1 and Lq, Lk the
/// packed totals of the queries and keys, plus copies of their cu_seqlens.
template <class T>
class AttentionContext {
 public:
  /// True until a training forward has filled it.
  bool empty() const { return !saved_; }
  index_t batch() const { return batch_; }
  index_t q_length() const { return lq_; }
  index_t kv_length() const { return lk_; }
  /// True when forward_varlen filled it (batch 1, lengths = the packed totals).
  bool varlen() const { return varlen_; }
  /// The query cu_seqlens of that forward (empty after a batched forward).
  const std::vector<index_t>& cu_seqlens() const { return cu_; }
  /// Its key cu_seqlens: the memory's for cross attention, cu_seqlens() for
  /// self-attention.
  const std::vector<index_t>& cu_seqlens_k() const { return cu_k_; }
  /// The saved tensors, as logical [B, H, L, D] views (bshd buffers).
  Tensor4<const T> q() const { return bshd<const T>(ws_.q.data(), batch_, lq_, hq_, d_); }
  Tensor4<const T> k() const { return bshd<const T>(ws_.k.data(), batch_, lk_, hkv_, d_); }
  Tensor4<const T> v() const { return bshd<const T>(ws_.v.data(), batch_, lk_, hkv_, dv_); }
  Tensor4<const T> heads() const { return bshd<const T>(ws_.heads.data(), batch_, lq_, hq_, dv_); }
  /// The accumulation type: a double layer keeps its lse in double.
  using lse_type = detail::accum_t<T>;
  TensorView<const lse_type, 3> lse() const {
    return TensorView<const lse_type, 3>(lse_.data(), {batch_, hq_, lq_});
  }
  /// Bytes held (saved tensors and backward scratch).
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const std::vector<T>* b : {&ws_.q, &ws_.k, &ws_.v, &ws_.heads, &dheads_, &dq_, &dk_,
                                    &dvals_, &xbuf_, &mbuf_, &dobuf_, &dxbuf_, &dmbuf_})
      n += b->capacity() * sizeof(T);
    return n + lse_.capacity() * sizeof(lse_type);
  }

 private:
  friend class AttentionProjections<T>;
  friend class MultiHeadAttention<T>;
  friend class CrossAttention<T>;

  MultiHeadWorkspace<T> ws_;  // q, k, v, heads and the RoPE table of the forward
  std::vector<lse_type> lse_;
  std::vector<T> dheads_, dq_, dk_, dvals_;             // backward: dA, dq, dk, dv
  std::vector<T> xbuf_, mbuf_, dobuf_, dxbuf_, dmbuf_;  // copies of strided views
  std::vector<index_t> cu_, cu_k_;                      // cu_seqlens of a varlen forward
  bool saved_ = false;
  bool varlen_ = false;          // filled by forward_varlen
  const void* layer_ = nullptr;  // the layer that saved it
  std::uint64_t version_ = 0;    // of that layer's weights
  std::optional<Rope> rope_;     // the RoPE of that forward
  index_t batch_ = 0, lq_ = 0, lk_ = 0, hq_ = 0, hkv_ = 0, d_ = 0, dv_ = 0;
};

// ------------------------------------------------------------------- layer --

/// The weights of an attention layer, owned (as [in, out] matrices), with
/// setters that check shapes and say the layout they read. Base of
/// MultiHeadAttention and CrossAttention. Copyable (a copy owns its own
/// weights and scratch) and nothrow-movable, so layers live in std::vector.
template <class T>
class AttentionProjections {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "attn: attention layers compute in float or double");

 public:
  /// Allocates zero weights of the sizes in `config` (checked; zeros derived).
  explicit AttentionProjections(const MultiHeadConfig& config)
      : cfg_(detail::resolve_config(config)),
        wq_(RowMatrix<T>::Zero(cfg_.d_model, cfg_.q_heads * cfg_.head_dim)),
        wk_(RowMatrix<T>::Zero(cfg_.d_kv_in, cfg_.kv_heads * cfg_.head_dim)),
        wv_(RowMatrix<T>::Zero(cfg_.d_kv_in, cfg_.kv_heads * cfg_.v_head_dim)),
        wo_(RowMatrix<T>::Zero(cfg_.q_heads * cfg_.v_head_dim, cfg_.d_model)) {}

  /// The sizes, with derived values filled in.
  const MultiHeadConfig& config() const { return cfg_; }

  /// Wq from any Eigen matrix: [d_model, Hq·D] in in_out (y = x·Wq), its
  /// transpose in out_in (PyTorch's q_proj.weight).
  template <class Derived>
  void set_wq(const Eigen::MatrixBase<Derived>& w, WeightLayout layout = WeightLayout::in_out) {
    set(wq_, w, layout, "Wq", "d_model", "q_heads*head_dim");
  }
  /// Wk [d_kv_in, Hkv·D] in in_out, its transpose in out_in.
  template <class Derived>
  void set_wk(const Eigen::MatrixBase<Derived>& w, WeightLayout layout = WeightLayout::in_out) {
    set(wk_, w, layout, "Wk", "d_kv_in", "kv_heads*head_dim");
  }
  /// Wv [d_kv_in, Hkv·Dv] in in_out, its transpose in out_in.
  template <class Derived>
  void set_wv(const Eigen::MatrixBase<Derived>& w, WeightLayout layout = WeightLayout::in_out) {
    set(wv_, w, layout, "Wv", "d_kv_in", "kv_heads*v_head_dim");
  }
  /// Wo [Hq·Dv, d_model] in in_out, its transpose in out_in.
  template <class Derived>
  void set_wo(const Eigen::MatrixBase<Derived>& w, WeightLayout layout = WeightLayout::in_out) {
    set(wo_, w, layout, "Wo", "q_heads*v_head_dim", "d_model");
  }

  /// A weight from a row-major buffer of rows × cols in `layout` (no
  /// default: a PyTorch checkpoint's square weight read in the wrong layout
  /// passes every shape check, so the caller says which it is).
  void set_wq(const T* data, index_t rows, index_t cols, WeightLayout layout) {
    set_wq(map(data, rows, cols), layout);
  }
  void set_wk(const T* data, index_t rows, index_t cols, WeightLayout layout) {
    set_wk(map(data, rows, cols), layout);
  }
  void set_wv(const T* data, index_t rows, index_t cols, WeightLayout layout) {
    set_wv(map(data, rows, cols), layout);
  }
  void set_wo(const T* data, index_t rows, index_t cols, WeightLayout layout) {
    set_wo(map(data, rows, cols), layout);
  }
  /// A weight from a view with any strides, in `layout`.
  void set_wq(const TensorView<const T, 2>& w, WeightLayout layout) { set_wq(matrix(w), layout); }
  void set_wk(const TensorView<const T, 2>& w, WeightLayout layout) { set_wk(matrix(w), layout); }
  void set_wv(const TensorView<const T, 2>& w, WeightLayout layout) { set_wv(matrix(w), layout); }
  void set_wo(const TensorView<const T, 2>& w, WeightLayout layout) { set_wo(matrix(w), layout); }

  /// The fused q, k, v weight: [Hq·D + Hkv·D + Hkv·Dv, d_model] in out_in
  /// (PyTorch's in_proj_weight, GPT-2's c_attn transposed, ...), its
  /// transpose in in_out. Self-attention only (d_kv_in == d_model).
  template <class Derived>
  void set_wqkv(const Eigen::MatrixBase<Derived>& w, WeightLayout layout) {
    if (cfg_.d_kv_in != cfg_.d_model)
      detail::fail("a fused wqkv needs d_kv_in == d_model, but d_kv_in is ", cfg_.d_kv_in,
                   " and d_model is ", cfg_.d_model);
    const index_t nq = wq_.cols(), nk = wk_.cols(), nv = wv_.cols();
    RowMatrix<T> all(cfg_.d_model, nq + nk + nv);
    set(all, w, layout, "Wqkv", "d_model", "q_heads*head_dim + 2*kv_heads*head_dim (+ v_head_dim)");
    wq_ = all.leftCols(nq);
    wk_ = all.middleCols(nq, nk);
    wv_ = all.rightCols(nv);
    packed_ = false;
    ++version_;
  }
  void set_wqkv(const T* data, index_t rows, index_t cols, WeightLayout layout) {
    set_wqkv(map(data, rows, cols), layout);
  }
  void set_wqkv(const TensorView<const T, 2>& w, WeightLayout layout) {
    set_wqkv(matrix(w), layout);
  }
  /// The fused q, k, v bias [Hq·D + Hkv·D + Hkv·Dv].
  template <class Derived>
  void set_bqkv(const Eigen::MatrixBase<Derived>& b) {
    const index_t nq = wq_.cols(), nk = wk_.cols(), nv = wv_.cols();
    Vector all;
    set_bias(all, b, "bqkv", nq + nk + nv);
    bq_ = all.head(nq);
    bk_ = all.segment(nq, nk);
    bv_ = all.tail(nv);
    packed_ = false;
    ++version_;
  }
  void set_bqkv(const T* data, index_t n) { set_bqkv(vmap(data, n)); }

  /// Biases (row or column vectors); a layer has a bias only once it is set.
  template <class Derived>
  void set_bq(const Eigen::MatrixBase<Derived>& b) {
    set_bias(bq_, b, "bq", wq_.cols());
  }
  template <class Derived>
  void set_bk(const Eigen::MatrixBase<Derived>& b) {
    set_bias(bk_, b, "bk", wk_.cols());
  }
  template <class Derived>
  void set_bv(const Eigen::MatrixBase<Derived>& b) {
    set_bias(bv_, b, "bv", wv_.cols());
  }
  template <class Derived>
  void set_bo(const Eigen::MatrixBase<Derived>& b) {
    set_bias(bo_, b, "bo", wo_.cols());
  }
  void set_bq(const T* data, index_t n) { set_bq(vmap(data, n)); }
  void set_bk(const T* data, index_t n) { set_bk(vmap(data, n)); }
  void set_bv(const T* data, index_t n) { set_bv(vmap(data, n)); }
  void set_bo(const T* data, index_t n) { set_bo(vmap(data, n)); }
  /// Removes all biases.
  void clear_biases() {
    bq_.resize(0);
    bk_.resize(0);
    bv_.resize(0);
    bo_.resize(0);
    packed_ = false;
    ++version_;
  }

  /// The weights, [in, out].
  const RowMatrix<T>& wq() const { return wq_; }
  const RowMatrix<T>& wk() const { return wk_; }
  const RowMatrix<T>& wv() const { return wv_; }
  const RowMatrix<T>& wo() const { return wo_; }

  /// Views of the weights ([in, out], layout in_out), as multi_head_attention takes them.
  MultiHeadWeights<T> weights() const {
    MultiHeadWeights<T> w;
    w.wq = view(wq_);
    w.wk = view(wk_);
    w.wv = view(wv_);
    w.wo = view(wo_);
    w.bq = view(bq_);
    w.bk = view(bk_);
    w.bv = view(bv_);
    w.bo = view(bo_);
    return w;
  }

  /// Sizes `grads` like this layer's parameters (empty bias gradients where
  /// the layer has no bias) and sets them to zero: call once per optimizer
  /// step when backward runs with GradMode::accumulate.
  void zero_grads(AttentionGrads<T>& grads) const {
    grads.wq.setZero(wq_.rows(), wq_.cols());
    grads.wk.setZero(wk_.rows(), wk_.cols());
    grads.wv.setZero(wv_.rows(), wv_.cols());
    grads.wo.setZero(wo_.rows(), wo_.cols());
    grads.bq.setZero(bq_.size());
    grads.bk.setZero(bk_.size());
    grads.bv.setZero(bv_.size());
    grads.bo.setZero(bo_.size());
  }

 protected:
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

  /// The weights as [in, out] views (for the overlap checks).
  detail::InOutWeights<T> in_out_weights() const {
    const MultiHeadWeights<T> w = weights();
    return {w.wq, w.wk, w.wv, w.wo, w.bq, w.bk, w.bv, w.bo};
  }
  /// The packed weights, packed again after a setter changed them.
  const detail::PackedProjections<T>& packed() const {
    if (!packed_) {
      packs_.pack(in_out_weights());
      packed_ = true;
    }
    return packs_;
  }

  /// Marks ctx as filled by a forward of this layer over [B, lq] queries and
  /// [B, lk] keys.
  void save_context(AttentionContext<T>& ctx, const MultiHeadConfig& c, index_t B, index_t lq,
                    index_t lk) const {
    ctx.saved_ = true;
    ctx.varlen_ = false;
    ctx.cu_.clear();
    ctx.cu_k_.clear();
    ctx.layer_ = this;
    ctx.version_ = version_;
    ctx.rope_ = c.rope;
    ctx.batch_ = B;
    ctx.lq_ = lq;
    ctx.lk_ = lk;
    ctx.hq_ = c.q_heads;
    ctx.hkv_ = c.kv_heads;
    ctx.d_ = c.head_dim;
    ctx.dv_ = c.v_head_dim;
  }

  /// Options of a training forward: lse into ctx (and a copy into the
  /// caller's options.lse afterwards, see copy_lse).
  static AttentionOptions context_options(const AttentionOptions& options, AttentionContext<T>& ctx,
                                          index_t B, index_t hq, index_t lq) {
    ctx.saved_ = false;  // stays false if the forward throws
    AttentionOptions o = options;
    o.lse = TensorView<typename AttentionContext<T>::lse_type, 3>(
        detail::grow(ctx.lse_, B * hq * lq), {B, hq, lq});
    return o;
  }
  static void copy_lse(const AttentionContext<T>& ctx, const AttentionOptions& options) {
    const LseView& l = options.lse;
    if (l.is_null()) return;
    const auto saved = ctx.lse();
    for (index_t b = 0; b < l.extent(0); ++b)
      for (index_t h = 0; h < l.extent(1); ++h)
        for (index_t i = 0; i < l.extent(2); ++i) l.set(b, h, i, saved(b, h, i));
  }

  /// The backward of both layers. x [B, Lq, d_model]; memory [B, Lk, d_kv_in]
  /// for cross attention, null for self-attention (keys and values then come
  /// from x); dout like the output; dx like x and dmemory like memory, each
  /// null to skip. `cu`: the cu_seqlens of a varlen forward, x [1, total,
  /// d_model]; `cu_k` those of its memory [1, total_k, d_kv_in] (cross
  /// attention; self-attention passes none, its keys are x's rows). The
  /// attention and RoPE then run per sequence, the projections over all
  /// rows. Every check runs before anything the caller sees is written.
  template <class Mask, class Mod>
  void backward_core(AttentionContext<T>& ctx, const TensorView<const T, 3>& x,
                     const TensorView<const T, 3>& memory, const TensorView<const T, 3>& dout,
                     const TensorView<T, 3>& dx, const TensorView<T, 3>& dmemory,
                     AttentionGrads<T>& g, const Mask& mask, const Mod& mod,
                     const AttentionOptions& options, const std::vector<index_t>* cu = nullptr,
                     const std::vector<index_t>* cu_k = nullptr) {
    static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
    static_assert(is_score_mod_v<Mod>,
                  "attn: the score_mod argument must be a score modifier (attn/score_mod.hpp)");
    const MultiHeadConfig& c = cfg_;
    const bool self = memory.is_null();
    // ---- checks
    if (ctx.empty()) detail::fail("ctx is empty: call forward(..., ctx) before backward");
    if (ctx.layer_ != this) detail::fail("ctx was filled by the forward of another layer");
    if (ctx.version_ != version_)
      detail::fail(
          "the layer's weights changed after the forward that filled ctx (weights "
          "version ",
          ctx.version_, " then ", version_, ")");
    if (ctx.varlen_ && !cu)
      detail::fail("ctx was filled by forward_varlen: call backward_varlen with its cu_seqlens");
    if (cu && !ctx.varlen_)
      detail::fail("ctx was filled by a batched forward: call backward, not backward_varlen");
    if (cu) check_same_cu_seqlens(*cu, ctx.cu_, "cu_seqlens");
    if (cu_k) check_same_cu_seqlens(*cu_k, ctx.cu_k_, "cu_seqlens_k");
    const index_t B = ctx.batch_, Lq = ctx.lq_, Lk = ctx.lk_;
    auto shape_is = [](const auto& v, const char* name, index_t b, index_t l, index_t w,
                       const char* what) {
      detail::check_view(v, name);
      if (v.extent(0) != b || v.extent(1) != l || v.extent(2) != w)
        detail::fail(name, " has shape ", detail::shape_str(v), ", expected [", b, ", ", l, ", ", w,
                     "] (", what, ")");
    };
    shape_is(x, "x", B, Lq, c.d_model, "the forward's x: batch, length, d_model");
    if (!self)
      shape_is(memory, "memory", B, Lk, c.d_kv_in, "the forward's memory: batch, length, d_kv_in");
    shape_is(dout, "dout", B, Lq, c.d_model, "the output's shape");
    if (!dx.is_null()) {
      shape_is(dx, "dx", B, Lq, c.d_model, "x's shape");
      detail::check_not_self_overlapping(dx, "dx");
    }
    if (!dmemory.is_null()) {
      if (self) detail::fail("dmemory is given, but self-attention has no memory");
      shape_is(dmemory, "dmemory", B, Lk, c.d_kv_in, "memory's shape");
      detail::check_not_self_overlapping(dmemory, "dmemory");
    }
    if (g.mode == GradMode::accumulate) {
      auto same = [](const auto& gm, const auto& w, const char* name) {
        if (gm.rows() != w.rows() || gm.cols() != w.cols())
          detail::fail("grads.", name, " has shape [", gm.rows(), ", ", gm.cols(),
                       "], but the layer's is [", w.rows(), ", ", w.cols(),
                       "]; GradMode::accumulate adds into gradients of the layer's sizes "
                       "(layer.zero_grads(grads) makes them)");
      };
      same(g.wq, wq_, "wq");
      same(g.wk, wk_, "wk");
      same(g.wv, wv_, "wv");
      same(g.wo, wo_, "wo");
      same(g.bq, bq_, "bq");
      same(g.bk, bk_, "bk");
      same(g.bv, bv_, "bv");
      same(g.bo, bo_, "bo");
    }
    if (!cu) {  // a varlen call binds them per sequence, below
      const AttentionShape shape = detail::layer_shape(c, B, Lq, Lk);
      (void)mask.bind(shape);
      (void)mod.bind(shape);
    }
    // each output (dx, dmemory, the gradient matrices) against every input and each other
    const detail::InOutWeights<T> w = in_out_weights();
    auto gview = [](auto& m) {
      using S = std::remove_reference_t<decltype(*m.data())>;
      if (m.size() == 0) return TensorView<const S, 1>();
      return TensorView<const S, 1>(m.data(), {static_cast<index_t>(m.size())});
    };
    const TensorView<const T, 1> gviews[] = {gview(g.wq), gview(g.wk), gview(g.wv), gview(g.wo),
                                             gview(g.bq), gview(g.bk), gview(g.bv), gview(g.bo)};
    const char* gnames[] = {"grads.wq", "grads.wk", "grads.wv", "grads.wo",
                            "grads.bq", "grads.bk", "grads.bv", "grads.bo"};
    auto against_inputs = [&](const auto& out, const char* on) {
      if (out.is_null()) return;
      auto one = [&](const auto& in, const char* in_name) {
        if (!in.is_null()) detail::check_no_overlap(out, on, in, in_name);
      };
      one(x, "x");
      one(memory, "memory");
      one(dout, "dout");
      w.for_each(one);
      detail::for_each_view(mask, one);
      detail::for_each_view(mod, one);
      for (const std::vector<T>* buf : {&ctx.ws_.q, &ctx.ws_.k, &ctx.ws_.v, &ctx.ws_.heads})
        one(detail::buffer_view(*buf), "the context's saved tensors");
      one(detail::buffer_view(ctx.lse_), "the context's lse");
    };
    against_inputs(dx, "dx");
    against_inputs(dmemory, "dmemory");
    if (!dx.is_null() && !dmemory.is_null()) detail::check_no_overlap(dx, "dx", dmemory, "dmemory");
    for (int i = 0; i < 8; ++i) {
      against_inputs(gviews[i], gnames[i]);
      if (!gviews[i].is_null()) {
        if (!dx.is_null()) detail::check_no_overlap(dx, "dx", gviews[i], gnames[i]);
        if (!dmemory.is_null()) detail::check_no_overlap(dmemory, "dmemory", gviews[i], gnames[i]);
      }
    }

    // ---- dA = dout·Woᵀ                                           [B·Lq, Hq·Dv]
    const int nt = options.num_threads;
    const index_t N = B * Lq, M = B * Lk;
    const index_t nq = c.q_heads * c.head_dim, nk = c.kv_heads * c.head_dim,
                  nv = c.kv_heads * c.v_head_dim, no = c.q_heads * c.v_head_dim;
    auto rows = [](const RowMatrix<T>& m) {
      return detail::RowsRef<const T>{m.data(), m.rows(), m.cols(), m.cols()};
    };
    auto buf_rows = [](std::vector<T>& b, index_t r, index_t cols) {
      return detail::RowsRef<T>{detail::grow(b, r * cols), r, cols, cols};
    };
    auto cref = [](const detail::RowsRef<T>& r) {
      return detail::RowsRef<const T>{r.data, r.rows, r.cols, r.ld};
    };
    const detail::RowsRef<const T> d_out = detail::as_rows(dout, ctx.dobuf_);
    const detail::RowsRef<T> d_heads = buf_rows(ctx.dheads_, N, no);
    detail::gemm_abt(d_out, rows(wo_), d_heads, false, nt);

    // ---- dq, dk, dv of the attention (same mask, modifier, scale, dropout, positions)
    const detail::RowsRef<T> dq = buf_rows(ctx.dq_, N, nq), dk = buf_rows(ctx.dk_, M, nk),
                             dv = buf_rows(ctx.dvals_, M, nv);
    AttentionOptions o = options;
    o.lse = {};
    if (cu) {
      varlen_attention_backward(ctx, d_heads.data, dq.data, dk.data, dv.data, mask, mod, o);
    } else {
      attention_backward(ctx.q(), ctx.k(), ctx.v(), ctx.heads(), ctx.lse(),
                         bshd<const T>(d_heads.data, B, Lq, c.q_heads, c.v_head_dim),
                         bshd(dq.data, B, Lq, c.q_heads, c.head_dim),
                         bshd(dk.data, B, Lk, c.kv_heads, c.head_dim),
                         bshd(dv.data, B, Lk, c.kv_heads, c.v_head_dim), mask, mod, o);
    }

    // ---- RoPE backward: turn dq, dk back by -p·θ (positions restart per varlen sequence)
    if (ctx.rope_) {
      const Rope& r = *ctx.rope_;
      index_t longest = Lq;
      if (cu) {
        longest = 0;
        for (std::size_t s = 0; s + 1 < cu->size(); ++s)
          longest = std::max(longest, (*cu)[s + 1] - (*cu)[s]);
      }
      ctx.ws_.rope.ensure(r, detail::check_rope(r, c.head_dim), r.offset, longest);
      auto unturn = [&](index_t b, index_t r0, index_t lq, index_t lk) {
        detail::apply_rope_table(bshd(dq.data + r0 * nq, b, lq, c.q_heads, c.head_dim),
                                 ctx.ws_.rope, r.pairing, r.offset, nt, /*backward=*/true);
        detail::apply_rope_table(bshd(dk.data + r0 * nk, b, lk, c.kv_heads, c.head_dim),
                                 ctx.ws_.rope, r.pairing, r.offset, nt, /*backward=*/true);
      };
      if (!cu) {
        unturn(B, 0, Lq, Lk);
      } else {
        for (std::size_t s = 0; s + 1 < cu->size(); ++s) {
          const index_t len = (*cu)[s + 1] - (*cu)[s];
          if (len > 0) unturn(1, (*cu)[s], len, len);
        }
      }
    }

    // ---- parameter gradients: dWo = Aᵀ·dout, dWq = xᵀ·dq, dWk = srcᵀ·dk, dWv = srcᵀ·dv
    const bool add = g.mode == GradMode::accumulate;
    if (!add) zero_grads(g);  // sizes them (no allocation at a repeated size)
    auto grad_rows = [](RowMatrix<T>& m) {
      return detail::RowsRef<T>{m.data(), m.rows(), m.cols(), m.cols()};
    };
    const detail::RowsRef<const T> a{ctx.ws_.heads.data(), N, no, no};
    const detail::RowsRef<const T> xr = detail::as_rows(x, ctx.xbuf_);
    const detail::RowsRef<const T> src = self ? xr : detail::as_rows(memory, ctx.mbuf_);
    detail::gemm_atb(a, d_out, grad_rows(g.wo), add, nt);
    detail::gemm_atb(xr, cref(dq), grad_rows(g.wq), add, nt);
    detail::gemm_atb(src, cref(dk), grad_rows(g.wk), add, nt);
    detail::gemm_atb(src, cref(dv), grad_rows(g.wv), add, nt);
    if (bo_.size()) detail::column_sums(d_out, g.bo.data(), add);
    if (bq_.size()) detail::column_sums(cref(dq), g.bq.data(), add);
    if (bk_.size()) detail::column_sums(cref(dk), g.bk.data(), add);
    if (bv_.size()) detail::column_sums(cref(dv), g.bv.data(), add);

    // ---- input gradients: dx = dq·Wqᵀ (+ dk·Wkᵀ + dv·Wvᵀ for self-attention),
    //      dmemory = dk·Wkᵀ + dv·Wvᵀ
    if (!dx.is_null()) {
      const detail::RowsRef<T> t = detail::rows_target(dx, ctx.dxbuf_);
      detail::gemm_abt(cref(dq), rows(wq_), t, false, nt);
      if (self) {
        detail::gemm_abt(cref(dk), rows(wk_), t, true, nt);
        detail::gemm_abt(cref(dv), rows(wv_), t, true, nt);
      }
      detail::copy_rows_out(t, dx);
    }
    if (!dmemory.is_null()) {
      const detail::RowsRef<T> t = detail::rows_target(dmemory, ctx.dmbuf_);
      detail::gemm_abt(cref(dk), rows(wk_), t, false, nt);
      detail::gemm_abt(cref(dv), rows(wv_), t, true, nt);
      detail::copy_rows_out(t, dmemory);
    }
  }

  /// cu_seqlens of a backward_varlen call against those its forward saved.
  static void check_same_cu_seqlens(const std::vector<index_t>& cu,
                                    const std::vector<index_t>& saved, const char* name) {
    if (cu.size() != saved.size())
      detail::fail(name, " has ", cu.size(), " entries, but the forward that filled ctx had ",
                   saved.size());
    for (std::size_t s = 0; s < cu.size(); ++s)
      if (cu[s] != saved[s])
        detail::fail(name, "[", s, "] is ", cu[s], ", but the forward that filled ctx had ",
                     saved[s]);
  }

  /// The attention backward of a varlen forward: one attention_backward per
  /// sequence on its rows of the saved q, heads, lse and of dA, dq (query
  /// rows, ctx.cu_) and of the saved k, v and dk, dv (key rows, ctx.cu_k_),
  /// each its own [len_q, len_k] problem of batch 1, as the forward ran it.
  /// A sequence with queries but no keys gets dq = 0 there, one with keys
  /// but no queries dk = dv = 0. Every sequence's call is checked before the
  /// first one writes. A modifier's gradient outputs (dbias, a bias table)
  /// are written by each call, so their sum over the sequences is kept aside
  /// (in double, in sequence order) and written back at the end.
  template <class Mask, class Mod>
  void varlen_attention_backward(AttentionContext<T>& ctx, const T* dheads, T* dq, T* dk, T* dv,
                                 const Mask& mask, const Mod& mod,
                                 const AttentionOptions& o) const {
    const MultiHeadConfig& c = cfg_;
    const std::vector<index_t>& cu = ctx.cu_;
    const std::vector<index_t>& cuk = ctx.cu_k_;
    const index_t total = ctx.lq_, hq = c.q_heads, hkv = c.kv_heads, d = c.head_dim,
                  dvd = c.v_head_dim;
    const index_t nq = hq * d, nk = hkv * d, nv = hkv * dvd, no = hq * dvd;
    const T* q = ctx.ws_.q.data();
    const T* k = ctx.ws_.k.data();
    const T* v = ctx.ws_.v.data();
    const T* a = ctx.ws_.heads.data();
    auto global = [&](index_t lq, index_t lk) {
      return detail::global_shape(detail::layer_shape(c, 1, lq, lk), o.positions);
    };
    auto runs = [&](std::size_t s) { return cu[s + 1] > cu[s] && cuk[s + 1] > cuk[s]; };
    int nonempty = 0;
    for (std::size_t s = 0; s + 1 < cu.size(); ++s) nonempty += runs(s) ? 1 : 0;
    if (nonempty == 0) {                          // no scores anywhere: every gradient here is zero
      const auto bound = mod.bind(global(1, 1));  // bound (and checked) before any write
      std::fill(dq, dq + total * nq, T(0));
      std::fill(dk, dk + ctx.lk_ * nk, T(0));
      std::fill(dv, dv + ctx.lk_ * nv, T(0));
      detail::for_each_grad_element(bound,
                                    [](auto& e) { e = std::remove_reference_t<decltype(e)>(0); });
      return;
    }
    std::vector<double> sum;  // the modifier's gradient outputs, summed over sequences
    int done = 0;
    for (int pass = 0; pass < 2; ++pass) {  // 0: check every sequence, 1: run
      for (std::size_t s = 0; s + 1 < cu.size(); ++s) {
        const index_t r0 = cu[s], len = cu[s + 1] - cu[s];
        const index_t k0 = cuk[s], klen = cuk[s + 1] - cuk[s];
        if (!runs(s)) {  // no scores: the gradient of the rows it has is zero
          if (pass == 1) {
            std::fill(dq + r0 * nq, dq + (r0 + len) * nq, T(0));
            std::fill(dk + k0 * nk, dk + (k0 + klen) * nk, T(0));
            std::fill(dv + k0 * nv, dv + (k0 + klen) * nv, T(0));
          }
          continue;
        }
        const Tensor4<const T> qs = bshd(q + r0 * nq, 1, len, hq, d);
        const Tensor4<const T> ks = bshd(k + k0 * nk, 1, klen, hkv, d);
        const Tensor4<const T> vs = bshd(v + k0 * nv, 1, klen, hkv, dvd);
        const Tensor4<const T> as = bshd(a + r0 * no, 1, len, hq, dvd);
        const TensorView<const typename AttentionContext<T>::lse_type, 3> ls(
            ctx.lse_.data() + r0, {1, hq, len}, {hq * total, total, 1});
        const Tensor4<const T> dos = bshd(dheads + r0 * no, 1, len, hq, dvd);
        const Tensor4<T> dqs = bshd(dq + r0 * nq, 1, len, hq, d);
        const Tensor4<T> dks = bshd(dk + k0 * nk, 1, klen, hkv, d);
        const Tensor4<T> dvs = bshd(dv + k0 * nv, 1, klen, hkv, dvd);
        if (pass == 0) {  // what attention_backward checks, without its work
          AttentionOptions probe;
          probe.positions = o.positions;
          (void)detail::check_attention(qs, ks, vs, as, probe);
          const AttentionShape g = global(len, klen);
          detail::check_backward(qs, ks, vs, as, ls, dos, dqs, dks, dvs, mask.bind(g), mod.bind(g),
                                 o);
          continue;
        }
        attention_backward(qs, ks, vs, as, ls, dos, dqs, dks, dvs, mask, mod, o);
        if (nonempty < 2) continue;
        std::size_t at = 0;
        const bool first = done++ == 0;
        detail::for_each_grad_element(mod.bind(global(len, klen)), [&](const auto& e) {
          if (first)
            sum.push_back(static_cast<double>(e));
          else
            sum[at++] += static_cast<double>(e);
        });
      }
    }
    if (sum.empty()) return;
    std::size_t at = 0;  // the sums back into the modifier's gradient views, in the same order
    for (std::size_t s = 0; s + 1 < cu.size(); ++s) {
      if (!runs(s)) continue;
      detail::for_each_grad_element(
          mod.bind(global(cu[s + 1] - cu[s], cuk[s + 1] - cuk[s])),
          [&](auto& e) { e = static_cast<std::remove_reference_t<decltype(e)>>(sum[at++]); });
      break;  // every sequence binds the same views
    }
  }

  MultiHeadConfig cfg_;
  MultiHeadWorkspace<T> ws_;

 private:
  static Eigen::Map<const RowMatrix<T>> map(const T* data, index_t rows, index_t cols) {
    if (data == nullptr) detail::fail("weight buffer is null");
    if (rows <= 0 || cols <= 0) detail::fail("weight buffer has shape [", rows, ", ", cols, "]");
    return Eigen::Map<const RowMatrix<T>>(data, rows, cols);
  }
  static StridedMap<const T> matrix(const TensorView<const T, 2>& w) {
    detail::check_view(w, "weight");
    return attn::matrix(w);
  }
  static Eigen::Map<const Vector> vmap(const T* data, index_t n) {
    if (data == nullptr) detail::fail("bias buffer is null");
    if (n <= 0) detail::fail("bias buffer has length ", n);
    return Eigen::Map<const Vector>(data, n);
  }
  template <class Derived>
  void set(RowMatrix<T>& dst, const Eigen::MatrixBase<Derived>& w, WeightLayout layout,
           const char* name, const char* in_name, const char* out_name) {
    const bool oi = layout == WeightLayout::out_in;
    const index_t r = oi ? dst.cols() : dst.rows(), c = oi ? dst.rows() : dst.cols();
    if (w.rows() != r || w.cols() != c)
      detail::fail(name, " has shape [", w.rows(), ", ", w.cols(), "], expected [", r, ", ", c,
                   "] (", oi ? out_name : in_name, ", ", oi ? in_name : out_name, ") for ",
                   layout_name(layout));
    if (oi)
      dst = w.transpose().template cast<T>();
    else
      dst = w.template cast<T>();
    packed_ = false;
    ++version_;
  }
  template <class Derived>
  void set_bias(Vector& dst, const Eigen::MatrixBase<Derived>& b, const char* name, index_t n) {
    if (b.size() != n || (b.rows() != 1 && b.cols() != 1))
      detail::fail(name, " has shape [", b.rows(), ", ", b.cols(), "], expected a vector of ", n);
    dst = b.reshaped().template cast<T>();
    packed_ = false;
    ++version_;
  }
  static TensorView<const T, 2> view(const RowMatrix<T>& m) {
    return TensorView<const T, 2>(m.data(), {m.rows(), m.cols()});
  }
  static TensorView<const T, 1> view(const Vector& v) {
    if (v.size() == 0) return {};
    return TensorView<const T, 1>(v.data(), {v.size()});
  }

  RowMatrix<T> wq_, wk_, wv_, wo_;
  Vector bq_, bk_, bv_, bo_;
  mutable detail::PackedProjections<T> packs_;  // the weights packed for the kernel
  mutable bool packed_ = false;                 // packs_ matches the weights
  std::uint64_t version_ = 0;                   // bumped by every setter (contexts check it)

 public:
  AttentionProjections(const AttentionProjections& o)
      : cfg_(o.cfg_), ws_(o.ws_), wq_(o.wq_), wk_(o.wk_), wv_(o.wv_), wo_(o.wo_), bq_(o.bq_),
        bk_(o.bk_), bv_(o.bv_), bo_(o.bo_) {}  // packs_ points at o's biases: pack again
  AttentionProjections& operator=(const AttentionProjections& o) {
    if (this != &o) *this = AttentionProjections(o);
    return *this;
  }
  AttentionProjections(AttentionProjections&&) noexcept = default;
  AttentionProjections& operator=(AttentionProjections&&) noexcept = default;
  ~AttentionProjections() = default;
};

/// Multi-head (MHA), grouped-query (GQA) and multi-query (MQA) self-attention
/// layer with owned weights and optional rotary positions. x and out are
/// [B, L, d_model] views (e.g. TensorView<const float, 3>(ptr, {B, L, d_model})
/// for a row-major buffer). Scratch is kept between calls, so a layer is not
/// safe to call from two threads at once; use one layer per thread.
template <class T>
class MultiHeadAttention : public AttentionProjections<T> {
  using Base = AttentionProjections<T>;

 public:
  explicit MultiHeadAttention(const MultiHeadConfig& config) : Base(config) {}

  /// The rotary embedding (empty when disabled); set its offset to continue
  /// a sequence.
  std::optional<Rope>& rope() { return this->cfg_.rope; }

  /// out = MHA(x) under `mask` and `score_mod` (any policy the engine takes;
  /// the problem per head is Lq = Lk = L). options as for masked_attention
  /// (scale, num_threads for the projections too, lse [B, Hq, L], stats).
  template <class Mask = NoMask, class Mod = NoScoreMod>
  void forward(TensorView<const T, 3> x, TensorView<T, 3> out, const Mask& mask = {},
               const Mod& score_mod = {}, const AttentionOptions& options = {}) {
    const MultiHeadConfig c = detail::resolve_config(this->cfg_);  // rope() may have changed
    detail::check_self_attention(c, this->in_out_weights(), x, out, mask, score_mod, options,
                                 &this->ws_);
    detail::self_attention_forward(c, this->packed(), x, out, mask, score_mod, options, this->ws_);
  }
  /// Same, without a score modifier.
  template <class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
  void forward(TensorView<const T, 3> x, TensorView<T, 3> out, const Mask& mask,
               const AttentionOptions& options) {
    forward(x, out, mask, no_score_mod(), options);
  }

  /// Training forward: out = MHA(x) as forward(x, out, mask, score_mod,
  /// options), and `ctx` keeps what backward needs (see AttentionContext).
  /// options.lse, if set, also receives the lse.
  template <class Mask, class Mod>
  void forward(TensorView<const T, 3> x, TensorView<T, 3> out, const Mask& mask,
               const Mod& score_mod, const AttentionOptions& options, AttentionContext<T>& ctx) {
    const MultiHeadConfig c = detail::resolve_config(this->cfg_);
    detail::check_self_attention(c, this->in_out_weights(), x, out, mask, score_mod, options,
                                 &ctx.ws_);
    if (!options.lse.is_null())
      detail::check_no_overlap(options.lse, "options.lse", detail::buffer_view(ctx.lse_),
                               "the context's lse");
    detail::check_no_overlap(out, "out", detail::buffer_view(ctx.lse_), "the context's lse");
    const index_t B = x.extent(0), L = x.extent(1);
    const AttentionOptions o = Base::context_options(options, ctx, B, c.q_heads, L);
    detail::self_attention_forward(c, this->packed(), x, out, mask, score_mod, o, ctx.ws_);
    Base::copy_lse(ctx, options);
    this->save_context(ctx, c, B, L, L);
  }

  /// Gradients of the training forward that filled `ctx`, for dout = dL/dout
  /// [B, L, d_model]: writes dx = dL/dx (a null view skips it) and the
  /// parameter gradients into `grads` ([in, out] layout; overwritten, or
  /// added to with grads.mode = GradMode::accumulate). x, mask, score_mod and
  /// options (scale, dropout, positions, tiles) must be the forward's; the
  /// weights must not have changed since (checked). Chain:
  ///   dA = dout·Woᵀ, dWo = Aᵀ·dout, dbo = Σ dout;  attention_backward → dq, dk, dv;
  ///   RoPE backward (turn by -p·θ);  dWq = xᵀ·dq, dWk = xᵀ·dk, dWv = xᵀ·dv, db = Σ rows;
  ///   dx = dq·Wqᵀ + dk·Wkᵀ + dv·Wvᵀ.
  /// Bitwise identical for any options.num_threads. Throws attn::Error before
  /// writing dx or grads if a shape is wrong or an output overlaps an input.
  template <class Mask = NoMask, class Mod = NoScoreMod>
  void backward(AttentionContext<T>& ctx, TensorView<const T, 3> x, TensorView<const T, 3> dout,
                TensorView<T, 3> dx, AttentionGrads<T>& grads, const Mask& mask = {},
                const Mod& score_mod = {}, const AttentionOptions& options = {}) {
    this->backward_core(ctx, x, TensorView<const T, 3>(), dout, dx, TensorView<T, 3>(), grads, mask,
                        score_mod, options);
  }
  /// Same, without a score modifier.
  template <class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
  void backward(AttentionContext<T>& ctx, TensorView<const T, 3> x, TensorView<const T, 3> dout,
                TensorView<T, 3> dx, AttentionGrads<T>& grads, const Mask& mask,
                const AttentionOptions& options) {
    backward(ctx, x, dout, dx, grads, mask, no_score_mod(), options);
  }

  /// Incremental decoding against a KV cache: prefill with the prompt, then
  /// call again with each new token. x [B, Lnew, d_model] holds the next Lnew
  /// tokens of each of the cache's B sequences (Lnew equal across the batch;
  /// sequences may hold different lengths). Their keys and values, after RoPE
  /// at positions rope().offset + cache.length(b) + i, are appended to
  /// `cache` (any cache type: float, double, half, bf16, int8), then the new
  /// queries attend to everything sequence b holds, with the mask and
  /// modifier bound per sequence as in cache_attention (attn::causal(): each
  /// new token sees the tokens up to itself). out is [B, Lnew, d_model];
  /// options.lse, if set, [B, Hq, Lnew]. Equal (to rounding) to forward() on
  /// the whole sequence, of which out is the last Lnew rows. Every check
  /// (shapes, room in the cache, positions, overlaps) runs before the cache
  /// or out is written.
  template <class C, class Mask = NoMask, class Mod = NoScoreMod>
  void forward(TensorView<const T, 3> x, KVCache<C>& cache, TensorView<T, 3> out,
               const Mask& mask = {}, const Mod& score_mod = {},
               const AttentionOptions& options = {}) {
    const MultiHeadConfig c = detail::resolve_config(this->cfg_);
    detail::check_cached_self_attention(c, this->in_out_weights(), x, cache, out, mask, score_mod,
                                        options, &this->ws_);
    detail::cached_self_attention(c, this->packed(), x, cache, out, mask, score_mod, options,
                                  this->ws_);
  }
  /// Same, without a score modifier.
  template <class C, class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
  void forward(TensorView<const T, 3> x, KVCache<C>& cache, TensorView<T, 3> out, const Mask& mask,
               const AttentionOptions& options) {
    forward(x, cache, out, mask, no_score_mod(), options);
  }

  /// Self-attention over variable-length sequences packed back to back
  /// (FlashAttention's varlen form): x and out [total, d_model], sequence s
  /// is rows [cu_seqlens[s], cu_seqlens[s+1]) (cu_seqlens[0] = 0, last =
  /// total, empty sequences allowed). No padding rows are projected or
  /// attended. Each sequence is its own [len, len] problem: the mask and
  /// score_mod are bound with batch 1 and Lq = Lk = len (causal, windows,
  /// ALiBi, soft-cap, custom; a view-based mask must broadcast over its
  /// sizes), RoPE positions restart at rope().offset. options.lse, if set,
  /// is [1, Hq, total].
  template <class Mask = NoMask, class Mod = NoScoreMod>
  void forward_varlen(TensorView<const T, 2> x, const std::vector<index_t>& cu_seqlens,
                      TensorView<T, 2> out, const Mask& mask = {}, const Mod& score_mod = {},
                      const AttentionOptions& options = {}) {
    const MultiHeadConfig c = detail::resolve_config(this->cfg_);
    check_varlen(c, x, cu_seqlens, out, mask, score_mod, options, this->ws_);
    detail::self_attention_varlen(c, this->packed(), detail::as_batch1(x), cu_seqlens,
                                  detail::as_batch1(out), mask, score_mod, options, this->ws_);
  }

  /// Training forward of the varlen form: out as forward_varlen(x,
  /// cu_seqlens, out, mask, score_mod, options), and `ctx` keeps what
  /// backward_varlen needs (the saved tensors of AttentionContext over the
  /// packed rows, lse [1, Hq, total], a copy of cu_seqlens). options.lse, if
  /// set ([1, Hq, total]), also receives the lse.
  template <class Mask, class Mod>
  void forward_varlen(TensorView<const T, 2> x, const std::vector<index_t>& cu_seqlens,
                      TensorView<T, 2> out, const Mask& mask, const Mod& score_mod,
                      const AttentionOptions& options, AttentionContext<T>& ctx) {
    const MultiHeadConfig c = detail::resolve_config(this->cfg_);
    check_varlen(c, x, cu_seqlens, out, mask, score_mod, options, ctx.ws_);
    if (!options.lse.is_null())
      detail::check_no_overlap(options.lse, "options.lse", detail::buffer_view(ctx.lse_),
                               "the context's lse");
    detail::check_no_overlap(out, "out", detail::buffer_view(ctx.lse_), "the context's lse");
    const index_t total = x.extent(0);
    const AttentionOptions o = Base::context_options(options, ctx, 1, c.q_heads, total);
    detail::self_attention_varlen(c, this->packed(), detail::as_batch1(x), cu_seqlens,
                                  detail::as_batch1(out), mask, score_mod, o, ctx.ws_);
    Base::copy_lse(ctx, options);
    this->save_context(ctx, c, 1, total, total);
    ctx.cu_.assign(cu_seqlens.begin(), cu_seqlens.end());
    ctx.cu_k_ = ctx.cu_;
    ctx.varlen_ = true;
  }

  /// Gradients of the training forward_varlen that filled `ctx`, for dout =
  /// dL/dout [total, d_model]: dx [total, d_model] (a null view skips it)
  /// and the parameter gradients into `grads`, as backward() does for the
  /// batched forward. cu_seqlens, x, mask, score_mod and options must be the
  /// forward's (cu_seqlens and the weights are checked). The attention and
  /// the RoPE backward run per sequence on its own [len, len] problem,
  /// exactly as the forward ran them (positions restart per sequence); the
  /// projections' gradients sum over all packed rows. A modifier's gradient
  /// outputs (additive_bias's dbias, a relative-bias table) receive the sum
  /// over the sequences. Bitwise identical for any options.num_threads.
  /// Throws attn::Error before writing dx, grads or a modifier's gradients
  /// if a shape is wrong, an output overlaps an input, or a sequence's mask
  /// or modifier does not bind.
  template <class Mask = NoMask, class Mod = NoScoreMod>
  void backward_varlen(AttentionContext<T>& ctx, TensorView<const T, 2> x,
                       const std::vector<index_t>& cu_seqlens, TensorView<const T, 2> dout,
                       TensorView<T, 2> dx, AttentionGrads<T>& grads, const Mask& mask = {},
                       const Mod& score_mod = {}, const AttentionOptions& options = {}) {
    if (!ctx.empty() && ctx.varlen_) {  // the packed shapes, in their own words
      const index_t total = ctx.lq_, dm = this->cfg_.d_model;
      auto rows_are = [&](const auto& v, const char* name, const char* what) {
        detail::check_view(v, name);
        if (v.extent(0) != total || v.extent(1) != dm)
          detail::fail(name, " has shape ", detail::shape_str(v), ", expected [", total, ", ", dm,
                       "] (", what, ")");
      };
      rows_are(x, "x", "the forward's x: packed rows, d_model");
      rows_are(dout, "dout", "the output's shape: packed rows, d_model");
      if (!dx.is_null()) rows_are(dx, "dx", "x's shape: packed rows, d_model");
    }
    this->backward_core(ctx, detail::as_batch1(x), TensorView<const T, 3>(),
                        detail::as_batch1(dout),
                        dx.is_null() ? TensorView<T, 3>() : detail::as_batch1(dx),
                        TensorView<T, 3>(), grads, mask, score_mod, options, &cu_seqlens);
  }
  /// Same, without a score modifier.
  template <class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
  void backward_varlen(AttentionContext<T>& ctx, TensorView<const T, 2> x,
                       const std::vector<index_t>& cu_seqlens, TensorView<const T, 2> dout,
                       TensorView<T, 2> dx, AttentionGrads<T>& grads, const Mask& mask,
                       const AttentionOptions& options) {
    backward_varlen(ctx, x, cu_seqlens, dout, dx, grads, mask, no_score_mod(), options);
  }

  /// Same, without a score modifier.
  template <class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
  void forward_varlen(TensorView<const T, 2> x, const std::vector<index_t>& cu_seqlens,
                      TensorView<T, 2> out, const Mask& mask, const AttentionOptions& options) {
    forward_varlen(x, cu_seqlens, out, mask, no_score_mod(), options);
  }

  /// Fills weights [B, Hq, L, L] with each head's softmax probabilities for
  /// input x (projections and RoPE as in forward). O(L²) memory: for
  /// attention maps, not for the forward pass.
  template <class Mask = NoMask, class Mod = NoScoreMod>
  void attention_weights(TensorView<const T, 3> x, const TensorView<float, 4>& weights,
                         const Mask& mask = {}, const Mod& score_mod = {},
                         const AttentionOptions& options = {}) {
    const MultiHeadConfig c = detail::resolve_config(this->cfg_);
    if (c.d_kv_in != c.d_model)
      detail::fail("self-attention needs d_kv_in == d_model, but d_kv_in is ", c.d_kv_in,
                   " and d_model is ", c.d_model);
    detail::check_sequence(x, "x", c.d_model, "d_model");
    const index_t B = x.extent(0), L = x.extent(1);
    const AttentionShape s = detail::layer_shape(c, B, L, L);
    if (weights.extent(0) != B || weights.extent(1) != c.q_heads || weights.extent(2) != L ||
        weights.extent(3) != L)
      detail::fail("weights has shape ", detail::shape_str(weights), ", expected [", B, ", ",
                   c.q_heads, ", ", L, ", ", L, "] (batch, q heads, Lq, Lk)");
    detail::check_view(weights, "weights");
    detail::check_not_self_overlapping(weights, "weights");
    const TensorView<float, 3> none;
    AttentionOptions probe = options;  // weights is the output here
    probe.lse = none;
    detail::check_layer_outputs<T>(weights, probe, x, TensorView<const T, 3>(),
                                   this->in_out_weights(), mask, score_mod, &this->ws_);
    (void)mask.bind(s);
    (void)score_mod.bind(s);
    const detail::PackedProjections<T>& p = this->packed();
    T* q = detail::project_q(c, p, x, this->ws_, options.num_threads);
    const index_t nk = c.kv_heads * c.head_dim;
    T* k = detail::grow(this->ws_.k, B * L * nk);
    detail::project_packed(x, p.k, p.bk, detail::rows_view(k, B, L, nk), options.num_threads);
    const Tensor4<T> qv = bshd(q, B, L, c.q_heads, c.head_dim);
    const Tensor4<T> kv = bshd(k, B, L, c.kv_heads, c.head_dim);
    detail::apply_layer_rope(c, qv, kv, L, this->ws_, options.num_threads);
    attn::attention_weights(Tensor4<const T>(qv), Tensor4<const T>(kv), weights, mask, score_mod,
                            options);
  }

 private:
  /// Every check of a varlen forward (the policies bound per sequence).
  template <class Mask, class Mod>
  void check_varlen(const MultiHeadConfig& c, const TensorView<const T, 2>& x,
                    const std::vector<index_t>& cu_seqlens, const TensorView<T, 2>& out,
                    const Mask& mask, const Mod& score_mod, const AttentionOptions& options,
                    const MultiHeadWorkspace<T>& ws) const {
    detail::check_view(x, "x");
    detail::check_self_attention(c, this->in_out_weights(), detail::as_batch1(x),
                                 detail::as_batch1(out), mask, score_mod, options, &ws,
                                 /*bind_policies=*/false);  // bound per sequence below
    const index_t total = x.extent(0);
    detail::check_cu_seqlens(cu_seqlens, total);
    if (!options.lse.is_null() &&
        (options.lse.extent(0) != 1 || options.lse.extent(1) != c.q_heads ||
         options.lse.extent(2) != total))
      detail::fail("options.lse has shape ", detail::shape_str(options.lse), ", expected [1, ",
                   c.q_heads, ", ", total, "] (packed rows)");
    for (std::size_t s = 0; s + 1 < cu_seqlens.size(); ++s) {  // every sequence's mask binds
      const index_t len = cu_seqlens[s + 1] - cu_seqlens[s];
      if (len == 0) continue;
      const AttentionShape sh = detail::layer_shape(c, 1, len, len);
      (void)mask.bind(sh);
      (void)score_mod.bind(sh);
    }
  }
};

}  // namespace attn
