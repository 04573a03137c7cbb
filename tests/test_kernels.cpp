// test_kernels — attn's micro-kernels (kernels/) against loops in double, on
// every instruction set this CPU runs, with every row and column tail of the
// register tiles and every packing layout; and the instruction-set choice.
#include "support.hpp"

#include <attn/kernels/dispatch.hpp>
#include <attn/kernels/pack.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using attn::index_t;
using attn::Isa;
using attn::kernels::KernelSet;

template <class T>
std::vector<T> random_vec(std::size_t n, std::uint32_t seed, double stddev = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, stddev);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(gen));
  return v;
}

/// Every (ISA, accumulation type) pair to test: float on each supported ISA, double portable.
template <class T>
std::vector<Isa> isas_for() {
  if constexpr (std::is_same<T, float>::value) return attn::supported_isas();
  return {Isa::portable};
}

/// Sizes around the register tile of `ks`: 1, tile - 1, tile, tile + 1, a few tiles + odd.
template <class T>
std::vector<index_t> around(index_t tile) {
  std::vector<index_t> v{1, tile - 1, tile, tile + 1, 3 * tile + 5};
  v.erase(std::remove(v.begin(), v.end(), index_t{0}), v.end());
  return v;
}

template <class T>
class Kernels : public ::testing::Test {};
using AccTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Kernels, AccTypes);

/// S = Q·Kᵀ for every row and column tail and odd depths, K packed from a strided source.
TYPED_TEST(Kernels, ScoreMatchesDoubleLoop) {
  using T = TypeParam;
  for (Isa isa : isas_for<T>()) {
    const KernelSet<T>& ks = attn::kernels::kernel_set<T>(isa);
    const index_t mr = ks.lanes == 16 ? 14 : 6;
    for (index_t rows : around<T>(mr))
      for (index_t cols : around<T>(ks.k_panel))
        for (index_t d : {1, 7, 64, 111}) {
          SCOPED_TRACE(std::string(attn::isa_name(isa)) + " rows=" + std::to_string(rows) +
                       " cols=" + std::to_string(cols) + " d=" + std::to_string(d));
          const auto q = random_vec<T>(static_cast<std::size_t>(rows * d), 1);
          // K stored transposed ([d, cols]) to exercise a strided packing source.
          const auto k = random_vec<T>(static_cast<std::size_t>(cols * d), 2);
          std::vector<T> row(static_cast<std::size_t>(d)),
              kp(static_cast<std::size_t>(attn::kernels::packed_k_size(cols, d, ks.k_panel)));
          attn::kernels::pack_k(ks, k.data(), 1, cols, cols, d, row.data(), kp.data());
          {  // the same keys as contiguous rows (the pack's fast path for full panels)
            std::vector<T> rows_k(k.size()), kp_rows(kp.size(), T(-1));
            for (index_t j = 0; j < cols; ++j)
              for (index_t p = 0; p < d; ++p) rows_k[j * d + p] = k[p * cols + j];
            attn::kernels::pack_k(ks, rows_k.data(), d, 1, cols, d, row.data(), kp_rows.data());
            ASSERT_EQ(kp_rows, kp) << "contiguous and strided sources pack differently";
          }
          const index_t panels = (cols + ks.k_panel - 1) / ks.k_panel;
          const index_t lds = panels * ks.k_panel + 3;
          std::vector<T> s(static_cast<std::size_t>(rows * lds), T(-7));
          ks.score(rows, cols, d, q.data(), d, kp.data(), s.data(), lds);
          double worst = 0;
          for (index_t i = 0; i < rows; ++i) {
            for (index_t j = 0; j < cols; ++j) {
              double ref = 0, mag = 0;
              for (index_t p = 0; p < d; ++p) {
                const double x = double(q[i * d + p]) * double(k[p * cols + j]);
                ref += x;
                mag += std::abs(x);
              }
              worst = std::max(worst, std::abs(s[i * lds + j] - ref) / std::max(mag, 1.0));
            }
            for (index_t j = panels * ks.k_panel; j < lds; ++j)
              ASSERT_EQ(s[i * lds + j], T(-7)) << "wrote past its panels";
            for (index_t j = cols; j < panels * ks.k_panel; ++j)
              ASSERT_EQ(s[i * lds + j], T(0)) << "padded key not zero";
          }
          EXPECT_LE(worst, 2.0 * d * attn_test::eps<T>());
        }
  }
}

/// S = Q·Kᵀ with K as rows (score_rows, the decoding kernel): every row block
/// (1-4 rows and their sums), every key block and tail, depths below, at and
/// past the vector width, a K row stride wider than d; nothing written past cols.
TYPED_TEST(Kernels, ScoreRowsMatchesDoubleLoop) {
  using T = TypeParam;
  for (Isa isa : isas_for<T>()) {
    const KernelSet<T>& ks = attn::kernels::kernel_set<T>(isa);
    for (index_t rows : {1, 2, 3, 4, 5, 7, 8, 9})
      for (index_t cols : {1, 2, 3, 4, 5, 7, 33, 256})
        for (index_t d : std::vector<index_t>{1, 7, ks.lanes, ks.lanes + 1, 64, 111, 128}) {
          SCOPED_TRACE(std::string(attn::isa_name(isa)) + " rows=" + std::to_string(rows) +
                       " cols=" + std::to_string(cols) + " d=" + std::to_string(d));
          const index_t ldq = d + 3, ldk = d + 5, lds = cols + 2;
          const auto q = random_vec<T>(static_cast<std::size_t>(rows * ldq), 11);
          const auto k = random_vec<T>(static_cast<std::size_t>(cols * ldk), 12);
          std::vector<T> s(static_cast<std::size_t>(rows * lds), T(-7));
          ks.score_rows(rows, cols, d, q.data(), ldq, k.data(), ldk, s.data(), lds, {});
          double worst = 0;
          for (index_t i = 0; i < rows; ++i) {
            for (index_t j = 0; j < cols; ++j) {
              double ref = 0, mag = 0;
              for (index_t p = 0; p < d; ++p) {
                const double x = double(q[i * ldq + p]) * double(k[j * ldk + p]);
                ref += x;
                mag += std::abs(x);
              }
              worst = std::max(worst, std::abs(s[i * lds + j] - ref) / std::max(mag, 1.0));
            }
            for (index_t j = cols; j < lds; ++j)
              ASSERT_EQ(s[i * lds + j], T(-7)) << "wrote past cols";
          }
          // A sum of d products in any order: within d·eps of the magnitude.
          EXPECT_LE(worst, 2.0 * d * attn_test::eps<T>());
        }
  }
}

