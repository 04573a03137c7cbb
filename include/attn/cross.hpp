// attn/cross.hpp — cross attention: queries from one sequence, keys and
// values from another (the encoder's output, "memory").
//
//   Q = x·Wq + bq            x      [B, Lq, d_model]
//   K = mem·Wk + bk          memory [B, Lk, d_kv_in]
//   V = mem·Wv + bv
//   out = concat_h(softmax(mask(score_mod(scale · Q_h·K_{g(h)}ᵀ))) · V_{g(h)})·Wo + bo
//
// Lq and Lk differ in general. A decoder calls cross attention once per step
// against the same memory, so K and V can be projected once
// (project_memory) and reused by every later call. Key padding of the memory
// is attn::key_padding(lengths) with lengths in memory positions. No rotary
// embedding: query and memory positions live in different sequences.
#pragma once

#include "attn/multi_head.hpp"
#include "attn/ops/varlen.hpp"

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

namespace attn {

/// K and V of a memory, projected once: [B, Lk, Hkv, D] and [B, Lk, Hkv, Dv]
/// buffers, read through bshd views. Reusable: projecting another memory of
/// the same or smaller size allocates nothing.
template <class T>
class ProjectedMemory {
 public:
  ProjectedMemory() = default;
  index_t batch() const { return batch_; }
  index_t length() const { return length_; }
  index_t kv_heads() const { return heads_; }
  /// Keys as a logical [B, Hkv, Lk, D] view.
  Tensor4<const T> keys() const { return bshd<const T>(k_.data(), batch_, length_, heads_, d_); }
  /// Values as a logical [B, Hkv, Lk, Dv] view.
  Tensor4<const T> values() const { return bshd<const T>(v_.data(), batch_, length_, heads_, dv_); }
  /// True until a memory has been projected into it.
  bool empty() const { return batch_ == 0; }

