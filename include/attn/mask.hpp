// attn/mask.hpp — mask policies: which keys may each query see?
//
// A mask is a small value type. The engine first calls `bind(shape)`, which
// checks the mask against the problem (throwing attn::Error) and returns the
// mask ready to answer, for batch b and query head h:
//
//   keep(b, h, q, k)               may query row q see key k?
//   key_range(b, h, q0, q1)        the keys [begin, end) that any row of [q0, q1) may see
//   classify(b, h, q0, q1, k0, k1) is the tile [q0,q1)×[k0,k1) empty, full or partial?
//
// Empty tiles are skipped, full tiles pay no per-element test, and only
// partial tiles call keep() per element. A mask whose visible keys form one
// interval per query row may also define
//
//   row_keys(b, h, q)              the keys [begin, end) that row q sees, exactly
//
// and partial tiles are then masked by filling outside that interval.
// Masks combine with `&`. For the backward pass, which walks key tiles in the
// outer loop, a mask may define
//
//   query_range(b, h, k0, k1)      the queries [begin, end) that may see a key of [k0, k1)
//
// (causal, window, key padding do); without it every query tile is classified.
#pragma once

#include "attn/detail/checks.hpp"
#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace attn {

/// What a mask says about a whole tile.
enum class TileKind { empty, partial, full };

/// Half-open range of key positions [begin, end).
struct KeyRange {
  index_t begin = 0;
  index_t end = 0;
  bool empty() const { return end <= begin; }
};

/// Marks a type as a mask policy (enables `&`).
struct MaskPolicy {};

template <class M>
inline constexpr bool is_mask_v = std::is_base_of<MaskPolicy, M>::value;

namespace detail {
/// A policy that reads memory (a mask or bias view) lists it with
/// `for_each_view(f)`, calling f(view, name) per view, so the entry points can
/// check that the output does not overlap it. Policies without one read none.
struct ViewSink {
  template <class View>
  void operator()(const View&, const char*) const;
};
template <class P, class = void>
struct has_views : std::false_type {};
template <class P>
struct has_views<P, std::void_t<decltype(std::declval<const P&>().for_each_view(ViewSink{}))>>
    : std::true_type {};
/// Calls f(view, name) for each view `policy` reads (none if it has no for_each_view).
template <class P, class F>
void for_each_view(const P& policy, F&& f) {
  if constexpr (has_views<P>::value) policy.for_each_view(f);
}
template <class P, class = void>
struct has_grad_views : std::false_type {};
template <class P>
struct has_grad_views<
    P, std::void_t<decltype(std::declval<const P&>().for_each_grad_view(ViewSink{}))>>
    : std::true_type {};
/// Calls f(view, name) for each gradient output of a score modifier (dbias).
template <class P, class F>
void for_each_grad_view(const P& policy, F&& f) {
  if constexpr (has_grad_views<P>::value) policy.for_each_grad_view(f);
}
/// Calls f(element) for every element of every gradient output of a score
/// modifier, views in for_each_grad_view's order, each in row-major order.
template <class P, class F>
void for_each_grad_element(const P& policy, F&& f) {
  for_each_grad_view(policy, [&](const auto& gv, const char*) {
    for (index_t i0 = 0; i0 < gv.extent(0); ++i0)
      for (index_t i1 = 0; i1 < gv.extent(1); ++i1)
        for (index_t i2 = 0; i2 < gv.extent(2); ++i2)
          for (index_t i3 = 0; i3 < gv.extent(3); ++i3) f(gv(i0, i1, i2, i3));
  });
}
/// Neither the output nor lse may overlap a view the policy reads.
template <class P, class O>
void check_policy_views(const P& policy, const TensorView<O, 4>& out, const LseView& lse) {
  for_each_view(policy, [&](const auto& view, const char* name) {
    check_no_overlap(out, "out", view, name);
    if (!lse.is_null()) check_no_overlap(lse, "lse", view, name);
  });
}
/// options.stats is written: it must not lie in a view a policy reads.
/// Views that bind() will refuse (null, wrong shape, overflowing) are left to it.
template <class... P>
void check_stats_policy_views(const AttentionStats* stats, const P&... policies) {
  if (!stats) return;
  auto one = [&](const auto& view, const char* name) {
    ByteRange r;
    try {
      if (view.data() == nullptr || view.size() == 0) return;
      r = byte_range(view, name);
    } catch (const Error&) {
      return;
    }
    check_disjoint(object_bytes(stats), "stats", r, name);
  };
  (for_each_view(policies, one), ...);
}
}  // namespace detail

