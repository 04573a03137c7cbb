// attn/kernels/targets.hpp — the kernel body compiled once per instruction set.
//
// body.inl is included once per target, each time inside a region that the
// compiler builds for that target (GCC: #pragma GCC target; Clang:
// #pragma clang attribute ... target), into its own namespace. So a program
// compiled without any -march flag still holds AVX2 and AVX-512 code, and
// dispatch.hpp picks one at run time. Compilers without target attributes,
// and other architectures, get the portable copy only.
#pragma once

#include "attn/kernels/kernel_set.hpp"
#include "attn/kernels/prefetch.hpp"
#include "attn/kernels/simd.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

// GCC 12 reports its own AVX-512 intrinsics (`__m512 __Y = __Y;` in
// _mm512_undefined_ps) as maybe-uninitialized when they are inlined into a
// function with a target pragma (GCC bug 105593); the warning is not about attn.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if !defined(ATTN_NO_DISPATCH) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__))
#define ATTN_KERNELS_X86 1
#include <immintrin.h>
#else
#define ATTN_KERNELS_X86 0
#endif

// ---------------------------------------------------------------- portable --
#define ATTN_KERNEL_NS portable
#include "attn/kernels/body.inl"
#undef ATTN_KERNEL_NS

#if ATTN_KERNELS_X86

// -------------------------------------------------------------------- AVX2 --
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#include "attn/kernels/simd_avx2.hpp"
#define ATTN_KERNEL_NS avx2
#include "attn/kernels/body.inl"
#undef ATTN_KERNEL_NS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ----------------------------------------------------------------- AVX-512 --
#if defined(__clang__)
#pragma clang attribute push(                                                    \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#endif
#include "attn/kernels/simd_avx512.hpp"
#define ATTN_KERNEL_NS avx512
#include "attn/kernels/body.inl"
#undef ATTN_KERNEL_NS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// -------------------------------------------------------- AVX-512 + BF16 --
#if defined(__clang__)
#pragma clang attribute push(                                                               \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")
#endif
#include "attn/kernels/bf16_avx512.hpp"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// -------------------------------------------------- AMX-BF16 (tdpbf16ps) --
#if defined(__clang__)
#pragma clang attribute push(                                                                      \
    __attribute__((                                                                                \
        target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")
#endif
#include "attn/kernels/bf16_amx.hpp"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // ATTN_KERNELS_X86

namespace attn {
namespace kernels {

/// The portable kernels for T (float or double).
template <class T>
const KernelSet<T>& portable_set() {
  using S = Portable<T>;
  static const KernelSet<T> set{Isa::portable,
                                portable::k_panel<S>(),
                                S::lanes,
                                &portable::score<S>,
                                &portable::score_rows<S>,
                                &portable::score_rows_i8<S>,
                                &portable::online_softmax<S>,
                                &portable::accumulate_pv<S>,
                                &portable::accumulate_pv_t<S>,
                                &portable::accumulate_pv_i8<S>,
                                &portable::scale_columns<Portable<float>>,
                                &portable::quantize_rows<Portable<float>>,
                                &portable::score_rows_q16<Portable<float>>,
                                &portable::pv_q16<Portable<float>>,
                                &portable::pv_q16_finish<Portable<float>>,
                                &Portable<float>::half_to_float,
                                &Portable<float>::i8_to_float};
  return set;
}

#if ATTN_KERNELS_X86
inline const KernelSet<float>& avx2_set() {
  using S = Avx2F32;
  static const KernelSet<float> set{Isa::avx2,
                                    avx2::k_panel<S>(),
                                    S::lanes,
                                    &avx2::score<S>,
                                    &avx2::score_rows<S>,
                                    &avx2::score_rows_i8<S>,
                                    &avx2::online_softmax<S>,
                                    &avx2::accumulate_pv<S>,
                                    &avx2::accumulate_pv_t<S>,
                                    &avx2::accumulate_pv_i8<S>,
                                    &avx2::scale_columns<S>,
                                    &avx2::quantize_rows<S>,
                                    &avx2::score_rows_q16<S>,
                                    &avx2::pv_q16<S>,
                                    &avx2::pv_q16_finish<S>,
                                    &S::half_to_float,
                                    &S::i8_to_float};
  return set;
}

inline const KernelSet<float>& avx512_set() {
  using S = Avx512F32;
  static const KernelSet<float> set{Isa::avx512,
                                    avx512::k_panel<S>(),
                                    S::lanes,
                                    &avx512::score<S>,
                                    &avx512::score_rows<S>,
                                    &avx512::score_rows_i8<S>,
                                    &avx512::online_softmax<S>,
                                    &avx512::accumulate_pv<S>,
                                    &avx512::accumulate_pv_t<S>,
                                    &avx512::accumulate_pv_i8<S>,
                                    &avx512::scale_columns<S>,
                                    &avx512::quantize_rows<S>,
                                    &avx512::score_rows_q16<S>,
                                    &avx512::pv_q16<S>,
                                    &avx512::pv_q16_finish<S>,
                                    &S::half_to_float,
                                    &S::i8_to_float};
  return set;
}
#endif

}  // namespace kernels
}  // namespace attn

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
