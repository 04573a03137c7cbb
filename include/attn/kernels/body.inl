// attn/kernels/body.inl — the micro-kernels, written once over a vector type S
// (simd.hpp). No include guard: targets.hpp includes this file once per
// instruction set, inside a region compiled for that target, with
// ATTN_KERNEL_NS naming the namespace of that copy.
//
// Layouts (T = S::T, NR = k_panel<S>() keys per panel, L = S::lanes):
//   Q    rows × d, row-major (ldq), already multiplied by the scale
//   Kp   ceil(cols / NR) panels; panel j holds K[j·NR + c][p] at [p·NR + c],
//        keys past cols are zero
//   S    rows × (panels·NR), row-major (lds); the score kernel writes whole panels
//   V    cols × dvp, row-major (ldv), dvp a multiple of L (zero-padded columns)
//   O    rows × dvp, row-major (ldo)
#ifndef ATTN_KERNEL_NS
#error "attn/kernels/body.inl is included by attn/kernels/targets.hpp only"
#endif

namespace attn {
namespace kernels {
namespace ATTN_KERNEL_NS {

/// Keys per packed K panel: two vectors of S (the width of the register tile).
template <class S>
constexpr int k_panel() {
  return 2 * S::lanes;
}

/// Rows of the register tile: two accumulator vectors per row, and two loads
/// plus one broadcast (and one spare) beside them.
template <class S>
constexpr int tile_rows() {
  return (S::regs - 4) / 2;
}

/// Rows split into as few blocks of at most MR rows as possible, of sizes that
/// differ by at most one (128 rows with MR = 14: 8 blocks of 13 and 2 of 12,
/// not 9 of 14 and a slow one of 2).
struct RowBlocks {
  index_t count, base, extra;  // the first `extra` blocks have base + 1 rows
  RowBlocks(index_t rows, index_t mr)
      : count((rows + mr - 1) / mr), base(count ? rows / count : 0),
        extra(count ? rows % count : 0) {}
  index_t size(index_t i) const { return base + (i < extra ? 1 : 0); }
};

/// Asks for the cache line at `p` ahead of its use (a hint: never faults).
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

/// Prefetches the `bytes` from `p` one cache line at a time.
template <int Bytes>
inline void prefetch_lines(const void* p) {
  const char* c = static_cast<const char*>(p);
  ATTN_KERNEL_UNROLL
  for (int b = 0; b < Bytes; b += 64) prefetch(c + b);
}

// ------------------------------------------------------------- S = Q · Kᵀ --

/// S[0:M, 0:NR] = Q[0:M, 0:d] · panelᵀ, prefetching the panel `next` (the one
/// the caller multiplies after this) line by line as this one is read: the
/// first row block finds each key tile in L3 (the call's packed K is larger
/// than L2), and without it the tile's products ran 25% slower there.
/// AVX-512: 14 × 32 tile: 28 accumulators + 2 K loads + 1 Q broadcast of 32 zmm.
/// AVX2:     6 × 16 tile: 12 accumulators + 2 K loads + 1 Q broadcast of 16 ymm.
template <class S, int M>
inline void score_block(index_t d, const typename S::T* q, index_t ldq, const typename S::T* kp,
                        const typename S::T* next, typename S::T* s, index_t lds) {
  using V = typename S::V;
  constexpr int L = S::lanes;
  V acc[M][2];
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = S::zero();
  for (index_t p = 0; p < d; ++p) {
    prefetch_lines<static_cast<int>(2 * L * sizeof(typename S::T))>(next + p * 2 * L);
    const V b0 = S::load(kp + p * 2 * L), b1 = S::load(kp + p * 2 * L + L);
    ATTN_KERNEL_UNROLL
    for (int i = 0; i < M; ++i) {
      const V a = S::broadcast(q + i * ldq + p);
      acc[i][0] = S::fma(a, b0, acc[i][0]);
      acc[i][1] = S::fma(a, b1, acc[i][1]);
    }
  }
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) {
    S::store(s + i * lds, acc[i][0]);
    S::store(s + i * lds + L, acc[i][1]);
  }
}

/// All panels of one block of M rows.
template <class S, int M>
void score_panels(index_t panels, index_t d, const typename S::T* q, index_t ldq,
                  const typename S::T* kp, typename S::T* s, index_t lds) {
  constexpr int NR = k_panel<S>();
  for (index_t j = 0; j < panels; ++j)  // after the last panel: the first, for the next rows
    score_block<S, M>(d, q, ldq, kp + j * NR * d, kp + (j + 1 < panels ? j + 1 : 0) * NR * d,
                      s + j * NR, lds);
}

template <class S, int... I>
void score_impl(index_t rows, index_t cols, index_t d, const typename S::T* q, index_t ldq,
                const typename S::T* kp, typename S::T* s, index_t lds,
                std::integer_sequence<int, I...>) {
  using Fn = void (*)(index_t, index_t, const typename S::T*, index_t, const typename S::T*,
                      typename S::T*, index_t);
  static constexpr Fn by_rows[] = {&score_panels<S, I + 1>...};  // [M - 1]
  constexpr int NR = k_panel<S>();
  const index_t panels = (cols + NR - 1) / NR;
  const RowBlocks blocks(rows, static_cast<index_t>(sizeof...(I)));
  for (index_t i = 0, i0 = 0; i < blocks.count; ++i) {
    const index_t m = blocks.size(i);
    by_rows[m - 1](panels, d, q + i0 * ldq, ldq, kp, s + i0 * lds, lds);
    i0 += m;
  }
}

/// S (rows × ceil(cols/NR)·NR, lds) = Q (rows × d, ldq) · Kᵀ from packed panels.
template <class S>
void score(index_t rows, index_t cols, index_t d, const typename S::T* q, index_t ldq,
           const typename S::T* kp, typename S::T* s, index_t lds) {
  score_impl<S>(rows, cols, d, q, ldq, kp, s, lds,
                std::make_integer_sequence<int, tile_rows<S>()>{});
}

// ------------------------------------------------ S = Q · Kᵀ, K as rows --

/// Keys per block of score_rows: M × KB accumulators, KB key loads and one
/// query load live in the registers (AVX-512: 4 × 4 + 5 of 32; AVX2: 4 × 2 + 3
/// of 16).
template <class S>
constexpr int rows_keys() {
  return S::regs >= 32 ? 4 : 2;
}
/// Query rows per block of score_rows.
constexpr int rows_block = 4;

/// A vector of S::lanes key or value elements of type E as S::T (int8 converted exactly).
template <class S, class E>
inline typename S::V load_as(const E* p) {
  if constexpr (std::is_same<E, std::int8_t>::value)
    return S::load_i8(p);
  else
    return S::load(p);
}

/// S[0:M, 0:KB] = Q[0:M, 0:d] · K[0:KB, 0:d]ᵀ with K rows at k (ldk): each score
/// a vector dot product over d, reduced in a fixed order (S::reduce_add), then
/// the d tail added element by element. int8 keys (E = int8_t) are converted in
/// registers and each score is multiplied by its key's scale. `pf` (null: none):
/// KB rows (ldk apart) prefetched one line per row per step of L elements.
template <class S, int M, int KB, class E>
inline void score_rows_keys(index_t d, const typename S::T* q, index_t ldq, const E* k, index_t ldk,
                            const float* kscale, typename S::T* s, index_t lds, const E* pf) {
  using T = typename S::T;
  using V = typename S::V;
  constexpr int L = S::lanes;
  V acc[M][KB];
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) ATTN_KERNEL_UNROLL
  for (int b = 0; b < KB; ++b) acc[i][b] = S::zero();
  index_t p = 0;
  for (; p + L <= d; p += L) {
    V kv[KB];
    if (pf)  // the rows `ahead` keys on: one line per row per step of L floats
      ATTN_KERNEL_UNROLL
    for (int b = 0; b < KB; ++b) prefetch_l2(pf + b * ldk + p);
    ATTN_KERNEL_UNROLL
    for (int b = 0; b < KB; ++b) kv[b] = load_as<S>(k + b * ldk + p);
    ATTN_KERNEL_UNROLL
    for (int i = 0; i < M; ++i) {
      const V a = S::load(q + i * ldq + p);
      ATTN_KERNEL_UNROLL
      for (int b = 0; b < KB; ++b) acc[i][b] = S::fma(a, kv[b], acc[i][b]);
    }
  }
  // Each score's lanes summed: S::lanes accumulators at a time into one vector
  // (S::sum_lanes, far fewer shuffles than a reduction per score), the rest one
  // by one.
  constexpr int n = M * KB, grouped = n / L * L;
  T sums[n];
  const V* flat = &acc[0][0];  // acc[i][b] is flat[i·KB + b]
  ATTN_KERNEL_UNROLL
  for (int g = 0; g < grouped; g += L) S::store(sums + g, S::sum_lanes(flat + g));
  ATTN_KERNEL_UNROLL
  for (int g = grouped; g < n; ++g) sums[g] = S::reduce_add(flat[g]);
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) ATTN_KERNEL_UNROLL
  for (int b = 0; b < KB; ++b) {
    T sum = sums[i * KB + b];
    for (index_t t = p; t < d; ++t)
      sum = S::mul_add(q[i * ldq + t], static_cast<T>(k[b * ldk + t]), sum);
    if constexpr (std::is_same<E, std::int8_t>::value) sum *= static_cast<T>(kscale[b]);
    s[i * lds + b] = sum;
  }
}

