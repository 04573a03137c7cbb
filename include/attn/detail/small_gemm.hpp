// attn/detail/small_gemm.hpp — C = A·B on small row-major blocks, no packing.
//
// Linear attention multiplies chunks of a few dozen rows by its F×Dv state
// and by the chunk's values. Those operands sit in L1 already, so the
// packing that a general GEMM does first (and that Eigen redoes on every
// call) costs as much as the product. This kernel reads both operands in
// place: a register tile of MR rows × NV vectors of C accumulates
// a(i, p) · b(p, :) for every depth p, broadcasting a(i, p) and loading
// the row b(p, :) once for all MR rows.
//
// Band limits make the triangular products of a causal chunk cheap: a block
// of rows [i0, i0 + mr) stops its depth at k_diag + i0 + mr and its columns
// at n_diag + i0 + mr, so work above the diagonal is mostly skipped (the
// caller still zeroes what lies above it inside a block).
//
// With AVX2 and FMA enabled at compile time the tile is written with
// intrinsics (float: 6 rows × 16 columns, double: 6 × 8); otherwise a plain
// loop nest that compilers vectorise over columns. Every element is a sum
// over depth in increasing order, whatever block it falls in.
#pragma once

#include "attn/tensor_view.hpp"

#include <algorithm>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ATTN_SMALL_GEMM_AVX2 1
#endif

// Loops over the register tile must be unrolled completely, or GCC keeps the
// accumulator array in memory and stores it on every step.
#if defined(__clang__)
#define ATTN_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define ATTN_UNROLL _Pragma("GCC unroll 16")
#else
#define ATTN_UNROLL
#endif

