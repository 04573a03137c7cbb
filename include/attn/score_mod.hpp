// attn/score_mod.hpp — score modifiers: functions of the scaled score.
//
// score = scale · q·k, then each modifier in the order given, then the mask.
// A modifier is a small value type. The engine calls `bind(shape)` (checks,
// may throw attn::Error), then on each computed tile
//
//   apply_tile(b, h, q0, k0, s, ld, rows, cols)   s[r*ld + c] is the score of (q0+r, k0+c)
//
// and the reference calls the element form `(*this)(b, h, q, k, score)`.
// Modifiers compose with attn::compose(m1, m2, ...), applied left to right.
//
// Each modifier also carries its derivative, for the backward pass. With x
// the raw score (scale · q·k before the modifier) and y = mod(x):
//
//   grad(b, h, q, k, x, g)                          g = dL/dy in, returns dL/dx
//   grad_tile(b, h, q0, k0, x, g, ld, rows, cols)   the same on a tile, g in place
//
// `unit_grad` says dy/dx = 1 everywhere (bias, ALiBi): the backward then
// keeps no copy of x and passes x = nullptr. A modifier with a gradient
// output (additive_bias(bias, dbias)) adds dL/dy into it from grad and
// grad_tile; the backward zeroes it first.
#pragma once

#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

namespace attn {

/// Marks a type as a score modifier.
struct ScoreModPolicy {};

template <class M>
inline constexpr bool is_score_mod_v = std::is_base_of<ScoreModPolicy, M>::value;

namespace detail {
/// Default tile form: the element form applied to every score of the tile.
template <class Mod, class Acc>
void apply_elementwise(const Mod& mod, index_t b, index_t h, index_t q0, index_t k0, Acc* s,
                       index_t ld, index_t rows, index_t cols) {
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c) s[r * ld + c] = mod(b, h, q0 + r, k0 + c, s[r * ld + c]);
}
/// Default gradient tile form: g[r, c] = mod.grad(..., x[r, c], g[r, c]).
template <class Mod, class Acc>
void grad_elementwise(const Mod& mod, index_t b, index_t h, index_t q0, index_t k0, const Acc* x,
                      Acc* g, index_t ld, index_t rows, index_t cols) {
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c)
      g[r * ld + c] = mod.grad(b, h, q0 + r, k0 + c, x ? x[r * ld + c] : Acc(0), g[r * ld + c]);
}
}  // namespace detail

// ---------------------------------------------------------------- identity --

/// Leaves scores unchanged (costs nothing).
struct NoScoreMod : ScoreModPolicy {
  static constexpr bool is_identity = true;
  static constexpr bool unit_grad = true;
  NoScoreMod bind(const AttentionShape&) const { return *this; }
  template <class Acc>
  Acc operator()(index_t, index_t, index_t, index_t, Acc s) const {
    return s;
  }
  template <class Acc>
  void apply_tile(index_t, index_t, index_t, index_t, Acc*, index_t, index_t, index_t) const {}
  template <class Acc>
  Acc grad(index_t, index_t, index_t, index_t, Acc, Acc g) const {
    return g;
  }
  template <class Acc>
  void grad_tile(index_t, index_t, index_t, index_t, const Acc*, Acc*, index_t, index_t,
                 index_t) const {}
};

inline NoScoreMod no_score_mod() { return {}; }

// ---------------------------------------------------------- additive bias --

/// score += bias[b, h, q, k] (bias broadcast over size-1 batch, head and
/// query dims). With a gradient view `dbias` (same shape as the bias, float
/// or double), the backward writes dL/dbias there, summed over the broadcast
/// batch and head dimensions (a bias broadcast over queries takes no dbias).
template <class T, class G = float>
struct AdditiveBias : ScoreModPolicy {
  static_assert(std::is_same<G, float>::value || std::is_same<G, double>::value,
                "attn: the gradient of an additive bias is stored as float or double");
  static constexpr bool is_identity = false;
  static constexpr bool unit_grad = true;
  TensorView<const T, 4> view;
  TensorView<G, 4> grad_view;  ///< dbias; null: not wanted