// ---------------------------------------------------------------- no mask --

/// Every query sees every key.
struct NoMask : MaskPolicy {
  static constexpr bool always_full = true;
  index_t lk = 0;
  NoMask bind(const AttentionShape& s) const {
    NoMask m;
    m.lk = s.lk;
    return m;
  }
  bool keep(index_t, index_t, index_t, index_t) const { return true; }
  KeyRange key_range(index_t, index_t, index_t, index_t) const { return {0, lk}; }
  KeyRange row_keys(index_t, index_t, index_t) const { return {0, lk}; }
  TileKind classify(index_t, index_t, index_t, index_t, index_t, index_t) const {
    return TileKind::full;
  }
};

/// No mask: dense attention.
inline NoMask no_mask() { return {}; }

// ----------------------------------------------------------------- causal --

/// Query i sees key j iff j <= i + offset. Bottom-right alignment uses
/// offset = Lk - Lq (the last query sees the last key); top-left uses 0.
struct Causal : MaskPolicy {
  static constexpr bool always_full = false;
  bool bottom_right = true;
  index_t offset = 0;
  index_t lk = 0;
  index_t lq = 0;

  Causal bind(const AttentionShape& s) const {
    Causal m = *this;
    m.offset = bottom_right ? s.diagonal_offset() : 0;
    m.lk = s.lk;
    m.lq = s.lq;
    return m;
  }
  bool keep(index_t, index_t, index_t q, index_t k) const { return k <= q + offset; }
  /// Query q sees key k0 or a later one iff q >= k0 - offset.
  KeyRange query_range(index_t, index_t, index_t k0, index_t) const {
    return {std::clamp<index_t>(k0 - offset, 0, lq), lq};
  }
  KeyRange key_range(index_t, index_t, index_t, index_t q1) const {
    return {0, std::clamp<index_t>(q1 - 1 + offset + 1, 0, lk)};
  }
  KeyRange row_keys(index_t, index_t, index_t q) const {
    return {0, std::clamp<index_t>(q + offset + 1, 0, lk)};
  }
  TileKind classify(index_t, index_t, index_t q0, index_t q1, index_t k0, index_t k1) const {
    if (k0 > q1 - 1 + offset) return TileKind::empty;  // first key past the last row's diagonal
    if (k1 - 1 <= q0 + offset) return TileKind::full;  // last key within the first row's diagonal
    return TileKind::partial;
  }
};

/// Causal mask aligned to the bottom-right (FlashAttention >= 2.1): query i
/// sees key j iff j <= i + (Lk - Lq).
inline Causal causal() { return {}; }

/// Causal mask aligned to the top-left (PyTorch `is_causal`): query i sees key j iff j <= i.
inline Causal causal_top_left() {
  Causal c;
  c.bottom_right = false;
  return c;
}

// ------------------------------------------------------------ key padding --

/// Batch b sees only its first lengths[b] keys.
struct KeyPadding : MaskPolicy {
  static constexpr bool always_full = false;
  std::vector<index_t> lengths;
  index_t lq = 0;

  KeyPadding bind(const AttentionShape& s) const {
    if (static_cast<index_t>(lengths.size()) != s.batch)
      detail::fail("key_padding has ", lengths.size(), " lengths, but the batch is ", s.batch);
    for (std::size_t b = 0; b < lengths.size(); ++b)
      if (lengths[b] < 0 || lengths[b] > s.lk)
        detail::fail("key_padding length of batch ", b, " is ", lengths[b],
                     ", outside [0, Lk = ", s.lk, "]");
    KeyPadding m = *this;
    m.lq = s.lq;
    return m;
  }
  bool keep(index_t b, index_t, index_t, index_t k) const { return k < lengths[b]; }
  KeyRange query_range(index_t b, index_t, index_t k0, index_t) const {
    return {0, k0 < lengths[b] ? lq : 0};
  }
  KeyRange key_range(index_t b, index_t, index_t, index_t) const { return {0, lengths[b]}; }
  KeyRange row_keys(index_t b, index_t, index_t) const { return {0, lengths[b]}; }
  TileKind classify(index_t b, index_t, index_t, index_t, index_t k0, index_t k1) const {
    if (k0 >= lengths[b]) return TileKind::empty;
    if (k1 <= lengths[b]) return TileKind::full;
    return TileKind::partial;
  }
};

