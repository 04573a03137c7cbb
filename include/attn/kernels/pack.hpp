// attn/kernels/pack.hpp — key and value tiles in the layouts of the micro-kernels.
//
// Keys become panels of NR keys (the score kernel reads one row of NR keys per
// head-dim element); values become rows padded to dvp columns. Both convert
// the storage type to the accumulation type on the way (half with F16C where
// the kernel set has it), so a tile is converted once per call, however many
// query tiles and query heads read it.
#pragma once

#include "attn/kernels/kernel_set.hpp"
#include "attn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace attn {
namespace kernels {

/// Columns of a packed value row: dv rounded up to 16 (a multiple of every
/// kernel's vector width, so the P·V kernel needs no column tails).
inline index_t padded_dv(index_t dv) { return (dv + 15) / 16 * 16; }

/// Elements of `cols` keys packed as panels of nr keys, d deep.
inline index_t packed_k_size(index_t cols, index_t d, int nr) {
  return (cols + nr - 1) / nr * nr * d;
}

/// Row `r` of a strided [rows, n] source, converted into dst[0, n).
template <class Acc, class T>
inline void load_row(const KernelSet<Acc>& ks, const T* src, index_t col_stride, index_t n,
                     Acc* dst) {
  if constexpr (std::is_same<T, Eigen::half>::value && std::is_same<Acc, float>::value) {
    if (col_stride == 1) {
      ks.half_to_float(reinterpret_cast<const std::uint16_t*>(src), dst, n);
      return;
    }
  }
  (void)ks;
  for (index_t c = 0; c < n; ++c) dst[c] = static_cast<Acc>(src[c * col_stride]);
}

/// Keys k[0, cols) (row i at k + i·row_stride, element p at + p·col_stride)
/// into panels: dst[(j·d + p)·nr + c] = K[j·nr + c][p]; keys past cols are 0.
/// `row` is scratch of d elements.
template <class Acc, class T>
void pack_k(const KernelSet<Acc>& ks, const T* k, index_t row_stride, index_t col_stride,
            index_t cols, index_t d, Acc* row, Acc* dst) {
  const index_t nr = ks.k_panel;
  const index_t panels = (cols + nr - 1) / nr;
  for (index_t j = 0; j < panels; ++j) {
    Acc* panel = dst + j * nr * d;
    const index_t n = std::min(nr, cols - j * nr);
    for (index_t c = 0; c < n; ++c) {
      load_row(ks, k + (j * nr + c) * row_stride, col_stride, d, row);
      for (index_t p = 0; p < d; ++p) panel[p * nr + c] = row[p];  // transpose into the panel
    }
    for (index_t c = n; c < nr; ++c)
      for (index_t p = 0; p < d; ++p) panel[p * nr + c] = Acc(0);
  }
}

/// Values v[0, cols) as rows of dvp columns: dst[i·dvp + c] = V[i][c], 0 for c >= dv.
template <class Acc, class T>
void pack_v(const KernelSet<Acc>& ks, const T* v, index_t row_stride, index_t col_stride,
            index_t cols, index_t dv, index_t dvp, Acc* dst) {
  for (index_t i = 0; i < cols; ++i) {
    Acc* out = dst + i * dvp;
    load_row(ks, v + i * row_stride, col_stride, dv, out);
    std::fill(out + dv, out + dvp, Acc(0));
  }
}

}  // namespace kernels
}  // namespace attn
