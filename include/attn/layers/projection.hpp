// attn/layers/projection.hpp — y = x·W + b, the products of the attention
// layers, deterministic and dispatched at run time.
//
// A weight is given in one of two layouts, said explicitly:
//   WeightLayout::in_out  W [in, out], y = x·W        (attn's own form)
//   WeightLayout::out_in  W [out, in], y = x·Wᵀ       (PyTorch / Hugging Face nn.Linear)
// and with any strides (zero and negative included). It is first packed into
// panels of NR columns, panel j = W[:, j·NR, (j+1)·NR) stored [in][NR]
// (columns past `out` are zero), so every layout and stride reaches the same
// micro-kernel with the same numbers.
//
// The micro-kernel computes an MR × NR tile of y with one accumulator per
// element: acc(i, c) = fma(x(i, p), W(p, c), acc(i, c)) for p = 0, 1, ...,
// in increasing order, then y = acc + b. Each element is one chain whatever
// tile, task or thread computes it, so results are bitwise identical for any
// thread count. Threads take (row block, column group) tasks through
// detail::parallel_tasks; no product ever calls Eigen.
//
// The instruction set is chosen once at run time (AVX-512F, AVX2 + FMA, or a
// portable loop), with the kernels compiled for their target by function
// attributes, so a consumer built without -march runs the same code as a
// -march=native build. Different instruction sets may differ by rounding
// (the portable loop does not fuse multiply and add).
#pragma once

#include "attn/core/eigen.hpp"  // first: reads the intrinsic headers with g++'s warnings silenced
#include "attn/detail/checks.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/detail/small_gemm.hpp"
#include "attn/kernels/dispatch.hpp"
#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ATTN_PROJ_X86 1
#define ATTN_TARGET_AVX512 __attribute__((target("avx512f")))
#define ATTN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace attn {

/// How a weight matrix is stored: [in, out] (y = x·W) or [out, in]
/// (y = x·Wᵀ, PyTorch's nn.Linear.weight).
enum class WeightLayout { in_out, out_in };

/// A weight view in `layout` as the logical [in, out] view (no copy).
template <class T>
TensorView<T, 2> in_out_view(const TensorView<T, 2>& w, WeightLayout layout) {
  if (layout == WeightLayout::in_out) return w;
  return TensorView<T, 2>(w.data(), {w.extent(1), w.extent(0)}, {w.stride(1), w.stride(0)});
}

inline const char* layout_name(WeightLayout l) {
  return l == WeightLayout::in_out ? "WeightLayout::in_out" : "WeightLayout::out_in";
}