/// Per-batch count of valid keys: batch b sees keys [0, lengths[b]).
template <class Int>
KeyPadding key_padding(const std::vector<Int>& lengths) {
  static_assert(std::is_integral<Int>::value, "attn::key_padding takes integer lengths");
  KeyPadding m;
  m.lengths.assign(lengths.begin(), lengths.end());
  return m;
}
inline KeyPadding key_padding(std::initializer_list<index_t> lengths) {
  KeyPadding m;
  m.lengths.assign(lengths.begin(), lengths.end());
  return m;
}

// -------------------------------------------------------------- bool mask --

namespace detail {
/// Checks a broadcastable [B or 1, H or 1, Lq, Lk] view (masks and biases).
template <class T>
void check_broadcast_view(const TensorView<T, 4>& v, const AttentionShape& s, const char* name) {
  if (v.data() == nullptr) detail::fail(name, " has null data");
  if ((v.extent(0) != s.batch && v.extent(0) != 1) ||
      (v.extent(1) != s.q_heads && v.extent(1) != 1) || (v.extent(2) != s.lq && v.extent(2) != 1) ||
      v.extent(3) != s.lk)
    detail::fail(name, " has shape [", v.extent(0), ", ", v.extent(1), ", ", v.extent(2), ", ",
                 v.extent(3), "], expected [", s.batch, " or 1, ", s.q_heads, " or 1, ", s.lq,
                 " or 1, ", s.lk, "]");
  (void)byte_range(v, name);  // every element's address fits
}
/// Offset of (b, h, q, 0) in a broadcastable view (size-1 dims broadcast,
/// the query dim too: a Hugging Face padding mask [B, 1, 1, Lk]).
template <class T>
index_t broadcast_row(const TensorView<T, 4>& v, index_t b, index_t h, index_t q) {
  return (v.extent(0) == 1 ? 0 : b * v.stride(0)) + (v.extent(1) == 1 ? 0 : h * v.stride(1)) +
         (v.extent(2) == 1 ? 0 : q * v.stride(2));
}
}  // namespace detail

/// An explicit boolean mask, true = keep. Tiles are classified by scanning
/// them, so all-false tiles are skipped and all-true tiles are untested.
struct BoolMask : MaskPolicy {
  static constexpr bool always_full = false;
  TensorView<const bool, 4> view;
  index_t lk = 0;

  BoolMask bind(const AttentionShape& s) const {
    detail::check_broadcast_view(view, s, "bool_mask");
    BoolMask m = *this;
    m.lk = s.lk;
    return m;
  }
  bool keep(index_t b, index_t h, index_t q, index_t k) const {
    return view.data()[detail::broadcast_row(view, b, h, q) + k * view.stride(3)];
  }
  template <class F>
  void for_each_view(F&& f) const {
    f(view, "bool_mask");
  }
  KeyRange key_range(index_t, index_t, index_t, index_t) const { return {0, lk}; }
  TileKind classify(index_t b, index_t h, index_t q0, index_t q1, index_t k0, index_t k1) const {
    index_t kept = 0;
    for (index_t q = q0; q < q1; ++q) {
      const bool* row = view.data() + detail::broadcast_row(view, b, h, q);
      for (index_t k = k0; k < k1; ++k) kept += row[k * view.stride(3)] ? 1 : 0;
    }
    if (kept == 0) return TileKind::empty;
    return kept == (q1 - q0) * (k1 - k0) ? TileKind::full : TileKind::partial;
  }
};

/// Boolean mask view [B or 1, H or 1, Lq or 1, Lk] (true = keep); size-1
/// dims broadcast, so a Hugging Face padding mask [B, 1, 1, Lk] is used as is.
inline BoolMask bool_mask(TensorView<const bool, 4> view) {
  BoolMask m;
  m.view = view;
  return m;
}

// ------------------------------------------------------------ custom mask --

/// A user predicate keep(b, h, q, k) -> bool, FlexAttention's mask_mod. Every
/// tile is partial (the predicate is opaque), so combine it with a structured
/// mask (&) when there is one, to keep tile skipping.
template <class F>
struct CustomMask : MaskPolicy {
  static constexpr bool always_full = false;
  F fn;
  index_t lk = 0;
  CustomMask bind(const AttentionShape& s) const {
    CustomMask m = *this;
    m.lk = s.lk;
    return m;
  }
  bool keep(index_t b, index_t h, index_t q, index_t k) const { return fn(b, h, q, k); }
  KeyRange key_range(index_t, index_t, index_t, index_t) const { return {0, lk}; }
  TileKind classify(index_t, index_t, index_t, index_t, index_t, index_t) const {
    return TileKind::partial;
  }
};