/// All keys of one block of M rows: KB at a time, then one by one.
template <class S, int M, class E>
void score_rows_cols(index_t cols, index_t d, const typename S::T* q, index_t ldq, const E* k,
                     index_t ldk, const float* kscale, typename S::T* s, index_t lds,
                     NextRows next) {
  constexpr int KB = rows_keys<S>();
  const auto scale_at = [&](index_t j) { return kscale ? kscale + j : nullptr; };
  // Rows stream_ahead keys on (in this call's rows, then in `next`) are
  // prefetched: inside the kernel's steps when a step of L elements is a whole
  // line (float rows), else whole rows per block.
  const index_t row_bytes = d * static_cast<index_t>(sizeof(E));
  const index_t ahead = stream_ahead(row_bytes);
  constexpr bool line_steps = S::lanes * sizeof(E) >= 64;
  index_t j = 0;
  for (; j + KB <= cols; j += KB) {
    const E* pf = stream_rows(k, ldk, cols, next, j + ahead, KB);
    score_rows_keys<S, M, KB>(d, q, ldq, k + j * ldk, ldk, scale_at(j), s + j, lds,
                              line_steps ? pf : nullptr);
    if (pf && !line_steps)
      for (int b = 0; b < KB; ++b) prefetch_bytes(pf + b * ldk, row_bytes);
  }
  for (; j < cols; ++j)
    score_rows_keys<S, M, 1>(d, q, ldq, k + j * ldk, ldk, scale_at(j), s + j, lds,
                             static_cast<const E*>(nullptr));
}