  AdditiveBias bind(const AttentionShape& s) const {
    detail::check_broadcast_view(view, s, "additive_bias");
    if (!grad_view.is_null()) {
      if (view.extent(2) == 1 && s.lq != 1)
        detail::fail("dbias is not supported for an additive_bias broadcast over queries (Lq ",
                     s.lq, "); expand the bias to [.., ", s.lq, ", ", s.lk, "]");
      detail::check_broadcast_view(grad_view, s, "dbias");
      if (grad_view.extent(0) != view.extent(0) || grad_view.extent(1) != view.extent(1))
        detail::fail("dbias has shape ", detail::shape_str(grad_view), ", but the bias has shape ",
                     detail::shape_str(view));
      detail::check_not_self_overlapping(grad_view, "dbias");
    }
    return *this;
  }
  template <class F>
  void for_each_view(F&& f) const {
    f(view, "additive_bias");
  }
  /// Calls f(view, name) for each gradient output (the backward checks and zeroes them).
  template <class F>
  void for_each_grad_view(F&& f) const {
    if (!grad_view.is_null()) f(grad_view, "dbias");
  }
  template <class Acc>
  Acc grad(index_t b, index_t h, index_t q, index_t k, Acc, Acc g) const {
    if (!grad_view.is_null())
      grad_view.data()[detail::broadcast_row(grad_view, b, h, q) + k * grad_view.stride(3)] +=
          static_cast<G>(g);
    return g;
  }
  template <class Acc>
  void grad_tile(index_t b, index_t h, index_t q0, index_t k0, const Acc*, Acc* g, index_t ld,
                 index_t rows, index_t cols) const {
    if (grad_view.is_null()) return;
    const index_t sk = grad_view.stride(3);
    for (index_t r = 0; r < rows; ++r) {
      G* row = grad_view.data() + detail::broadcast_row(grad_view, b, h, q0 + r) + k0 * sk;
      const Acc* in = g + r * ld;
      for (index_t c = 0; c < cols; ++c) row[c * sk] += static_cast<G>(in[c]);
    }
  }
  template <class Acc>
  Acc operator()(index_t b, index_t h, index_t q, index_t k, Acc s) const {
    return s +
           static_cast<Acc>(view.data()[detail::broadcast_row(view, b, h, q) + k * view.stride(3)]);
  }
  template <class Acc>
  void apply_tile(index_t b, index_t h, index_t q0, index_t k0, Acc* s, index_t ld, index_t rows,
                  index_t cols) const {
    const index_t sk = view.stride(3);
    for (index_t r = 0; r < rows; ++r) {
      const T* row = view.data() + detail::broadcast_row(view, b, h, q0 + r) + k0 * sk;
      Acc* out = s + r * ld;
      for (index_t c = 0; c < cols; ++c) out[c] += static_cast<Acc>(row[c * sk]);
    }
  }
};

/// Additive bias view [B or 1, H or 1, Lq or 1, Lk] (size-1 dims broadcast).
template <class T>
AdditiveBias<std::remove_cv_t<T>> additive_bias(TensorView<T, 4> view) {
  AdditiveBias<std::remove_cv_t<T>> m;
  m.view = view;
  return m;
}

/// Additive bias with its gradient output: attention_backward writes
/// dL/dbias into `dbias` (same shape as `view`; size-1 dims summed over).
template <class T, class G>
AdditiveBias<std::remove_cv_t<T>, G> additive_bias(TensorView<T, 4> view, TensorView<G, 4> dbias) {
  AdditiveBias<std::remove_cv_t<T>, G> m;
  m.view = view;
  m.grad_view = dbias;
  return m;
}

