// attn/kernels/bf16_avx512.hpp — bf16 products with AVX512-BF16 (vdpbf16ps).
// Included only by targets.hpp, inside the region compiled for AVX-512 + BF16.
//
// vdpbf16ps multiplies pairs along the reduction dimension, so the operands
// come in pairs (bf16 bits as std::uint16_t, B = 2 elements per 32-bit lane):
//   Qb   rows × dpad (dpad = d rounded up to even, zero-padded), unscaled
//   Kb   panels of 32 keys; panel j holds (K[j·32 + c][2t], K[j·32 + c][2t + 1])
//        at [(t·32 + c)·2 + {0, 1}]
//   Pb   rows × cpad (cols rounded up to even, zero-padded): P rounded to bf16
//   Vb   key pairs; (V[2t][c], V[2t + 1][c]) at [(t·dvp + c)·2 + {0, 1}]
// fp32 accumulation throughout; the score scale is applied to the fp32 sums.
#pragma once

#include <immintrin.h>

namespace attn {
namespace kernels {
namespace avx512_bf16 {

constexpr int k_panel = 32;  // keys per Kb panel: two zmm of 16 key pairs
constexpr int tile_rows = 14;

/// S[0:M, 0:32] = scale · Qb[0:M] · panelᵀ over dp depth pairs.
/// 14 × 32 tile: 28 accumulators + 2 K loads + 1 Q pair broadcast of 32 zmm.
template <int M>
inline void score_block(index_t dp, const std::uint16_t* q, index_t ldq, const std::uint16_t* kp,
                        float* s, index_t lds, float scale) {
  __m512 acc[M][2];
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (index_t t = 0; t < dp; ++t) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(kp + t * 64);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(kp + t * 64 + 32);
    ATTN_KERNEL_UNROLL
    for (int i = 0; i < M; ++i) {
      std::int32_t pair;
      std::memcpy(&pair, q + i * ldq + 2 * t, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) {
    _mm512_storeu_ps(s + i * lds, _mm512_mul_ps(acc[i][0], vs));
    _mm512_storeu_ps(s + i * lds + 16, _mm512_mul_ps(acc[i][1], vs));
  }
}

template <int M>
void score_panels(index_t panels, index_t dp, const std::uint16_t* q, index_t ldq,
                  const std::uint16_t* kp, float* s, index_t lds, float scale) {
  for (index_t j = 0; j < panels; ++j)
    score_block<M>(dp, q, ldq, kp + j * k_panel * 2 * dp, s + j * k_panel, lds, scale);
}

template <int... I>
void score_impl(index_t rows, index_t cols, index_t d, const std::uint16_t* q, index_t ldq,
                const std::uint16_t* kp, float* s, index_t lds, float scale,
                std::integer_sequence<int, I...>) {
  using Fn = void (*)(index_t, index_t, const std::uint16_t*, index_t, const std::uint16_t*, float*,
                      index_t, float);
  static constexpr Fn by_rows[] = {&score_panels<I + 1>...};
  const index_t panels = (cols + k_panel - 1) / k_panel, dp = (d + 1) / 2;
  const avx512::RowBlocks blocks(rows, tile_rows);
  for (index_t i = 0, i0 = 0; i < blocks.count; ++i) {
    const index_t m = blocks.size(i);
    by_rows[m - 1](panels, dp, q + i0 * ldq, ldq, kp, s + i0 * lds, lds, scale);
    i0 += m;
  }
}

/// S (rows × panels·32, lds) = scale · Qb (rows × dpad, ldq) · Kbᵀ.
inline void score(index_t rows, index_t cols, index_t d, const std::uint16_t* q, index_t ldq,
                  const std::uint16_t* kp, float* s, index_t lds, float scale) {
  score_impl(rows, cols, d, q, ldq, kp, s, lds, scale,
             std::make_integer_sequence<int, tile_rows>{});
}

/// O[0:M, 0:NV·16] += Pb[0:M] · Vb over cp key pairs.
/// 14 × 32 tile: 28 accumulators + 2 V loads + 1 P pair broadcast of 32 zmm.
template <int M, int NV>
inline void pv_block(index_t cp, const std::uint16_t* p, index_t ldp, const std::uint16_t* v,
                     index_t dvp, float* o, index_t ldo) {
  __m512 acc[M][NV];
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) ATTN_KERNEL_UNROLL
  for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_loadu_ps(o + i * ldo + j * 16);
  for (index_t t = 0; t < cp; ++t) {
    __m512bh b[NV];
    ATTN_KERNEL_UNROLL
    for (int j = 0; j < NV; ++j) b[j] = (__m512bh)_mm512_loadu_si512(v + (t * dvp + j * 16) * 2);
    ATTN_KERNEL_UNROLL
    for (int i = 0; i < M; ++i) {
      std::int32_t pair;
      std::memcpy(&pair, p + i * ldp + 2 * t, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      ATTN_KERNEL_UNROLL
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
    }
  }
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) ATTN_KERNEL_UNROLL
  for (int j = 0; j < NV; ++j) _mm512_storeu_ps(o + i * ldo + j * 16, acc[i][j]);
}

template <int M>
void pv_columns(index_t dvp, index_t cp, const std::uint16_t* p, index_t ldp,
                const std::uint16_t* v, float* o, index_t ldo) {
  index_t j = 0;
  for (; j + 32 <= dvp; j += 32) pv_block<M, 2>(cp, p, ldp, v + 2 * j, dvp, o + j, ldo);
  if (j < dvp) pv_block<M, 1>(cp, p, ldp, v + 2 * j, dvp, o + j, ldo);
}

template <int... I>
void pv_impl(index_t rows, index_t dvp, index_t cols, const std::uint16_t* p, index_t ldp,
             const std::uint16_t* v, float* o, index_t ldo, std::integer_sequence<int, I...>) {
  using Fn = void (*)(index_t, index_t, const std::uint16_t*, index_t, const std::uint16_t*, float*,
                      index_t);
  static constexpr Fn by_rows[] = {&pv_columns<I + 1>...};
  const avx512::RowBlocks blocks(rows, tile_rows);
  for (index_t i = 0, i0 = 0; i < blocks.count; ++i) {
    const index_t m = blocks.size(i);
    by_rows[m - 1](dvp, (cols + 1) / 2, p + i0 * ldp, ldp, v, o + i0 * ldo, ldo);
    i0 += m;
  }
}

/// O (rows × dvp, ldo) += Pb (rows × cpad, ldp) · Vb (cols keys in pairs, dvp columns).
inline void accumulate_pv(index_t rows, index_t dvp, index_t cols, const std::uint16_t* p,
                          index_t ldp, const std::uint16_t* v, float* o, index_t ldo) {
  pv_impl(rows, dvp, cols, p, ldp, v, o, ldo, std::make_integer_sequence<int, tile_rows>{});
}

/// Pb = bf16(P) row by row (round to nearest even), cols rounded up to even with a zero.
inline void round_to_bf16(index_t rows, index_t cols, const float* p, index_t ldp,
                          std::uint16_t* pb, index_t ldpb) {
  for (index_t r = 0; r < rows; ++r) {
    const float* src = p + r * ldp;
    std::uint16_t* dst = pb + r * ldpb;
    index_t c = 0;
    for (; c + 32 <= cols; c += 32) {
      const __m512bh h =
          _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + c + 16), _mm512_loadu_ps(src + c));
      _mm512_storeu_si512(dst + c, (__m512i)h);
    }
    if (c < cols) {
      const index_t n = cols - c;
      const __mmask16 lo = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
      const __mmask16 hi = static_cast<__mmask16>(n <= 16 ? 0 : (1u << (n - 16)) - 1);
      const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + c + 16),
                                             _mm512_maskz_loadu_ps(lo, src + c));
      const index_t w = n + (n & 1);  // through the zero that pads an odd count
      _mm512_mask_storeu_epi16(dst + c, static_cast<__mmask32>((std::uint64_t{1} << w) - 1),
                               (__m512i)h);
    }
  }
}

/// The online softmax of scale·S (scale > 0: avx512::online_softmax) row by row,
/// each row of P rounded to Pb while it is still in L1. The score kernels then
/// store unscaled sums, and no pass over S scales them.
inline void softmax_to_bf16(index_t rows, index_t cols, float* s, index_t lds, float scale,
                            float* m, float* l, float* o, index_t ldo, index_t dvp,
                            std::uint16_t* pb, index_t ldpb) {
  for (index_t r = 0; r < rows; ++r) {
    avx512::online_softmax<Avx512F32>(1, cols, s + r * lds, lds, scale, m + r, l + r, o + r * ldo,
                                      ldo, dvp);
    round_to_bf16(1, cols, s + r * lds, lds, pb + r * ldpb, ldpb);
  }
}

}  // namespace avx512_bf16
}  // namespace kernels
}  // namespace attn