/// pv_t (O += Aᵀ·V with A stored transposed, the backward's dV and dK products)
/// gives the bits of pv on a transposed copy of A: the same products in the same
/// order. Every row block and column width of the register tile.
TYPED_TEST(Kernels, PvTransposedEqualsPvOnACopy) {
  using T = TypeParam;
  for (Isa isa : isas_for<T>()) {
    const KernelSet<T>& ks = attn::kernels::kernel_set<T>(isa);
    const index_t mr = ks.lanes == 16 ? 14 : 6;
    for (index_t rows : around<T>(mr))
      for (index_t cols : {1, 13, 64})
        for (index_t dvp : {16, 32, 48, 128}) {
          SCOPED_TRACE(std::string(attn::isa_name(isa)) + " rows=" + std::to_string(rows) +
                       " cols=" + std::to_string(cols) + " dvp=" + std::to_string(dvp));
          const index_t lda = rows + 3, ldt = cols + 1, ldo = dvp + 16;
          const auto a = random_vec<T>(static_cast<std::size_t>(cols * lda), 31);  // (cols, rows)
          std::vector<T> at(static_cast<std::size_t>(rows * ldt));                 // (rows, cols)
          for (index_t k = 0; k < cols; ++k)
            for (index_t i = 0; i < rows; ++i) at[i * ldt + k] = a[k * lda + i];
          const auto v = random_vec<T>(static_cast<std::size_t>(cols * dvp), 32);
          auto o1 = random_vec<T>(static_cast<std::size_t>(rows * ldo), 33);
          auto o2 = o1;
          ks.pv_t(rows, dvp, cols, a.data(), lda, v.data(), dvp, o1.data(), ldo);
          ks.pv(rows, dvp, cols, at.data(), ldt, v.data(), dvp, o2.data(), ldo, {});
          ASSERT_EQ(std::memcmp(o1.data(), o2.data(), o1.size() * sizeof(T)), 0);
        }
  }
}

/// int8 rows with a scale per row, std::int8_t codes in [-127, 127].
std::vector<std::int8_t> random_codes(std::size_t n, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(-127, 127);
  std::vector<std::int8_t> v(n);
  for (auto& x : v) x = static_cast<std::int8_t>(dist(gen));
  return v;
}

/// score_rows_i8: S[i][j] = kscale[j] · Σ_p Q[i][p]·K̂[j][p], converted in registers;
/// every row block, key block and tail, every depth tail, scales of several magnitudes.
TYPED_TEST(Kernels, ScoreRowsInt8MatchesDoubleLoop) {
  using T = TypeParam;
  for (Isa isa : isas_for<T>()) {
    const KernelSet<T>& ks = attn::kernels::kernel_set<T>(isa);
    for (index_t rows : {1, 3, 4, 5, 8})
      for (index_t cols : {1, 3, 4, 5, 33})
        for (index_t d : std::vector<index_t>{1, 7, ks.lanes, ks.lanes + 1, 64, 111, 128}) {
          SCOPED_TRACE(std::string(attn::isa_name(isa)) + " rows=" + std::to_string(rows) +
                       " cols=" + std::to_string(cols) + " d=" + std::to_string(d));
          const index_t ldq = d + 1, ldk = d + 3, lds = cols + 1;
          const auto q = random_vec<T>(static_cast<std::size_t>(rows * ldq), 21);
          const auto k = random_codes(static_cast<std::size_t>(cols * ldk), 22);
          std::vector<float> scale(static_cast<std::size_t>(cols));
          for (index_t j = 0; j < cols; ++j)
            scale[j] = std::ldexp(0.75f + 0.01f * j, int(j % 7) - 3);
          std::vector<T> s(static_cast<std::size_t>(rows * lds), T(-7));
          ks.score_rows_i8(rows, cols, d, q.data(), ldq, k.data(), ldk, scale.data(), s.data(), lds,
                           {});
          for (index_t i = 0; i < rows; ++i) {
            for (index_t j = 0; j < cols; ++j) {
              double ref = 0, mag = 0;
              for (index_t p = 0; p < d; ++p) {
                const double x = double(q[i * ldq + p]) * double(k[j * ldk + p]);
                ref += x;
                mag += std::abs(x);
              }
              // d products summed (d·eps of the magnitude), then one rounding of the scale product.
              ASSERT_LE(std::abs(s[i * lds + j] - scale[j] * ref),
                        (d + 1) * attn_test::eps<T>() * scale[j] * mag + 1e-30)
                  << "i=" << i << " j=" << j;
            }
            ASSERT_EQ(s[i * lds + cols], T(-7)) << "wrote past cols";
          }
        }
  }
}

