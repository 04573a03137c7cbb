// attn/kernels/simd_avx2.hpp — the AVX2 + FMA vector of 8 floats (16 ymm).
// Included only by targets.hpp, inside the region compiled for "avx2,fma,f16c".
#pragma once

#include <immintrin.h>

namespace attn {
namespace kernels {

struct Avx2F32 {
  using T = float;
  using V = __m256;
  static constexpr int lanes = 8;
  static constexpr int regs = 16;
  static constexpr bool native_exp = false;

  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V load_i8(const std::int8_t* p) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  /// a·b + c rounded once (an FMA instruction, whatever the compiler fuses).
  static float mul_add(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  /// The lanes summed in sum_lanes' order: within each 128-bit lane
  /// (x0 + x2) + (x1 + x3), then lane 0 + lane 1. One score must get the same
  /// bits from either, since which one a score takes depends on where a run
  /// of keys starts.
  static float reduce_add(V a) {
    const V pairs = _mm256_add_ps(a, _mm256_permute_ps(a, _MM_SHUFFLE(1, 0, 3, 2)));
    const V lanes = _mm256_add_ps(pairs, _mm256_permute_ps(pairs, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtss_f32(
        _mm_add_ss(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1)));
  }
  /// Lane j: the 8 lanes of x[j] summed (j < 8). Adds over a transposition:
  /// pairs of vectors within 128-bit lanes, then pairs of pairs, then the two
  /// 128-bit lanes; 21 instructions for 8 sums.
  static V sum_lanes(const V* x) { return transpose_sum<AddF32>(x); }
  /// sum_lanes' adds over a transposition, with Add::add on lanes held as V's
  /// bits (float, or int32 for sum_lanes_i).
  struct AddF32 {
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
  };
  struct AddI32 {
    static V add(V a, V b) {
      return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b)));
    }
  };
  template <class Add>
  static V transpose_sum(const V* x) {
    V t[4], u[2];
    for (int i = 0; i < 4; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
      t[i] = Add::add(_mm256_unpacklo_ps(x[2 * i], x[2 * i + 1]),
                      _mm256_unpackhi_ps(x[2 * i], x[2 * i + 1]));
    for (int i = 0; i < 2; ++i) {  // per 128-bit lane: that lane's sums of x[4i ... 4i + 3]
      const __m256d a = _mm256_castps_pd(t[2 * i]), b = _mm256_castps_pd(t[2 * i + 1]);
      u[i] = Add::add(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
                      _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    return Add::add(_mm256_permute2f128_ps(u[0], u[1], 0x20),
                    _mm256_permute2f128_ps(u[0], u[1], 0x31));
  }
  static float reduce_max(V a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  /// p·2^n where x >= lo or x is NaN, 0 elsewhere: n is integral, shifted =
  /// n + 1.5·2^23 holds n in its low mantissa bits, and lo >= -87.3 keeps n >= -126
  /// where it counts, so 2^n is a normal float built from its exponent bits.
  static V ldexp_above(V p, V /*n*/, V shifted, V x, float lo) {
    const __m256i e =
        _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(0x4B400000 - 127));
    const V two_n = _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
    return _mm256_and_ps(_mm256_mul_ps(p, two_n),
                         _mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_NLT_UQ));
  }
  /// dst[i] = scale · src[i] for n int8 values.
  static void i8_to_float(const std::int8_t* src, float scale, float* dst, index_t n) {
    const __m256 vs = _mm256_set1_ps(scale);
    index_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i,
                       _mm256_mul_ps(vs, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                             reinterpret_cast<const __m128i*>(src + i))))));
    for (; i < n; ++i) dst[i] = scale * static_cast<float>(src[i]);
  }
  static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }

  // Integer products on 8-bit caches (body.inl, "int8 rows in integers"): I holds
  // 8 int32 sums, or 16 int16 values taken as 8 pairs.
  using I = __m256i;
  static I izero() { return _mm256_setzero_si256(); }
  static I iload(const std::int32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static void istore(std::int32_t* p, I a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a);
  }
  static I load_i16(const std::int16_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  /// 16 int8 values widened to int16.
  static I widen_i8(const std::int8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  /// Lane l of acc plus a[2l]·b[2l] + a[2l+1]·b[2l+1] (int16 products, int32 sums).
  static I madd(I acc, I a, I b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
  /// The int16 pair at p in every lane.
  static I broadcast_pair(const std::int16_t* p) {
    std::int32_t x;
    std::memcpy(&x, p, sizeof x);
    return _mm256_set1_epi32(x);
  }
  /// Elements 0..7 of rows r0 and r1 as pairs: lane c holds (r0[c], r1[c]).
  static I pair_rows(const std::int8_t* r0, const std::int8_t* r1) {
    return _mm256_cvtepi8_epi16(
        _mm_unpacklo_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r0)),
                          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r1))));
  }
  /// Elements 0..15 of rows r0 and r1 as pairs in two vectors (x0: 0-7, x1: 8-15).
  static void pair_rows2(const std::int8_t* r0, const std::int8_t* r1, I& x0, I& x1) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1));
    x0 = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b));
    x1 = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a, b));
  }
  static void unpair2(I x0, I x1, I& e0, I& e1) {
    e0 = x0;
    e1 = x1;
  }
  static V to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static std::int32_t reduce_add_i(I a) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
  }
  /// Lane j: the 8 lanes of x[j] summed (sum_lanes' transposition on int32).
  static I sum_lanes_i(const I* x) {
    V v[8];
    for (int i = 0; i < 8; ++i) v[i] = _mm256_castsi256_ps(x[i]);
    return _mm256_castps_si256(transpose_sum<AddI32>(v));
  }
  /// The 8 lanes of x rounded to the nearest integer (ties to even), as int16;
  /// |x| < 32768.
  static void round_to_i16(std::int16_t* p, V x) {
    const __m256i n = _mm256_cvtps_epi32(x);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packs_epi32(_mm256_castsi256_si128(n), _mm256_extracti128_si256(n, 1)));
  }

  /// n halfs (IEEE binary16 bits) to floats.
  static void half_to_float(const std::uint16_t* src, float* dst, index_t n) {
    index_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
  }
};

}  // namespace kernels
}  // namespace attn
