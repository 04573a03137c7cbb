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
}  // namespace detail

// ---------------------------------------------------------------- identity --

/// Leaves scores unchanged (costs nothing).
struct NoScoreMod : ScoreModPolicy {
  static constexpr bool is_identity = true;
  NoScoreMod bind(const AttentionShape&) const { return *this; }
  template <class Acc>
  Acc operator()(index_t, index_t, index_t, index_t, Acc s) const {
    return s;
  }
  template <class Acc>
  void apply_tile(index_t, index_t, index_t, index_t, Acc*, index_t, index_t, index_t) const {}
};

inline NoScoreMod no_score_mod() { return {}; }

// ---------------------------------------------------------- additive bias --

/// score += bias[b, h, q, k] (bias broadcast over size-1 batch, head and query dims).
template <class T>
struct AdditiveBias : ScoreModPolicy {
  static constexpr bool is_identity = false;
  TensorView<const T, 4> view;

  AdditiveBias bind(const AttentionShape& s) const {
    detail::check_broadcast_view(view, s, "additive_bias");
    return *this;
  }
  template <class F>
  void for_each_view(F&& f) const {
    f(view, "additive_bias");
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

// ------------------------------------------------------------------ ALiBi --

/// score += -slope[h] · |i + (Lk - Lq) - j| (bottom-right aligned distance).
struct Alibi : ScoreModPolicy {
  static constexpr bool is_identity = false;
  std::vector<double> slopes;
  index_t offset = 0;

  Alibi bind(const AttentionShape& s) const {
    if (static_cast<index_t>(slopes.size()) != s.q_heads)
      detail::fail("alibi has ", slopes.size(), " slopes, but q has ", s.q_heads, " heads");
    for (std::size_t h = 0; h < slopes.size(); ++h)
      if (!std::isfinite(slopes[h])) detail::fail("alibi slope of head ", h, " is ", slopes[h]);
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
  auto pow2 = [](index_t m) {
    std::vector<double> r;
    for (index_t i = 1; i <= m; ++i)
      r.push_back(std::exp2(-8.0 * static_cast<double>(i) / static_cast<double>(m)));
    return r;
  };
  index_t p = 1;
  while (p * 2 <= n) p *= 2;
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
  double cap = 0;

  Softcap bind(const AttentionShape&) const {
    if (!(cap > 0) || !std::isfinite(cap))
      detail::fail("softcap cap is ", cap, ", must be finite and > 0");
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
  A a;
  B b;
  ComposedMod bind(const AttentionShape& s) const { return {{}, a.bind(s), b.bind(s)}; }
  template <class F>
  void for_each_view(F&& f) const {
    detail::for_each_view(a, f);
    detail::for_each_view(b, f);
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

/// A user function f(b, h, q, k, score) -> score, FlexAttention's score_mod.
/// It must be generic in the score type (float or double).
template <class F>
struct CustomScoreMod : ScoreModPolicy {
  static constexpr bool is_identity = false;
  F fn;
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
};

template <class F>
CustomScoreMod<F> custom_score_mod(F fn) {
  return CustomScoreMod<F>{{}, std::move(fn)};
}

}  // namespace attn
