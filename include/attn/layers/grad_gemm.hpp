// attn/layers/grad_gemm.hpp — the row-major products of the layers' backward
// pass (dX = dY·Wᵀ, dW = Xᵀ·dY, db = Σ_rows dY).
//
// Each product runs Eigen's single-threaded GEMM kernel (detail::TileGemm,
// packing buffers allocated once per worker) on a fixed grid of output
// blocks, one task per block: every element of the result is computed by one
// task whose shapes do not depend on the thread count, so results are
// bitwise the same for any number of threads, and Eigen never starts its own
// thread team.
#pragma once

#include "attn/detail/gemm.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

namespace attn {
namespace detail {

/// A row-major matrix: rows × cols, row r at data + r·ld (unit column stride).
template <class T>
struct RowsRef {
  T* data = nullptr;
  index_t rows = 0, cols = 0, ld = 0;
};

/// Rows and columns of one output block of the products below.
constexpr index_t grad_block_rows = 64;
constexpr index_t grad_block_cols = 512;

/// Runs body(gemm, r0, rows, c0, cols) over the fixed block grid of an
/// m × n output; the gemm of each worker is sized for blocks of depth k.
template <class T, class Body>
void for_output_blocks(index_t m, index_t n, index_t k, int num_threads, Body body) {
  if (m == 0 || n == 0) return;
  const index_t rb = (m + grad_block_rows - 1) / grad_block_rows,
                cb = (n + grad_block_cols - 1) / grad_block_cols;
  const index_t tasks = rb * cb;
  const bool small = static_cast<double>(m) * static_cast<double>(n) *
                         static_cast<double>(std::max<index_t>(k, 1)) <
                     2.0e6;  // under ~50 µs a parallel region costs more than it saves
  const int threads = small ? 1 : resolve_threads(num_threads, tasks);
  const index_t bm = std::min(m, grad_block_rows), bn = std::min(n, grad_block_cols);
  parallel_tasks(
      tasks, threads,
      [&] { return std::make_unique<TileGemm<T>>(bm, bn, std::max<index_t>(k, 1)); },
      [&](TileGemm<T>& gemm, index_t t) {
        const index_t r0 = (t / cb) * grad_block_rows, c0 = (t % cb) * grad_block_cols;
        body(gemm, r0, std::min(grad_block_rows, m - r0), c0, std::min(grad_block_cols, n - c0));
      },
      [](TileGemm<T>&) {});
}

/// Sets rows × cols of c (leading dimension ldc) to zero.
template <class T>
void zero_block(T* c, index_t ldc, index_t rows, index_t cols) {
  for (index_t r = 0; r < rows; ++r) std::fill(c + r * ldc, c + r * ldc + cols, T(0));
}

/// C[m, n] = A[m, k]·B[n, k]ᵀ, or C += that when `add`.
template <class T>
void gemm_abt(const RowsRef<const T>& a, const RowsRef<const T>& b, const RowsRef<T>& c, bool add,
              int num_threads) {
  const index_t k = a.cols;
  for_output_blocks<T>(c.rows, c.cols, k, num_threads,
                       [&](TileGemm<T>& g, index_t r0, index_t rows, index_t c0, index_t cols) {
                         T* cp = c.data + r0 * c.ld + c0;
                         if (!add) zero_block(cp, c.ld, rows, cols);
                         if (k == 0) return;
                         g.add_abt(rows, cols, k, a.data + r0 * a.ld, a.ld, b.data + c0 * b.ld,
                                   b.ld, cp, c.ld, T(1));
                       });
}

/// C[m, n] = A[k, m]ᵀ·B[k, n], or C += that when `add` (a sum over the k rows).
template <class T>
void gemm_atb(const RowsRef<const T>& a, const RowsRef<const T>& b, const RowsRef<T>& c, bool add,
              int num_threads) {
  const index_t k = a.rows;
  for_output_blocks<T>(c.rows, c.cols, k, num_threads,
                       [&](TileGemm<T>& g, index_t r0, index_t rows, index_t c0, index_t cols) {
                         T* cp = c.data + r0 * c.ld + c0;
                         if (!add) zero_block(cp, c.ld, rows, cols);
                         if (k == 0) return;
                         g.add_atb(rows, cols, k, a.data + r0, a.ld, b.data + c0, b.ld, cp, c.ld,
                                   T(1));
                       });
}

/// db[j] = Σ_r g[r, j] (or db += that when `add`), rows in increasing order.
template <class T>
void column_sums(const RowsRef<const T>& g, T* db, bool add) {
  if (!add) std::fill(db, db + g.cols, T(0));
  for (index_t r = 0; r < g.rows; ++r) {
    const T* row = g.data + r * g.ld;
    for (index_t j = 0; j < g.cols; ++j) db[j] += row[j];
  }
}

/// Whether x [B, L, w] is a row-major [B·L, w] matrix (unit column stride,
/// evenly spaced rows that do not overlap); its leading dimension if so.
template <class T>
bool rows_layout(const TensorView<T, 3>& x, index_t& ld) {
  const index_t B = x.extent(0), L = x.extent(1), w = x.extent(2);
  if (w > 1 && x.stride(2) != 1) return false;
  if (L > 1) {
    ld = x.stride(1);
    if (B > 1 && x.stride(0) != L * ld) return false;
  } else {
    ld = x.stride(0);
    if (B == 1) ld = w;
  }
  return ld >= w;
}

/// x [B, L, w] as a row-major [B·L, w] matrix: the view itself when it is
/// one (rows_layout), else a copy in `buf`.
template <class T>
RowsRef<const T> as_rows(const TensorView<const T, 3>& x, std::vector<T>& buf) {
  const index_t B = x.extent(0), L = x.extent(1), w = x.extent(2);
  index_t ld = 0;
  if (rows_layout(x, ld)) return {x.data(), B * L, w, ld};
  if (static_cast<index_t>(buf.size()) < B * L * w) buf.resize(static_cast<std::size_t>(B * L * w));
  for (index_t b = 0; b < B; ++b)
    for (index_t l = 0; l < L; ++l)
      for (index_t j = 0; j < w; ++j)
        buf[static_cast<std::size_t>((b * L + l) * w + j)] = x(b, l, j);
  return {buf.data(), B * L, w, w};
}

/// Where to write a [B, L, w] result: the view itself when it is a row-major
/// matrix, else `buf` (then copy_rows_out copies it into the view).
template <class T>
RowsRef<T> rows_target(const TensorView<T, 3>& y, std::vector<T>& buf) {
  const index_t B = y.extent(0), L = y.extent(1), w = y.extent(2);
  index_t ld = 0;
  if (rows_layout(y, ld)) return {y.data(), B * L, w, ld};
  if (static_cast<index_t>(buf.size()) < B * L * w) buf.resize(static_cast<std::size_t>(B * L * w));
  return {buf.data(), B * L, w, w};
}

/// Copies r into y unless r is y itself (see rows_target).
template <class T>
void copy_rows_out(const RowsRef<T>& r, const TensorView<T, 3>& y) {
  if (r.data == y.data()) return;
  const index_t L = y.extent(1);
  for (index_t b = 0; b < y.extent(0); ++b)
    for (index_t l = 0; l < L; ++l)
      for (index_t j = 0; j < y.extent(2); ++j) y(b, l, j) = r.data[(b * L + l) * r.ld + j];
}

}  // namespace detail
}  // namespace attn