namespace detail {

// ------------------------------------------------------------- dispatch --

/// Instruction sets of the projection kernels.
enum class ProjIsa { portable, avx2, avx512 };

/// Whether this machine can run `isa`.
inline bool projection_isa_supported(ProjIsa isa) {
#ifdef ATTN_PROJ_X86
  if (isa == ProjIsa::avx512) return __builtin_cpu_supports("avx512f");
  if (isa == ProjIsa::avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == ProjIsa::portable;
}

/// The projections' instruction set follows the library's one dispatch point
/// (kernels/dispatch.hpp: CPUID, ATTN_ISA, attn::set_isa), narrowed to what
/// these kernels were compiled for.
inline ProjIsa projection_isa() {
  ProjIsa want = ProjIsa::portable;
  switch (active_isa()) {
    case Isa::amx_bf16:
    case Isa::avx512_bf16:
    case Isa::avx512:
      want = ProjIsa::avx512;
      break;
    case Isa::avx2:
      want = ProjIsa::avx2;
      break;
    default:
      break;
  }
  if (want == ProjIsa::avx512 && !projection_isa_supported(want)) want = ProjIsa::avx2;
  if (want == ProjIsa::avx2 && !projection_isa_supported(want)) want = ProjIsa::portable;
  return want;
}

// --------------------------------------------------------- packed weight --

/// Columns per panel: two 512-bit vectors.
template <class T>
constexpr int panel_width() {
  return std::is_same<T, float>::value ? 32 : 16;
}

/// A weight as panels of NR columns (see the top of this file).
template <class T>
class PackedWeight {
 public:
  static constexpr int nr = panel_width<T>();

  /// Packs the logical [in, out] view w (any strides); buffers only grow.
  void pack(const TensorView<const T, 2>& w) {
    depth_ = w.extent(0);
    cols_ = w.extent(1);
    panels_ = (cols_ + nr - 1) / nr;
    const auto n = static_cast<std::size_t>(panels_ * depth_ * nr);
    if (data_.size() < n) data_.resize(n);
    const T* src = w.data();
    const index_t s0 = w.stride(0), s1 = w.stride(1);
    for (index_t j = 0; j < panels_; ++j) {
      T* dst = data_.data() + j * depth_ * nr;
      const index_t c0 = j * nr, nc = std::min<index_t>(nr, cols_ - c0);
      for (index_t p = 0; p < depth_; ++p) {
        T* row = dst + p * nr;
        const T* s = src + p * s0 + c0 * s1;
        for (index_t c = 0; c < nc; ++c) row[c] = s[c * s1];
        for (index_t c = nc; c < nr; ++c) row[c] = T(0);
      }
    }
  }
  index_t depth() const { return depth_; }
  index_t cols() const { return cols_; }
  index_t panels() const { return panels_; }
  bool empty() const { return panels_ == 0; }
  const T* panel(index_t j) const { return data_.data() + j * depth_ * nr; }

 private:
  std::vector<T> data_;
  index_t depth_ = 0, cols_ = 0, panels_ = 0;
};

// -------------------------------------------------------- micro-kernels --
//
// Each computes tile[MR][NR] = Σ_p x(i, p) · panel(p, :) for the rows at
// a[i] (element p at a[i][p·sa]), p in increasing order.

/// Portable: the compiler vectorises the column loop for the baseline target.
template <class T, int MR>
void tile_portable(index_t depth, const T* const* a, index_t sa, const T* panel, T* tile) {
  constexpr int nr = panel_width<T>();
  T acc[MR][nr] = {};
  for (index_t p = 0; p < depth; ++p) {
    const T* bp = panel + p * nr;
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i][p * sa];
      for (int c = 0; c < nr; ++c) acc[i][c] += ai * bp[c];
    }
  }
  std::memcpy(tile, acc, sizeof(acc));
}

#ifdef ATTN_PROJ_X86

// 12 × 32 floats (12 × 16 doubles): 24 zmm accumulators + 2 panel loads + 1 broadcast of 32 zmm.
template <int MR>
ATTN_TARGET_AVX512 void tile_avx512(index_t depth, const float* const* a, index_t sa,
                                    const float* panel, float* tile) {
  __m512 acc[MR][2];
  ATTN_UNROLL
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (index_t p = 0; p < depth; ++p) {
    const __m512 b0 = _mm512_loadu_ps(panel + p * 32), b1 = _mm512_loadu_ps(panel + p * 32 + 16);
    const index_t off = p * sa;
    ATTN_UNROLL
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i][off]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
  ATTN_UNROLL
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(tile + i * 32, acc[i][0]);
    _mm512_storeu_ps(tile + i * 32 + 16, acc[i][1]);
  }
}

template <int MR>
ATTN_TARGET_AVX512 void tile_avx512(index_t depth, const double* const* a, index_t sa,
                                    const double* panel, double* tile) {
  __m512d acc[MR][2];
  ATTN_UNROLL
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_pd();
  for (index_t p = 0; p < depth; ++p) {
    const __m512d b0 = _mm512_loadu_pd(panel + p * 16), b1 = _mm512_loadu_pd(panel + p * 16 + 8);
    const index_t off = p * sa;
    ATTN_UNROLL
    for (int i = 0; i < MR; ++i) {
      const __m512d ai = _mm512_set1_pd(a[i][off]);
      acc[i][0] = _mm512_fmadd_pd(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_pd(ai, b1, acc[i][1]);
    }
  }
  ATTN_UNROLL
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_pd(tile + i * 16, acc[i][0]);
    _mm512_storeu_pd(tile + i * 16 + 8, acc[i][1]);
  }
}

