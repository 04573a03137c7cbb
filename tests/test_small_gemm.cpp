// The small row-major GEMM under linear attention, against a double-precision
// triple loop: every tail of the register tile (rows 1..6, columns not a
// multiple of the vector width), accumulate or overwrite, leading dimensions
// wider than the block, and the band limits of causal chunks.
#include <attn/detail/small_gemm.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "support.hpp"

namespace {

using attn::index_t;
using attn::detail::GemmBand;
using attn::detail::small_gemm;

template <class T>
class SmallGemm : public ::testing::Test {};
TYPED_TEST_SUITE(SmallGemm, attn_test::FloatTypes, );

template <class T>
std::vector<T> random_values(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(gen));
  return v;
}

// C (+)= A·B in double with the band applied the way GemmBand defines it.
// Entries of C the band leaves alone must keep their old value.
template <class T>
void check(index_t m, index_t n, index_t k, bool accumulate, GemmBand band, unsigned seed) {
  const index_t lda = k + 3, ldb = n + 5, ldc = n + 2;  // padded rows: strides are honoured
  const auto a0 = random_values<T>(static_cast<std::size_t>(m * lda), seed);
  const auto b = random_values<T>(static_cast<std::size_t>(k * ldb), seed + 1);
  const auto c0 = random_values<T>(static_cast<std::size_t>(m * ldc), seed + 2);
  auto a = a0;
  // A is zero beyond each row's own band (the contract of GemmBand.k_diag)
  if (band.k_diag >= 0)
    for (index_t i = 0; i < m; ++i)
      for (index_t p = std::max<index_t>(0, band.k_diag + i + 1); p < k; ++p) a[i * lda + p] = T(0);
  auto c = c0;
  small_gemm<T>(m, n, k, a.data(), lda, b.data(), ldb, c.data(), ldc, accumulate, band);

  const double e = attn_test::eps<T>();
  for (index_t i = 0; i < m; ++i) {
    const index_t block_end = (i / 6) * 6 + std::min<index_t>(6, m - (i / 6) * 6);
    const index_t cols = band.n_diag < 0 ? n : std::min(n, band.n_diag + block_end);
    for (index_t j = 0; j < ldc; ++j) {
      const double got = static_cast<double>(c[i * ldc + j]);
      if (j >= cols) {  // outside the product (padding or beyond the column band): untouched
        EXPECT_EQ(got, static_cast<double>(c0[i * ldc + j])) << i << "," << j;
        continue;
      }
      double want = accumulate ? static_cast<double>(c0[i * ldc + j]) : 0.0, mag = std::abs(want);
      for (index_t p = 0; p < k; ++p) {
        const double t = static_cast<double>(a[i * lda + p]) * static_cast<double>(b[p * ldb + j]);
        want += t;
        mag += std::abs(t);
      }
      // a k-term sum rounded in T: |error| <= k·eps·Σ|terms| (a factor 2 for margin)
      const double tol = 2.0 * static_cast<double>(k + 1) * e * mag + 1e-300;
      ASSERT_NEAR(got, want, tol) << "m=" << m << " n=" << n << " k=" << k << " at " << i << ","
                                  << j;
    }
  }
}

TYPED_TEST(SmallGemm, EveryTileTail) {
  unsigned seed = 1;
  for (index_t m : {1, 2, 3, 4, 5, 6, 7, 11, 13, 32})
    for (index_t n : {1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 31, 33, 64, 65})
      for (bool acc : {false, true}) check<TypeParam>(m, n, 9, acc, {}, seed++);
}

TYPED_TEST(SmallGemm, DepthShapes) {
  unsigned seed = 100;
  for (index_t k : {1, 2, 16, 64, 97}) check<TypeParam>(13, 20, k, true, {}, seed++);
}

TYPED_TEST(SmallGemm, ZeroDepthOverwritesWithZeros) {
  std::vector<TypeParam> c(12, TypeParam(5));
  small_gemm<TypeParam>(3, 4, 0, nullptr, 1, nullptr, 4, c.data(), 4, false);
  for (auto x : c) EXPECT_EQ(x, TypeParam(0));
}

// The causal chunk's two banded products: A = Q·Kᵀ up to the diagonal, and
// [Q | A]·[S ; V] reading A only up to the diagonal.
TYPED_TEST(SmallGemm, Bands) {
  unsigned seed = 200;
  for (index_t m : {1, 5, 6, 7, 16, 32})
    for (index_t diag : {0, 3, 64}) {
      check<TypeParam>(m, m, 20, false, GemmBand{-1, diag}, seed++);
      check<TypeParam>(m, 24, diag + m, true, GemmBand{diag, -1}, seed++);
      check<TypeParam>(m, m + 3, diag + m, false, GemmBand{diag, 0}, seed++);
    }
}

}  // namespace
