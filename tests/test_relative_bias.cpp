// T5 relative position bias and the 2-D (Swin) relative bias: buckets against
// T5's formula written out by hand, attention against the fp64 reference run
// with the same bias written out as a dense additive_bias, the table
// derivatives against finite differences, and argument errors.
#include "support.hpp"
#include "type_names.hpp"

#include <attn/policy/relative_bias_2d.hpp>
#include <attn/policy/t5_bias.hpp>

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace attn_test;

std::vector<double> random_table(index_t n, std::uint32_t seed) {
  std::vector<double> t(static_cast<std::size_t>(n));
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  for (auto& x : t) x = dist(gen);
  return t;
}

/// A dense [1, H, Lq, Lk] bias from an element function f(h, i, j).
template <class F>
struct DenseBias {
  std::vector<double> buf;
  attn::TensorView<const double, 4> view;
  DenseBias(index_t h, index_t lq, index_t lk, F f) : buf(static_cast<std::size_t>(h * lq * lk)) {
    for (index_t a = 0; a < h; ++a)
      for (index_t i = 0; i < lq; ++i)
        for (index_t j = 0; j < lk; ++j)
          buf[static_cast<std::size_t>((a * lq + i) * lk + j)] = f(a, i, j);
    view = attn::TensorView<const double, 4>(buf.data(), {1, h, lq, lk});
  }
};
template <class F>
DenseBias<F> dense_bias(index_t h, index_t lq, index_t lk, F f) {
  return DenseBias<F>(h, lq, lk, f);
}

// ------------------------------------------------------------- T5 buckets --

// T5 with 32 buckets, max_distance 128. Bidirectional: 16 buckets a side, 8
// exact; n > 0 adds 16. Large magnitudes: 8 + trunc(ln(a/8) / ln(16) · 8).
TEST(T5Bucket, BidirectionalByHand) {
  for (index_t n = -7; n <= 0; ++n) EXPECT_EQ(attn::t5_bucket(n, true, 32, 128), -n) << n;
  for (index_t n = 1; n <= 7; ++n) EXPECT_EQ(attn::t5_bucket(n, true, 32, 128), 16 + n) << n;
  EXPECT_EQ(attn::t5_bucket(-8, true, 32, 128), 8);  // ln(1) = 0
  EXPECT_EQ(attn::t5_bucket(8, true, 32, 128), 24);
  EXPECT_EQ(attn::t5_bucket(-20, true, 32, 128), 10);  // 8·ln(2.5)/ln(16) = 2.64
  EXPECT_EQ(attn::t5_bucket(20, true, 32, 128), 26);
  EXPECT_EQ(attn::t5_bucket(-100, true, 32, 128), 15);  // 8·ln(12.5)/ln(16) = 7.29
  EXPECT_EQ(attn::t5_bucket(-127, true, 32, 128), 15);  // 7.97
  EXPECT_EQ(attn::t5_bucket(-128, true, 32, 128), 15);  // 8, capped at 15
  EXPECT_EQ(attn::t5_bucket(128, true, 32, 128), 31);
  EXPECT_EQ(attn::t5_bucket(100000, true, 32, 128), 31);
  EXPECT_EQ(attn::t5_bucket(-100000, true, 32, 128), 15);
}

// Unidirectional (decoder): 32 buckets for n <= 0, 16 exact; n > 0 is bucket
// 0. Large: 16 + trunc(ln(a/16) / ln(8) · 16).
TEST(T5Bucket, UnidirectionalByHand) {
  for (index_t n = 0; n <= 15; ++n) EXPECT_EQ(attn::t5_bucket(-n, false, 32, 128), n) << n;
  for (index_t n = 1; n <= 50; ++n) EXPECT_EQ(attn::t5_bucket(n, false, 32, 128), 0) << n;
  EXPECT_EQ(attn::t5_bucket(-16, false, 32, 128), 16);
  EXPECT_EQ(attn::t5_bucket(-40, false, 32, 128), 23);   // 16·ln(2.5)/ln(8) = 7.05
  EXPECT_EQ(attn::t5_bucket(-127, false, 32, 128), 31);  // 15.94
  EXPECT_EQ(attn::t5_bucket(-128, false, 32, 128), 31);  // 16, capped
  EXPECT_EQ(attn::t5_bucket(-5000, false, 32, 128), 31);
}

// Buckets never decrease with the magnitude and stay in range.
TEST(T5Bucket, MonotoneAndInRange) {
  for (bool bidir : {true, false})
    for (index_t nb : {4, 8, 32, 64}) {
      index_t prev = 0;
      for (index_t a = 0; a < 1000; ++a) {
        const index_t b = attn::t5_bucket(-a, bidir, nb, 100);
        EXPECT_GE(b, prev);
        EXPECT_LT(b, bidir ? nb / 2 : nb);
        prev = b;
      }
    }
}

