// attn/kernels/simd.hpp — one small vector type per instruction set.
//
// The micro-kernels (body.inl) are written once over a vector type S:
//
//   S::T         element type            S::lanes  elements per vector
//   S::regs      architectural vector registers (sizes the register tile)
//   S::V         the vector;  zero, set1, load, store, broadcast, fma (a·b + c),
//                add, sub, mul, max, reduce_add, reduce_max; sum_lanes(x): the
//                vector whose lane j is reduce_add(x[j]) for S::lanes vectors x
//                (x86: adds over a transposition, each sum in a fixed order)
//   exp support  ldexp_above(p, n, shifted, x, lo) for the float exp polynomial,
//                or S::exp when the type has its own
//
// Each x86 type is defined inside a region compiled for its target (see
// targets.hpp), so its intrinsics are usable in a translation unit built
// without -march. The portable type is plain arrays and loops that any
// compiler vectorises for whatever its baseline target is.
#pragma once

#include "attn/detail/softmax.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

// Loops over a register tile must be unrolled completely, or the compiler
// keeps the accumulators in memory.
#if defined(__clang__)
#define ATTN_KERNEL_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define ATTN_KERNEL_UNROLL _Pragma("GCC unroll 32")
#else
#define ATTN_KERNEL_UNROLL
#endif

namespace attn {
namespace kernels {

/// Portable vector of N elements of T: arrays and loops, no intrinsics.
/// 16 "registers" of 4 elements: the SSE2 / NEON shape every 64-bit CPU has.
template <class E, int N = 16 / static_cast<int>(sizeof(E))>
struct Portable {
  using T = E;
  struct V {
    T x[N];
  };
  static constexpr int lanes = N;
  static constexpr int regs = 16;
  static constexpr bool native_exp = true;  // exp lane by lane (detail::exp_nonpositive, std::exp)

  static V zero() { return set1(T(0)); }
  static V set1(T a) {
    V r;
    for (int i = 0; i < N; ++i) r.x[i] = a;
    return r;
  }
  static V load(const T* p) {
    V r;
    std::memcpy(r.x, p, sizeof r.x);
    return r;
  }
  static void store(T* p, const V& a) { std::memcpy(p, a.x, sizeof a.x); }
  static V broadcast(const T* p) { return set1(*p); }
  /// N int8 values converted exactly.
  static V load_i8(const std::int8_t* p) {
    V r;
    for (int i = 0; i < N; ++i) r.x[i] = static_cast<T>(p[i]);
    return r;
  }
  /// a·b + c rounded once where the target has FMA, twice where it has none:
  /// never left to the compiler, which may fuse a·b + c in one inlined copy
  /// and not in another (GCC with -march=native), and then a score's bits
  /// would depend on which copy computed it (keys in a block or in a tail).
  static T mul_add(T a, T b, T c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
  }
  static V fma(const V& a, const V& b, const V& c) {
    V r;
    for (int i = 0; i < N; ++i) r.x[i] = mul_add(a.x[i], b.x[i], c.x[i]);
    return r;
  }
  static V add(const V& a, const V& b) {
    V r;
    for (int i = 0; i < N; ++i) r.x[i] = a.x[i] + b.x[i];
    return r;
  }
  static V sub(const V& a, const V& b) {
    V r;
    for (int i = 0; i < N; ++i) r.x[i] = a.x[i] - b.x[i];
    return r;
  }
  static V mul(const V& a, const V& b) {
    V r;
    for (int i = 0; i < N; ++i) r.x[i] = a.x[i] * b.x[i];
    return r;
  }
  static V max(const V& a, const V& b) {
    V r;
    for (int i = 0; i < N; ++i) r.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i];
    return r;
  }
  static T reduce_add(const V& a) {
    T s = a.x[0];
    for (int i = 1; i < N; ++i) s += a.x[i];
    return s;
  }
  static V sum_lanes(const V* x) {
    V r;
    for (int j = 0; j < N; ++j) r.x[j] = reduce_add(x[j]);
    return r;
  }
  static T reduce_max(const V& a) {
    T s = a.x[0];
    for (int i = 1; i < N; ++i) s = a.x[i] > s ? a.x[i] : s;
    return s;
  }
  /// exp(x) for x <= 0 lane by lane; exactly 0 at -inf.
  static V exp(const V& a) {
    V r;
    for (int i = 0; i < N; ++i) {
      if constexpr (std::is_same<T, float>::value)
        r.x[i] = detail::exp_nonpositive(a.x[i]);
      else
        r.x[i] = std::exp(a.x[i]);
    }
    return r;
  }
  static V abs(const V& a) {
    V r;
    for (int i = 0; i < N; ++i) r.x[i] = std::fabs(a.x[i]);
    return r;
  }