/// score_rows and score_rows_i8 give each score the same bits however the keys
/// are cut into calls: a cache hands its keys over in runs (one per block of a
/// paged cache, one per tile of a contiguous one), and a paged cache must equal
/// the contiguous one bit for bit. A key in a block of rows_keys keys is summed
/// with S::sum_lanes, a tail key with S::reduce_add: the two must agree. Each
/// run call is told where the keys go on (NextRows, a prefetch hint), pointing
/// at other numbers, which must not reach a score.
TYPED_TEST(Kernels, ScoreRowsBitsDoNotDependOnTheRuns) {
  using T = TypeParam;
  for (Isa isa : isas_for<T>()) {
    const KernelSet<T>& ks = attn::kernels::kernel_set<T>(isa);
    for (index_t rows : {1, 2, 3, 4, 5, 8})
      for (index_t d : std::vector<index_t>{7, ks.lanes, 2 * ks.lanes + 3, 64, 128}) {
        SCOPED_TRACE(std::string(attn::isa_name(isa)) + " rows=" + std::to_string(rows) +
                     " d=" + std::to_string(d));
        const index_t cols = 37, ldk = d + 2;
        const auto q = random_vec<T>(static_cast<std::size_t>(rows * d), 41);
        const auto k = random_vec<T>(static_cast<std::size_t>(cols * ldk), 42);
        const auto k8 = random_codes(static_cast<std::size_t>(cols * ldk), 43);
        std::vector<float> scale(static_cast<std::size_t>(cols));
        for (index_t j = 0; j < cols; ++j) scale[j] = std::ldexp(0.75f + 0.01f * j, int(j % 5) - 2);
        for (index_t run : {1, 2, 3, 5, 16}) {  // runs of `run` keys against one call
          std::vector<T> whole(static_cast<std::size_t>(rows * cols)), runs(whole.size());
          std::vector<T> whole8(whole.size()), runs8(whole.size());
          ks.score_rows(rows, cols, d, q.data(), d, k.data(), ldk, whole.data(), cols, {});
          ks.score_rows_i8(rows, cols, d, q.data(), d, k8.data(), ldk, scale.data(), whole8.data(),
                           cols, {});
          for (index_t j = 0; j < cols; j += run) {
            const index_t n = std::min(run, cols - j);
            const attn::kernels::NextRows next{q.data(), std::min(run, cols - j - n)};
            ks.score_rows(rows, n, d, q.data(), d, k.data() + j * ldk, ldk, runs.data() + j, cols,
                          next);
            ks.score_rows_i8(rows, n, d, q.data(), d, k8.data() + j * ldk, ldk, scale.data() + j,
                             runs8.data() + j, cols, {k.data(), next.n});
          }
          ASSERT_EQ(std::memcmp(whole.data(), runs.data(), whole.size() * sizeof(T)), 0)
              << "runs of " << run;
          ASSERT_EQ(std::memcmp(whole8.data(), runs8.data(), whole8.size() * sizeof(T)), 0)
              << "int8, runs of " << run;
        }
      }
  }
}

/// pv_i8: O += P·V̂ with int8 value rows converted in registers, every row and column block.
TYPED_TEST(Kernels, PvInt8MatchesDoubleLoop) {
  using T = TypeParam;
  for (Isa isa : isas_for<T>()) {
    const KernelSet<T>& ks = attn::kernels::kernel_set<T>(isa);
    for (index_t rows : {1, 4, 8, 15})
      for (index_t cols : {1, 13, 256})
        for (index_t dv : {16, 32, 48, 128}) {
          SCOPED_TRACE(std::string(attn::isa_name(isa)) + " rows=" + std::to_string(rows) +
                       " cols=" + std::to_string(cols) + " dv=" + std::to_string(dv));
          const index_t ldp = cols + 2, ldv = dv + 16, ldo = dv + 16;
          const auto p = random_vec<T>(static_cast<std::size_t>(rows * ldp), 23);
          const auto v = random_codes(static_cast<std::size_t>(cols * ldv), 24);
          auto o = random_vec<T>(static_cast<std::size_t>(rows * ldo), 25);
          const auto o0 = o;
          ks.pv_i8(rows, dv, cols, p.data(), ldp, v.data(), ldv, o.data(), ldo, {});
          for (index_t i = 0; i < rows; ++i) {
            for (index_t c = 0; c < dv; ++c) {
              double ref = o0[i * ldo + c], mag = std::abs(ref);
              for (index_t k = 0; k < cols; ++k) {
                const double x = double(p[i * ldp + k]) * double(v[k * ldv + c]);
                ref += x;
                mag += std::abs(x);
              }
              ASSERT_LE(std::abs(o[i * ldo + c] - ref),
                        2.0 * (cols + 1) * attn_test::eps<T>() * mag)
                  << "i=" << i << " c=" << c;
            }
            for (index_t c = dv; c < ldo; ++c)
              ASSERT_EQ(o[i * ldo + c], o0[i * ldo + c]) << "wrote past dv";
          }
        }
  }
}

/// int8 rows times their scale: exact products rounded once, so every ISA gives
/// the bits of the scalar product, over every vector tail and the extreme codes.
TEST(KernelsInt8, ToFloatIsTheRoundedProduct) {
  std::vector<std::int8_t> x;
  for (int i = -128; i < 128; ++i) x.push_back(static_cast<std::int8_t>(i));
  for (Isa isa : attn::supported_isas()) {
    const KernelSet<float>& ks = attn::kernels::kernel_set<float>(isa);
    for (float scale : {0.0f, 1.0f, 0.00731f, 3.3e-39f, 1.7e36f})
      for (index_t n : {1, 7, 8, 9, 15, 16, 17, 33, 256}) {
        std::vector<float> out(static_cast<std::size_t>(n + 1), -5.0f);
        ks.i8_to_float(x.data() + (256 - n) / 2, scale, out.data(), n);
        for (index_t i = 0; i < n; ++i)
          ASSERT_EQ(out[static_cast<std::size_t>(i)],
                    scale * static_cast<float>(x[static_cast<std::size_t>((256 - n) / 2 + i)]))
              << attn::isa_name(isa) << " n=" << n << " i=" << i << " scale=" << scale;
        ASSERT_EQ(out[static_cast<std::size_t>(n)], -5.0f) << "wrote past n";
      }
  }
}

// ------------------------------------------- int8 rows in integer products --

/// int16 values in [-limit, limit], the extremes among them.
std::vector<std::int16_t> random_q16(std::size_t n, std::uint32_t seed, int limit) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(-limit, limit);
  std::vector<std::int16_t> v(n);
  for (auto& x : v) x = static_cast<std::int16_t>(dist(gen));
  if (n > 1) v[0] = static_cast<std::int16_t>(limit), v[1] = static_cast<std::int16_t>(-limit);
  return v;
}