// Half a panel per pass, 6 × 16 floats (6 × 8 doubles): 12 ymm accumulators + 2 loads + 1
// broadcast of 16 ymm; two passes cover the panel's 32 (16) columns.
template <int MR>
ATTN_TARGET_AVX2 void tile_avx2(index_t depth, const float* const* a, index_t sa,
                                const float* panel, float* tile) {
  for (int half = 0; half < 2; ++half) {
    __m256 acc[MR][2];
    ATTN_UNROLL
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const float* bp = panel + half * 16;
    for (index_t p = 0; p < depth; ++p) {
      const __m256 b0 = _mm256_loadu_ps(bp + p * 32), b1 = _mm256_loadu_ps(bp + p * 32 + 8);
      const index_t off = p * sa;
      ATTN_UNROLL
      for (int i = 0; i < MR; ++i) {
        const __m256 ai = _mm256_set1_ps(a[i][off]);
        acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
      }
    }
    ATTN_UNROLL
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_ps(tile + i * 32 + half * 16, acc[i][0]);
      _mm256_storeu_ps(tile + i * 32 + half * 16 + 8, acc[i][1]);
    }
  }
}

template <int MR>
ATTN_TARGET_AVX2 void tile_avx2(index_t depth, const double* const* a, index_t sa,
                                const double* panel, double* tile) {
  for (int half = 0; half < 2; ++half) {
    __m256d acc[MR][2];
    ATTN_UNROLL
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_pd();
    const double* bp = panel + half * 8;
    for (index_t p = 0; p < depth; ++p) {
      const __m256d b0 = _mm256_loadu_pd(bp + p * 16), b1 = _mm256_loadu_pd(bp + p * 16 + 4);
      const index_t off = p * sa;
      ATTN_UNROLL
      for (int i = 0; i < MR; ++i) {
        const __m256d ai = _mm256_set1_pd(a[i][off]);
        acc[i][0] = _mm256_fmadd_pd(ai, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_pd(ai, b1, acc[i][1]);
      }
    }
    ATTN_UNROLL
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_pd(tile + i * 16 + half * 8, acc[i][0]);
      _mm256_storeu_pd(tile + i * 16 + half * 8 + 4, acc[i][1]);
    }
  }
}

#endif  // ATTN_PROJ_X86

/// Rows of the register tile of an instruction set.
inline int tile_rows(ProjIsa isa) {
  return isa == ProjIsa::avx512 ? 12 : isa == ProjIsa::avx2 ? 6 : 4;
}

/// One tile on `isa` (MR = tile_rows(isa) row pointers in a).
template <class T>
void run_tile(ProjIsa isa, index_t depth, const T* const* a, index_t sa, const T* panel, T* tile) {
#ifdef ATTN_PROJ_X86
  if (isa == ProjIsa::avx512) return tile_avx512<12>(depth, a, sa, panel, tile);
  if (isa == ProjIsa::avx2) return tile_avx2<6>(depth, a, sa, panel, tile);
#endif
  (void)isa;
  tile_portable<T, 4>(depth, a, sa, panel, tile);
}

// ------------------------------------------------------------- product --