 private:
  template <class>
  friend class CrossAttention;
  std::vector<T> k_, v_;
  index_t batch_ = 0, length_ = 0, heads_ = 0, d_ = 0, dv_ = 0;
};

namespace detail {

/// Checks the query side of a cross-attention call against the memory's
/// batch and length, and binds the policies once so they throw early.
template <class T, class Mask, class Mod>
void check_cross(const MultiHeadConfig& c, const InOutWeights<T>& w,
                 const TensorView<const T, 3>& x, const TensorView<T, 3>& out,
                 const TensorView<const T, 3>& memory, index_t mem_batch, index_t mem_len,
                 const Mask& mask, const Mod& mod, const AttentionOptions& opt,
                 const MultiHeadWorkspace<T>* ws, bool bind_policies = true) {
  static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
  static_assert(is_score_mod_v<Mod>,
                "attn: the score_mod argument must be a score modifier (attn/score_mod.hpp)");
  check_sequence(x, "x", c.d_model, "d_model");
  if (x.extent(0) != mem_batch)
    fail("x has batch ", x.extent(0), ", but the memory has batch ", mem_batch);
  check_output(out, x, c.d_model);
  check_layer_outputs<T>(out, opt, x, memory, w, mask, mod, ws);
  if (!bind_policies) return;
  const AttentionShape s = layer_shape(c, x.extent(0), x.extent(1), mem_len);
  (void)mask.bind(s);
  (void)mod.bind(s);
}

/// Projects q of x and attends to the projected k, v (bshd views).
template <class T, class Mask, class Mod>
void cross_attention_forward(const MultiHeadConfig& c, const PackedProjections<T>& p,
                             const TensorView<const T, 3>& x, const Tensor4<const T>& k,
                             const Tensor4<const T>& v, const TensorView<T, 3>& out,
                             const Mask& mask, const Mod& mod, const AttentionOptions& opt,
                             MultiHeadWorkspace<T>& ws) {
  const index_t B = x.extent(0), L = x.extent(1);
  const T* q = project_q(c, p, x, ws, opt.num_threads);  // [B·Lq, Hq·D] = [B, Lq, Hq, D]
  attend_and_project_out<T>(c, p, bshd<const T>(q, B, L, c.q_heads, c.head_dim), k, v, out, mask,
                            mod, opt, ws);
}

/// Every check of a varlen cross-attention call: x and out [total_q,
/// d_model], memory [total_k, d_kv_in], cu_seqlens_q / cu_seqlens_k of
/// n + 1 offsets each, options.lse [1, Hq, total_q], and the policies bound
/// per sequence to its own [len_q, len_k] problem.
template <class T, class Mask, class Mod>
void check_cross_varlen(const MultiHeadConfig& c, const InOutWeights<T>& w,
                        const TensorView<const T, 2>& x, const std::vector<index_t>& cu_q,
                        const TensorView<const T, 2>& memory, const std::vector<index_t>& cu_k,
                        const TensorView<T, 2>& out, const Mask& mask, const Mod& mod,
                        const AttentionOptions& opt, const MultiHeadWorkspace<T>* ws) {
  check_view(x, "x");
  check_view(memory, "memory");
  check_view(out, "out");
  const index_t tq = x.extent(0), tk = memory.extent(0);
  check_sequence(as_batch1(memory), "memory", c.d_kv_in, "d_kv_in");
  check_cross(c, w, as_batch1(x), as_batch1(out), as_batch1(memory), 1, tk, mask, mod, opt, ws,
              /*bind_policies=*/false);  // bound per sequence below
  check_cu_seqlens(cu_q, tq, "cu_seqlens_q");
  check_cu_seqlens(cu_k, tk, "cu_seqlens_k");
  if (cu_q.size() != cu_k.size())
    fail("cu_seqlens_q has ", cu_q.size(), " entries, cu_seqlens_k ", cu_k.size(),
         "; both need n + 1 (one query and one memory sequence each)");
  if (!opt.lse.is_null() &&
      (opt.lse.extent(0) != 1 || opt.lse.extent(1) != c.q_heads || opt.lse.extent(2) != tq))
    fail("options.lse has shape ", shape_str(opt.lse), ", expected [1, ", c.q_heads, ", ", tq,
         "] (packed query rows)");
  for (std::size_t s = 0; s + 1 < cu_q.size(); ++s) {  // every sequence's policies bind
    const index_t lq = cu_q[s + 1] - cu_q[s], lk = cu_k[s + 1] - cu_k[s];
    if (lq == 0 || lk == 0) continue;
    const AttentionShape sh = layer_shape(c, 1, lq, lk);
    (void)mask.bind(sh);
    (void)mod.bind(sh);
  }
}

/// Cross attention over packed sequences on checked arguments: q projected
/// over all rows, attention per sequence (query rows [cu_q[s], cu_q[s+1])
/// against memory rows [cu_k[s], cu_k[s+1]) of the projected k, v, its own
/// [len_q, len_k] problem), the output projection over all rows. A sequence
/// with queries but no memory rows sees no key: zeros before the output
/// projection, lse −inf.
template <class T, class Mask, class Mod>
void cross_attention_varlen(const MultiHeadConfig& c, const PackedProjections<T>& p,
                            const TensorView<const T, 3>& x, const std::vector<index_t>& cu_q,
                            const T* k, const T* v, const std::vector<index_t>& cu_k,
                            const TensorView<T, 3>& out, const Mask& mask, const Mod& mod,
                            const AttentionOptions& opt, MultiHeadWorkspace<T>& ws) {
  const index_t total = x.extent(1), no = c.q_heads * c.v_head_dim;
  const T* q = project_q(c, p, x, ws, opt.num_threads);  // [total, Hq·D]
  T* heads = grow(ws.heads, total * no);
  for (std::size_t s = 0; s + 1 < cu_q.size(); ++s) {
    const index_t r0 = cu_q[s], len = cu_q[s + 1] - cu_q[s];
    if (len > 0)
      attend_packed_sequence(c, q, k, v, r0, len, cu_k[s], cu_k[s + 1] - cu_k[s], heads, mask, mod,
                             opt);
  }
  project_packed(TensorView<const T, 3>(rows_view(heads, index_t{1}, total, no)), p.o, p.bo, out,
                 opt.num_threads);
}

/// A config for cross attention must not ask for RoPE.
inline MultiHeadConfig resolve_cross_config(const MultiHeadConfig& config) {
  const MultiHeadConfig c = resolve_config(config);
  if (c.rope) fail("cross attention takes no rope (query and memory positions are unrelated)");
  return c;
}

}  // namespace detail

// ------------------------------------------------------- free function form --

/// Cross attention with caller-owned weights: out [B, Lq, d_model] from
/// queries x [B, Lq, d_model] and memory [B, Lk, d_kv_in]. mask and
/// score_mod see the per-head problem [Lq, Lk] (key_padding lengths count
/// memory positions). Throws attn::Error before writing out if a size or
/// weight shape is wrong. `workspace`, if given, is reused across calls.
template <class T, class Mask = NoMask, class Mod = NoScoreMod>
void cross_attention(detail::identity_t<TensorView<const T, 3>> x,
                     detail::identity_t<TensorView<const T, 3>> memory,
                     detail::identity_t<TensorView<T, 3>> out, const MultiHeadConfig& config,
                     const MultiHeadWeights<T>& weights, const Mask& mask = {},
                     const Mod& score_mod = {}, const AttentionOptions& options = {},
                     MultiHeadWorkspace<T>* workspace = nullptr) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "attn: attention layers compute in float or double");
  const MultiHeadConfig c = detail::resolve_cross_config(config);
  if (!weights.wqkv.is_null() || !weights.bqkv.is_null())
    detail::fail(
        "cross attention takes separate wq, wk, wv (its queries and memory differ), not a "
        "fused wqkv");
  const detail::InOutWeights<T> w = detail::check_weights(c, weights);
  detail::check_sequence(memory, "memory", c.d_kv_in, "d_kv_in");
  detail::check_cross(c, w, x, out, memory, memory.extent(0), memory.extent(1), mask, score_mod,
                      options, workspace);
  MultiHeadWorkspace<T> local;
  MultiHeadWorkspace<T>& ws = workspace ? *workspace : local;
  ws.packed.pack(w);
  detail::project_kv(c, ws.packed, memory, ws.k, ws.v, options.num_threads);
  const index_t B = memory.extent(0), Lk = memory.extent(1);
  detail::cross_attention_forward(c, ws.packed, x,
                                  bshd<const T>(ws.k.data(), B, Lk, c.kv_heads, c.head_dim),
                                  bshd<const T>(ws.v.data(), B, Lk, c.kv_heads, c.v_head_dim), out,
                                  mask, score_mod, options, ws);
}

