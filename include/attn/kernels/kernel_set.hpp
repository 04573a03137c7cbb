// attn/kernels/kernel_set.hpp — the instruction sets attn has kernels for, and
// the table of kernels of one instruction set.
#pragma once

#include "attn/kernels/prefetch.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>

namespace attn {

/// Instruction sets with their own kernels, slowest first.
///   portable     plain loops the compiler vectorises for its baseline target
///   avx2         AVX2 + FMA + F16C (16 ymm registers, 8 floats)
///   avx512       AVX-512 F/BW/DQ/VL (32 zmm registers, 16 floats)
///   avx512_bf16  avx512 plus AVX512-BF16 (vdpbf16ps for bf16 storage)
///   amx_bf16     avx512_bf16 plus AMX tiles (tdpbf16ps for bf16 storage)
enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx_bf16 = 4 };

/// How many values Isa has.
constexpr int isa_count = 5;

/// The name ATTN_ISA takes for `isa`.
inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::portable:
      return "portable";
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    case Isa::avx512_bf16:
      return "avx512_bf16";
    case Isa::amx_bf16:
      return "amx_bf16";
  }
  return "unknown";
}

namespace kernels {

/// Keeps a row's int32 sum of n products of int16 and int8 codes from overflowing:
/// the largest int16 magnitude to round to, 32767 up to n = 516 (one definition
/// for every instruction set's int8 kernels and their callers).
inline int int16_limit(index_t n) {
  const std::int64_t most =
      std::numeric_limits<std::int32_t>::max() / (127 * std::max<index_t>(n, 1));
  return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(32767, most)));
}

/// The micro-kernels of one instruction set for accumulation type T (layouts
/// in body.inl). Plain function pointers: one table per (ISA, T), chosen once
/// per call by dispatch.hpp.
template <class T>
struct KernelSet {
  Isa isa;
  int k_panel;  ///< keys per packed K panel (NR)
  int lanes;    ///< elements per vector; dvp (padded Dv) must be a multiple
  /// S (rows × panels·NR, lds) = Q (rows × d, ldq) · Kᵀ, K as ceil(cols/NR) panels.
  void (*score)(index_t rows, index_t cols, index_t d, const T* q, index_t ldq, const T* kp, T* s,
                index_t lds);
  /// S (rows × cols, lds) = Q (rows × d, ldq) · Kᵀ with K as rows (cols × d, ldk): for
  /// a few query rows (decoding), where packing K into panels costs more than the products.
  /// `next`: where the key rows go on after the call's (a paged cache's next run; prefetched).
  void (*score_rows)(index_t rows, index_t cols, index_t d, const T* q, index_t ldq, const T* k,
                     index_t ldk, T* s, index_t lds, NextRows next);
  /// score_rows on int8 key rows with a scale per key (8-bit caches):
  /// S[i][j] = kscale[j] · Σ_p Q[i][p]·K̂[j][p].
  void (*score_rows_i8)(index_t rows, index_t cols, index_t d, const T* q, index_t ldq,
                        const std::int8_t* k, index_t ldk, const float* kscale, T* s, index_t lds,
                        NextRows next);
  /// Online-softmax update of rows of scale·S (scale > 0) in place (S becomes P), of m, l
  /// and of O's rows.
  void (*softmax)(index_t rows, index_t cols, T* s, index_t lds, T scale, T* m, T* l, T* o,
                  index_t ldo, index_t dvp);
  /// O (rows × dvp, ldo) += P (rows × cols, ldp) · V (cols × dvp, ldv); `next` as for
  /// score_rows (used with a few rows, where the kernel streams V).
  void (*pv)(index_t rows, index_t dvp, index_t cols, const T* p, index_t ldp, const T* v,
             index_t ldv, T* o, index_t ldo, NextRows next);
  /// O (rows × dvp, ldo) += Aᵀ (rows × cols) · V (cols × dvp, ldv), A stored as
  /// (cols × rows, lda): pv on a transposed operand, without the transposed copy.
  void (*pv_t)(index_t rows, index_t dvp, index_t cols, const T* a, index_t lda, const T* v,
               index_t ldv, T* o, index_t ldo);
  /// pv on int8 value rows (dvp columns, converted in registers); their scales are already in P.
  void (*pv_i8)(index_t rows, index_t dvp, index_t cols, const T* p, index_t ldp,
                const std::int8_t* v, index_t ldv, T* o, index_t ldo, NextRows next);
  // 8-bit caches in integer products (body.inl, "int8 rows in integers"); on
  // float rows whatever T is (the walk takes them for float accumulation only).
  /// x[i][c] *= colscale[c] (rows × cols, ldx).
  void (*scale_columns)(index_t rows, index_t cols, float* x, index_t ldx, const float* colscale);
  /// Rows of x rounded to int16 with a scale per row: |dst| ≤ limit; false if a value is not
  /// finite.
  bool (*quantize_rows)(index_t rows, index_t cols, const float* x, index_t ldx, int limit,
                        std::int16_t* dst, index_t ldd, float* rowscale);
  /// S[i][j] = qscale[i] · kscale[j] · Σ_p Q̂[i][p]·K̂[j][p], int16 queries, int8 keys, int32 sums.
  void (*score_rows_q16)(index_t rows, index_t cols, index_t d, const std::int16_t* q, index_t ldq,
                         const float* qscale, const std::int8_t* k, index_t ldk,
                         const float* kscale, float* s, index_t lds, NextRows next);
  /// A (rows × dv int32) += Ŵ (rows × cols int16) · V̂ (cols × dv int8), A in the kernel's order.
  void (*pv_q16)(index_t rows, index_t dv, index_t cols, const std::int16_t* w, index_t ldw,
                 const std::int8_t* v, index_t ldv, std::int32_t* a, index_t lda, NextRows next);
  /// O[i][c] += rowscale[i] · A[i][c] for pv_q16's sums.
  void (*pv_q16_finish)(index_t rows, index_t dv, const std::int32_t* a, index_t lda,
                        const float* rowscale, float* o, index_t ldo);
  /// n IEEE halfs (as bits) to floats (F16C where the ISA has it).
  void (*half_to_float)(const std::uint16_t* src, float* dst, index_t n);
  /// dst[i] = scale · src[i] for n int8 values (8-bit caches), the same bits on every ISA.
  void (*i8_to_float)(const std::int8_t* src, float scale, float* dst, index_t n);
};

}  // namespace kernels
}  // namespace attn
