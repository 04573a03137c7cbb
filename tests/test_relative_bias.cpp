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

/// dL/dtable from one attention_backward call (L = Σ out ∘ dout), in T,
/// against the fp64 reference backward, and the reference against central
/// differences of the reference forward. B = 2 and GQA: every batch and the
/// query heads of a group add into the table, in one task per KV head.
template <class T, class Make, class Mask>
void expect_backward_table_grad(const Problem& p, index_t rows, const Make& make_mod,
                                const Mask& mask) {
  const Inputs<T> in(p, 5);
  const Tensor<T> dout = random_tensor<T>(p.B, p.Hq, p.Lq, p.Dv, 8);
  const std::vector<double> table = random_table(rows * p.Hq, 9);
  const Tensor<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v),
                       d64 = to_double(dout);
  // reference dtable, and central differences of the reference forward
  std::vector<double> ref(table.size(), -1.0);
  {
    Tensor<double> dq(p.B, p.Hq, p.Lq, p.D), dk(p.B, p.Hkv, p.Lk, p.D), dv(p.B, p.Hkv, p.Lk, p.Dv);
    const attn::TensorView<double, 2> g(ref.data(), {rows, p.Hq});
    attn::reference::attention_backward(q.cview(), k.cview(), v.cview(), d64.cview(), dq.view,
                                        dk.view, dv.view, mask, make_mod(table).with_table_grad(g));
  }
  auto loss = [&](const std::vector<double>& t) {
    Tensor<double> out(p.B, p.Hq, p.Lq, p.Dv);
    attn::reference::attention(q.cview(), k.cview(), v.cview(), out.view, mask, make_mod(t));
    double sum = 0;
    for (std::size_t i = 0; i < out.buf.size(); ++i) sum += out.buf[i] * d64.buf[i];
    return sum;
  };
  double ref_max = 0;
  for (std::size_t e = 0; e < table.size(); ++e) {
    std::vector<double> plus = table, minus = table;
    plus[e] += 1e-5;
    minus[e] -= 1e-5;
    const double fd = (loss(plus) - loss(minus)) / 2e-5;
    ASSERT_NEAR(ref[e], fd, 1e-8 * (1 + std::abs(fd))) << "entry " << e;
    ref_max = std::max(ref_max, std::abs(ref[e]));
  }
  // the engine, forward then backward in T, 1 and 3 threads
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv);
  std::vector<float> lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
  attn::AttentionOptions fo;
  fo.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, mask, make_mod(table), fo);
  std::vector<double> got[2];
  for (int t = 0; t < 2; ++t) {
    got[t].assign(table.size(), 42.0);  // the backward zeroes it first
    Tensor<T> dq(p.B, p.Hq, p.Lq, p.D), dk(p.B, p.Hkv, p.Lk, p.D), dv(p.B, p.Hkv, p.Lk, p.Dv);
    attn::AttentionOptions bo;
    bo.num_threads = t == 0 ? 1 : 3;
    const attn::TensorView<double, 2> g(got[t].data(), {rows, p.Hq});
    attn::attention_backward(in.q.view, in.k.view, in.v.view, out.cview(),
                             attn::TensorView<const float, 3>(fo.lse.float_view()), dout.cview(),
                             dq.view, dk.view, dv.view, mask, make_mod(table).with_table_grad(g),
                             bo);
  }
  EXPECT_EQ(got[0], got[1]) << "bitwise across thread counts";
  // Each entry sums many dS terms, each with the engine's relative error (a
  // few eps<T>, and eps<float>·|lse| from P read through the float lse):
  // 64·max(eps<T>, eps<float>) of the largest entry, far below a misplaced term.
  const double tol = 64 * std::max(eps<T>(), eps<float>()) * std::max(ref_max, 1.0);
  for (std::size_t e = 0; e < table.size(); ++e)
    EXPECT_NEAR(got[0][e], ref[e], tol) << "entry " << e << " " << p.str();
}

TYPED_TEST(T5Attention, T5TableGradientFromAttentionBackward) {
  const Problem p = make(2, 4, 2, 13, 17, 8, 6);
  for (bool bidir : {true, false})
    expect_backward_table_grad<TypeParam>(
        p, 8, [&](const std::vector<double>& t) { return attn::t5_bias(t, 8, 12, bidir); },
        attn::causal());
}

TYPED_TEST(Bias2dAttention, RelativeBias2dTableGradientFromAttentionBackward) {
  const index_t gh = 3, gw = 4;
  const Problem p = make(2, 4, 2, gh * gw, gh * gw, 8, 8);
  expect_backward_table_grad<TypeParam>(
      p, (2 * gh - 1) * (2 * gw - 1),
      [&](const std::vector<double>& t) { return attn::relative_bias_2d(t, gh, gw); },
      attn::no_mask());
}

TEST(TableGradients, BackwardChecksTheGradientView) {
  const Problem p = make(1, 2, 1, 5, 5, 4, 4);
  const Inputs<double> in(p, 1);
  Tensor<double> out(p.B, p.Hq, p.Lq, p.Dv), dq(p.B, p.Hq, p.Lq, p.D), dk(p.B, p.Hkv, p.Lk, p.D),
      dv(p.B, p.Hkv, p.Lk, p.Dv);
  std::vector<float> lse(static_cast<std::size_t>(p.Hq * p.Lq));
  std::vector<double> g(7 * 2, 3.0);
  const attn::TensorView<const float, 3> l(lse.data(), {1, p.Hq, p.Lq});
  try {
    attn::attention_backward(in.q.view, in.k.view, in.v.view, out.cview(), l, out.cview(), dq.view,
                             dk.view, dv.view, attn::no_mask(),
                             attn::t5_bias(random_table(16, 1), 8, 12, true)
                                 .with_table_grad(attn::TensorView<double, 2>(g.data(), {7, 2})));
    FAIL() << "no error";
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find("t5_bias dtable has shape [7, 2]"), std::string::npos)
        << e.what();
  }
  for (double x : g) EXPECT_EQ(x, 3.0);
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
