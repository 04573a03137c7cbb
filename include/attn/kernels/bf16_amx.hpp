// attn/kernels/bf16_amx.hpp — bf16 products on AMX tiles (tdpbf16ps).
// Included only by targets.hpp, inside the region compiled for AVX-512 + BF16
// + AMX, after bf16_avx512.hpp, whose operand layouts it reads unchanged:
//
//   Qb  rows × dpad bf16, row-major          = the A operand of S = Q·Kᵀ
//   Kb  32-key panels, head-dim pairs        = the B operand: pair row t of a
//       panel is 32 keys × 2 bf16 (128 bytes), so keys [0, 16) and [16, 32)
//       of 16 pair rows are two B tiles with a 128-byte stride
//   Pb  rows × cpad bf16, row-major          = the A operand of O += P·V
//   Vb  key pairs, dvp columns               = the B operand: pair row t is
//       dvp columns × 2 bf16, a 4·dvp-byte stride
//
// One tdpbf16ps multiplies a 16 × 32 bf16 tile by a 32 × 16 one (as 16 pair
// rows) into a 16 × 16 fp32 tile: 8192 multiply-adds, 16 times the work of a
// vdpbf16ps. Eight tile registers hold a 32 × 32 block of C (four tiles), two
// A tiles and two B tiles. Rows outside whole 16-row tiles, head dims that are
// not a multiple of 32 and the last keys of a tile that does not fill 32 go
// through the AVX512-BF16 kernels, which read the same layouts.
//
// Every kernel call loads its own tile configuration (ldtilecfg), so it does
// not depend on what ran before on the thread. Linux hands out AMX state only
// to a process that asked for it (arch_prctl, dispatch.hpp does that once).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace attn {
namespace kernels {
namespace amx_bf16 {

/// The configuration every kernel here uses: palette 1, tiles 0–7 all
/// 16 rows × 64 bytes (16 fp32 or 32 bf16 per row).
struct alignas(64) TileConfig {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  std::uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

inline void configure() {
  // Static, not a local: GCC's _tile_loadconfig declares that it reads only 8
  // bytes, so stores to the rest of a local configuration may be dropped.
  static const TileConfig config;
  _tile_loadconfig(&config);
}

/// Whether AMX takes S = Q·Kᵀ for head dim d (whole 32-element steps).
inline bool takes_depth(index_t d) { return d % 32 == 0; }

/// S[0:32·TR, 0:32·panels] = Qb · Kbᵀ, unscaled: TR (1 or 2) row tiles of 16.
template <int TR>
void score_rows(index_t panels, index_t dp, const std::uint16_t* q, index_t ldq,
                const std::uint16_t* kp, float* s, index_t lds) {
  const index_t qs = ldq * 2, ss = lds * 4;  // byte strides
  for (index_t j = 0; j < panels; ++j) {
    const std::uint16_t* panel = kp + j * 64 * dp;
    _tile_zero(0);
    _tile_zero(1);
    if (TR == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (index_t t = 0; t < dp; t += 16) {
      _tile_loadd(6, panel + t * 64, 128);
      _tile_loadd(7, panel + t * 64 + 32, 128);
      _tile_loadd(4, q + 2 * t, qs);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (TR == 2) {
        _tile_loadd(5, q + 16 * ldq + 2 * t, qs);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    float* sj = s + j * 32;
    _tile_stored(0, sj, ss);
    _tile_stored(1, sj + 16, ss);
    if (TR == 2) {
      _tile_stored(2, sj + 16 * lds, ss);
      _tile_stored(3, sj + 16 * lds + 16, ss);
    }
  }
}

/// S (rows × panels·32, lds) = scale · Qb (rows × d, ldq) · Kbᵀ, d a multiple
/// of 32 (takes_depth); no pass over S for scale 1. Whole 16-row tiles on AMX, the rest on
/// AVX512-BF16.
inline void score(index_t rows, index_t cols, index_t d, const std::uint16_t* q, index_t ldq,
                  const std::uint16_t* kp, float* s, index_t lds, float scale) {
  const index_t panels = (cols + 31) / 32, dp = d / 2, whole = rows / 16 * 16;
  if (whole > 0) {
    configure();
    index_t r = 0;
    for (; r + 32 <= whole; r += 32)
      score_rows<2>(panels, dp, q + r * ldq, ldq, kp, s + r * lds, lds);
    if (r < whole) score_rows<1>(panels, dp, q + r * ldq, ldq, kp, s + r * lds, lds);
    const __m512 vs = _mm512_set1_ps(scale);
    if (scale != 1.0f)  // 1: the softmax applies the scale (softmax_to_bf16)
      for (index_t i = 0; i < whole; ++i)
        for (index_t c = 0; c < panels * 32; c += 16)
          _mm512_storeu_ps(s + i * lds + c, _mm512_mul_ps(_mm512_loadu_ps(s + i * lds + c), vs));
  }
  if (whole < rows)
    avx512_bf16::score(rows - whole, cols, d, q + whole * ldq, ldq, kp, s + whole * lds, lds,
                       scale);
}

/// O[0:16·TR, 0:16·TC] += Pb · Vb over kp key pairs (a multiple of 16).
template <int TR, int TC>
void pv_block(index_t kp, const std::uint16_t* p, index_t ldp, const std::uint16_t* v, index_t dvp,
              float* o, index_t ldo) {
  const index_t ps = ldp * 2, vs = dvp * 4, os = ldo * 4;  // byte strides
  _tile_loadd(0, o, os);
  if (TC == 2) _tile_loadd(1, o + 16, os);
  if (TR == 2) {
    _tile_loadd(2, o + 16 * ldo, os);
    if (TC == 2) _tile_loadd(3, o + 16 * ldo + 16, os);
  }
  for (index_t t = 0; t < kp; t += 16) {
    _tile_loadd(6, v + t * dvp * 2, vs);
    if (TC == 2) _tile_loadd(7, v + t * dvp * 2 + 32, vs);
    _tile_loadd(4, p + 2 * t, ps);
    _tile_dpbf16ps(0, 4, 6);
    if (TC == 2) _tile_dpbf16ps(1, 4, 7);
    if (TR == 2) {
      _tile_loadd(5, p + 16 * ldp + 2 * t, ps);
      _tile_dpbf16ps(2, 5, 6);
      if (TC == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, o, os);
  if (TC == 2) _tile_stored(1, o + 16, os);
  if (TR == 2) {
    _tile_stored(2, o + 16 * ldo, os);
    if (TC == 2) _tile_stored(3, o + 16 * ldo + 16, os);
  }
}

template <int TR>
void pv_rows(index_t dvp, index_t kp, const std::uint16_t* p, index_t ldp, const std::uint16_t* v,
             float* o, index_t ldo) {
  index_t c = 0;
  for (; c + 32 <= dvp; c += 32) pv_block<TR, 2>(kp, p, ldp, v + 2 * c, dvp, o + c, ldo);
  if (c < dvp) pv_block<TR, 1>(kp, p, ldp, v + 2 * c, dvp, o + c, ldo);
}

/// O (rows × dvp, ldo) += Pb (rows × cpad, ldp) · Vb (cols keys in pairs, dvp
/// a multiple of 16). Whole 16-row tiles and whole 32-key steps on AMX, the
/// rest on AVX512-BF16.
inline void accumulate_pv(index_t rows, index_t dvp, index_t cols, const std::uint16_t* p,
                          index_t ldp, const std::uint16_t* v, float* o, index_t ldo) {
  const index_t whole = rows / 16 * 16, keys = cols / 32 * 32;
  if (whole > 0 && keys > 0) {
    configure();
    index_t r = 0;
    for (; r + 32 <= whole; r += 32)
      pv_rows<2>(dvp, keys / 2, p + r * ldp, ldp, v, o + r * ldo, ldo);
    if (r < whole) pv_rows<1>(dvp, keys / 2, p + r * ldp, ldp, v, o + r * ldo, ldo);
    if (keys < cols)
      avx512_bf16::accumulate_pv(whole, dvp, cols - keys, p + keys, ldp, v + keys * dvp, o, ldo);
  } else if (whole > 0) {
    avx512_bf16::accumulate_pv(whole, dvp, cols, p, ldp, v, o, ldo);
  }
  if (whole < rows)
    avx512_bf16::accumulate_pv(rows - whole, dvp, cols, p + whole * ldp, ldp, v, o + whole * ldo,
                               ldo);
}

}  // namespace amx_bf16
}  // namespace kernels
}  // namespace attn