  // Integer products on 8-bit caches (body.inl, "int8 rows in integers"): I
  // holds N int32 sums in x[0, N), or 2N int16 values (as int32) taken as N pairs.
  struct I {
    std::int32_t x[2 * N];
  };
  static I izero() {
    I r{};
    return r;
  }
  static I iload(const std::int32_t* p) {
    I r{};
    std::memcpy(r.x, p, N * sizeof(std::int32_t));
    return r;
  }
  static void istore(std::int32_t* p, const I& a) { std::memcpy(p, a.x, N * sizeof(std::int32_t)); }
  static I load_i16(const std::int16_t* p) {
    I r;
    for (int i = 0; i < 2 * N; ++i) r.x[i] = p[i];
    return r;
  }
  static I widen_i8(const std::int8_t* p) {
    I r;
    for (int i = 0; i < 2 * N; ++i) r.x[i] = p[i];
    return r;
  }
  static I madd(const I& acc, const I& a, const I& b) {
    I r = acc;
    for (int l = 0; l < N; ++l) r.x[l] += a.x[2 * l] * b.x[2 * l] + a.x[2 * l + 1] * b.x[2 * l + 1];
    return r;
  }
  static I broadcast_pair(const std::int16_t* p) {
    I r;
    for (int l = 0; l < N; ++l) {
      r.x[2 * l] = p[0];
      r.x[2 * l + 1] = p[1];
    }
    return r;
  }
  static I pair_rows(const std::int8_t* r0, const std::int8_t* r1) {
    I r;
    for (int c = 0; c < N; ++c) {
      r.x[2 * c] = r0[c];
      r.x[2 * c + 1] = r1[c];
    }
    return r;
  }
  static void pair_rows2(const std::int8_t* r0, const std::int8_t* r1, I& x0, I& x1) {
    x0 = pair_rows(r0, r1);
    x1 = pair_rows(r0 + N, r1 + N);
  }
  static void unpair2(const I& x0, const I& x1, I& e0, I& e1) {
    e0 = x0;
    e1 = x1;
  }
  static V to_float(const I& a) {
    V r;
    for (int i = 0; i < N; ++i) r.x[i] = static_cast<T>(a.x[i]);
    return r;
  }
  static std::int32_t reduce_add_i(const I& a) {
    std::int32_t s = 0;
    for (int i = 0; i < N; ++i) s += a.x[i];
    return s;
  }
  static I sum_lanes_i(const I* x) {
    I r{};
    for (int j = 0; j < N; ++j) r.x[j] = reduce_add_i(x[j]);
    return r;
  }
  /// The N lanes of x rounded to the nearest integer (ties to even, as the x86
  /// conversions in the default rounding mode), as int16; |x| < 32768.
  static void round_to_i16(std::int16_t* p, const V& x) {
    for (int i = 0; i < N; ++i) p[i] = static_cast<std::int16_t>(std::nearbyint(x.x[i]));
  }

  /// dst[i] = scale · src[i] for n int8 values (exact products rounded once: the
  /// same bits on every instruction set).
  static void i8_to_float(const std::int8_t* src, float scale, float* dst, index_t n) {
    for (index_t i = 0; i < n; ++i) dst[i] = scale * static_cast<float>(src[i]);
  }
  /// n halfs (IEEE binary16 bits) to floats.
  static void half_to_float(const std::uint16_t* src, float* dst, index_t n) {
    for (index_t i = 0; i < n; ++i) {
      Eigen::half_impl::__half_raw raw;
      raw.x = src[i];
      dst[i] = Eigen::half_impl::half_to_float(raw);
    }
  }
};

}  // namespace kernels
}  // namespace attn