/// y[B, L, cols] = x[B, L, depth]·W + bias with W packed; x and y any strides
/// (y must not overlap x, W or bias). Bitwise the same for any num_threads.
template <class T>
void project_packed(const TensorView<const T, 3>& x, const PackedWeight<T>& w,
                    const TensorView<const T, 1>& bias, const TensorView<T, 3>& y, int num_threads,
                    ProjIsa isa = projection_isa()) {
  constexpr int nr = PackedWeight<T>::nr;
  constexpr int mr_max = 12;
  const index_t B = x.extent(0), L = x.extent(1), depth = w.depth(), cols = w.cols();
  const index_t rows = B * L;
  if (rows == 0 || cols == 0) return;
  const int mr = tile_rows(isa);
  constexpr index_t rows_per_task = 96;  // a multiple of every tile_rows
  const index_t row_tasks = (rows + rows_per_task - 1) / rows_per_task;
  const bool small = static_cast<double>(rows) * static_cast<double>(cols) *
                         static_cast<double>(std::max<index_t>(depth, 1)) <
                     2.0e6;  // under ~50 µs a parallel region costs more than it saves
  const int threads = small ? 1 : resolve_threads(num_threads, row_tasks * w.panels());
  // Column groups only when there are too few row blocks for the threads.
  const index_t col_groups = std::min<index_t>(
      w.panels(), std::max<index_t>(1, (2 * threads + row_tasks - 1) / row_tasks));
  const index_t panels_per_group = (w.panels() + col_groups - 1) / col_groups;
  const index_t tasks = row_tasks * col_groups;
  const T* bias_data = bias.is_null() ? nullptr : bias.data();
  const index_t sb = bias.is_null() ? 0 : bias.stride(0);
  const index_t sa = x.stride(2), sy = y.stride(2);
  auto row_ptr = [&](index_t r) {
    return x.data() + (r / L) * x.stride(0) + (r % L) * x.stride(1);
  };
  auto out_ptr = [&](index_t r) {
    return y.data() + (r / L) * y.stride(0) + (r % L) * y.stride(1);
  };
  struct Scratch {
    alignas(64) T tile[mr_max * nr];
  };
  parallel_tasks(
      tasks, threads, [] { return std::make_unique<Scratch>(); },
      [&](Scratch& s, index_t t) {
        const index_t rb = t / col_groups, cg = t % col_groups;
        const index_t r_begin = rb * rows_per_task, r_end = std::min(rows, r_begin + rows_per_task);
        const index_t j_begin = cg * panels_per_group,
                      j_end = std::min(w.panels(), j_begin + panels_per_group);
        for (index_t j = j_begin; j < j_end; ++j) {
          const index_t c0 = j * nr, nc = std::min<index_t>(nr, cols - c0);
          for (index_t r0 = r_begin; r0 < r_end; r0 += mr) {
            const index_t m = std::min<index_t>(mr, r_end - r0);
            const T* a[mr_max];
            // rows past the end re-read the last row; their results are dropped
            for (int i = 0; i < mr; ++i) a[i] = row_ptr(r0 + std::min<index_t>(i, m - 1));
            run_tile(isa, depth, a, sa, w.panel(j), s.tile);
            for (index_t i = 0; i < m; ++i) {  // y = acc + b
              T* yr = out_ptr(r0 + i) + c0 * sy;
              const T* tr = s.tile + i * nr;
              if (bias_data) {
                const T* br = bias_data + c0 * sb;
                for (index_t c = 0; c < nc; ++c) yr[c * sy] = tr[c] + br[c * sb];
              } else {
                for (index_t c = 0; c < nc; ++c) yr[c * sy] = tr[c];
              }
            }
          }
        }
      },
      [](Scratch&) {});
}

}  // namespace detail

// ---------------------------------------------------------- public form --

/// y = x·W + bias for x [B, L, in] and y [B, L, out], W in `layout`
/// ([in, out] or [out, in]), bias [out] or a default view for none. Any
/// strides. Deterministic for any num_threads; never starts Eigen threads.
/// Throws attn::Error before writing y if a shape is wrong or y overlaps an input.
template <class T>
void linear(TensorView<const T, 3> x, TensorView<const T, 2> weight, WeightLayout layout,
            TensorView<const T, 1> bias, TensorView<T, 3> y, int num_threads = 0) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "attn::linear computes in float or double");
  detail::check_view(x, "x");
  detail::check_view(weight, "weight");
  const TensorView<const T, 2> w = in_out_view(weight, layout);
  if (w.extent(0) != x.extent(2))
    detail::fail("weight has shape ", detail::shape_str(weight), " (", layout_name(layout),
                 "), its in dimension ", w.extent(0), " differs from x's last dim ", x.extent(2));
  if (!bias.is_null()) {
    detail::check_view(bias, "bias");
    if (bias.extent(0) != w.extent(1))
      detail::fail("bias has length ", bias.extent(0), ", expected ", w.extent(1));
  }
  detail::check_view(y, "y");
  if (y.extent(0) != x.extent(0) || y.extent(1) != x.extent(1) || y.extent(2) != w.extent(1))
    detail::fail("y has shape ", detail::shape_str(y), ", expected [", x.extent(0), ", ",
                 x.extent(1), ", ", w.extent(1), "]");
  detail::check_not_self_overlapping(y, "y");
  detail::check_no_overlap(y, "y", x, "x");
  detail::check_no_overlap(y, "y", weight, "weight");
  if (!bias.is_null()) detail::check_no_overlap(y, "y", bias, "bias");
  detail::PackedWeight<T> packed;
  packed.pack(w);
  detail::project_packed(x, packed, bias, y, num_threads);
}

}  // namespace attn