// ------------------------------------------------------------------ ALiBi --

/// score += -slope[h] · |i + (Lk - Lq) - j| (bottom-right aligned distance).
struct Alibi : ScoreModPolicy {
  static constexpr bool is_identity = false;
  static constexpr bool unit_grad = true;
  std::vector<double> slopes;
  index_t offset = 0;

  Alibi bind(const AttentionShape& s) const {
    if (static_cast<index_t>(slopes.size()) != s.q_heads)
      detail::fail("alibi has ", slopes.size(), " slopes, but q has ", s.q_heads, " heads");
    // |slope| · distance must stay finite in the accumulation type; the
    // largest distance |i + (Lk - Lq) - j| is max(Lq - 1 + Lk - Lq, Lk - 1) < Lk + Lq.
    const double reach = static_cast<double>(s.lq) + static_cast<double>(s.lk);
    for (std::size_t h = 0; h < slopes.size(); ++h)
      if (!(std::abs(slopes[h]) * reach <= s.accum_max))
        detail::fail("alibi slope of head ", h, " is ", slopes[h],
                     ", must be finite in the accumulation type ", detail::accum_name(s.accum_max),
                     " times the largest distance, Lq + Lk = ", reach);
    Alibi m = *this;
    m.offset = s.diagonal_offset();
    return m;
  }
  template <class Acc>
  Acc operator()(index_t, index_t h, index_t q, index_t k, Acc s) const {
    return s - static_cast<Acc>(slopes[h]) * static_cast<Acc>(std::abs(q + offset - k));
  }
  template <class Acc>
  void apply_tile(index_t, index_t h, index_t q0, index_t k0, Acc* s, index_t ld, index_t rows,
                  index_t cols) const {
    const Acc slope = static_cast<Acc>(slopes[h]);
    for (index_t r = 0; r < rows; ++r) {
      const index_t pos = q0 + r + offset - k0;  // distance to column 0
      Acc* out = s + r * ld;
      for (index_t c = 0; c < cols; ++c) out[c] -= slope * static_cast<Acc>(std::abs(pos - c));
    }
  }
  template <class Acc>
  Acc grad(index_t, index_t, index_t, index_t, Acc, Acc g) const {
    return g;
  }
  template <class Acc>
  void grad_tile(index_t, index_t, index_t, index_t, const Acc*, Acc*, index_t, index_t,
                 index_t) const {}
};

/// ALiBi with one slope per query head.
template <class S>
Alibi alibi(const std::vector<S>& slopes) {
  Alibi m;
  m.slopes.assign(slopes.begin(), slopes.end());
  return m;
}

/// The standard ALiBi slopes for n heads: 2^(-8·i/n) for i = 1..n (n a power
/// of two; otherwise the published interleaving of the two nearest powers).
inline std::vector<double> alibi_slopes(index_t n) {
  if (n <= 0) detail::fail("alibi_slopes: the head count is ", n, ", must be > 0");
  // Refused before allocating (8 bytes a head, and a 2^40-head request failed
  // inside the allocator): no model has this many heads, and past it
  // neighbouring slopes 2^(-8/n) apart agree to float's resolution.
  constexpr index_t max_heads = index_t{1} << 24;
  if (n > max_heads)
    detail::fail("alibi_slopes: the head count is ", n, ", more than the ", max_heads,
                 " attn supports");
  auto pow2 = [](index_t m) {
    std::vector<double> r;
    r.reserve(static_cast<std::size_t>(m));
    for (index_t i = 1; i <= m; ++i)
      r.push_back(std::exp2(-8.0 * static_cast<double>(i) / static_cast<double>(m)));
    return r;
  };
  index_t p = 1;
  while (p <= n / 2) p *= 2;  // the largest power of two <= n (p * 2 could overflow)
  std::vector<double> r = pow2(p);
  if (p < n) {
    const std::vector<double> extra = pow2(2 * p);
    for (index_t i = 0; i < n - p; ++i) r.push_back(extra[static_cast<std::size_t>(2 * i)]);
  }
  return r;
}