template <class F>
CustomMask<F> custom_mask(F fn) {
  CustomMask<F> m{{}, std::move(fn)};
  return m;
}

/// True when mask M defines query_range(b, h, k0, k1).
template <class M, class = void>
struct has_query_range : std::false_type {};
template <class M>
struct has_query_range<M, std::void_t<decltype(std::declval<const M&>().query_range(
                              index_t{}, index_t{}, index_t{}, index_t{}))>> : std::true_type {};

namespace detail {
/// The queries of [0, lq) that may see a key of [k0, k1): the mask's own
/// answer when it has one, all of them otherwise.
template <class M>
KeyRange query_range(const M& m, index_t b, index_t h, index_t k0, index_t k1, index_t lq) {
  if constexpr (has_query_range<M>::value) {
    const KeyRange r = m.query_range(b, h, k0, k1);
    return {std::clamp<index_t>(r.begin, 0, lq), std::clamp<index_t>(r.end, 0, lq)};
  } else {
    (void)m, (void)b, (void)h, (void)k0, (void)k1;
    return {0, lq};
  }
}
}  // namespace detail

// ------------------------------------------------------------ conjunction --

/// A key is kept iff both masks keep it.
template <class A, class B>
struct MaskAnd : MaskPolicy {
  static constexpr bool always_full = A::always_full && B::always_full;
  A a;
  B b;
  MaskAnd bind(const AttentionShape& s) const { return {{}, a.bind(s), b.bind(s)}; }
  template <class F>
  void for_each_view(F&& f) const {
    detail::for_each_view(a, f);
    detail::for_each_view(b, f);
  }
  bool keep(index_t bb, index_t h, index_t q, index_t k) const {
    return a.keep(bb, h, q, k) && b.keep(bb, h, q, k);
  }
  KeyRange key_range(index_t bb, index_t h, index_t q0, index_t q1) const {
    const KeyRange ra = a.key_range(bb, h, q0, q1), rb = b.key_range(bb, h, q0, q1);
    return {std::max(ra.begin, rb.begin), std::min(ra.end, rb.end)};
  }
  /// Defined when both masks define it: the intersection of two intervals.
  template <class A2 = A, class B2 = B>
  auto row_keys(index_t bb, index_t h, index_t q) const
      -> decltype(std::declval<const A2&>().row_keys(bb, h, q),
                  std::declval<const B2&>().row_keys(bb, h, q), KeyRange{}) {
    const KeyRange ra = a.row_keys(bb, h, q), rb = b.row_keys(bb, h, q);
    return {std::max(ra.begin, rb.begin), std::min(ra.end, rb.end)};
  }
  TileKind classify(index_t bb, index_t h, index_t q0, index_t q1, index_t k0, index_t k1) const {
    const TileKind ka = a.classify(bb, h, q0, q1, k0, k1);
    if (ka == TileKind::empty) return ka;
    const TileKind kb = b.classify(bb, h, q0, q1, k0, k1);
    if (kb == TileKind::empty) return kb;
    return (ka == TileKind::full && kb == TileKind::full) ? TileKind::full : TileKind::partial;
  }
  /// Defined when either mask defines it: the intersection of what they know.
  template <class A2 = A, class B2 = B,
            class = std::enable_if_t<has_query_range<A2>::value || has_query_range<B2>::value>>
  KeyRange query_range(index_t bb, index_t h, index_t k0, index_t k1) const {
    constexpr index_t all = std::numeric_limits<index_t>::max();
    const KeyRange ra = detail::query_range(a, bb, h, k0, k1, all);
    const KeyRange rb = detail::query_range(b, bb, h, k0, k1, all);
    return {std::max(ra.begin, rb.begin), std::min(ra.end, rb.end)};
  }
};

/// True when mask M defines row_keys(b, h, q).
template <class M, class = void>
struct has_row_keys : std::false_type {};
template <class M>
struct has_row_keys<
    M, std::void_t<decltype(std::declval<const M&>().row_keys(index_t{}, index_t{}, index_t{}))>>
    : std::true_type {};
template <class M>
inline constexpr bool has_row_keys_v = has_row_keys<M>::value;

template <class A, class B, class = std::enable_if_t<is_mask_v<A> && is_mask_v<B>>>
MaskAnd<A, B> operator&(const A& a, const B& b) {
  return {{}, a, b};
}

}  // namespace attn
