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
#include "attn/detail/gemm.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/mask.hpp"
#include "attn/masked.hpp"
#include "attn/options.hpp"
#include "attn/rope.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include "attn/core/eigen.hpp"

#include <algorithm>
#include <deque>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

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
/// own. Shapes: wq [d_model, Hq·D], wk [d_kv_in, Hkv·D], wv [d_kv_in, Hkv·Dv],
/// wo [Hq·Dv, d_model]; biases bq [Hq·D], bk [Hkv·D], bv [Hkv·Dv], bo [d_model],
/// each optional (a default-constructed view means "no bias"). Any strides:
/// row-major and transposed (column-major, e.g. a PyTorch [out, in] weight
/// viewed with strides {1, in}) are used in place; other strides are copied.
template <class T>
struct MultiHeadWeights {
  TensorView<const T, 2> wq, wk, wv, wo;
  TensorView<const T, 1> bq, bk, bv, bo;
};

namespace detail {

// ------------------------------------------------------- projection GEMMs --

/// y = x·W for a row-major x [rows, depth] and W [depth, cols], rows split
/// into fixed chunks of `chunk` rows handed to the threads; each thread runs
/// a single-threaded GEMM with its own packing buffers. PERF.md: independent
/// 1-thread GEMMs beat one GEMM that makes its threads wait on each other,
/// and packing buffers allocated per product cost fresh pages every call.
/// Buffers are made once per (cols, depth) and kept; the blocking depends
/// only on that shape, so results do not depend on the thread count.
template <class T>
class ProjectionGemms {
 public:
  static constexpr index_t chunk = 256;

  /// y[r, :] = x[r, :]·W for r < rows; ldx, ldw, ldy are (positive) row strides.
  void run(index_t rows, index_t cols, index_t depth, const T* x, index_t ldx, const T* w,
           index_t ldw, T* y, index_t ldy, int num_threads) {
    const index_t tasks = (rows + chunk - 1) / chunk;
    // Below ~4M multiply-adds (~0.1 ms) a parallel region costs more than it saves.
    const bool small =
        static_cast<double>(rows) * static_cast<double>(cols) * static_cast<double>(depth) < 4.0e6;
    const int threads = small ? 1 : resolve_threads(num_threads, tasks);
    Entry& e = entry(cols, depth, threads);
    auto body = [&](TileGemm<T>& g, index_t t) {
      const index_t r0 = t * chunk, n = std::min(chunk, rows - r0);
      for (index_t r = r0; r < r0 + n; ++r) std::fill(y + r * ldy, y + r * ldy + cols, T(0));
      g.add_ab(n, cols, depth, x + r0 * ldx, ldx, w, ldw, y + r0 * ldy, ldy, T(1));  // (n, cols)
    };
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
      {
        TileGemm<T>& g = *e.gemms[static_cast<std::size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 1)
        for (index_t t = 0; t < tasks; ++t) body(g, t);
      }
      return;
    }
#endif
    for (index_t t = 0; t < tasks; ++t) body(*e.gemms[0], t);
  }

 private:
  struct Entry {
    index_t cols = 0, depth = 0;
    std::vector<std::unique_ptr<TileGemm<T>>> gemms;  // one per thread
  };
  Entry& entry(index_t cols, index_t depth, int threads) {
    Entry* e = nullptr;
    for (Entry& x : entries_)
      if (x.cols == cols && x.depth == depth) e = &x;
    if (!e) {
      entries_.emplace_back();
      e = &entries_.back();
      e->cols = cols;
      e->depth = depth;
    }
    while (static_cast<int>(e->gemms.size()) < threads)
      e->gemms.push_back(std::make_unique<TileGemm<T>>(chunk, cols, depth));
    return *e;
  }
  std::deque<Entry> entries_;  // a deque keeps references stable as it grows
};

}  // namespace detail