template <class S, class E>
void score_rows_impl(index_t rows, index_t cols, index_t d, const typename S::T* q, index_t ldq,
                     const E* k, index_t ldk, const float* kscale, typename S::T* s, index_t lds,
                     NextRows next) {
  using Fn = void (*)(index_t, index_t, const typename S::T*, index_t, const E*, index_t,
                      const float*, typename S::T*, index_t, NextRows);
  static constexpr Fn by_rows[] = {&score_rows_cols<S, 1, E>, &score_rows_cols<S, 2, E>,
                                   &score_rows_cols<S, 3, E>, &score_rows_cols<S, 4, E>};
  static_assert(sizeof(by_rows) / sizeof(by_rows[0]) == rows_block, "one entry per block size");
  const RowBlocks blocks(rows, rows_block);
  for (index_t i = 0, i0 = 0; i < blocks.count; ++i) {
    const index_t m = blocks.size(i);
    by_rows[m - 1](cols, d, q + i0 * ldq, ldq, k, ldk, kscale, s + i0 * lds, lds, next);
    i0 += m;
  }
}

/// S (rows × cols, lds) = Q (rows × d, ldq) · Kᵀ, K as rows (cols × d, ldk): no
/// packing, for the few stacked query rows of a decoding step (the panel kernel
/// needs K transposed into panels, which costs more than the products when
/// only a handful of rows read each key). `next`: where the key rows go on
/// after this call's (prefetched only).
template <class S>
void score_rows(index_t rows, index_t cols, index_t d, const typename S::T* q, index_t ldq,
                const typename S::T* k, index_t ldk, typename S::T* s, index_t lds, NextRows next) {
  score_rows_impl<S>(rows, cols, d, q, ldq, k, ldk, nullptr, s, lds, next);
}

/// The same with int8 key rows and a scale per key: S[i][j] = kscale[j] · Σ_p Q[i][p]·K̂[j][p].
template <class S>
void score_rows_i8(index_t rows, index_t cols, index_t d, const typename S::T* q, index_t ldq,
                   const std::int8_t* k, index_t ldk, const float* kscale, typename S::T* s,
                   index_t lds, NextRows next) {
  score_rows_impl<S>(rows, cols, d, q, ldq, k, ldk, kscale, s, lds, next);
}

// ------------------------------------------------- online softmax sweep --

/// exp(x) for x <= 0, exactly 0 below -87.3 (so exp(-inf) = 0), NaN for NaN.
/// Cody–Waite: x = n·ln2 + r, n = round(x·log2 e) by the 1.5·2^23 shift, |r| <=
/// ln2/2 with ln2 in two parts (r exact); exp(r) by a degree-6 polynomial
/// (fitted for relative error on |r| <= ln2/2: 2e-9 in exact arithmetic, 0.6 ulp
/// in float Horner); times 2^n (AVX-512: one vscalefps, masked to 0 below -87.3).
template <class S>
inline typename S::V exp_nonpositive(typename S::V x) {
  if constexpr (S::native_exp) {
    return S::exp(x);
  } else {
    using V = typename S::V;
    const V shifted = S::fma(x, S::set1(1.44269504088896341f), S::set1(12582912.0f));
    const V n = S::sub(shifted, S::set1(12582912.0f));
    V r = S::fma(n, S::set1(-0.693359375f), x);  // x - n·ln2, ln2 in two parts
    r = S::fma(n, S::set1(2.12194440e-4f), r);
    V p = S::set1(1.3843607157e-3f);
    p = S::fma(p, r, S::set1(8.3741955459e-3f));
    p = S::fma(p, r, S::set1(4.1668005288e-2f));
    p = S::fma(p, r, S::set1(1.6666430235e-1f));
    p = S::fma(p, r, S::set1(4.9999994040e-1f));
    p = S::fma(p, r, S::set1(1.0f));
    p = S::fma(p, r, S::set1(1.0f));
    return S::ldexp_above(p, n, shifted, x, -87.3f);
  }
}

