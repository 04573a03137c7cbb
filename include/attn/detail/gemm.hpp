// attn/detail/gemm.hpp — single-threaded GEMM on tiles, with packing buffers
// allocated once.
//
// The tile products of the engine go straight to Eigen's blocked GEMM kernel
// (the one behind `A * B`), called with a blocking space that each worker
// allocates once per call. This avoids two costs of the public product API
// inside the tile loop: packing buffers above EIGEN_STACK_ALLOCATION_LIMIT are
// heap-allocated on every product (fresh pages cost ~10 µs each), and a product
// outside a parallel region may start its own OpenMP team, which would also
// make results depend on the thread count.
#pragma once

#include "attn/tensor_view.hpp"

#include "attn/core/eigen.hpp"

static_assert(EIGEN_VERSION_AT_LEAST(3, 4, 0), "attn needs Eigen 3.4 or newer");

namespace attn {
namespace detail {

template <class Acc>
class TileGemm {
  using Blocking = Eigen::internal::gemm_blocking_space<Eigen::RowMajor, Acc, Acc, Eigen::Dynamic,
                                                        Eigen::Dynamic, Eigen::Dynamic, 1, false>;

 public:
  /// Buffers sized for products up to max_rows × max_cols with inner size max_depth.
  TileGemm(index_t max_rows, index_t max_cols, index_t max_depth)
      : blocking_(max_rows, max_cols, max_depth, 1, true) {
    blocking_.allocateAll();
  }
  TileGemm(const TileGemm&) = delete;
  TileGemm& operator=(const TileGemm&) = delete;

  /// C += alpha · A · Bᵀ.  A: rows×depth row-major (lda); B: cols×depth row-major (ldb);
  /// C: rows×cols row-major (ldc).
  void add_abt(index_t rows, index_t cols, index_t depth, const Acc* a, index_t lda, const Acc* b,
               index_t ldb, Acc* c, index_t ldc, Acc alpha) {
    Eigen::internal::general_matrix_matrix_product<index_t, Acc, Eigen::RowMajor, false, Acc,
                                                   Eigen::ColMajor, false, Eigen::RowMajor,
                                                   1>::run(rows, cols, depth, a, lda, b, ldb, c, 1,
                                                           ldc, alpha, blocking_);
  }

  /// C += alpha · A · B.  A: rows×depth row-major (lda); B: depth×cols row-major (ldb);
  /// C: rows×cols row-major (ldc).
  void add_ab(index_t rows, index_t cols, index_t depth, const Acc* a, index_t lda, const Acc* b,
              index_t ldb, Acc* c, index_t ldc, Acc alpha) {
    Eigen::internal::general_matrix_matrix_product<index_t, Acc, Eigen::RowMajor, false, Acc,
                                                   Eigen::RowMajor, false, Eigen::RowMajor,
                                                   1>::run(rows, cols, depth, a, lda, b, ldb, c, 1,
                                                           ldc, alpha, blocking_);
  }

  /// C += alpha · Aᵀ · B.  A: depth×rows row-major (lda); B: depth×cols row-major (ldb);
  /// C: rows×cols row-major (ldc). (Aᵀ of a row-major matrix is a column-major one.)
  void add_atb(index_t rows, index_t cols, index_t depth, const Acc* a, index_t lda, const Acc* b,
               index_t ldb, Acc* c, index_t ldc, Acc alpha) {
    Eigen::internal::general_matrix_matrix_product<index_t, Acc, Eigen::ColMajor, false, Acc,
                                                   Eigen::RowMajor, false, Eigen::RowMajor,
                                                   1>::run(rows, cols, depth, a, lda, b, ldb, c, 1,
                                                           ldc, alpha, blocking_);
  }

 private:
  Blocking blocking_;
};

}  // namespace detail
}  // namespace attn