/// Scratch of a layer: projected q, k, v and the heads' output, the RoPE
/// table and the projection GEMMs' packing buffers. Everything only grows,
/// so repeated calls at one size allocate nothing after the first.
template <class T>
struct MultiHeadWorkspace {
  std::vector<T> q, k, v, heads;
  detail::RopeTable<T> rope;
  detail::ProjectionGemms<T> gemms;
};

namespace detail {

template <class T>
using ColMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

/// Calls f with an Eigen expression of a 2-D weight view: a plain map for
/// row-major or column-major strides (the GEMM reads it in place), a strided
/// map otherwise.
template <class T, class F>
void with_matrix(const TensorView<const T, 2>& w, F&& f) {
  const index_t r = w.extent(0), c = w.extent(1);
  if (w.stride(1) == 1 || c == 1) {
    f(Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>(
        w.data(), r, c,
        Eigen::OuterStride<>(c == 1 ? std::max<index_t>(w.stride(0), 1) : w.stride(0))));
  } else if (w.stride(0) == 1 || r == 1) {
    f(Eigen::Map<const ColMatrix<T>, 0, Eigen::OuterStride<>>(
        w.data(), r, c,
        Eigen::OuterStride<>(r == 1 ? std::max<index_t>(w.stride(1), 1) : w.stride(1))));
  } else {
    f(matrix(w));
  }
}

/// Calls f(rows_map, first_row) over a [B, L, d] sequence view, as one
/// [B·L, d] matrix when batches are packed back to back, else per batch.
template <class T, class F>
void for_row_blocks(const TensorView<T, 3>& x, F&& f) {
  using Plain = std::remove_cv_t<T>;
  using Mat = std::conditional_t<std::is_const<T>::value, const RowMatrix<Plain>, RowMatrix<Plain>>;
  const index_t B = x.extent(0), L = x.extent(1), d = x.extent(2);
  if (x.stride(2) == 1 && (B == 1 || x.stride(0) == L * x.stride(1))) {
    f(Eigen::Map<Mat, 0, Eigen::OuterStride<>>(
          x.data(), B * L, d, Eigen::OuterStride<>(L == 1 && B == 1 ? d : x.stride(1))),
      index_t{0});
    return;
  }
  for (index_t b = 0; b < B; ++b)
    f(StridedMap<T>(x.data() + b * x.stride(0), L, d,
                    Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(x.stride(1), x.stride(2))),
      b * L);
}

/// y[rows] += bias, y row-major with cols columns.
template <class T, class Y>
void add_bias(Y& y, const TensorView<const T, 1>& bias) {
  if (!bias.is_null())
    y.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>, 0, Eigen::InnerStride<>>(
        bias.data(), 1, y.cols(), Eigen::InnerStride<>(bias.stride(0)));
}

/// y = x·W + bias for x [B, L, d_in] (rows given by for_row_blocks) into the
/// row-major [B·L, cols] buffer y. Row-major W and unit-stride rows take the
/// thread-split GEMMs of `gemms`; other strides go through an Eigen product.
template <class T>
void project(const TensorView<const T, 3>& x, const TensorView<const T, 2>& w,
             const TensorView<const T, 1>& bias, T* y, ProjectionGemms<T>& gemms, int num_threads) {
  const index_t cols = w.extent(1), depth = w.extent(0);
  for_row_blocks(x, [&](const auto& xm, index_t row0) {
    Eigen::Map<RowMatrix<T>> ym(y + row0 * cols, xm.rows(), cols);
    if (xm.innerStride() == 1 && xm.outerStride() > 0 && (w.stride(1) == 1 || cols == 1) &&
        w.stride(0) > 0) {
      gemms.run(xm.rows(), cols, depth, xm.data(), xm.outerStride(), w.data(), w.stride(0),
                ym.data(), cols, num_threads);
    } else {
      with_matrix(w, [&](const auto& wm) { ym.noalias() = xm * wm; });  // (rows, d_in)·(d_in, cols)
    }
    add_bias(ym, bias);
  });
}

/// out = heads·Wo + bo, heads row-major [B·L, Hq·Dv], out a [B, L, d_model] view.
template <class T>
void project_out(const T* heads, const TensorView<const T, 2>& wo, const TensorView<const T, 1>& bo,
                 const TensorView<T, 3>& out, ProjectionGemms<T>& gemms, int num_threads) {
  const index_t width = wo.extent(0), cols = wo.extent(1);
  for_row_blocks(out, [&](auto om, index_t row0) {
    Eigen::Map<const RowMatrix<T>> hm(heads + row0 * width, om.rows(), width);
    if (om.innerStride() == 1 && om.outerStride() > 0 && (wo.stride(1) == 1 || cols == 1) &&
        wo.stride(0) > 0) {
      gemms.run(om.rows(), cols, width, hm.data(), width, wo.data(), wo.stride(0), om.data(),
                om.outerStride(), num_threads);
    } else {
      with_matrix(
          wo, [&](const auto& wm) { om.noalias() = hm * wm; });  // (rows, Hq·Dv)·(Hq·Dv, d_model)
    }
    add_bias(om, bo);
  });
}

/// Sets OpenMP's thread count for the GEMMs of one call (when the caller
/// asked for a number) and restores it afterwards.
class GemmThreads {
 public:
  explicit GemmThreads(int n) {
#ifdef _OPENMP
    if (n > 0) {
      saved_ = omp_get_max_threads();
      omp_set_num_threads(n);
    }
#else
    (void)n;
#endif
  }
  ~GemmThreads() {
#ifdef _OPENMP
    if (saved_ > 0) omp_set_num_threads(saved_);
#endif
  }
  GemmThreads(const GemmThreads&) = delete;
  GemmThreads& operator=(const GemmThreads&) = delete;