/// score_rows_q16: the int32 sums are exact, so each score is exactly
/// float(Σ q̂·k̂) · qscale · kscale, rounded as written, on every ISA: every row
/// and key block and tail, depth tails, runs, and the largest depth (516) at
/// which int16_limit keeps ±32767 · ±127 sums in range (all extremes aligned).
TEST(KernelsInt8, ScoreRowsQ16IsTheExactSumScaled) {
  for (Isa isa : attn::supported_isas()) {
    const KernelSet<float>& ks = attn::kernels::kernel_set<float>(isa);
    for (index_t rows : {1, 3, 4, 5, 8})
      for (index_t cols : {1, 3, 4, 5, 33})
        for (index_t d :
             std::vector<index_t>{1, 7, 2 * ks.lanes, 2 * ks.lanes + 1, 111, 128, 516}) {
          SCOPED_TRACE(std::string(attn::isa_name(isa)) + " rows=" + std::to_string(rows) +
                       " cols=" + std::to_string(cols) + " d=" + std::to_string(d));
          const int limit = attn::kernels::int16_limit(d);
          ASSERT_EQ(limit, 32767);
          const index_t ldq = d + 1, ldk = d + 3, lds = cols + 1;
          auto q = random_q16(static_cast<std::size_t>(rows * ldq), 31, limit);
          auto k = random_codes(static_cast<std::size_t>(cols * ldk), 32);
          if (d == 516)  // the largest sums: every product +32767·127 in row 0 against key 0
            for (index_t p = 0; p < d; ++p) q[p] = 32767, k[p] = 127;
          std::vector<float> qscale(static_cast<std::size_t>(rows)),
              kscale(static_cast<std::size_t>(cols));
          for (index_t i = 0; i < rows; ++i) qscale[i] = std::ldexp(0.9f + 0.01f * i, -15);
          for (index_t j = 0; j < cols; ++j)
            kscale[j] = std::ldexp(0.75f + 0.01f * j, int(j % 7) - 3);
          std::vector<float> s(static_cast<std::size_t>(rows * lds), -7.0f), runs(s);
          ks.score_rows_q16(rows, cols, d, q.data(), ldq, qscale.data(), k.data(), ldk,
                            kscale.data(), s.data(), lds, {});
          for (index_t j = 0; j < cols;
               j += 3)  // the same keys in runs of three, each told of the next
            ks.score_rows_q16(rows, std::min<index_t>(3, cols - j), d, q.data(), ldq, qscale.data(),
                              k.data() + j * ldk, ldk, kscale.data() + j, runs.data() + j, lds,
                              {k.data() + (j + 3) * ldk, std::clamp<index_t>(cols - j - 3, 0, 3)});
          for (index_t i = 0; i < rows; ++i) {
            for (index_t j = 0; j < cols; ++j) {
              std::int64_t sum = 0;
              for (index_t p = 0; p < d; ++p)
                sum += std::int64_t{q[i * ldq + p]} * std::int64_t{k[j * ldk + p]};
              ASSERT_LT(std::abs(sum), std::int64_t{1} << 31);
              const float want = static_cast<float>(sum) * qscale[i] * kscale[j];
              ASSERT_EQ(s[i * lds + j], want) << "i=" << i << " j=" << j << " sum=" << sum;
              ASSERT_EQ(runs[i * lds + j], want) << "runs, i=" << i << " j=" << j;
            }
            ASSERT_EQ(s[i * lds + cols], -7.0f) << "wrote past cols";
          }
        }
  }
}

/// pv_q16 + pv_q16_finish: A += Ŵ·V̂ in int32, exact, so with rowscale 1 and O = 0
/// each output is the exact sum rounded once to float. Every row block, every
/// width a multiple of the lanes (blocks of 4, 2 and 1 vectors), odd key counts
/// (the last key paired with zeros), keys fed in runs of odd lengths into the
/// same sums, and ±32767 · ±127 at every key of the largest tile int16_limit allows.
TEST(KernelsInt8, PvQ16IsTheExactSum) {
  for (Isa isa : attn::supported_isas()) {
    const KernelSet<float>& ks = attn::kernels::kernel_set<float>(isa);
    const index_t L = ks.lanes;
    for (index_t rows : {1, 2, 3, 4, 5, 8})
      for (index_t cols : {1, 2, 13, 256, 516})
        for (index_t dv : {L, 2 * L, 3 * L, 4 * L, 5 * L, 8 * L}) {
          SCOPED_TRACE(std::string(attn::isa_name(isa)) + " rows=" + std::to_string(rows) +
                       " cols=" + std::to_string(cols) + " dv=" + std::to_string(dv));
          const int limit = attn::kernels::int16_limit(cols);
          ASSERT_EQ(limit, 32767);
          const index_t ldw = cols + 3, ldv = dv + 5, lda = dv + 7, ldo = dv + 16;
          auto w = random_q16(static_cast<std::size_t>(rows * ldw), 33, limit);
          for (index_t i = 0; i < rows; ++i) w[i * ldw + cols] = 0;  // quantize_rows' padding
          auto v = random_codes(static_cast<std::size_t>(cols * ldv), 34);
          if (cols == 516)
            for (index_t kk = 0; kk < cols; ++kk) w[kk] = -32767, v[kk * ldv] = 127;
          for (index_t run : {cols, index_t{3}, index_t{5}}) {
            std::vector<std::int32_t> a(static_cast<std::size_t>(rows * lda), 0);
            for (index_t j = 0; j < cols; j += run)
              ks.pv_q16(rows, dv, std::min(run, cols - j), w.data() + j, ldw, v.data() + j * ldv,
                        ldv, a.data(), lda,
                        {v.data() + (j + run) * ldv, std::clamp<index_t>(cols - j - run, 0, run)});
            std::vector<float> rowscale(static_cast<std::size_t>(rows), 1.0f);
            std::vector<float> o(static_cast<std::size_t>(rows * ldo), 0.0f);
            for (index_t i = 0; i < rows; ++i) o[i * ldo + dv] = -3.0f;
            ks.pv_q16_finish(rows, dv, a.data(), lda, rowscale.data(), o.data(), ldo);
            for (index_t i = 0; i < rows; ++i) {
              for (index_t c = 0; c < dv; ++c) {
                std::int64_t sum = 0;
                for (index_t kk = 0; kk < cols; ++kk)
                  sum += std::int64_t{w[i * ldw + kk]} * std::int64_t{v[kk * ldv + c]};
                ASSERT_EQ(o[i * ldo + c], static_cast<float>(sum))
                    << "runs of " << run << " i=" << i << " c=" << c;
              }
              ASSERT_EQ(o[i * ldo + dv], -3.0f) << "wrote past dv";
            }
          }
        }
  }
}