// ------------------------------------------------------------------- layer --

/// Cross-attention layer (MHA, GQA or MQA) with owned weights: Wq
/// [d_model, Hq·D], Wk/Wv [d_kv_in, Hkv·D or Dv], Wo [Hq·Dv, d_model]. Either
/// pass the memory on every call, or project it once with project_memory()
/// and pass the ProjectedMemory. Not safe to call from two threads at once.
template <class T>
class CrossAttention : public AttentionProjections<T> {
  using Base = AttentionProjections<T>;

 public:
  /// Sizes as for MultiHeadAttention; config.rope must be empty.
  explicit CrossAttention(const MultiHeadConfig& config)
      : Base(detail::resolve_cross_config(config)) {}

  /// Projects memory [B, Lk, d_kv_in] into `kv` (its buffers are reused).
  void project_memory(TensorView<const T, 3> memory, ProjectedMemory<T>& kv,
                      int num_threads = 0) const {
    const MultiHeadConfig& c = this->cfg_;
    detail::check_sequence(memory, "memory", c.d_kv_in, "d_kv_in");
    // kv's buffers are written: the memory must not lie in them (the weights are the layer's own)
    for (const auto& [buf, name] : {std::pair{detail::buffer_view(kv.k_), "the projected keys"},
                                    std::pair{detail::buffer_view(kv.v_), "the projected values"}})
      if (!buf.is_null()) detail::check_no_overlap(buf, name, memory, "memory");
    detail::project_kv(c, this->packed(), memory, kv.k_, kv.v_, num_threads);
    kv.batch_ = memory.extent(0);
    kv.length_ = memory.extent(1);
    kv.heads_ = c.kv_heads;
    kv.d_ = c.head_dim;
    kv.dv_ = c.v_head_dim;
  }
  /// Same, into a new ProjectedMemory.
  ProjectedMemory<T> project_memory(TensorView<const T, 3> memory, int num_threads = 0) const {
    ProjectedMemory<T> kv;
    project_memory(memory, kv, num_threads);
    return kv;
  }