 private:
  int saved_ = 0;
};

/// Grows a buffer to at least n elements (never shrinks, so steady-state
/// calls do not allocate).
template <class T>
T* grow(std::vector<T>& buf, index_t n) {
  if (static_cast<index_t>(buf.size()) < n) buf.resize(static_cast<std::size_t>(n));
  return buf.data();
}

/// Checks one weight view against its expected shape.
template <class T>
void check_weight(const TensorView<const T, 2>& w, const char* name, index_t rows, index_t cols,
                  const char* meaning) {
  if (w.data() == nullptr) fail(name, " has null data");
  if (w.extent(0) != rows || w.extent(1) != cols)
    fail(name, " has shape [", w.extent(0), ", ", w.extent(1), "], expected [", rows, ", ", cols,
         "] (", meaning, ")");
}

/// Checks one optional bias view against its expected length.
template <class T>
void check_bias(const TensorView<const T, 1>& b, const char* name, index_t n) {
  if (b.is_null()) return;
  if (b.data() == nullptr) fail(name, " has null data");
  if (b.extent(0) != n) fail(name, " has length ", b.extent(0), ", expected ", n);
}

/// Checks all weights of a resolved config.
template <class T>
void check_weights(const MultiHeadConfig& c, const MultiHeadWeights<T>& w) {
  check_weight(w.wq, "Wq", c.d_model, c.q_heads * c.head_dim, "d_model, q_heads*head_dim");
  check_weight(w.wk, "Wk", c.d_kv_in, c.kv_heads * c.head_dim, "d_kv_in, kv_heads*head_dim");
  check_weight(w.wv, "Wv", c.d_kv_in, c.kv_heads * c.v_head_dim, "d_kv_in, kv_heads*v_head_dim");
  check_weight(w.wo, "Wo", c.q_heads * c.v_head_dim, c.d_model, "q_heads*v_head_dim, d_model");
  check_bias(w.bq, "bq", c.q_heads * c.head_dim);
  check_bias(w.bk, "bk", c.kv_heads * c.head_dim);
  check_bias(w.bv, "bv", c.kv_heads * c.v_head_dim);
  check_bias(w.bo, "bo", c.d_model);
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

/// Checks the output [B, L, d_model] against the query input, and that it
/// overlaps no input.
template <class T>
void check_output(const TensorView<T, 3>& out, const TensorView<const T, 3>& x, index_t d_model) {
  check_view(out, "out");
  if (out.extent(0) != x.extent(0) || out.extent(1) != x.extent(1) || out.extent(2) != d_model)
    fail("out has shape ", shape_str(out), ", expected [", x.extent(0), ", ", x.extent(1), ", ",
         d_model, "] (batch, length, d_model)");
  check_not_self_overlapping(out, "out");
  check_no_overlap(out, "out", x, "x");
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

/// Projects K and V of src [B, Lk, d_kv_in] into k [B·Lk, Hkv·D] and v [B·Lk, Hkv·Dv].
template <class T>
void project_kv(const MultiHeadConfig& c, const MultiHeadWeights<T>& w,
                const TensorView<const T, 3>& src, std::vector<T>& k, std::vector<T>& v,
                ProjectionGemms<T>& gemms, int num_threads) {
  const index_t rows = src.extent(0) * src.extent(1);
  project(src, w.wk, w.bk, grow(k, rows * c.kv_heads * c.head_dim), gemms, num_threads);
  project(src, w.wv, w.bv, grow(v, rows * c.kv_heads * c.v_head_dim), gemms, num_threads);
}

/// Everything after the projections: attention on bshd views of the
/// projected buffers, then the output projection into out.
template <class T, class Mask, class Mod>
void attend_and_project_out(const MultiHeadConfig& c, const MultiHeadWeights<T>& w,
                            const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                            const TensorView<const T, 4>& v, const TensorView<T, 3>& out,
                            const Mask& mask, const Mod& mod, const AttentionOptions& opt,
                            MultiHeadWorkspace<T>& ws) {
  const index_t B = q.extent(0), L = q.extent(2);
  T* heads = grow(ws.heads, B * L * c.q_heads * c.v_head_dim);
  masked_attention(q, k, v, bshd(heads, B, L, c.q_heads, c.v_head_dim), mask, mod, opt);
  project_out<T>(heads, w.wo, w.bo, out, ws.gemms, opt.num_threads);
}

/// The self-attention layer on checked arguments.
template <class T, class Mask, class Mod>
void self_attention_forward(const MultiHeadConfig& c, const MultiHeadWeights<T>& w,
                            const TensorView<const T, 3>& x, const TensorView<T, 3>& out,
                            const Mask& mask, const Mod& mod, const AttentionOptions& opt,
                            MultiHeadWorkspace<T>& ws) {
  const index_t B = x.extent(0), L = x.extent(1);
  const GemmThreads threads(opt.num_threads);
  T* q = grow(ws.q, B * L * c.q_heads * c.head_dim);
  project(x, w.wq, w.bq, q, ws.gemms, opt.num_threads);  // [B·L, Hq·D] = [B, L, Hq, D]
  project_kv(c, w, x, ws.k, ws.v, ws.gemms, opt.num_threads);
  const Tensor4<T> qv = bshd(q, B, L, c.q_heads, c.head_dim);
  const Tensor4<T> kv = bshd(ws.k.data(), B, L, c.kv_heads, c.head_dim);
  const Tensor4<T> vv = bshd(ws.v.data(), B, L, c.kv_heads, c.v_head_dim);
  if (c.rope) {
    const index_t rd = check_rope(*c.rope, c.head_dim);
    ws.rope.ensure(*c.rope, rd, c.rope->offset, L);
    apply_rope_table(qv, ws.rope, c.rope->pairing, c.rope->offset, opt.num_threads);
    apply_rope_table(kv, ws.rope, c.rope->pairing, c.rope->offset, opt.num_threads);
  }
  attend_and_project_out<T>(c, w, qv, kv, vv, out, mask, mod, opt, ws);
}

/// Checks every argument of a self-attention call.
template <class T, class Mask, class Mod>
void check_self_attention(const MultiHeadConfig& c, const TensorView<const T, 3>& x,
                          const TensorView<T, 3>& out, const Mask& mask, const Mod& mod) {
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
  const AttentionShape s = layer_shape(c, x.extent(0), x.extent(1), x.extent(1));
  (void)mask.bind(s);
  (void)mod.bind(s);
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
/// x and out [B, L, d_model] (any strides; rows with unit inner stride are
/// fastest). `config` gives the sizes (zeros derived, see MultiHeadConfig),
/// `weights` the projections, `mask`/`score_mod` any policy the engine takes
/// (applied per head to the [L, L] scores), `options` as for
/// masked_attention (scale, threads, tiles, lse [B, Hq, L], stats).
/// `workspace`, if given, is reused across calls (no allocation at a
/// repeated size); otherwise scratch is allocated per call. Throws
/// attn::Error before writing out if a size or weight shape is wrong.
template <class T, class Mask = NoMask, class Mod = NoScoreMod>
void multi_head_attention(detail::identity_t<TensorView<const T, 3>> x,
                          detail::identity_t<TensorView<T, 3>> out, const MultiHeadConfig& config,
                          const MultiHeadWeights<T>& weights, const Mask& mask = {},
                          const Mod& score_mod = {}, const AttentionOptions& options = {},
                          MultiHeadWorkspace<T>* workspace = nullptr) {
  const MultiHeadConfig c = detail::resolve_config(config);
  detail::check_weights(c, weights);
  detail::check_self_attention(c, x, out, mask, score_mod);
  MultiHeadWorkspace<T> local;
  detail::self_attention_forward(c, weights, x, out, mask, score_mod, options,
                                 workspace ? *workspace : local);
}

// ------------------------------------------------------------------- layer --

/// The weights of an attention layer, owned, with setters that check shapes.
/// Base of MultiHeadAttention and CrossAttention.
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

  /// Wq [d_model, Hq·D] from any Eigen matrix (y = x·Wq).
  template <class Derived>
  void set_wq(const Eigen::MatrixBase<Derived>& w) {
    set(wq_, w, "Wq", "d_model, q_heads*head_dim");
  }
  /// Wk [d_kv_in, Hkv·D].
  template <class Derived>
  void set_wk(const Eigen::MatrixBase<Derived>& w) {
    set(wk_, w, "Wk", "d_kv_in, kv_heads*head_dim");
  }
  /// Wv [d_kv_in, Hkv·Dv].
  template <class Derived>
  void set_wv(const Eigen::MatrixBase<Derived>& w) {
    set(wv_, w, "Wv", "d_kv_in, kv_heads*v_head_dim");
  }
  /// Wo [Hq·Dv, d_model].
  template <class Derived>
  void set_wo(const Eigen::MatrixBase<Derived>& w) {
    set(wo_, w, "Wo", "q_heads*v_head_dim, d_model");
  }

  /// Wq from a row-major buffer of rows × cols (checked against the config).
  void set_wq(const T* data, index_t rows, index_t cols) { set_wq(map(data, rows, cols)); }
  void set_wk(const T* data, index_t rows, index_t cols) { set_wk(map(data, rows, cols)); }
  void set_wv(const T* data, index_t rows, index_t cols) { set_wv(map(data, rows, cols)); }
  void set_wo(const T* data, index_t rows, index_t cols) { set_wo(map(data, rows, cols)); }

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
  }

  const RowMatrix<T>& wq() const { return wq_; }
  const RowMatrix<T>& wk() const { return wk_; }
  const RowMatrix<T>& wv() const { return wv_; }
  const RowMatrix<T>& wo() const { return wo_; }

  /// Views of the weights, as multi_head_attention takes them.
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

 protected:
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  MultiHeadConfig cfg_;
  MultiHeadWorkspace<T> ws_;

 private:
  static Eigen::Map<const RowMatrix<T>> map(const T* data, index_t rows, index_t cols) {
    if (data == nullptr) detail::fail("weight buffer is null");
    if (rows <= 0 || cols <= 0) detail::fail("weight buffer has shape [", rows, ", ", cols, "]");
    return Eigen::Map<const RowMatrix<T>>(data, rows, cols);
  }
  static Eigen::Map<const Vector> vmap(const T* data, index_t n) {
    if (data == nullptr) detail::fail("bias buffer is null");
    if (n <= 0) detail::fail("bias buffer has length ", n);
    return Eigen::Map<const Vector>(data, n);
  }
  template <class Derived>
  static void set(RowMatrix<T>& dst, const Eigen::MatrixBase<Derived>& w, const char* name,
                  const char* meaning) {
    if (w.rows() != dst.rows() || w.cols() != dst.cols())
      detail::fail(name, " has shape [", w.rows(), ", ", w.cols(), "], expected [", dst.rows(),
                   ", ", dst.cols(), "] (", meaning, ")");
    dst = w.template cast<T>();
  }
  template <class Derived>
  static void set_bias(Vector& dst, const Eigen::MatrixBase<Derived>& b, const char* name,
                       index_t n) {
    if (b.size() != n || (b.rows() != 1 && b.cols() != 1))
      detail::fail(name, " has shape [", b.rows(), ", ", b.cols(), "], expected a vector of ", n);
    dst = b.reshaped().template cast<T>();
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
  /// (scale, num_threads for the GEMMs too, lse [B, Hq, L], stats).
  template <class Mask = NoMask, class Mod = NoScoreMod>
  void forward(TensorView<const T, 3> x, TensorView<T, 3> out, const Mask& mask = {},
               const Mod& score_mod = {}, const AttentionOptions& options = {}) {
    const MultiHeadConfig c = detail::resolve_config(this->cfg_);  // rope() may have changed
    detail::check_self_attention(c, x, out, mask, score_mod);
    detail::self_attention_forward(c, this->weights(), x, out, mask, score_mod, options, this->ws_);
  }
  /// Same, without a score modifier.
  template <class Mask, class = std::enable_if_t<is_mask_v<Mask>>>
  void forward(TensorView<const T, 3> x, TensorView<T, 3> out, const Mask& mask,
               const AttentionOptions& options) {
    forward(x, out, mask, no_score_mod(), options);
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
    (void)mask.bind(s);
    (void)score_mod.bind(s);
    const MultiHeadWeights<T> w = this->weights();
    const detail::GemmThreads threads(options.num_threads);
    T* q = detail::grow(this->ws_.q, B * L * c.q_heads * c.head_dim);
    T* k = detail::grow(this->ws_.k, B * L * c.kv_heads * c.head_dim);
    detail::project(x, w.wq, w.bq, q, this->ws_.gemms, options.num_threads);
    detail::project(x, w.wk, w.bk, k, this->ws_.gemms, options.num_threads);
    const Tensor4<T> qv = bshd(q, B, L, c.q_heads, c.head_dim);
    const Tensor4<T> kv = bshd(k, B, L, c.kv_heads, c.head_dim);
    if (c.rope) {
      const index_t rd = detail::check_rope(*c.rope, c.head_dim);
      this->ws_.rope.ensure(*c.rope, rd, c.rope->offset, L);
      detail::apply_rope_table(qv, this->ws_.rope, c.rope->pairing, c.rope->offset,
                               options.num_threads);
      detail::apply_rope_table(kv, this->ws_.rope, c.rope->pairing, c.rope->offset,
                               options.num_threads);
    }
    attn::attention_weights(Tensor4<const T>(qv), Tensor4<const T>(kv), weights, mask, score_mod,
                            options);
  }
};

}  // namespace attn