// ------------------------------------------------------------- T5 attention --

template <class T>
class T5Attention : public ::testing::Test {};
TYPED_TEST_SUITE(T5Attention, FloatTypes, StorageTypeNames);

TYPED_TEST(T5Attention, MatchesDenseBias) {
  using T = TypeParam;
  for (const Problem& p :
       {make(1, 2, 2, 1, 1, 16, 16), make(1, 2, 1, 127, 129, 17, 11),
        make(2, 4, 2, 70, 300, 33, 33, Layout::bshd), make(1, 1, 1, 300, 40, 8, 8)})
    for (bool bidir : {true, false}) {
      SCOPED_TRACE(bidir ? "bidirectional" : "unidirectional");
      const index_t nb = 32, md = 40;
      const std::vector<double> table = random_table(nb * p.Hq, 3);
      const auto bias = dense_bias(p.Hq, p.Lq, p.Lk, [&](index_t h, index_t i, index_t j) {
        const index_t n = j - (i + p.Lk - p.Lq);
        return table[static_cast<std::size_t>(attn::t5_bucket(n, bidir, nb, md) * p.Hq + h)];
      });
      const auto mod = attn::t5_bias(table, nb, md, bidir);
      attn::AttentionOptions opt;
      opt.block_q = 32;
      opt.block_k = 48;
      const Inputs<T> in(p, 5);
      std::vector<float> lse_ref, lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
      const Tensor<double> ref =
          reference_output(in, p, attn::causal(), attn::additive_bias(bias.view), opt, &lse_ref);
      Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
      opt.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
      attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(), mod, opt);
      expect_close(out, ref, lse, lse_ref, tolerance<T>(p.D, p.Lk, max_abs(in.v), 8.0));
    }
}

TYPED_TEST(T5Attention, ElementFormEqualsTileForm) {
  using T = TypeParam;
  attn::AttentionShape s;
  s.batch = 1, s.q_heads = 3, s.kv_heads = 1, s.lq = 37, s.lk = 90, s.d = 8, s.dv = 8;
  const auto mod = attn::t5_bias(random_table(16 * 3, 9), 16, 50, true).bind(s);
  std::vector<T> tile(37 * 90, T(0.5));
  mod.apply_tile(0, 2, 0, 0, tile.data(), 90, 37, 90);
  for (index_t i = 0; i < 37; ++i)
    for (index_t j = 0; j < 90; ++j)
      ASSERT_EQ(tile[static_cast<std::size_t>(i * 90 + j)], mod(0, 2, i, j, T(0.5)));
}

// -------------------------------------------------------------- 2-D bias --

template <class T>
class Bias2dAttention : public ::testing::Test {};
TYPED_TEST_SUITE(Bias2dAttention, FloatTypes, StorageTypeNames);

TYPED_TEST(Bias2dAttention, MatchesSwinIndexWrittenOut) {
  using T = TypeParam;
  for (const auto& grid :
       std::vector<std::pair<index_t, index_t>>{{1, 1}, {7, 7}, {5, 13}, {12, 11}})
    for (const Layout layout : {Layout::bhsd, Layout::bshd}) {
      const index_t gh = grid.first, gw = grid.second;
      const index_t n = gh * gw, H = 3;
      const Problem p = make(2, H, 1, n, n, 19, 12, layout);
      const std::vector<double> table = random_table((2 * gh - 1) * (2 * gw - 1) * H, 4);
      const auto bias = dense_bias(H, n, n, [&](index_t h, index_t i, index_t j) {
        // Swin: relative_coords = coords_q - coords_k, + (Wh - 1, Ww - 1), dy·(2Ww - 1) + dx
        const index_t dy = i / gw - j / gw + gh - 1, dx = i % gw - j % gw + gw - 1;
        return table[static_cast<std::size_t>((dy * (2 * gw - 1) + dx) * H + h)];
      });
      attn::AttentionOptions opt;
      opt.block_q = 16;
      opt.block_k = 24;
      const Inputs<T> in(p, 8);
      std::vector<float> lse_ref, lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
      const Tensor<double> ref =
          reference_output(in, p, attn::no_mask(), attn::additive_bias(bias.view), opt, &lse_ref);
      Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
      opt.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
      attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::no_mask(),
                             attn::relative_bias_2d(table, gh, gw), opt);
      expect_close(out, ref, lse, lse_ref, tolerance<T>(p.D, p.Lk, max_abs(in.v), 8.0));
    }
}

// --------------------------------------------------------- table gradients --