/// One key tile of the online softmax on scores c·S (c = `scale` > 0, so the
/// row max of c·S is c times the row max of S), row by row while the row is in L1:
///   m' = max(m, c·rowmax(S));  P = exp(c·S - m') (one fma per vector, exact for
///   c = 1);  l = l·exp(m - m') + rowsum(P);  O = O·exp(m - m'), only for rows whose
///   max moved.
/// A row with nothing seen yet (m' = -inf) keeps P = 0 and l = 0. The bf16
/// products pass their score scale here instead of scaling S in a pass of its own.
template <class S>
void online_softmax(index_t rows, index_t cols, typename S::T* s, index_t lds, typename S::T scale,
                    typename S::T* m, typename S::T* l, typename S::T* o, index_t ldo,
                    index_t dvp) {
  using T = typename S::T;
  using V = typename S::V;
  constexpr int L = S::lanes;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  for (index_t r = 0; r < rows; ++r) {
    T* row = s + r * lds;
    index_t c = 0;
    V vmax = S::set1(neg_inf);
    for (; c + L <= cols; c += L) vmax = S::max(vmax, S::load(row + c));
    T row_max = S::reduce_max(vmax);
    for (; c < cols; ++c) row_max = std::max(row_max, row[c]);
    row_max *= scale;

    const T m_old = m[r];
    const T m_new = std::max(m_old, row_max);
    const T m_use = m_new == neg_inf ? T(0) : m_new;
    if (m_old != m_new) {
      const T alpha = std::exp(m_old - m_use);  // 0 when m_old = -inf
      l[r] *= alpha;
      T* orow = o + r * ldo;
      const V va = S::set1(alpha);
      for (index_t j = 0; j < dvp; j += L) S::store(orow + j, S::mul(S::load(orow + j), va));
    }

    const V vm = S::set1(-m_use), vc = S::set1(scale);
    V vsum = S::zero();
    c = 0;
    for (; c + L <= cols; c += L) {
      const V p = exp_nonpositive<S>(S::fma(S::load(row + c), vc, vm));
      S::store(row + c, p);
      vsum = S::add(vsum, p);
    }
    T sum = S::reduce_add(vsum);
    if (c < cols) {  // the tail as one vector through a stack buffer
      alignas(64) T tail[L];
      for (int i = 0; i < L; ++i) tail[i] = c + i < cols ? row[c + i] : neg_inf;
      S::store(tail, exp_nonpositive<S>(S::fma(S::load(tail), vc, vm)));
      for (int i = 0; c + i < cols; ++i) {
        row[c + i] = tail[i];
        sum += tail[i];
      }
    }
    l[r] += sum;
    m[r] = m_new;
  }
}

// ------------------------------------------------------------ O += P · V --

/// O[0:M, 0:NV·L] += P[0:M, 0:cols] · V[0:cols, 0:NV·L] (V of element type E:
/// S::T, or int8 converted in registers).
/// AVX-512: 14 × 32 tile: 28 accumulators + 2 V loads + 1 P broadcast of 32 zmm.
/// AVX2:     6 × 16 tile: 12 accumulators + 2 V loads + 1 P broadcast of 16 ymm.
template <class S, int M, int NV, class E, bool TA>
inline void pv_block(index_t cols, const typename S::T* p, index_t ldp, const E* v, index_t ldv,
                     typename S::T* o, index_t ldo, index_t row_bytes, NextRows next) {
  using V = typename S::V;
  constexpr int L = S::lanes;
  V acc[M][NV];
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) ATTN_KERNEL_UNROLL
  for (int j = 0; j < NV; ++j) acc[i][j] = S::load(o + i * ldo + j * L);
  // Many rows: this block's columns 32 keys on (~400 cycles of FMAs at 13 rows, an
  // L3 round trip). Few rows: whole rows (row_bytes, first column block only)
  // stream_ahead keys on, running on into `next`; the block's FMAs per key are
  // too few to hide DRAM.
  constexpr bool few = M <= rows_block;
  const index_t ahead = few ? stream_ahead(row_bytes) : 32;
  for (index_t k = 0; k < cols; ++k) {
    if (few) {
      if (row_bytes > 0)
        if (const E* r = stream_rows(v, ldv, cols, next, k + ahead)) prefetch_bytes(r, row_bytes);
    } else if (k + ahead < cols) {
      prefetch_lines<static_cast<int>(NV * L * sizeof(E))>(v + (k + ahead) * ldv);
    }
    V b[NV];
    ATTN_KERNEL_UNROLL
    for (int j = 0; j < NV; ++j) b[j] = load_as<S>(v + k * ldv + j * L);
    ATTN_KERNEL_UNROLL
    for (int i = 0; i < M; ++i) {
      // P (M × cols) as stored, or TA: P is stored transposed (cols × M rows of ldp),
      // and the M elements of key k are adjacent.
      const V a = S::broadcast(TA ? p + k * ldp + i : p + i * ldp + k);
      ATTN_KERNEL_UNROLL
      for (int j = 0; j < NV; ++j) acc[i][j] = S::fma(a, b[j], acc[i][j]);
    }
  }
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) ATTN_KERNEL_UNROLL
  for (int j = 0; j < NV; ++j) S::store(o + i * ldo + j * L, acc[i][j]);
}