  /// out [B, Lq, d_model] = cross attention of x [B, Lq, d_model] over a
  /// projected memory. mask/score_mod see [Lq, Lk] per head.
  template <class Mask = NoMask, class Mod = NoScoreMod>
  void forward(TensorView<const T, 3> x, const ProjectedMemory<T>& kv, TensorView<T, 3> out,
               const Mask& mask = {}, const Mod& score_mod = {},
               const AttentionOptions& options = {}) {
    check_memory(kv);
    detail::check_cross(this->cfg_, this->in_out_weights(), x, out, TensorView<const T, 3>(),
                        kv.batch(), kv.length(), mask, score_mod, options, &this->ws_);
    for (const auto& [view, name] :
         {std::pair{kv.keys(), "memory keys"}, std::pair{kv.values(), "memory values"}}) {
      detail::check_no_overlap(out, "out", view, name);
      if (!options.lse.is_null()) detail::check_no_overlap(options.lse, "options.lse", view, name);
    }
    detail::cross_attention_forward(this->cfg_, this->packed(), x, kv.keys(), kv.values(), out,
                                    mask, score_mod, options, this->ws_);
  }
  /// Same, projecting memory [B, Lk, d_kv_in] on this call.
  template <class Mask = NoMask, class Mod = NoScoreMod>
  void forward(TensorView<const T, 3> x, TensorView<const T, 3> memory, TensorView<T, 3> out,
               const Mask& mask = {}, const Mod& score_mod = {},
               const AttentionOptions& options = {}) {
    detail::check_sequence(memory, "memory", this->cfg_.d_kv_in, "d_kv_in");
    detail::check_cross(this->cfg_, this->in_out_weights(), x, out, memory, memory.extent(0),
                        memory.extent(1), mask, score_mod, options, &this->ws_);
    project_memory(memory, memory_, options.num_threads);
    forward(x, memory_, out, mask, score_mod, options);
  }
  /// Without a score modifier, over a projected memory.
  template <class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
  void forward(TensorView<const T, 3> x, const ProjectedMemory<T>& kv, TensorView<T, 3> out,
               const Mask& mask, const AttentionOptions& options) {
    forward(x, kv, out, mask, no_score_mod(), options);
  }
  /// Without a score modifier, projecting the memory on this call.
  template <class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
  void forward(TensorView<const T, 3> x, TensorView<const T, 3> memory, TensorView<T, 3> out,
               const Mask& mask, const AttentionOptions& options) {
    forward(x, memory, out, mask, no_score_mod(), options);
  }

  /// Training forward: out = cross attention of x over memory, projecting
  /// the memory on this call, as forward(x, memory, out, mask, score_mod,
  /// options); `ctx` keeps what backward needs (see AttentionContext).
  template <class Mask, class Mod>
  void forward(TensorView<const T, 3> x, TensorView<const T, 3> memory, TensorView<T, 3> out,
               const Mask& mask, const Mod& score_mod, const AttentionOptions& options,
               AttentionContext<T>& ctx) {
    const MultiHeadConfig& c = this->cfg_;
    detail::check_sequence(memory, "memory", c.d_kv_in, "d_kv_in");
    detail::check_cross(c, this->in_out_weights(), x, out, memory, memory.extent(0),
                        memory.extent(1), mask, score_mod, options, &ctx.ws_);
    if (!options.lse.is_null())
      detail::check_no_overlap(options.lse, "options.lse", detail::buffer_view(ctx.lse_),
                               "the context's lse");
    detail::check_no_overlap(out, "out", detail::buffer_view(ctx.lse_), "the context's lse");
    const index_t B = x.extent(0), Lq = x.extent(1), Lk = memory.extent(1);
    const AttentionOptions o = Base::context_options(options, ctx, B, c.q_heads, Lq);
    detail::project_kv(c, this->packed(), memory, ctx.ws_.k, ctx.ws_.v, options.num_threads);
    detail::cross_attention_forward(
        c, this->packed(), x, bshd<const T>(ctx.ws_.k.data(), B, Lk, c.kv_heads, c.head_dim),
        bshd<const T>(ctx.ws_.v.data(), B, Lk, c.kv_heads, c.v_head_dim), out, mask, score_mod, o,
        ctx.ws_);
    Base::copy_lse(ctx, options);
    this->save_context(ctx, c, B, Lq, Lk);
  }