// -------------------------------------------------------------- soft-cap --

/// score = cap · tanh(score / cap), applied to the scaled score.
struct Softcap : ScoreModPolicy {
  static constexpr bool is_identity = false;
  static constexpr bool unit_grad = false;
  double cap = 0;

  Softcap bind(const AttentionShape& s) const {
    if (!(cap > 0) || !std::isfinite(cap))
      detail::fail("softcap cap is ", cap, ", must be finite and > 0");
    // cap and 1 / cap are both used, in the accumulation type
    if (!(cap <= s.accum_max) || !(1.0 / cap <= s.accum_max))
      detail::fail("softcap cap is ", cap,
                   ", it and 1 / cap must be finite in the accumulation type ",
                   detail::accum_name(s.accum_max));
    return *this;
  }
  template <class Acc>
  Acc operator()(index_t, index_t, index_t, index_t, Acc s) const {
    const Acc c = static_cast<Acc>(cap);
    return c * std::tanh(s / c);
  }
  template <class Acc>
  void apply_tile(index_t, index_t, index_t, index_t, Acc* s, index_t ld, index_t rows,
                  index_t cols) const {
    const Acc c = static_cast<Acc>(cap), inv = Acc(1) / c;
    for (index_t r = 0; r < rows; ++r) {
      Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>> row(s + r * ld, cols);
      row = c * (row * inv).tanh();
    }
  }
  /// d/dx cap·tanh(x/cap) = 1 - tanh²(x/cap).
  template <class Acc>
  Acc grad(index_t, index_t, index_t, index_t, Acc x, Acc g) const {
    const Acc t = std::tanh(x / static_cast<Acc>(cap));
    return g * (Acc(1) - t * t);
  }
  template <class Acc>
  void grad_tile(index_t, index_t, index_t, index_t, const Acc* x, Acc* g, index_t ld, index_t rows,
                 index_t cols) const {
    const Acc inv = Acc(1) / static_cast<Acc>(cap);
    for (index_t r = 0; r < rows; ++r) {
      Eigen::Map<const Eigen::Array<Acc, Eigen::Dynamic, 1>> xr(x + r * ld, cols);
      Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>> gr(g + r * ld, cols);
      gr *= Acc(1) - (xr * inv).tanh().square();
    }
  }
};

inline Softcap softcap(double cap) {
  Softcap m;
  m.cap = cap;
  return m;
}

// ------------------------------------------------------------ composition --

/// Applies A, then B.
template <class A, class B>
struct ComposedMod : ScoreModPolicy {
  static constexpr bool is_identity = A::is_identity && B::is_identity;
  static constexpr bool unit_grad = A::unit_grad && B::unit_grad;
  A a;
  B b;
  ComposedMod bind(const AttentionShape& s) const { return {{}, a.bind(s), b.bind(s)}; }
  template <class F>
  void for_each_view(F&& f) const {
    detail::for_each_view(a, f);
    detail::for_each_view(b, f);
  }
  template <class F>
  void for_each_grad_view(F&& f) const {
    detail::for_each_grad_view(a, f);
    detail::for_each_grad_view(b, f);
  }
  /// Chain rule: y = B(A(x)), dL/dx = A'(x) · B'(A(x)) · g, recomputing A(x).
  template <class Acc>
  Acc grad(index_t bb, index_t h, index_t q, index_t k, Acc x, Acc g) const {
    const Acc ax = A::unit_grad && B::unit_grad ? x : a(bb, h, q, k, x);
    return a.grad(bb, h, q, k, x, b.grad(bb, h, q, k, ax, g));
  }
  template <class Acc>
  void grad_tile(index_t bb, index_t h, index_t q0, index_t k0, const Acc* x, Acc* g, index_t ld,
                 index_t rows, index_t cols) const {
    if constexpr (A::unit_grad && B::unit_grad) {  // no x needed: each part on the whole tile
      b.grad_tile(bb, h, q0, k0, x, g, ld, rows, cols);
      a.grad_tile(bb, h, q0, k0, x, g, ld, rows, cols);
    } else {
      detail::grad_elementwise(*this, bb, h, q0, k0, x, g, ld, rows, cols);
    }
  }
  template <class Acc>
  Acc operator()(index_t bb, index_t h, index_t q, index_t k, Acc s) const {
    return b(bb, h, q, k, a(bb, h, q, k, s));
  }
  template <class Acc>
  void apply_tile(index_t bb, index_t h, index_t q0, index_t k0, Acc* s, index_t ld, index_t rows,
                  index_t cols) const {
    a.apply_tile(bb, h, q0, k0, s, ld, rows, cols);
    b.apply_tile(bb, h, q0, k0, s, ld, rows, cols);
  }
};