/// quantize_rows: rowscale = max|x| / limit, each value within half a step
/// (plus the float rounding of x·limit/max), the largest at ±limit, an
/// all-zero row all zeros with scale 0, the odd padding 0, the same int16 on
/// every ISA (float products rounded to nearest even everywhere), and a row
/// with inf or NaN refused. scale_columns multiplies columns by their scale.
TEST(KernelsInt8, QuantizeRowsRoundsToTheNearestStep) {
  const index_t rows = 5, cols = 37, ldx = 40, ldd = 40;
  auto x = random_vec<float>(static_cast<std::size_t>(rows * ldx), 35, 3.0);
  for (index_t c = 0; c < cols; ++c) x[2 * ldx + c] = 0.0f;  // an all-zero row
  x[3 * ldx + 17] = -1e30f;                                  // one value far beyond the rest
  std::vector<float> colscale(static_cast<std::size_t>(cols));
  for (index_t c = 0; c < cols; ++c) colscale[c] = 0.5f + 0.125f * c;
  std::vector<std::int16_t> first;
  for (Isa isa : attn::supported_isas()) {
    SCOPED_TRACE(attn::isa_name(isa));
    const KernelSet<float>& ks = attn::kernels::kernel_set<float>(isa);
    auto xs = x;
    ks.scale_columns(rows, cols, xs.data(), ldx, colscale.data());
    for (index_t i = 0; i < rows; ++i)
      for (index_t c = 0; c < ldx; ++c)
        ASSERT_EQ(xs[i * ldx + c], c < cols ? x[i * ldx + c] * colscale[c] : x[i * ldx + c]);
    for (int limit : {32767, 1000}) {
      std::vector<std::int16_t> dst(static_cast<std::size_t>(rows * ldd), 99);
      std::vector<float> scale(static_cast<std::size_t>(rows), -1.0f);
      ASSERT_TRUE(
          ks.quantize_rows(rows, cols, xs.data(), ldx, limit, dst.data(), ldd, scale.data()));
      for (index_t i = 0; i < rows; ++i) {
        double most = 0;
        for (index_t c = 0; c < cols; ++c) most = std::max(most, std::abs(double(xs[i * ldx + c])));
        ASSERT_EQ(scale[i], static_cast<float>(most) / static_cast<float>(limit));
        for (index_t c = 0; c < cols; ++c) {
          const double xv = xs[i * ldx + c], q = dst[i * ldd + c];
          ASSERT_LE(std::abs(q), limit);
          if (most == 0) {
            ASSERT_EQ(q, 0);
            continue;
          }
          ASSERT_LE(std::abs(xv / scale[i] - q), 0.5 + 1e-6 * limit) << "i=" << i << " c=" << c;
          if (std::abs(xv) == most) {
            ASSERT_EQ(std::abs(q), limit);
          }
        }
        ASSERT_EQ(dst[i * ldd + cols], 0) << "padding of an odd row";
        ASSERT_EQ(dst[i * ldd + cols + 1], 99) << "wrote past the padding";
      }
      if (limit == 32767) {
        if (first.empty()) first = dst;
        ASSERT_EQ(dst, first) << "int16 differ from " << attn::isa_name(attn::supported_isas()[0]);
      }
    }
    for (float bad : {std::numeric_limits<float>::infinity(), std::nanf("")}) {
      auto xb = xs;
      xb[4 * ldx + 30] = bad;
      std::vector<std::int16_t> dst(static_cast<std::size_t>(rows * ldd));
      std::vector<float> scale(static_cast<std::size_t>(rows));
      ASSERT_FALSE(
          ks.quantize_rows(rows, cols, xb.data(), ldx, 32767, dst.data(), ldd, scale.data()))
          << bad;
    }
  }
}

/// O += P·V for every row tail and every padded width.
TYPED_TEST(Kernels, PvMatchesDoubleLoop) {
  using T = TypeParam;
  for (Isa isa : isas_for<T>()) {
    const KernelSet<T>& ks = attn::kernels::kernel_set<T>(isa);
    const index_t mr = ks.lanes == 16 ? 14 : 6;
    // Besides sizes around the register tile, 2-6 rows: the blocks of at most
    // 6 (AVX-512) or 2 (AVX2) rows that take four vectors of V at a time.
    auto row_counts = around<T>(mr);
    row_counts.insert(row_counts.end(), {2, 3, 4, 6});
    for (index_t rows : row_counts)
      for (index_t cols : {1, 13, 64, 257})
        for (index_t dv : {1, 15, 16, 17, 33, 64, 80, 111}) {
          SCOPED_TRACE(std::string(attn::isa_name(isa)) + " rows=" + std::to_string(rows) +
                       " cols=" + std::to_string(cols) + " dv=" + std::to_string(dv));
          const index_t dvp = attn::kernels::padded_dv(dv);
          ASSERT_EQ(dvp % ks.lanes, 0);
          const index_t ldp = cols + 2, ldo = dvp + 16;
          const auto p = random_vec<T>(static_cast<std::size_t>(rows * ldp), 3);
          // V as bshd-like rows with a row stride of 2·dv, packed to dvp columns.
          const auto v = random_vec<T>(static_cast<std::size_t>(cols * 2 * dv), 4);
          std::vector<T> vp(static_cast<std::size_t>(cols * dvp), T(-1));
          attn::kernels::pack_v(ks, v.data(), 2 * dv, 1, cols, dv, dvp, vp.data());
          auto o = random_vec<T>(static_cast<std::size_t>(rows * ldo), 5);
          const auto o0 = o;
          ks.pv(rows, dvp, cols, p.data(), ldp, vp.data(), dvp, o.data(), ldo, {});
          double worst = 0;
          for (index_t i = 0; i < rows; ++i) {
            for (index_t c = 0; c < dv; ++c) {
              double ref = o0[i * ldo + c], mag = std::abs(ref);
              for (index_t k = 0; k < cols; ++k) {
                const double x = double(p[i * ldp + k]) * double(v[k * 2 * dv + c]);
                ref += x;
                mag += std::abs(x);
              }
              worst = std::max(worst, std::abs(o[i * ldo + c] - ref) / std::max(mag, 1.0));
            }
            for (index_t c = dv; c < dvp; ++c) ASSERT_EQ(o[i * ldo + c], o0[i * ldo + c]);
            for (index_t c = dvp; c < ldo; ++c)
              ASSERT_EQ(o[i * ldo + c], o0[i * ldo + c]) << "wrote past dvp";
          }
          EXPECT_LE(worst, 2.0 * (cols + 1) * attn_test::eps<T>());
        }
  }
}