  /// Gradients of the training forward that filled `ctx`, for dout = dL/dout
  /// [B, Lq, d_model]: dx = dL/dx [B, Lq, d_model] (from q only), dmemory =
  /// dL/dmemory [B, Lk, d_kv_in] (from k and v; a null view skips either),
  /// and the parameter gradients into `grads` as MultiHeadAttention::backward
  /// does. x, memory, mask, score_mod and options must be the forward's.
  template <class Mask = NoMask, class Mod = NoScoreMod>
  void backward(AttentionContext<T>& ctx, TensorView<const T, 3> x, TensorView<const T, 3> memory,
                TensorView<const T, 3> dout, TensorView<T, 3> dx, TensorView<T, 3> dmemory,
                AttentionGrads<T>& grads, const Mask& mask = {}, const Mod& score_mod = {},
                const AttentionOptions& options = {}) {
    detail::check_view(memory, "memory");
    this->backward_core(ctx, x, memory, dout, dx, dmemory, grads, mask, score_mod, options);
  }
  /// Same, without a score modifier.
  template <class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
  void backward(AttentionContext<T>& ctx, TensorView<const T, 3> x, TensorView<const T, 3> memory,
                TensorView<const T, 3> dout, TensorView<T, 3> dx, TensorView<T, 3> dmemory,
                AttentionGrads<T>& grads, const Mask& mask, const AttentionOptions& options) {
    backward(ctx, x, memory, dout, dx, dmemory, grads, mask, no_score_mod(), options);
  }

  /// Cross attention over variable-length sequences packed back to back
  /// (FlashAttention's varlen form): sequence s has query rows
  /// [cu_seqlens_q[s], cu_seqlens_q[s+1]) of x and out [total_q, d_model]
  /// and memory rows [cu_seqlens_k[s], cu_seqlens_k[s+1]) of memory
  /// [total_k, d_kv_in] (both start at 0 and end at their totals; empty
  /// sequences allowed on either side). No padding rows are projected or
  /// attended. Each sequence is its own [len_q, len_k] problem: the mask and
  /// score_mod are bound with batch 1 and those lengths (a view-based policy
  /// must broadcast over them). Query rows of a sequence with no memory rows
  /// see no key (out = bo there, lse −inf). options.lse, if set, is [1, Hq,
  /// total_q]. Equal to one forward per sequence.
  template <class Mask = NoMask, class Mod = NoScoreMod>
  void forward_varlen(TensorView<const T, 2> x, const std::vector<index_t>& cu_seqlens_q,
                      TensorView<const T, 2> memory, const std::vector<index_t>& cu_seqlens_k,
                      TensorView<T, 2> out, const Mask& mask = {}, const Mod& score_mod = {},
                      const AttentionOptions& options = {}) {
    const MultiHeadConfig& c = this->cfg_;
    detail::check_cross_varlen(c, this->in_out_weights(), x, cu_seqlens_q, memory, cu_seqlens_k,
                               out, mask, score_mod, options, &this->ws_);
    detail::project_kv(c, this->packed(), detail::as_batch1(memory), this->ws_.k, this->ws_.v,
                       options.num_threads);
    detail::cross_attention_varlen(c, this->packed(), detail::as_batch1(x), cu_seqlens_q,
                                   this->ws_.k.data(), this->ws_.v.data(), cu_seqlens_k,
                                   detail::as_batch1(out), mask, score_mod, options, this->ws_);
  }
  /// Training forward of the varlen form: out as forward_varlen above, and
  /// `ctx` keeps what backward_varlen needs (the saved tensors of
  /// AttentionContext over the packed rows, lse [1, Hq, total_q], copies of
  /// both cu_seqlens). options.lse, if set, also receives the lse.
  template <class Mask, class Mod>
  void forward_varlen(TensorView<const T, 2> x, const std::vector<index_t>& cu_seqlens_q,
                      TensorView<const T, 2> memory, const std::vector<index_t>& cu_seqlens_k,
                      TensorView<T, 2> out, const Mask& mask, const Mod& score_mod,
                      const AttentionOptions& options, AttentionContext<T>& ctx) {
    const MultiHeadConfig& c = this->cfg_;
    detail::check_cross_varlen(c, this->in_out_weights(), x, cu_seqlens_q, memory, cu_seqlens_k,
                               out, mask, score_mod, options, &ctx.ws_);
    if (!options.lse.is_null())
      detail::check_no_overlap(options.lse, "options.lse", detail::buffer_view(ctx.lse_),
                               "the context's lse");
    detail::check_no_overlap(out, "out", detail::buffer_view(ctx.lse_), "the context's lse");
    const index_t tq = x.extent(0), tk = memory.extent(0);
    const AttentionOptions o = Base::context_options(options, ctx, 1, c.q_heads, tq);
    detail::project_kv(c, this->packed(), detail::as_batch1(memory), ctx.ws_.k, ctx.ws_.v,
                       options.num_threads);
    detail::cross_attention_varlen(c, this->packed(), detail::as_batch1(x), cu_seqlens_q,
                                   ctx.ws_.k.data(), ctx.ws_.v.data(), cu_seqlens_k,
                                   detail::as_batch1(out), mask, score_mod, o, ctx.ws_);
    Base::copy_lse(ctx, options);
    this->save_context(ctx, c, 1, tq, tk);
    ctx.cu_.assign(cu_seqlens_q.begin(), cu_seqlens_q.end());
    ctx.cu_k_.assign(cu_seqlens_k.begin(), cu_seqlens_k.end());
    ctx.varlen_ = true;
  }
  /// Same, without a score modifier.
  template <class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
  void forward_varlen(TensorView<const T, 2> x, const std::vector<index_t>& cu_seqlens_q,
                      TensorView<const T, 2> memory, const std::vector<index_t>& cu_seqlens_k,
                      TensorView<T, 2> out, const Mask& mask, const AttentionOptions& options) {
    forward_varlen(x, cu_seqlens_q, memory, cu_seqlens_k, out, mask, no_score_mod(), options);
  }