/// compose(m1, m2, ...): m1 first, then m2, and so on.
template <class A>
A compose(const A& a) {
  static_assert(is_score_mod_v<A>, "attn::compose takes score modifiers");
  return a;
}
template <class A, class B, class... Rest>
auto compose(const A& a, const B& b, const Rest&... rest) {
  static_assert(is_score_mod_v<A> && is_score_mod_v<B>, "attn::compose takes score modifiers");
  return compose(ComposedMod<A, B>{{}, a, b}, rest...);
}

/// Marks a custom modifier given without a derivative.
struct NoDerivative {};

/// A user function f(b, h, q, k, score) -> score, FlexAttention's score_mod,
/// and optionally its derivative df(b, h, q, k, score) -> d f / d score (at
/// the raw score). Both must be generic in the score type (float or double).
/// The forward needs only f; the backward refuses one without df.
template <class F, class DF = NoDerivative>
struct CustomScoreMod : ScoreModPolicy {
  static constexpr bool is_identity = false;
  static constexpr bool unit_grad = false;
  static constexpr bool has_derivative = !std::is_same<DF, NoDerivative>::value;
  F fn;
  DF dfn;
  CustomScoreMod bind(const AttentionShape&) const { return *this; }
  template <class Acc>
  Acc operator()(index_t b, index_t h, index_t q, index_t k, Acc s) const {
    return static_cast<Acc>(fn(b, h, q, k, s));
  }
  template <class Acc>
  void apply_tile(index_t b, index_t h, index_t q0, index_t k0, Acc* s, index_t ld, index_t rows,
                  index_t cols) const {
    detail::apply_elementwise(*this, b, h, q0, k0, s, ld, rows, cols);
  }
  template <class Acc>
  Acc grad(index_t b, index_t h, index_t q, index_t k, Acc x, Acc g) const {
    static_assert(has_derivative,
                  "attn: the backward pass needs the derivative of a custom score modifier; "
                  "pass it as custom_score_mod(f, df)");
    if constexpr (has_derivative) return g * static_cast<Acc>(dfn(b, h, q, k, x));
    return g;
  }
  template <class Acc>
  void grad_tile(index_t b, index_t h, index_t q0, index_t k0, const Acc* x, Acc* g, index_t ld,
                 index_t rows, index_t cols) const {
    detail::grad_elementwise(*this, b, h, q0, k0, x, g, ld, rows, cols);
  }
};

template <class F>
CustomScoreMod<F> custom_score_mod(F fn) {
  return CustomScoreMod<F>{{}, std::move(fn), {}};
}

/// A custom modifier with its derivative df(b, h, q, k, x) = d fn / dx, so
/// attention_backward can differentiate through it.
template <class F, class DF>
CustomScoreMod<F, DF> custom_score_mod(F fn, DF df) {
  return CustomScoreMod<F, DF>{{}, std::move(fn), std::move(df)};
}

}  // namespace attn