/// The online-softmax sweep: P, m, l and the rescaled O against double, with
/// rows that are fresh (m = -inf), rows whose max moves and rows whose max stays,
/// -inf scores (masked keys) and fully masked rows, every column tail, and
/// scales 1, 1/2 (exact) and 1/√128 (rounded) on the scores.
TYPED_TEST(Kernels, SoftmaxMatchesDoubleLoop) {
  using T = TypeParam;
  constexpr T inf = std::numeric_limits<T>::infinity();
  for (Isa isa : isas_for<T>()) {
    const KernelSet<T>& ks = attn::kernels::kernel_set<T>(isa);
    for (const T scale : {T(1), T(0.5), T(1 / std::sqrt(128.0))})
      for (index_t cols : around<T>(ks.lanes)) {
        SCOPED_TRACE(std::string(attn::isa_name(isa)) + " cols=" + std::to_string(cols) +
                     " scale=" + std::to_string(scale));
        const index_t rows = 6, lds = cols + 5, dvp = 32, ldo = dvp;
        auto s = random_vec<T>(static_cast<std::size_t>(rows * lds), 6, 3.0);
        for (index_t j = 0; j < cols; j += 3) s[1 * lds + j] = -inf;  // masked keys
        for (index_t j = 0; j < cols; ++j) s[2 * lds + j] = -inf;  // a row that sees nothing here
        for (index_t j = 0; j < cols; ++j) s[5 * lds + j] = -inf;
        std::vector<T> m{-inf, 0.5, 2.0, 100.0, -inf, 1.0}, l{0, 2.0, 1.5, 3.0, 0, 1.0};
        auto o = random_vec<T>(static_cast<std::size_t>(rows * ldo), 7);
        const auto s0 = s, m0 = m, l0 = l, o0 = o;
        ks.softmax(rows, cols, s.data(), lds, scale, m.data(), l.data(), o.data(), ldo, dvp);
        for (index_t r = 0; r < rows; ++r) {
          T mx = -inf;
          for (index_t j = 0; j < cols; ++j) mx = std::max(mx, s0[r * lds + j]);
          // The max of the scaled row is the row max times the scale, rounded once.
          const double m_new = std::max(double(m0[r]), double(T(mx * scale)));
          ASSERT_EQ(double(m[r]), m_new) << "row " << r;
          const double m_use = m_new == -inf ? 0.0 : m_new;
          // exp's own error, and for a rounded scale the rounding of m' = scale·max,
          // |m'|·eps/2, that scale·S - m' carries into the exponent.
          const double tol = (8 + (scale == T(1) ? 0.0 : std::abs(m_use))) * attn_test::eps<T>();
          const double alpha = std::exp(double(m0[r]) - m_use);
          double sum = 0;
          for (index_t j = 0; j < cols; ++j) {
            const double x = double(scale) * double(s0[r * lds + j]) - m_use;
            const double p = std::exp(x);
            sum += p;
            // Plus the rounding of x = scale·s - m', |x|·eps/2 relative.
            const double tol_p = tol + std::abs(x) * attn_test::eps<T>() / 2;
            if (std::isinf(s0[r * lds + j]))
              ASSERT_EQ(s[r * lds + j], T(0)) << "exp(-inf) must be exactly 0";
            else
              ASSERT_NEAR(s[r * lds + j], p, tol_p * std::max(p, 1e-30) + 1e-37);
          }
          EXPECT_NEAR(l[r], double(l0[r]) * alpha + sum, tol * (double(l0[r]) * alpha + sum));
          for (index_t c = 0; c < dvp; ++c)
            EXPECT_NEAR(o[r * ldo + c], double(o0[r * ldo + c]) * alpha,
                        tol * std::abs(double(o0[r * ldo + c])))
                << "row " << r;
          if (m0[r] == m[r]) {
            for (index_t c = 0; c < dvp; ++c)
              ASSERT_EQ(o[r * ldo + c], o0[r * ldo + c]) << "O rescaled though its max stayed";
          }
        }
      }
  }
}

/// Half keys convert through the ISA's converter (F16C on x86) exactly.
TEST(KernelsPack, HalfConvertsExactly) {
  std::vector<Eigen::half> h(37);
  for (std::size_t i = 0; i < h.size(); ++i)
    h[i] = Eigen::half(static_cast<float>(i) * 0.37f - 5.f);
  h[3] = Eigen::half(std::numeric_limits<float>::infinity());
  for (Isa isa : attn::supported_isas()) {
    const KernelSet<float>& ks = attn::kernels::kernel_set<float>(isa);
    std::vector<float> out(h.size());
    attn::kernels::load_row(ks, h.data(), 1, static_cast<index_t>(h.size()), out.data());
    for (std::size_t i = 0; i < h.size(); ++i)
      ASSERT_EQ(out[i], static_cast<float>(h[i])) << attn::isa_name(isa) << " element " << i;
  }
}

// --------------------------------------------------------------------- bf16 --

