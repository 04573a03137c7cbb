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
#include <cstring>
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
    if (std::is_same<T, Acc>::value && col_stride == 1 && n == nr) {
      // A full panel of contiguous rows: element p of nr keys at a time, so the stores run
      // along the panel (1.6x faster than a row at a time at d = 64, nr = 32; the keys'
      // nr rows stay in L1 while they are read d times).
      const T* src = k + j * nr * row_stride;
      for (index_t p = 0; p < d; ++p)
        for (index_t c = 0; c < nr; ++c)
          panel[p * nr + c] = static_cast<Acc>(src[c * row_stride + p]);
      continue;
    }
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

// ------------------------------------------------- bf16 pairs (vdpbf16ps) --

/// The bits of a bfloat16.
inline std::uint16_t bf16_bits(Eigen::bfloat16 x) {
  return Eigen::numext::bit_cast<std::uint16_t>(x);
}

/// Elements of `cols` keys as bf16 K panels (bf16_avx512.hpp): 32-key panels, d rounded up to even.
inline index_t packed_kb_size(index_t cols, index_t d) {
  return (cols + 31) / 32 * 32 * (d + (d & 1));
}

/// Keys k[0, cols) into bf16 panels of 32 keys with head-dim elements paired:
/// dst[((j·dp + t)·32 + c)·2 + e] = K[j·32 + c][2t + e]; zero past cols and d.
inline void pack_kb(const Eigen::bfloat16* k, index_t row_stride, index_t col_stride, index_t cols,
                    index_t d, std::uint16_t* dst) {
  const index_t dp = (d + 1) / 2, panels = (cols + 31) / 32;
  index_t j = 0;
  if (col_stride == 1 && d % 2 == 0) {
    // Whole panels of rows with unit stride: a key's pair t is 4 contiguous bytes,
    // so a panel is a 32 × dp transpose of 4-byte pairs, with no test per element.
    for (; j < cols / 32; ++j) {
      std::uint16_t* panel = dst + j * 64 * dp;
      const Eigen::bfloat16* rows = k + j * 32 * row_stride;
      for (index_t t = 0; t < dp; ++t)
        for (index_t c = 0; c < 32; ++c)
          std::memcpy(panel + (t * 32 + c) * 2, rows + c * row_stride + 2 * t, 4);
    }
  }
  for (; j < panels; ++j) {
    std::uint16_t* panel = dst + j * 64 * dp;
    for (index_t c = 0; c < 32; ++c) {
      const index_t key = j * 32 + c;
      for (index_t p = 0; p < 2 * dp; ++p)
        panel[((p / 2) * 32 + c) * 2 + (p & 1)] =
            key < cols && p < d ? bf16_bits(k[key * row_stride + p * col_stride]) : 0;
    }
  }
}

/// Values v[0, cols) with adjacent keys paired: dst[(t·dvp + c)·2 + e] = V[2t + e][c];
/// zero past cols and dv.
inline void pack_vb(const Eigen::bfloat16* v, index_t row_stride, index_t col_stride, index_t cols,
                    index_t dv, index_t dvp, std::uint16_t* dst) {
  const index_t pairs = (cols + 1) / 2;
  index_t t = 0;
  if (col_stride == 1 && dv == dvp) {
    // Whole pairs of rows with unit stride: two rows interleaved, with no test per element.
    for (; t < cols / 2; ++t) {
      const Eigen::bfloat16* v0 = v + 2 * t * row_stride;
      const Eigen::bfloat16* v1 = v0 + row_stride;
      std::uint16_t* out = dst + t * dvp * 2;
      for (index_t c = 0; c < dvp; ++c) {
        out[2 * c] = bf16_bits(v0[c]);
        out[2 * c + 1] = bf16_bits(v1[c]);
      }
    }
  }
  for (; t < pairs; ++t)
    for (index_t e = 0; e < 2; ++e) {
      const index_t key = 2 * t + e;
      for (index_t c = 0; c < dvp; ++c)
        dst[(t * dvp + c) * 2 + e] =
            key < cols && c < dv ? bf16_bits(v[key * row_stride + c * col_stride]) : 0;
    }
}

/// Query rows as bf16 bits, rows × dpad (ldq), zero in the padding column of an odd d.
inline void pack_qb(const Eigen::bfloat16* q, index_t row_stride, index_t col_stride, index_t rows,
                    index_t d, std::uint16_t* dst, index_t ldq) {
  for (index_t r = 0; r < rows; ++r) {
    for (index_t p = 0; p < d; ++p)
      dst[r * ldq + p] = bf16_bits(q[r * row_stride + p * col_stride]);
    if (d & 1) dst[r * ldq + d] = 0;
  }
}

}  // namespace kernels
}  // namespace attn