/// f(table) = Σ_{h,i,j} G[h,i,j] · bias(h, i, j; table): a linear function of
/// the table, so its finite difference per entry is its derivative exactly
/// (up to rounding); accumulate_table_grad over tiles of any size must equal it.
template <class Mod>
void expect_table_grad(const std::vector<double>& table, const attn::AttentionShape& s,
                       const std::function<Mod(const std::vector<double>&)>& make_mod) {
  const index_t H = s.q_heads;
  std::vector<double> g(static_cast<std::size_t>(H * s.lq * s.lk));
  std::mt19937 gen(17);
  std::normal_distribution<double> dist(0.0, 1.0);
  for (auto& x : g) x = dist(gen);
  auto f = [&](const std::vector<double>& t) {
    const Mod m = make_mod(t).bind(s);
    double sum = 0;
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < s.lq; ++i)
        for (index_t j = 0; j < s.lk; ++j)
          sum += g[static_cast<std::size_t>((h * s.lq + i) * s.lk + j)] * m(0, h, i, j, 0.0);
    return sum;
  };
  // Analytic: tiles of 7 × 5 (edges included).
  const Mod m = make_mod(table).bind(s);
  std::vector<double> dtable(table.size(), 0.0);
  for (index_t h = 0; h < H; ++h)
    for (index_t q0 = 0; q0 < s.lq; q0 += 7)
      for (index_t k0 = 0; k0 < s.lk; k0 += 5) {
        const index_t rows = std::min<index_t>(7, s.lq - q0),
                      cols = std::min<index_t>(5, s.lk - k0);
        const double* ds = &g[static_cast<std::size_t>((h * s.lq + q0) * s.lk + k0)];
        m.accumulate_table_grad(0, h, q0, k0, ds, s.lk, rows, cols, dtable.data());
      }
  const double step = 0.5;
  for (std::size_t e = 0; e < table.size(); ++e) {
    std::vector<double> plus = table, minus = table;
    plus[e] += step;
    minus[e] -= step;
    const double fd = (f(plus) - f(minus)) / (2 * step);
    ASSERT_NEAR(dtable[e], fd, 1e-9 * (1 + std::abs(fd))) << "entry " << e;
  }
}

TEST(TableGradients, T5MatchesFiniteDifferences) {
  attn::AttentionShape s;
  s.batch = 1, s.q_heads = 2, s.kv_heads = 1, s.lq = 23, s.lk = 31, s.d = 4, s.dv = 4;
  for (bool bidir : {true, false}) {
    const index_t nb = 8, md = 12;
    expect_table_grad<attn::T5Bias>(random_table(nb * 2, 2), s, [&](const std::vector<double>& t) {
      return attn::t5_bias(t, nb, md, bidir);
    });
  }
}

TEST(TableGradients, RelativeBias2dMatchesFiniteDifferences) {
  attn::AttentionShape s;
  const index_t gh = 4, gw = 5;
  s.batch = 1, s.q_heads = 2, s.kv_heads = 1, s.lq = gh * gw, s.lk = gh * gw, s.d = 4, s.dv = 4;
  expect_table_grad<attn::RelativeBias2d>(
      random_table((2 * gh - 1) * (2 * gw - 1) * 2, 3), s,
      [&](const std::vector<double>& t) { return attn::relative_bias_2d(t, gh, gw); });
}

// ------------------------------------------------------------------ errors --

template <class Mod>
void expect_error(const Mod& mod, const std::string& what) {
  const Problem p = make(1, 2, 2, 12, 12, 8, 8);
  const Inputs<float> in(p, 1);
  Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
  for (auto& x : out.buf) x = 42.f;
  try {
    attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::no_mask(), mod);
    FAIL() << "no error for " << what;
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
  for (float x : out.buf) ASSERT_EQ(x, 42.f);
}

TEST(RelativeBiasErrors, ThrowBeforeWriting) {
  expect_error(attn::t5_bias(std::vector<double>(32 * 3), 32, 128, true),
               "t5_bias table has 3 heads ([32, 3]), but q has 2 heads");
  expect_error(attn::t5_bias(std::vector<double>(33), 32, 128, true),
               "t5_bias table has 33 entries, not a multiple of num_buckets 32");
  expect_error(attn::t5_bias(std::vector<double>(64), 32, 8, true),
               "t5_bias max_distance is 8, must be > the 8 exact buckets");
  std::vector<double> nan_table(64);
  nan_table[5] = std::nan("");
  expect_error(attn::t5_bias(nan_table, 32, 128, true), "t5_bias table entry 5 is nan");
  expect_error(attn::relative_bias_2d(std::vector<double>(2 * 5 * 7), 3, 5),
               "relative_bias_2d grid 3 x 5 has 15 tokens, but Lq = 12 and Lk = 12");
  expect_error(attn::relative_bias_2d(std::vector<double>(2 * 5 * 7 + 1), 3, 4),
               "relative_bias_2d table has 71 entries, not a multiple of (2·3 - 1)·(2·4 - 1) = 35");
}

}  // namespace