  /// Gradients of the training forward_varlen that filled `ctx`, for dout =
  /// dL/dout [total_q, d_model]: dx [total_q, d_model] (from q only),
  /// dmemory [total_k, d_kv_in] (from k and v; a null view skips either),
  /// and the parameter gradients into `grads`, as backward() does for the
  /// batched forward. The cu_seqlens, x, memory, mask, score_mod and options
  /// must be the forward's (both cu_seqlens and the weights are checked).
  /// The attention backward runs per sequence on its own [len_q, len_k]
  /// problem; the projections' gradients sum over all packed rows; a
  /// modifier's gradient outputs receive the sum over the sequences.
  /// Bitwise identical for any options.num_threads. Throws attn::Error
  /// before writing dx, dmemory, grads or a modifier's gradients if a shape
  /// is wrong, an output overlaps an input, or a sequence's mask or modifier
  /// does not bind.
  template <class Mask = NoMask, class Mod = NoScoreMod>
  void backward_varlen(AttentionContext<T>& ctx, TensorView<const T, 2> x,
                       const std::vector<index_t>& cu_seqlens_q, TensorView<const T, 2> memory,
                       const std::vector<index_t>& cu_seqlens_k, TensorView<const T, 2> dout,
                       TensorView<T, 2> dx, TensorView<T, 2> dmemory, AttentionGrads<T>& grads,
                       const Mask& mask = {}, const Mod& score_mod = {},
                       const AttentionOptions& options = {}) {
    if (!ctx.empty() && ctx.varlen_) {  // the packed shapes, in their own words
      const index_t tq = ctx.lq_, tk = ctx.lk_;
      auto rows_are = [&](const auto& v, const char* name, index_t rows, index_t w,
                          const char* what) {
        detail::check_view(v, name);
        if (v.extent(0) != rows || v.extent(1) != w)
          detail::fail(name, " has shape ", detail::shape_str(v), ", expected [", rows, ", ", w,
                       "] (", what, ")");
      };
      const index_t dm = this->cfg_.d_model, dk = this->cfg_.d_kv_in;
      rows_are(x, "x", tq, dm, "the forward's x: packed query rows, d_model");
      rows_are(memory, "memory", tk, dk, "the forward's memory: packed rows, d_kv_in");
      rows_are(dout, "dout", tq, dm, "the output's shape: packed query rows, d_model");
      if (!dx.is_null()) rows_are(dx, "dx", tq, dm, "x's shape: packed query rows, d_model");
      if (!dmemory.is_null())
        rows_are(dmemory, "dmemory", tk, dk, "memory's shape: packed rows, d_kv_in");
    }
    detail::check_view(memory, "memory");
    this->backward_core(ctx, detail::as_batch1(x), detail::as_batch1(memory),
                        detail::as_batch1(dout),
                        dx.is_null() ? TensorView<T, 3>() : detail::as_batch1(dx),
                        dmemory.is_null() ? TensorView<T, 3>() : detail::as_batch1(dmemory), grads,
                        mask, score_mod, options, &cu_seqlens_q, &cu_seqlens_k);
  }
  /// Same, without a score modifier.
  template <class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
  void backward_varlen(AttentionContext<T>& ctx, TensorView<const T, 2> x,
                       const std::vector<index_t>& cu_seqlens_q, TensorView<const T, 2> memory,
                       const std::vector<index_t>& cu_seqlens_k, TensorView<const T, 2> dout,
                       TensorView<T, 2> dx, TensorView<T, 2> dmemory, AttentionGrads<T>& grads,
                       const Mask& mask, const AttentionOptions& options) {
    backward_varlen(ctx, x, cu_seqlens_q, memory, cu_seqlens_k, dout, dx, dmemory, grads, mask,
                    no_score_mod(), options);
  }