namespace attn {
namespace detail {

/// Where a product is banded: row block [i0, i0 + mr) reads depth
/// p < k_diag + i0 + mr and writes columns j < n_diag + i0 + mr. A negative
/// value means no limit. Entries of A beyond a row's own band must be zero.
struct GemmBand {
  index_t k_diag = -1;
  index_t n_diag = -1;
};

#ifdef ATTN_SMALL_GEMM_AVX2

template <class T>
struct Simd;

template <>
struct Simd<float> {
  using V = __m256;
  static constexpr int width = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  // lanes < n set (0 < n <= 8)
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load(const float* p, __m256i m) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, __m256i m, V x) { _mm256_maskstore_ps(p, m, x); }
};

template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int width = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V broadcast(const double* p) { return _mm256_broadcast_sd(p); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V x) { _mm256_storeu_pd(p, x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  // lanes < n set (0 < n <= 4), as 64-bit masks
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static V load(const double* p, __m256i m) { return _mm256_maskload_pd(p, m); }
  static void store(double* p, __m256i m, V x) { _mm256_maskstore_pd(p, m, x); }
};

/// C[MR × cols] (+)= A[MR × k] · B[k × cols] over NV vectors of columns;
/// when Partial, the last vector covers only its first `last` lanes.
template <class T, int MR, int NV, bool Partial>
inline void gemm_tile(index_t k, const T* a, index_t lda, const T* b, index_t ldb, T* c,
                      index_t ldc, bool accumulate, int last) {
  using S = Simd<T>;
  using V = typename S::V;
  const __m256i m = S::mask(last);
  V acc[MR][NV];
  ATTN_UNROLL
  for (int i = 0; i < MR; ++i) ATTN_UNROLL
  for (int v = 0; v < NV; ++v) {
    T* cp = c + i * ldc + v * S::width;
    acc[i][v] = !accumulate ? S::zero() : (Partial && v == NV - 1) ? S::load(cp, m) : S::load(cp);
  }
  for (index_t p = 0; p < k; ++p) {
    V bv[NV];
    const T* bp = b + p * ldb;
    ATTN_UNROLL
    for (int v = 0; v < NV; ++v)
      bv[v] = (Partial && v == NV - 1) ? S::load(bp + v * S::width, m) : S::load(bp + v * S::width);
    ATTN_UNROLL
    for (int i = 0; i < MR; ++i) {
      const V av = S::broadcast(a + i * lda + p);
      ATTN_UNROLL
      for (int v = 0; v < NV; ++v) acc[i][v] = S::fma(av, bv[v], acc[i][v]);
    }
  }
  ATTN_UNROLL
  for (int i = 0; i < MR; ++i) ATTN_UNROLL
  for (int v = 0; v < NV; ++v) {
    T* cp = c + i * ldc + v * S::width;
    if (Partial && v == NV - 1)
      S::store(cp, m, acc[i][v]);
    else
      S::store(cp, acc[i][v]);
  }
}

/// Rows [0, MR) of a row block: columns in tiles of two vectors, then one.
template <class T, int MR>
inline void gemm_rows(index_t cols, index_t k, const T* a, index_t lda, const T* b, index_t ldb,
                      T* c, index_t ldc, bool accumulate) {
  constexpr int w = Simd<T>::width;
  index_t j = 0;
  for (; j + 2 * w <= cols; j += 2 * w)
    gemm_tile<T, MR, 2, false>(k, a, lda, b + j, ldb, c + j, ldc, accumulate, w);
  const int rest = static_cast<int>(cols - j);  // < 2w
  if (rest > w)
    gemm_tile<T, MR, 2, true>(k, a, lda, b + j, ldb, c + j, ldc, accumulate, rest - w);
  else if (rest == w)
    gemm_tile<T, MR, 1, false>(k, a, lda, b + j, ldb, c + j, ldc, accumulate, w);
  else if (rest > 0)
    gemm_tile<T, MR, 1, true>(k, a, lda, b + j, ldb, c + j, ldc, accumulate, rest);
}

#endif  // ATTN_SMALL_GEMM_AVX2

/// Rows of a row block without intrinsics: c(i, :) (+)= Σ_p a(i, p) b(p, :),
/// the inner loop over contiguous columns (vectorised by the compiler).
template <class T>
inline void gemm_rows_portable(index_t mr, index_t cols, index_t k, const T* a, index_t lda,
                               const T* b, index_t ldb, T* c, index_t ldc, bool accumulate) {
  for (index_t i = 0; i < mr; ++i) {
    T* ci = c + i * ldc;
    if (!accumulate) std::fill(ci, ci + cols, T(0));
    for (index_t p = 0; p < k; ++p) {
      const T aip = a[i * lda + p];
      const T* bp = b + p * ldb;
      for (index_t j = 0; j < cols; ++j) ci[j] += aip * bp[j];
    }
  }
}

/// C (m × n, ldc) = A (m × k, lda) · B (k × n, ldb), or C += A·B when
/// `accumulate`; all row-major, no aliasing between C and A or B. `band`
/// limits depth and columns per block of rows (see GemmBand); columns a
/// block does not reach are left as they were.
template <class T>
void small_gemm(index_t m, index_t n, index_t k, const T* a, index_t lda, const T* b, index_t ldb,
                T* c, index_t ldc, bool accumulate, GemmBand band = {}) {
  constexpr index_t mr_max = 6;
  for (index_t i0 = 0; i0 < m; i0 += mr_max) {
    const index_t mr = std::min(mr_max, m - i0);
    const index_t kk = band.k_diag < 0 ? k : std::min(k, band.k_diag + i0 + mr);
    const index_t nn = band.n_diag < 0 ? n : std::min(n, band.n_diag + i0 + mr);
    const T* ai = a + i0 * lda;
    T* ci = c + i0 * ldc;
#ifdef ATTN_SMALL_GEMM_AVX2
    if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
      switch (mr) {
        case 6:
          gemm_rows<T, 6>(nn, kk, ai, lda, b, ldb, ci, ldc, accumulate);
          break;
        case 5:
          gemm_rows<T, 5>(nn, kk, ai, lda, b, ldb, ci, ldc, accumulate);
          break;
        case 4:
          gemm_rows<T, 4>(nn, kk, ai, lda, b, ldb, ci, ldc, accumulate);
          break;
        case 3:
          gemm_rows<T, 3>(nn, kk, ai, lda, b, ldb, ci, ldc, accumulate);
          break;
        case 2:
          gemm_rows<T, 2>(nn, kk, ai, lda, b, ldb, ci, ldc, accumulate);
          break;
        default:
          gemm_rows<T, 1>(nn, kk, ai, lda, b, ldb, ci, ldc, accumulate);
          break;
      }
      continue;
    }
#endif
    gemm_rows_portable(mr, nn, kk, ai, lda, b, ldb, ci, ldc, accumulate);
  }
}

}  // namespace detail
}  // namespace attn