/// The bf16 pair layouts (pack.hpp) element by element against their formulas,
/// zeros past the keys and the head dims included: unit-stride rows (whole
/// panels and pairs take a path of their own) and strided ones, every tail.
TEST(KernelsPack, Bf16PairLayouts) {
  using attn::kernels::bf16_bits;
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> dist(-4.f, 4.f);
  for (const index_t col_stride : {1, 3})
    for (const index_t cols : {1, 2, 31, 32, 33, 64, 101})
      for (const index_t d : {1, 7, 16, 24, 64, 128}) {
        SCOPED_TRACE("col_stride=" + std::to_string(col_stride) + " cols=" + std::to_string(cols) +
                     " d=" + std::to_string(d));
        const index_t row_stride = d * col_stride + 2;
        std::vector<Eigen::bfloat16> src(static_cast<std::size_t>(cols * row_stride));
        for (auto& x : src) x = Eigen::bfloat16(dist(gen));
        const auto at = [&](index_t key, index_t p) -> std::uint16_t {
          return bf16_bits(src[static_cast<std::size_t>(key * row_stride + p * col_stride)]);
        };
        const index_t dp = (d + 1) / 2, panels = (cols + 31) / 32;
        std::vector<std::uint16_t> kb(
            static_cast<std::size_t>(attn::kernels::packed_kb_size(cols, d)), 0xFFFF);
        ASSERT_EQ(kb.size(), static_cast<std::size_t>(panels * 64 * dp));
        attn::kernels::pack_kb(src.data(), row_stride, col_stride, cols, d, kb.data());
        for (index_t j = 0; j < panels; ++j)
          for (index_t t = 0; t < dp; ++t)
            for (index_t c = 0; c < 32; ++c)
              for (index_t e = 0; e < 2; ++e) {
                const index_t key = j * 32 + c, p = 2 * t + e;
                ASSERT_EQ(kb[static_cast<std::size_t>(((j * dp + t) * 32 + c) * 2 + e)],
                          key < cols && p < d ? at(key, p) : 0)
                    << "K key " << key << " dim " << p;
              }
        const index_t dv = d, dvp = attn::kernels::padded_dv(dv), pairs = (cols + 1) / 2;
        std::vector<std::uint16_t> vb(static_cast<std::size_t>(pairs * 2 * dvp), 0xFFFF);
        attn::kernels::pack_vb(src.data(), row_stride, col_stride, cols, dv, dvp, vb.data());
        for (index_t t = 0; t < pairs; ++t)
          for (index_t c = 0; c < dvp; ++c)
            for (index_t e = 0; e < 2; ++e) {
              const index_t key = 2 * t + e;
              ASSERT_EQ(vb[static_cast<std::size_t>((t * dvp + c) * 2 + e)],
                        key < cols && c < dv ? at(key, c) : 0)
                  << "V key " << key << " column " << c;
            }
      }
}

#if ATTN_KERNELS_X86
std::vector<Eigen::bfloat16> random_bf16(std::size_t n, std::uint32_t seed) {
  const auto f = random_vec<float>(n, seed);
  std::vector<Eigen::bfloat16> r(n);
  for (std::size_t i = 0; i < n; ++i) r[i] = Eigen::bfloat16(f[i]);
  return r;
}

using ScoreBf16 = void (*)(index_t, index_t, index_t, const std::uint16_t*, index_t,
                           const std::uint16_t*, float*, index_t, float);
using PvBf16 = void (*)(index_t, index_t, index_t, const std::uint16_t*, index_t,
                        const std::uint16_t*, float*, index_t);