/// Vectors of V per block of M rows: four when the M × 4 accumulators, four V
/// loads and a broadcast fit the registers (a few rows, as when decoding: each
/// broadcast of P then feeds four FMAs, not two), else two.
template <class S, int M>
constexpr int pv_vectors() {
  return M * 4 + 4 + 1 <= S::regs ? 4 : 2;
}

/// All column blocks of one block of M rows: pv_vectors at a time, then two, then one.
template <class S, int M, class E, bool TA>
void pv_columns(index_t dvp, index_t cols, const typename S::T* p, index_t ldp, const E* v,
                index_t ldv, typename S::T* o, index_t ldo, NextRows next) {
  constexpr int L = S::lanes;
  constexpr int NV = pv_vectors<S, M>();
  const index_t row_bytes = dvp * static_cast<index_t>(sizeof(E));  // prefetched by block 0
  index_t j = 0;
  if constexpr (NV == 4)
    for (; j + 4 * L <= dvp; j += 4 * L)
      pv_block<S, M, 4, E, TA>(cols, p, ldp, v + j, ldv, o + j, ldo, j == 0 ? row_bytes : 0, next);
  for (; j + 2 * L <= dvp; j += 2 * L)
    pv_block<S, M, 2, E, TA>(cols, p, ldp, v + j, ldv, o + j, ldo, j == 0 ? row_bytes : 0, next);
  if (j < dvp)
    pv_block<S, M, 1, E, TA>(cols, p, ldp, v + j, ldv, o + j, ldo, j == 0 ? row_bytes : 0, next);
}

template <class S, class E, bool TA, int... I>
void pv_impl(index_t rows, index_t dvp, index_t cols, const typename S::T* p, index_t ldp,
             const E* v, index_t ldv, typename S::T* o, index_t ldo, NextRows next,
             std::integer_sequence<int, I...>) {
  using Fn = void (*)(index_t, index_t, const typename S::T*, index_t, const E*, index_t,
                      typename S::T*, index_t, NextRows);
  static constexpr Fn by_rows[] = {&pv_columns<S, I + 1, E, TA>...};  // [M - 1]
  const RowBlocks blocks(rows, static_cast<index_t>(sizeof...(I)));
  for (index_t i = 0, i0 = 0; i < blocks.count; ++i) {
    const index_t m = blocks.size(i);
    by_rows[m - 1](dvp, cols, p + (TA ? i0 : i0 * ldp), ldp, v, ldv, o + i0 * ldo, ldo, next);
    i0 += m;
  }
}

/// O (rows × dvp, ldo) += P (rows × cols, ldp) · V (cols × dvp, ldv); dvp a multiple of L.
/// `next`: where the value rows go on after this call's (prefetched only, few rows).
template <class S>
void accumulate_pv(index_t rows, index_t dvp, index_t cols, const typename S::T* p, index_t ldp,
                   const typename S::T* v, index_t ldv, typename S::T* o, index_t ldo,
                   NextRows next) {
  pv_impl<S, typename S::T, false>(rows, dvp, cols, p, ldp, v, ldv, o, ldo, next,
                                   std::make_integer_sequence<int, tile_rows<S>()>{});
}

/// O (rows × dvp, ldo) += Aᵀ · V with A stored (cols × rows, lda): the backward's
/// dV += Pᵀ·dO and dK += dSᵀ·Q without a transposed copy. The same products in
/// the same order as pv on a transposed copy of A.
template <class S>
void accumulate_pv_t(index_t rows, index_t dvp, index_t cols, const typename S::T* a, index_t lda,
                     const typename S::T* v, index_t ldv, typename S::T* o, index_t ldo) {
  pv_impl<S, typename S::T, true>(rows, dvp, cols, a, lda, v, ldv, o, ldo, NextRows{},
                                  std::make_integer_sequence<int, tile_rows<S>()>{});
}

