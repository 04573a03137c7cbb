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

/// Extents positive, data non-null.
template <class T, int R>
void check_view(const TensorView<T, R>& v, const char* name) {
  for (int i = 0; i < R; ++i)
    if (v.extent(i) <= 0)
      fail(name, " has shape ", shape_str(v), ": dimension ", i, " is ", v.extent(i),
           ", every dimension must be > 0");
  if (v.data() == nullptr) fail(name, " has null data but shape ", shape_str(v));
}

/// Byte range [lo, hi) that a view touches.
struct ByteRange {
  std::uintptr_t lo = 0, hi = 0;
};

template <class T, int R>
ByteRange byte_range(const TensorView<T, R>& v) {
  index_t lo = 0, hi = 0;  // element offsets of the lowest and highest element
  for (int i = 0; i < R; ++i) {
    const index_t span = (v.extent(i) - 1) * v.stride(i);
    (span < 0 ? lo : hi) += span;
  }
  const auto base = reinterpret_cast<std::uintptr_t>(v.data());
  const auto size = static_cast<std::intptr_t>(sizeof(T));
  return {static_cast<std::uintptr_t>(static_cast<std::intptr_t>(base) + lo * size),
          static_cast<std::uintptr_t>(static_cast<std::intptr_t>(base) + (hi + 1) * size)};
}

template <class A, int RA, class B, int RB>
void check_no_overlap(const TensorView<A, RA>& out, const char* out_name,
                      const TensorView<B, RB>& in, const char* in_name) {
  const ByteRange a = byte_range(out), b = byte_range(in);
  if (a.lo < b.hi && b.lo < a.hi)
    fail(out_name, " overlaps ", in_name, ": ", out_name, " spans bytes [", a.lo, ", ", a.hi, "), ",
         in_name, " spans [", b.lo, ", ", b.hi, ")");
}

/// A view that is written must not map two indices to one element.
template <class T, int R>
void check_not_self_overlapping(const TensorView<T, R>& v, const char* name) {
  std::array<int, R> order{};
  for (int i = 0; i < R; ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](int a, int b) { return std::abs(v.stride(a)) < std::abs(v.stride(b)); });
  index_t reach = 0;  // largest offset reachable with the smaller-stride dims
  for (int i : order) {
    if (v.extent(i) == 1) continue;
    if (std::abs(v.stride(i)) <= reach)
      fail(
          name, " has shape ", shape_str(v), " and strides ",
          [&] {
            std::ostringstream os;
            os << '[';
            for (int j = 0; j < R; ++j) os << (j ? ", " : "") << v.stride(j);
            os << ']';
            return os.str();
          }(),
          ", which map two elements to one address (dimension ", i, ")");
    reach += (v.extent(i) - 1) * std::abs(v.stride(i));
  }
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
  check_not_self_overlapping(out, "out");
  check_no_overlap(out, "out", q, "q");
  check_no_overlap(out, "out", k, "k");
  check_no_overlap(out, "out", v, "v");

  if (opt.scale && !std::isfinite(*opt.scale)) fail("scale is ", *opt.scale, ", must be finite");
  if (opt.num_threads < 0) fail("num_threads is ", opt.num_threads, ", must be >= 0");
  if (opt.block_q < 0) fail("block_q is ", opt.block_q, ", must be >= 0 (0 = automatic)");
  if (opt.block_k < 0) fail("block_k is ", opt.block_k, ", must be >= 0 (0 = automatic)");
  check_positions(opt.positions, s);
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
  }
  return s;
}

}  // namespace detail
}  // namespace attn