/// bf16 scores (K panels with head-dim pairs) against a double loop, and
/// nothing written past the panels.
void check_bf16_score(ScoreBf16 score, std::initializer_list<index_t> row_counts,
                      std::initializer_list<index_t> col_counts,
                      std::initializer_list<index_t> depths) {
  for (index_t rows : row_counts)
    for (index_t cols : col_counts)
      for (index_t d : depths) {
        SCOPED_TRACE("rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                     " d=" + std::to_string(d));
        const index_t dpad = d + (d & 1), panels = (cols + 31) / 32, lds = panels * 32 + 5;
        const auto q = random_bf16(static_cast<std::size_t>(rows * d), 1);
        const auto k = random_bf16(static_cast<std::size_t>(cols * d), 2);  // bshd-like: [cols, d]
        std::vector<std::uint16_t> qb(static_cast<std::size_t>(rows * dpad)),
            kp(static_cast<std::size_t>(attn::kernels::packed_kb_size(cols, d)));
        attn::kernels::pack_qb(q.data(), d, 1, rows, d, qb.data(), dpad);
        attn::kernels::pack_kb(k.data(), d, 1, cols, d, kp.data());
        std::vector<float> s(static_cast<std::size_t>(rows * lds), -7.f);
        const float scale = 0.37f;
        score(rows, cols, d, qb.data(), dpad, kp.data(), s.data(), lds, scale);
        for (index_t i = 0; i < rows; ++i) {
          for (index_t j = 0; j < cols; ++j) {
            double ref = 0, mag = 0;
            for (index_t p = 0; p < d; ++p) {
              const double x = double(q[i * d + p]) * double(k[j * d + p]);
              ref += x;
              mag += std::abs(x);
            }
            ASSERT_NEAR(s[i * lds + j], scale * ref,
                        4.0 * d * attn_test::eps<float>() * scale * std::max(mag, 1.0))
                << i << ", " << j;
          }
          for (index_t j = panels * 32; j < lds; ++j) ASSERT_EQ(s[i * lds + j], -7.f);
        }
      }
}

/// bf16 P·V (P rounded to nearest even, V with key pairs) against a double
/// loop; O's columns past dv unchanged.
void check_bf16_pv(PvBf16 pv, std::initializer_list<index_t> row_counts,
                   std::initializer_list<index_t> col_counts,
                   std::initializer_list<index_t> widths) {
  namespace kb = attn::kernels::avx512_bf16;
  for (index_t rows : row_counts)
    for (index_t cols : col_counts)
      for (index_t dv : widths) {
        SCOPED_TRACE("rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                     " dv=" + std::to_string(dv));
        const index_t dvp = attn::kernels::padded_dv(dv), ldp = cols + 3, ldpb = cols + 5,
                      ldo = dvp + 16;
        const auto p = random_vec<float>(static_cast<std::size_t>(rows * ldp), 3);
        const auto v = random_bf16(static_cast<std::size_t>(cols * dv), 4);
        std::vector<std::uint16_t> pb(static_cast<std::size_t>(rows * ldpb), 0xFFFF),
            vb(static_cast<std::size_t>((cols + 1) / 2 * 2 * dvp));
        kb::round_to_bf16(rows, cols, p.data(), ldp, pb.data(), ldpb);
        for (index_t i = 0; i < rows; ++i) {
          for (index_t c = 0; c < cols; ++c)
            ASSERT_EQ(pb[i * ldpb + c], attn::kernels::bf16_bits(Eigen::bfloat16(p[i * ldp + c])));
          if (cols & 1) {
            ASSERT_EQ(pb[i * ldpb + cols], 0) << "odd key count not padded with 0";
          }
          for (index_t c = cols + (cols & 1); c < ldpb; ++c) ASSERT_EQ(pb[i * ldpb + c], 0xFFFF);
        }
        attn::kernels::pack_vb(v.data(), dv, 1, cols, dv, dvp, vb.data());
        auto o = random_vec<float>(static_cast<std::size_t>(rows * ldo), 5);
        const auto o0 = o;
        pv(rows, dvp, cols, pb.data(), ldpb, vb.data(), o.data(), ldo);
        for (index_t i = 0; i < rows; ++i) {
          for (index_t c = 0; c < dv; ++c) {
            double ref = o0[i * ldo + c], mag = std::abs(ref);
            for (index_t k = 0; k < cols; ++k) {
              const double x = double(Eigen::bfloat16(p[i * ldp + k])) * double(v[k * dv + c]);
              ref += x;
              mag += std::abs(x);
            }
            ASSERT_NEAR(o[i * ldo + c], ref,
                        2.0 * (cols + 1) * attn_test::eps<float>() * std::max(mag, 1.0));
          }
          for (index_t c = dv; c < ldo; ++c) ASSERT_EQ(o[i * ldo + c], o0[i * ldo + c]);
        }
      }
}

/// vdpbf16ps scores: odd d, every row and key tail.
TEST(KernelsBf16, ScoreMatchesDoubleLoop) {
  if (!attn::isa_supported(Isa::avx512_bf16)) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  check_bf16_score(&attn::kernels::avx512_bf16::score, {1, 13, 14, 15, 47}, {1, 31, 32, 33, 101},
                   {1, 7, 64, 111});
}

/// vdpbf16ps P·V: odd key counts, every row and column tail.
TEST(KernelsBf16, PvMatchesDoubleLoop) {
  if (!attn::isa_supported(Isa::avx512_bf16)) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  check_bf16_pv(&attn::kernels::avx512_bf16::accumulate_pv, {1, 13, 14, 15, 31},
                {1, 2, 15, 16, 17, 33, 64, 257}, {1, 16, 17, 64, 80});
}

/// AMX scores: one and two 16-row tiles, rows left to AVX512-BF16 below and
/// above them, every 32-element depth step up to 128.
TEST(KernelsAmx, ScoreMatchesDoubleLoop) {
  if (!attn::isa_supported(Isa::amx_bf16)) GTEST_SKIP() << "no AMX-BF16 on this CPU (or OS)";
  check_bf16_score(&attn::kernels::amx_bf16::score, {1, 15, 16, 17, 31, 32, 33, 48, 50},
                   {1, 31, 32, 33, 101}, {32, 64, 96, 128});
}

/// AMX P·V: whole 32-key steps with the key tail on AVX512-BF16, one and two
/// column tiles, row tails.
TEST(KernelsAmx, PvMatchesDoubleLoop) {
  if (!attn::isa_supported(Isa::amx_bf16)) GTEST_SKIP() << "no AMX-BF16 on this CPU (or OS)";
  check_bf16_pv(&attn::kernels::amx_bf16::accumulate_pv, {1, 15, 16, 17, 32, 33, 48},
                {1, 2, 31, 32, 33, 64, 65, 257}, {16, 17, 32, 48, 64, 80, 128});
}
#endif

// ----------------------------------------------------------------- dispatch --

TEST(Dispatch, PortableAlwaysRunsAndBestIsLast) {
  const auto isas = attn::supported_isas();
  ASSERT_FALSE(isas.empty());
  EXPECT_EQ(isas.front(), Isa::portable);
  // The widest, or avx512 where bf16 products do not pay (Intel).
  EXPECT_TRUE(attn::best_isa() == isas.back() ||
              (isas.back() == Isa::avx512_bf16 && attn::best_isa() == Isa::avx512));
}

TEST(Dispatch, SetIsaForcesAndResets) {
  for (Isa isa : attn::supported_isas()) {
    attn::set_isa(isa);
    EXPECT_EQ(attn::active_isa(), isa);
    EXPECT_EQ(attn::kernels::kernel_set<float>(isa).isa,
              isa == Isa::avx512_bf16 || isa == Isa::amx_bf16 ? Isa::avx512 : isa);
  }
  attn::reset_isa();
  EXPECT_NO_THROW(attn::active_isa());
}

TEST(Dispatch, RefusesWhatTheCpuCannotRun) {
  const Isa before = attn::active_isa();
  const Isa all[] = {Isa::portable,    Isa::avx2,     Isa::avx512,
                     Isa::avx512_bf16, Isa::amx_bf16, static_cast<Isa>(7)};
  for (Isa isa : all) {
    if (attn::isa_supported(isa)) continue;
    try {
      attn::set_isa(isa);
      FAIL() << "set_isa accepted " << attn::isa_name(isa);
    } catch (const attn::Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("'") + attn::isa_name(isa) + "'"),
                std::string::npos)
          << e.what();
      EXPECT_NE(std::string(e.what()).find("portable"), std::string::npos) << e.what();
    }
    EXPECT_EQ(attn::active_isa(), before) << "a refused set_isa changed the choice";
  }
}

}  // namespace