/// The same with int8 value rows (their scales already folded into P's columns).
template <class S>
void accumulate_pv_i8(index_t rows, index_t dvp, index_t cols, const typename S::T* p, index_t ldp,
                      const std::int8_t* v, index_t ldv, typename S::T* o, index_t ldo,
                      NextRows next) {
  pv_impl<S, std::int8_t, false>(rows, dvp, cols, p, ldp, v, ldv, o, ldo, next,
                                 std::make_integer_sequence<int, tile_rows<S>()>{});
}

// ------------------------------------------------ int8 rows in integers --
//
// An 8-bit cache's rows are codes x̂ in [-127, 127] with a float scale per row.
// Queries, and the probabilities that multiply values, are rounded to int16
// with a scale per row (quantize_rows); an int16 times a widened code is summed
// in int32 two products at a time (S::madd). Integer sums are exact, so they do
// not depend on the instruction set, on the order of the sums or on how a
// paged cache cuts a tile into runs. Per 2L codes and query row this is one
// madd where float products take two conversions and two FMAs per 2L codes.

/// x[i][c] *= colscale[c]: an int8 cache's value scales folded into P's columns.
template <class S>
void scale_columns(index_t rows, index_t cols, float* x, index_t ldx, const float* colscale) {
  constexpr int L = S::lanes;
  for (index_t i = 0; i < rows; ++i) {
    float* row = x + i * ldx;
    index_t c = 0;
    for (; c + L <= cols; c += L)
      S::store(row + c, S::mul(S::load(row + c), S::load(colscale + c)));
    for (; c < cols; ++c) row[c] *= colscale[c];
  }
}

/// For each row i: rowscale[i] = max_c |x[i][c]| / limit and dst[i][c] =
/// round(x[i][c] / rowscale[i]) (0 for an all-zero row). Returns false, with
/// dst and rowscale unspecified, when a value is not finite. dst rows hold
/// cols rounded up to even, the padding 0.
template <class S>
bool quantize_rows(index_t rows, index_t cols, const float* x, index_t ldx, int limit,
                   std::int16_t* dst, index_t ldd, float* rowscale) {
  using V = typename S::V;
  constexpr int L = S::lanes;
  for (index_t i = 0; i < rows; ++i) {
    const float* row = x + i * ldx;
    V vmax = S::zero(), vsum = S::zero();  // vsum is not finite iff a value is not
    index_t c = 0;
    for (; c + L <= cols; c += L) {
      const V a = S::abs(S::load(row + c));
      vmax = S::max(vmax, a);
      vsum = S::add(vsum, a);
    }
    float most = S::reduce_max(vmax), sum = S::reduce_add(vsum);
    for (; c < cols; ++c) {
      most = std::max(most, std::fabs(row[c]));
      sum += std::fabs(row[c]);
    }
    if (!std::isfinite(sum) || !std::isfinite(most)) return false;
    rowscale[i] = most / static_cast<float>(limit);
    std::int16_t* out = dst + i * ldd;
    const V f = S::set1(most > 0 ? static_cast<float>(limit) / most : 0.0f);
    for (c = 0; c + L <= cols; c += L) S::round_to_i16(out + c, S::mul(S::load(row + c), f));
    alignas(64) float tail[L] = {};
    alignas(64) std::int16_t rounded[L];
    for (index_t t = c; t < cols; ++t) tail[t - c] = row[t];
    S::round_to_i16(rounded, S::mul(S::load(tail), f));
    for (index_t t = c; t < cols; ++t) out[t] = rounded[t - c];
    if (cols % 2) out[cols] = 0;
  }
  return true;
}

