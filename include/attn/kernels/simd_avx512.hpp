// attn/kernels/simd_avx512.hpp — the AVX-512 vector of 16 floats (32 zmm).
// Included only by targets.hpp, inside the region compiled for AVX-512 F/BW/DQ/VL.
#pragma once

#include <immintrin.h>

namespace attn {
namespace kernels {

struct Avx512F32 {
  using T = float;
  using V = __m512;
  static constexpr int lanes = 16;
  static constexpr int regs = 32;
  static constexpr bool native_exp = false;

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V load_i8(const std::int8_t* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  /// a·b + c rounded once (an FMA instruction, whatever the compiler fuses).
  static float mul_add(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  /// The lanes summed in sum_lanes' order: within each 128-bit lane
  /// (x0 + x2) + (x1 + x3), then (lane 0 + lane 1) + (lane 2 + lane 3). One
  /// score must get the same bits from either, since which one a score takes
  /// depends on where a run of keys starts.
  static float reduce_add(V a) {
    const V pairs = _mm512_add_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(1, 0, 3, 2)));
    const V lanes = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, _MM_SHUFFLE(2, 3, 0, 1)));
    const V halves =
        _mm512_add_ps(lanes, _mm512_shuffle_f32x4(lanes, lanes, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_cvtss_f32(
        _mm512_add_ps(halves, _mm512_shuffle_f32x4(halves, halves, _MM_SHUFFLE(1, 0, 3, 2))));
  }
  /// Lane j: the 16 lanes of x[j] summed (j < 16). Adds over a transposition:
  /// pairs of vectors within 128-bit lanes, then pairs of pairs, then the four
  /// 128-bit lanes in two steps; 45 instructions for 16 sums.
  static V sum_lanes(const V* x) { return transpose_sum<AddF32>(x); }
  /// sum_lanes' adds over a transposition, with Add::add on lanes held as V's
  /// bits (float, or int32 for sum_lanes_i).
  struct AddF32 {
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
  };
  struct AddI32 {
    static V add(V a, V b) {
      return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
    }
  };
  template <class Add>
  static V transpose_sum(const V* x) {
    V t[8], u[4];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
      t[i] = Add::add(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]),
                      _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's sums of x[4i ... 4i + 3]
      const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
      u[i] = Add::add(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                      _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    constexpr int even = _MM_SHUFFLE(2, 0, 2, 0), odd = _MM_SHUFFLE(3, 1, 3, 1);
    const V w0 =
        Add::add(_mm512_shuffle_f32x4(u[0], u[1], even), _mm512_shuffle_f32x4(u[0], u[1], odd));
    const V w1 =
        Add::add(_mm512_shuffle_f32x4(u[2], u[3], even), _mm512_shuffle_f32x4(u[2], u[3], odd));
    return Add::add(_mm512_shuffle_f32x4(w0, w1, even), _mm512_shuffle_f32x4(w0, w1, odd));
  }
  static float reduce_max(V a) {
    __m256 h = _mm256_max_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  /// p·2^n where x >= lo or x is NaN, 0 elsewhere: n is integral, shifted =
  /// n + 1.5·2^23 (vscalefps on n, zero-masked).
  static V ldexp_above(V p, V n, V /*shifted*/, V x, float lo) {
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_NLT_UQ), p, n);
  }
  /// dst[i] = scale · src[i] for n int8 values.
  static void i8_to_float(const std::int8_t* src, float scale, float* dst, index_t n) {
    const __m512 vs = _mm512_set1_ps(scale);
    index_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i,
                       _mm512_mul_ps(vs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                             reinterpret_cast<const __m128i*>(src + i))))));
    for (; i < n; ++i) dst[i] = scale * static_cast<float>(src[i]);
  }
  static V abs(V a) { return _mm512_abs_ps(a); }

  // Integer products on 8-bit caches (body.inl, "int8 rows in integers"): I holds
  // 16 int32 sums, or 32 int16 values taken as 16 pairs.
  using I = __m512i;
  static I izero() { return _mm512_setzero_si512(); }
  static I iload(const std::int32_t* p) { return _mm512_loadu_si512(p); }
  static void istore(std::int32_t* p, I a) { _mm512_storeu_si512(p, a); }
  static I load_i16(const std::int16_t* p) { return _mm512_loadu_si512(p); }
  /// 32 int8 values widened to int16.
  static I widen_i8(const std::int8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  /// Lane l of acc plus a[2l]·b[2l] + a[2l+1]·b[2l+1] (int16 products, int32 sums).
  static I madd(I acc, I a, I b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
  /// The int16 pair at p in every lane.
  static I broadcast_pair(const std::int16_t* p) {
    std::int32_t x;
    std::memcpy(&x, p, sizeof x);
    return _mm512_set1_epi32(x);
  }
  /// Elements 0..15 of rows r0 and r1 as pairs: lane c holds (r0[c], r1[c]).
  static I pair_rows(const std::int8_t* r0, const std::int8_t* r1) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1));
    return _mm512_cvtepi8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b)));
  }
  /// Elements 0..31 of rows r0 and r1 as pairs in two vectors, in the order
  /// the 256-bit unpacks leave them (x0: elements 0-7 and 16-23, x1: 8-15 and
  /// 24-31); unpair2 puts sums in that order back in element order.
  static void pair_rows2(const std::int8_t* r0, const std::int8_t* r1, I& x0, I& x1) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1));
    x0 = _mm512_cvtepi8_epi16(_mm256_unpacklo_epi8(a, b));
    x1 = _mm512_cvtepi8_epi16(_mm256_unpackhi_epi8(a, b));
  }
  static void unpair2(I x0, I x1, I& e0, I& e1) {
    e0 = _mm512_inserti64x4(x0, _mm512_castsi512_si256(x1), 1);
    e1 = _mm512_inserti64x4(x1, _mm512_extracti64x4_epi64(x0, 1), 0);
  }
  static V to_float(I a) { return _mm512_cvtepi32_ps(a); }
  static std::int32_t reduce_add_i(I a) { return _mm512_reduce_add_epi32(a); }
  /// Lane j: the 16 lanes of x[j] summed (sum_lanes' transposition on int32).
  static I sum_lanes_i(const I* x) {
    V v[16];
    for (int i = 0; i < 16; ++i) v[i] = _mm512_castsi512_ps(x[i]);
    return _mm512_castps_si512(transpose_sum<AddI32>(v));
  }
  /// The 16 lanes of x rounded to the nearest integer (ties to even), as int16;
  /// |x| < 32768.
  static void round_to_i16(std::int16_t* p, V x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(x)));
  }

  /// n halfs (IEEE binary16 bits) to floats.
  static void half_to_float(const std::uint16_t* src, float* dst, index_t n) {
    index_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(
          dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
  }
};

}  // namespace kernels
}  // namespace attn
