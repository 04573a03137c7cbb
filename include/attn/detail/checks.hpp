// attn/detail/checks.hpp — argument checks shared by every entry point.
// Each failure throws attn::Error naming the argument and the numbers, and
// every check runs before any output is written.
#pragma once

#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>

namespace attn {
namespace detail {

template <class T, int R>
std::string shape_str(const TensorView<T, R>& v) {
  std::ostringstream os;
  os << '[';
  for (int i = 0; i < R; ++i) os << (i ? ", " : "") << v.extent(i);
  os << ']';
  return os.str();
}

template <class T, int R>
std::string strides_str(const TensorView<T, R>& v) {
  std::ostringstream os;
  os << '[';
  for (int i = 0; i < R; ++i) os << (i ? ", " : "") << v.stride(i);
  os << ']';
  return os.str();
}

/// Byte range [lo, hi) that a view touches.
struct ByteRange {
  std::uintptr_t lo = 0, hi = 0;
};

/// The exact byte range of a view with positive extents, or attn::Error when
/// an element offset, its byte offset or its address does not fit (so the
/// range never wraps around, and every offset inside the view fits index_t).
template <class T, int R>
ByteRange byte_range(const TensorView<T, R>& v, const char* name) {
  auto refuse = [&](const char* why) {
    fail(name, " has shape ", shape_str(v), " and strides ", strides_str(v), ", whose ", why);
  };
  std::int64_t lo = 0, hi = 0;  // element offsets of the lowest and highest element
  for (int i = 0; i < R; ++i) {
    std::int64_t span = 0;  // (extent - 1) · stride
    if (v.extent(i) <= 0) continue;
    if (!mul_fits(v.extent(i) - 1, v.stride(i), span) ||
        !add_fits(span < 0 ? lo : hi, span, span < 0 ? lo : hi))
      refuse("element offsets overflow a 64-bit integer");
  }
  constexpr auto size = static_cast<std::int64_t>(sizeof(T));
  std::int64_t lo_bytes = 0, hi_bytes = 0;  // lo · size, (hi + 1) · size
  if (!mul_fits(lo, size, lo_bytes) || !add_fits(hi, 1, hi_bytes) ||
      !mul_fits(hi_bytes, size, hi_bytes))
    refuse("byte offsets overflow a 64-bit integer");
  const auto base = reinterpret_cast<std::uintptr_t>(v.data());
  ByteRange r;
  // lo_bytes <= 0 <= hi_bytes; neither end may wrap around the address space
  const auto below = static_cast<std::uintptr_t>(-(lo_bytes + 1)) + 1;  // |lo_bytes|, no overflow
  if (lo_bytes < 0 && below > base) refuse("lowest element lies below address 0");
  r.lo = lo_bytes < 0 ? base - below : base;
  if (__builtin_add_overflow(base, static_cast<std::uintptr_t>(hi_bytes), &r.hi))
    refuse("highest element lies past the end of the address space");
  return r;
}

/// Extents positive, data non-null, and every element's address fits.
template <class T, int R>
void check_view(const TensorView<T, R>& v, const char* name) {
  for (int i = 0; i < R; ++i)
    if (v.extent(i) <= 0)
      fail(name, " has shape ", shape_str(v), ": dimension ", i, " is ", v.extent(i),
           ", every dimension must be > 0");
  if (v.data() == nullptr) fail(name, " has null data but shape ", shape_str(v));
  (void)byte_range(v, name);
}

// An lse output is checked as the float or double view it holds.
inline std::string shape_str(const LseView& v) {
  return v.visit([](const auto& l) { return shape_str(l); });
}
inline ByteRange byte_range(const LseView& v, const char* name) {
  return v.visit([&](const auto& l) { return byte_range(l, name); });
}
inline void check_view(const LseView& v, const char* name) {
  v.visit([&](const auto& l) { check_view(l, name); });
}

/// Fails when the byte ranges [a.lo, a.hi) and [b.lo, b.hi) share a byte.
inline void check_disjoint(const ByteRange& a, const char* out_name, const ByteRange& b,
                           const char* in_name) {
  if (a.lo < b.hi && b.lo < a.hi)
    fail(out_name, " overlaps ", in_name, ": ", out_name, " spans bytes [", a.lo, ", ", a.hi, "), ",
         in_name, " spans [", b.lo, ", ", b.hi, ")");
}

/// Fails when two views (TensorViews or an LseView) share a byte.
template <class A, class B>
void check_no_overlap(const A& out, const char* out_name, const B& in, const char* in_name) {
  check_disjoint(byte_range(out, out_name), out_name, byte_range(in, in_name), in_name);
}

/// The bytes of one object (a stats struct the call writes).
template <class T>
ByteRange object_bytes(const T* p) {
  const auto base = reinterpret_cast<std::uintptr_t>(p);
  return {base, base + sizeof(T)};
}

/// A view that is written must not map two indices to one element.
template <class T, int R>
void check_not_self_overlapping(const TensorView<T, R>& v, const char* name) {
  auto magnitude = [](index_t s) {  // |s| without overflow for the most negative stride
    return s < 0 ? static_cast<std::uint64_t>(-(s + 1)) + 1 : static_cast<std::uint64_t>(s);
  };
  std::array<int, R> order{};
  for (int i = 0; i < R; ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](int a, int b) { return magnitude(v.stride(a)) < magnitude(v.stride(b)); });
  std::uint64_t reach = 0;  // largest offset reachable with the smaller-stride dims
  for (int i : order) {
    if (v.extent(i) <= 1) continue;
    const std::uint64_t m = magnitude(v.stride(i));
    if (m <= reach)
      fail(name, " has shape ", shape_str(v), " and strides ", strides_str(v),
           ", which map two elements to one address (dimension ", i, ")");
    std::uint64_t step = 0;  // (extent - 1) · |stride|; saturates (then nothing larger follows)
    if (__builtin_mul_overflow(static_cast<std::uint64_t>(v.extent(i) - 1), m, &step) ||
        __builtin_add_overflow(reach, step, &reach))
      reach = ~std::uint64_t{0};
  }
}

/// Largest finite value of the accumulation type of these storage types:
/// double if any is double, float otherwise.
template <class... T>
inline constexpr double accum_max_v = (std::is_same<std::remove_cv_t<T>, double>::value || ...)
                                          ? std::numeric_limits<double>::max()
                                          : static_cast<double>(std::numeric_limits<float>::max());

/// "float" or "double": the accumulation type whose largest value is `max`.
inline const char* accum_name(double max) {
  return max == std::numeric_limits<double>::max() ? "double" : "float";
}

/// A user parameter that the kernel multiplies or divides by, in double,
/// checked in the accumulation type: finite there (1e39 is infinite as a float).
inline void check_finite_in(double x, double accum_max, const char* name) {
  if (!(std::abs(x) <= accum_max))
    fail(name, " is ", x, ", must be finite in the accumulation type ", accum_name(accum_max),
         " (|", name, "| <= ", accum_max, ")");
}

/// options.stats is written: it must not lie in any view the call reads or writes.
template <class T, int R>
void check_stats(const AttentionStats* stats, const TensorView<T, R>& v, const char* name) {
  if (stats) check_disjoint(object_bytes(stats), "stats", byte_range(v, name), name);
}

inline void check_not_self_overlapping(const LseView& v, const char* name) {
  v.visit([&](const auto& l) { check_not_self_overlapping(l, name); });
}
inline void check_stats(const AttentionStats* stats, const LseView& v, const char* name) {
  v.visit([&](const auto& l) { check_stats(stats, l, name); });
}

/// Positions: offsets >= 0, and a given global length holds the call's rows.
inline void check_positions(const Positions& p, const AttentionShape& s) {
  if (p.q_offset < 0) fail("positions.q_offset is ", p.q_offset, ", must be >= 0");
  if (p.k_offset < 0) fail("positions.k_offset is ", p.k_offset, ", must be >= 0");
  if (p.q_length < 0)
    fail("positions.q_length is ", p.q_length, ", must be >= 0 (0 = q_offset + Lq)");
  if (p.k_length < 0)
    fail("positions.k_length is ", p.k_length, ", must be >= 0 (0 = k_offset + Lk)");
  if (p.q_length != 0 && (p.q_offset > p.q_length || s.lq > p.q_length - p.q_offset))
    fail("positions: queries [", p.q_offset, ", q_offset + Lq = ", p.q_offset, " + ", s.lq,
         ") do not fit q_length ", p.q_length);
  if (p.k_length != 0 && (p.k_offset > p.k_length || s.lk > p.k_length - p.k_offset))
    fail("positions: keys [", p.k_offset, ", k_offset + Lk = ", p.k_offset, " + ", s.lk,
         ") do not fit k_length ", p.k_length);
  const index_t max = std::numeric_limits<index_t>::max();
  if (p.q_length == 0 && p.q_offset > max - s.lq)
    fail("positions.q_offset ", p.q_offset, " + Lq ", s.lq, " overflows");
  if (p.k_length == 0 && p.k_offset > max - s.lk)
    fail("positions.k_offset ", p.k_offset, " + Lk ", s.lk, " overflows");
  // masks and modifiers bound to the global shape form positions up to Lq + Lk
  (void)checked_add(p.q_length != 0 ? p.q_length : p.q_offset + s.lq,
                    p.k_length != 0 ? p.k_length : p.k_offset + s.lk, "global Lq + Lk");
}

/// Sinks: not given, or one logit per query head, none NaN or +inf.
inline void check_sinks(const TensorView<const float, 1>& sinks, index_t q_heads) {
  if (sinks.is_null()) return;
  if (sinks.data() == nullptr) fail("sinks has null data but ", sinks.extent(0), " entries");
  if (sinks.extent(0) != q_heads)
    fail("sinks has ", sinks.extent(0), " entries, expected one per query head (", q_heads, ")");
  for (index_t h = 0; h < q_heads; ++h)
    if (std::isnan(sinks(h)) || sinks(h) == std::numeric_limits<float>::infinity())
      fail("sink of head ", h, " is ", sinks(h), ", must be finite or -inf");
}

/// The shape of the whole sequence a call is part of (its global lengths).
inline AttentionShape global_shape(const AttentionShape& s, const Positions& p) {
  AttentionShape g = s;
  g.lq = p.q_length != 0 ? p.q_length : p.q_offset + s.lq;
  g.lk = p.k_length != 0 ? p.k_length : p.k_offset + s.lk;
  return g;
}

/// Checks q [B,Hq,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv], out [B,Hq,Lq,Dv]
/// and the options; returns the problem's sizes.
template <class Q, class K, class V, class O>
AttentionShape check_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                               const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                               const AttentionOptions& opt) {
  check_view(q, "q");
  check_view(k, "k");
  check_view(v, "v");
  check_view(out, "out");
  AttentionShape s;
  s.batch = q.extent(0);
  s.q_heads = q.extent(1);
  s.lq = q.extent(2);
  s.d = q.extent(3);
  s.kv_heads = k.extent(1);
  s.lk = k.extent(2);
  s.dv = v.extent(3);
  if (k.extent(0) != s.batch) fail("k has batch ", k.extent(0), ", but q has batch ", s.batch);
  if (v.extent(0) != s.batch) fail("v has batch ", v.extent(0), ", but q has batch ", s.batch);
  if (k.extent(3) != s.d) fail("k has head dim ", k.extent(3), ", but q has head dim ", s.d);
  if (v.extent(1) != s.kv_heads) fail("v has ", v.extent(1), " heads, but k has ", s.kv_heads);
  if (v.extent(2) != s.lk) fail("v has length ", v.extent(2), ", but k has length ", s.lk);
  if (s.q_heads % s.kv_heads != 0)
    fail("k has ", s.kv_heads, " heads, which does not divide q's ", s.q_heads, " heads");
  if (out.extent(0) != s.batch || out.extent(1) != s.q_heads || out.extent(2) != s.lq ||
      out.extent(3) != s.dv)
    fail("out has shape ", shape_str(out), ", expected [", s.batch, ", ", s.q_heads, ", ", s.lq,
         ", ", s.dv, "] (batch, q heads, Lq, Dv)");
  // masks and modifiers form positions up to Lq + Lk (k and v may broadcast a
  // huge Lk with a zero stride; out's element count already fits)
  (void)checked_add(s.lq, s.lk, "Lq + Lk");
  check_not_self_overlapping(out, "out");
  check_no_overlap(out, "out", q, "q");
  check_no_overlap(out, "out", k, "k");
  check_no_overlap(out, "out", v, "v");

  s.accum_max = accum_max_v<Q, K, V, O>;
  if (opt.scale) check_finite_in(*opt.scale, s.accum_max, "scale");
  if (opt.num_threads < 0) fail("num_threads is ", opt.num_threads, ", must be >= 0");
  if (opt.block_q < 0) fail("block_q is ", opt.block_q, ", must be >= 0 (0 = automatic)");
  if (opt.block_k < 0) fail("block_k is ", opt.block_k, ", must be >= 0 (0 = automatic)");
  check_positions(opt.positions, s);
  check_sinks(opt.sinks, s.q_heads);
  if (!opt.sinks.is_null()) check_no_overlap(out, "out", opt.sinks, "sinks");
  if (!opt.lse.is_null()) {
    const auto& l = opt.lse;
    if (l.extent(0) != s.batch || l.extent(1) != s.q_heads || l.extent(2) != s.lq)
      fail("lse has shape ", shape_str(l), ", expected [", s.batch, ", ", s.q_heads, ", ", s.lq,
           "] (batch, q heads, Lq)");
    check_view(l, "lse");
    check_not_self_overlapping(l, "lse");
    check_no_overlap(l, "lse", q, "q");
    check_no_overlap(l, "lse", k, "k");
    check_no_overlap(l, "lse", v, "v");
    check_no_overlap(l, "lse", out, "out");
    check_stats(opt.stats, l, "lse");
  }
  check_stats(opt.stats, q, "q");
  check_stats(opt.stats, k, "k");
  check_stats(opt.stats, v, "v");
  check_stats(opt.stats, out, "out");
  return s;
}

}  // namespace detail
}  // namespace attn