/// S[0:M, 0:KB] = qscale[i] · kscale[b] · Σ_p Q̂[i][p]·K̂[b][p] (int32 sums).
template <class S, int M, int KB>
inline void score_q16_keys(index_t d, const std::int16_t* q, index_t ldq, const float* qscale,
                           const std::int8_t* k, index_t ldk, const float* kscale, float* s,
                           index_t lds) {
  using I = typename S::I;
  constexpr int L = S::lanes, P = 2 * L;
  I acc[M][KB];
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) ATTN_KERNEL_UNROLL
  for (int b = 0; b < KB; ++b) acc[i][b] = S::izero();
  index_t p = 0;
  for (; p + P <= d; p += P) {
    I kv[KB];
    ATTN_KERNEL_UNROLL
    for (int b = 0; b < KB; ++b) kv[b] = S::widen_i8(k + b * ldk + p);
    ATTN_KERNEL_UNROLL
    for (int i = 0; i < M; ++i) {
      const I a = S::load_i16(q + i * ldq + p);
      ATTN_KERNEL_UNROLL
      for (int b = 0; b < KB; ++b) acc[i][b] = S::madd(acc[i][b], a, kv[b]);
    }
  }
  constexpr int n = M * KB, grouped = n / L * L;
  std::int32_t sums[n];
  const I* flat = &acc[0][0];
  ATTN_KERNEL_UNROLL
  for (int g = 0; g < grouped; g += L) S::istore(sums + g, S::sum_lanes_i(flat + g));
  ATTN_KERNEL_UNROLL
  for (int g = grouped; g < n; ++g) sums[g] = S::reduce_add_i(flat[g]);
  if (p < d)  // the depth tail, element by element
    for (int i = 0; i < M; ++i)
      for (int b = 0; b < KB; ++b)
        for (index_t t = p; t < d; ++t) sums[i * KB + b] += q[i * ldq + t] * k[b * ldk + t];
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) ATTN_KERNEL_UNROLL
  for (int b = 0; b < KB; ++b)
    s[i * lds + b] = static_cast<float>(sums[i * KB + b]) * qscale[i] * kscale[b];
}

/// All keys of one block of M rows: rows_keys at a time, then one by one; whole
/// rows prefetched stream_ahead keys on, as score_rows does for int8 rows.
template <class S, int M>
void score_q16_cols(index_t cols, index_t d, const std::int16_t* q, index_t ldq,
                    const float* qscale, const std::int8_t* k, index_t ldk, const float* kscale,
                    float* s, index_t lds, NextRows next) {
  constexpr int KB = rows_keys<S>();
  const index_t ahead = stream_ahead(d);
  index_t j = 0;
  for (; j + KB <= cols; j += KB) {
    score_q16_keys<S, M, KB>(d, q, ldq, qscale, k + j * ldk, ldk, kscale + j, s + j, lds);
    if (const std::int8_t* pf = stream_rows(k, ldk, cols, next, j + ahead, KB))
      for (int b = 0; b < KB; ++b) prefetch_bytes(pf + b * ldk, d);
  }
  for (; j < cols; ++j)
    score_q16_keys<S, M, 1>(d, q, ldq, qscale, k + j * ldk, ldk, kscale + j, s + j, lds);
}

/// S (rows × cols, lds) = qscale[i] · kscale[j] · Σ_p Q̂[i][p]·K̂[j][p]: int16
/// query rows (quantize_rows) against int8 key rows, sums in int32, which stay
/// in range for queries bounded by int16_limit(d) (32767 up to d = 516).
template <class S>
void score_rows_q16(index_t rows, index_t cols, index_t d, const std::int16_t* q, index_t ldq,
                    const float* qscale, const std::int8_t* k, index_t ldk, const float* kscale,
                    float* s, index_t lds, NextRows next) {
  using Fn = void (*)(index_t, index_t, const std::int16_t*, index_t, const float*,
                      const std::int8_t*, index_t, const float*, float*, index_t, NextRows);
  static constexpr Fn by_rows[] = {&score_q16_cols<S, 1>, &score_q16_cols<S, 2>,
                                   &score_q16_cols<S, 3>, &score_q16_cols<S, 4>};
  static_assert(sizeof(by_rows) / sizeof(by_rows[0]) == rows_block, "one entry per block size");
  const RowBlocks blocks(rows, rows_block);
  for (index_t i = 0, i0 = 0; i < blocks.count; ++i) {
    const index_t m = blocks.size(i);
    by_rows[m - 1](cols, d, q + i0 * ldq, ldq, qscale + i0, k, ldk, kscale, s + i0 * lds, lds,
                   next);
    i0 += m;
  }
}