  /// Fills weights [B, Hq, Lq, Lk] with each head's softmax probabilities of
  /// x over the projected memory. O(Lq·Lk) memory: for attention maps.
  template <class Mask = NoMask, class Mod = NoScoreMod>
  void attention_weights(TensorView<const T, 3> x, const ProjectedMemory<T>& kv,
                         const TensorView<float, 4>& weights, const Mask& mask = {},
                         const Mod& score_mod = {}, const AttentionOptions& options = {}) {
    const MultiHeadConfig& c = this->cfg_;
    check_memory(kv);
    detail::check_sequence(x, "x", c.d_model, "d_model");
    if (x.extent(0) != kv.batch())
      detail::fail("x has batch ", x.extent(0), ", but the memory has batch ", kv.batch());
    const AttentionShape s = detail::layer_shape(c, x.extent(0), x.extent(1), kv.length());
    (void)mask.bind(s);
    (void)score_mod.bind(s);
    const index_t B = x.extent(0), L = x.extent(1);
    detail::check_view(weights, "weights");
    detail::check_not_self_overlapping(weights, "weights");
    AttentionOptions probe = options;  // weights is the output here
    probe.lse = {};
    detail::check_layer_outputs<T>(weights, probe, x, TensorView<const T, 3>(),
                                   this->in_out_weights(), mask, score_mod, &this->ws_);
    for (const auto& [view, name] :
         {std::pair{kv.keys(), "memory keys"}, std::pair{kv.values(), "memory values"}})
      detail::check_no_overlap(weights, "weights", view, name);
    const T* q = detail::project_q(c, this->packed(), x, this->ws_, options.num_threads);
    attn::attention_weights(bshd<const T>(q, B, L, c.q_heads, c.head_dim), kv.keys(), weights, mask,
                            score_mod, options);
  }

 private:
  void check_memory(const ProjectedMemory<T>& kv) const {
    if (kv.empty()) detail::fail("the projected memory is empty: call project_memory first");
    if (kv.kv_heads() != this->cfg_.kv_heads || kv.keys().extent(3) != this->cfg_.head_dim ||
        kv.values().extent(3) != this->cfg_.v_head_dim)
      detail::fail("the projected memory has ", kv.kv_heads(), " heads of dim ",
                   kv.keys().extent(3), "/", kv.values().extent(3), ", but the layer has ",
                   this->cfg_.kv_heads, " kv heads of dim ", this->cfg_.head_dim, "/",
                   this->cfg_.v_head_dim);
  }

  ProjectedMemory<T> memory_;  // the memory projected by forward(x, memory, ...)
};

}  // namespace attn