/// A[0:M, NX·L columns] += W[0:M, 0:cols] · V̂[0:cols, same columns], two keys
/// per madd: value rows k and k + 1 paired element by element, W's pair
/// (w[k], w[k+1]) broadcast. A keeps each 2L columns in pair_rows2's order
/// (NX even), or an L-column block in element order (NX = 1). An odd last key
/// pairs with a row of zeros (and W's padding 0).
template <class S, int M, int NX>
inline void pv_q16_block(index_t cols, const std::int16_t* w, index_t ldw, const std::int8_t* v,
                         index_t ldv, std::int32_t* a, index_t lda, index_t row_bytes,
                         NextRows next) {
  using I = typename S::I;
  constexpr int L = S::lanes;
  static_assert(NX == 1 || NX % 2 == 0, "whole pairs of vectors, or one");
  alignas(64) static const std::int8_t zeros[NX * L] = {};
  I acc[M][NX];
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) ATTN_KERNEL_UNROLL
  for (int j = 0; j < NX; ++j) acc[i][j] = S::iload(a + i * lda + j * L);
  const index_t ahead = stream_ahead(row_bytes);
  for (index_t k = 0; k < cols; k += 2) {
    if (row_bytes > 0)
      if (const std::int8_t* r = stream_rows(v, ldv, cols, next, k + ahead, 2)) {
        prefetch_bytes(r, row_bytes);
        prefetch_bytes(r + ldv, row_bytes);
      }
    const std::int8_t* r0 = v + k * ldv;
    const std::int8_t* r1 = k + 1 < cols ? r0 + ldv : zeros;
    I x[NX];
    if constexpr (NX == 1) {
      x[0] = S::pair_rows(r0, r1);
    } else {
      ATTN_KERNEL_UNROLL
      for (int j = 0; j < NX; j += 2) S::pair_rows2(r0 + j * L, r1 + j * L, x[j], x[j + 1]);
    }
    ATTN_KERNEL_UNROLL
    for (int i = 0; i < M; ++i) {
      const I pw = S::broadcast_pair(w + i * ldw + k);
      ATTN_KERNEL_UNROLL
      for (int j = 0; j < NX; ++j) acc[i][j] = S::madd(acc[i][j], pw, x[j]);
    }
  }
  ATTN_KERNEL_UNROLL
  for (int i = 0; i < M; ++i) ATTN_KERNEL_UNROLL
  for (int j = 0; j < NX; ++j) S::istore(a + i * lda + j * L, acc[i][j]);
}

/// All column blocks of one block of M rows: pv_vectors at a time, then two, then one.
template <class S, int M>
void pv_q16_columns(index_t dv, index_t cols, const std::int16_t* w, index_t ldw,
                    const std::int8_t* v, index_t ldv, std::int32_t* a, index_t lda,
                    NextRows next) {
  constexpr int L = S::lanes;
  index_t j = 0;
  if constexpr (pv_vectors<S, M>() == 4)
    for (; j + 4 * L <= dv; j += 4 * L)
      pv_q16_block<S, M, 4>(cols, w, ldw, v + j, ldv, a + j, lda, j == 0 ? dv : 0, next);
  for (; j + 2 * L <= dv; j += 2 * L)
    pv_q16_block<S, M, 2>(cols, w, ldw, v + j, ldv, a + j, lda, j == 0 ? dv : 0, next);
  if (j < dv) pv_q16_block<S, M, 1>(cols, w, ldw, v + j, ldv, a + j, lda, j == 0 ? dv : 0, next);
}

/// A (rows × dv int32, lda; pv_q16_finish's order) += Ŵ (rows × cols int16,
/// ldw, rows padded to even with 0) · V̂ (cols × dv int8 codes, ldv); dv a
/// multiple of L. Sums stay exact while Σ |ŵ|·127 over a row's keys < 2^31
/// (int16_limit(cols) bounds Ŵ).
template <class S>
void pv_q16(index_t rows, index_t dv, index_t cols, const std::int16_t* w, index_t ldw,
            const std::int8_t* v, index_t ldv, std::int32_t* a, index_t lda, NextRows next) {
  using Fn = void (*)(index_t, index_t, const std::int16_t*, index_t, const std::int8_t*, index_t,
                      std::int32_t*, index_t, NextRows);
  static constexpr Fn by_rows[] = {&pv_q16_columns<S, 1>, &pv_q16_columns<S, 2>,
                                   &pv_q16_columns<S, 3>, &pv_q16_columns<S, 4>};
  const RowBlocks blocks(rows, rows_block);
  for (index_t i = 0, i0 = 0; i < blocks.count; ++i) {
    const index_t m = blocks.size(i);
    by_rows[m - 1](dv, cols, w + i0 * ldw, ldw, v, ldv, a + i0 * lda, lda, next);
    i0 += m;
  }
}

/// O[i][c] += rowscale[i] · A[i][c] for the sums of pv_q16 (in its order).
template <class S>
void pv_q16_finish(index_t rows, index_t dv, const std::int32_t* a, index_t lda,
                   const float* rowscale, float* o, index_t ldo) {
  using I = typename S::I;
  using V = typename S::V;
  constexpr int L = S::lanes;
  for (index_t i = 0; i < rows; ++i) {
    const std::int32_t* ar = a + i * lda;
    float* orow = o + i * ldo;
    const V f = S::set1(rowscale[i]);
    index_t j = 0;
    for (; j + 2 * L <= dv; j += 2 * L) {
      I e0, e1;
      S::unpair2(S::iload(ar + j), S::iload(ar + j + L), e0, e1);
      S::store(orow + j, S::fma(S::to_float(e0), f, S::load(orow + j)));
      S::store(orow + j + L, S::fma(S::to_float(e1), f, S::load(orow + j + L)));
    }
    if (j < dv) S::store(orow + j, S::fma(S::to_float(S::iload(ar + j)), f, S::load(orow + j)));
  }
}

}  // namespace ATTN_KERNEL_NS
}  // namespace kernels
}  // namespace attn
