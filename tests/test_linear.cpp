// Linear attention against its fp64 reference (materialised φ(Q)φ(K)ᵀ), the
// recurrent state (pieces and token-by-token decoding equal one call), FAVOR+
// reproducibility and its approximation of softmax attention, and bad input.
#include "support.hpp"

#include <attn/linear.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace attn_test;

// A [B, H, len, D] window of a view starting at sequence position l0.
template <class T>
attn::Tensor4<T> seq_slice(const attn::Tensor4<T>& t, index_t l0, index_t len) {
  return attn::Tensor4<T>(t.data() + l0 * t.stride(2), {t.extent(0), t.extent(1), len, t.extent(3)},
                          t.strides());
}

// Allowed |fast - fp64 reference| for linear attention with F features over lk
// keys: weights w_ij = φ(q_i)ᵀφ(k_j) >= 0 are F-term sums of non-negative
// terms and the output is Σ w v / (Σ w + eps), a near-convex combination of
// values, so the error model of softmax attention (support.hpp) applies with
// F in place of D; smax bounds the exponent range of the FAVOR+ features.
template <class T>
double linear_tolerance(index_t f, index_t lk, double vmax, double smax = 8.0) {
  return tolerance<T>(f, lk, vmax, smax);
}

// Runs linear_attention in T and the reference in double on the same inputs.
template <class T, class Map>
void expect_linear_matches_reference(const Problem& p, const Map& map,
                                     attn::LinearAttentionOptions opt, std::uint32_t seed = 7) {
  SCOPED_TRACE(p.str() + (opt.causal ? " causal" : " non-causal") +
               " chunk=" + std::to_string(opt.chunk));
  const Inputs<T> in(p, seed);
  const Tensor<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v);
  Tensor<double> ref(p.B, p.Hq, p.Lq, p.Dv);
  attn::reference::linear_attention(q.cview(), k.cview(), v.cview(), ref.view, map, opt);
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
  attn::linear_attention(in.q.cview(), in.k.cview(), in.v.cview(), out.view, map, opt);
  EXPECT_LE(max_abs_diff(out, ref),
            linear_tolerance<T>(map.num_features(p.D), p.Lk, max_abs(in.v)));
}

template <class T>
class LinearAttention : public ::testing::Test {};
// The empty third argument keeps clang -Wpedantic quiet about an empty __VA_ARGS__.
TYPED_TEST_SUITE(LinearAttention, FloatTypes, );

// ------------------------------------------------------------ reference --

TYPED_TEST(LinearAttention, EveryMapMatchesReferenceCausalAndNot) {
  Problem p;
  p.B = 2;
  p.Hq = 4;
  p.Hkv = 2;
  p.D = 24;
  p.Dv = 40;
  for (bool causal : {false, true})
    for (auto [lq, lk] : {std::pair<index_t, index_t>{1, 1}, {100, 100}, {30, 70}, {70, 30}}) {
      p.Lq = lq;
      p.Lk = lk;
      attn::LinearAttentionOptions opt;
      opt.causal = causal;
      expect_linear_matches_reference<TypeParam>(p, attn::elu_plus_one(), opt);
      expect_linear_matches_reference<TypeParam>(p, attn::relu(), opt);
      expect_linear_matches_reference<TypeParam>(p, attn::favor_plus(p.D, 48, 3), opt);
    }
}

// N not a multiple of the chunk, chunk larger than N, chunk of one row.
TYPED_TEST(LinearAttention, EveryChunkSizeMatchesReference) {
  Problem p;
  p.Hq = 2;
  p.Hkv = 2;
  p.Lq = p.Lk = 131;
  p.D = 16;
  p.Dv = 24;
  for (index_t chunk : {1, 7, 64, 128, 200}) {
    attn::LinearAttentionOptions opt;
    opt.causal = true;
    opt.chunk = chunk;
    expect_linear_matches_reference<TypeParam>(p, attn::elu_plus_one(), opt);
    expect_linear_matches_reference<TypeParam>(p, attn::favor_plus(p.D, 40, 1), opt);
    opt.causal = false;
    expect_linear_matches_reference<TypeParam>(p, attn::elu_plus_one(), opt);
  }
}

// GQA and MQA in both memory layouts; several query heads read one state.
TYPED_TEST(LinearAttention, GroupedHeadsInBothLayouts) {
  for (index_t hkv : {6, 2, 1})
    for (Layout layout : {Layout::bhsd, Layout::bshd})
      for (bool causal : {false, true}) {
        Problem p;
        p.B = 2;
        p.Hq = 6;
        p.Hkv = hkv;
        p.Lq = p.Lk = 77;
        p.D = 16;
        p.Dv = 8;
        p.layout = layout;
        attn::LinearAttentionOptions opt;
        opt.causal = causal;
        opt.chunk = 32;
        expect_linear_matches_reference<TypeParam>(p, attn::elu_plus_one(), opt);
      }
}

// float q, k, v with a double output accumulate in double (the inputs are
// converted, not read in place), and so does the state.
TEST(LinearAttentionMixed, FloatInputsDoubleOutput) {
  Problem p;
  p.B = 2;
  p.Hq = 4;
  p.Hkv = 2;
  p.Lq = p.Lk = 45;
  p.D = 12;
  p.Dv = 7;
  p.layout = Layout::bshd;
  const Inputs<float> in(p, 17);
  const Tensor<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v);
  attn::LinearAttentionOptions opt;
  opt.causal = true;
  opt.chunk = 16;
  const auto map = attn::favor_plus(p.D, 24, 2);
  Tensor<double> ref(p.B, p.Hq, p.Lq, p.Dv), out(p.B, p.Hq, p.Lq, p.Dv);
  attn::reference::linear_attention(q.cview(), k.cview(), v.cview(), ref.view, map, opt);
  attn::LinearStateBuffer<double> state(p.B, p.Hkv, 24, p.Dv);
  attn::linear_attention(in.q.cview(), in.k.cview(), in.v.cview(), out.view, map, state.state(),
                         opt);
  EXPECT_LE(max_abs_diff(out, ref), linear_tolerance<double>(24, p.Lk, max_abs(in.v)));
}

// Results depend on the task, not on the worker that ran it.
TYPED_TEST(LinearAttention, ThreadCountDoesNotChangeTheResult) {
  Problem p;
  p.B = 2;
  p.Hq = 4;
  p.Hkv = 4;
  p.Lq = p.Lk = 90;
  const Inputs<TypeParam> in(p, 5);
  Tensor<TypeParam> one(p.B, p.Hq, p.Lq, p.Dv), two(p.B, p.Hq, p.Lq, p.Dv);
  attn::LinearAttentionOptions opt;
  opt.causal = true;
  opt.num_threads = 1;
  attn::linear_attention(in.q.view, in.k.view, in.v.view, one.view, attn::elu_plus_one(), opt);
  opt.num_threads = 2;
  attn::linear_attention(in.q.view, in.k.view, in.v.view, two.view, attn::elu_plus_one(), opt);
  EXPECT_EQ(one.buf, two.buf);
}

// --------------------------------------------------------------- state --

// The state after a call holds S = Σ φ(k_j) v_jᵀ and z = Σ φ(k_j), here
// computed directly from the elu + 1 definition.
TYPED_TEST(LinearAttention, StateHoldsTheSumsOverKeys) {
  Problem p;
  p.B = 2;
  p.Hq = 2;
  p.Hkv = 1;
  p.Lq = p.Lk = 50;
  p.D = 8;
  p.Dv = 5;
  const Inputs<TypeParam> in(p, 9);
  Tensor<TypeParam> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::LinearStateBuffer<TypeParam> state(p.B, p.Hkv, p.D, p.Dv);
  attn::LinearAttentionOptions opt;
  opt.causal = true;
  opt.chunk = 16;
  attn::linear_attention(in.q.view, in.k.view, in.v.view, out.view, attn::elu_plus_one(),
                         state.state(), opt);
  for (index_t b = 0; b < p.B; ++b)
    for (index_t r = 0; r < p.D; ++r) {
      double z = 0;
      std::vector<double> s(static_cast<std::size_t>(p.Dv), 0.0);
      for (index_t j = 0; j < p.Lk; ++j) {
        const double x = static_cast<double>(in.k(b, 0, j, r));
        const double phi = x > 0 ? x + 1 : std::exp(x);
        z += phi;
        for (index_t c = 0; c < p.Dv; ++c)
          s[static_cast<std::size_t>(c)] += phi * static_cast<double>(in.v(b, 0, j, c));
      }
      const double tol = linear_tolerance<TypeParam>(p.D, p.Lk, 4.0) * p.Lk * 4.0;
      EXPECT_NEAR(static_cast<double>(state.state().z(b, 0, r)), z, tol);
      for (index_t c = 0; c < p.Dv; ++c)
        EXPECT_NEAR(static_cast<double>(state.state().s(b, 0, r, c)),
                    s[static_cast<std::size_t>(c)], tol);
    }
}

// Causal calls over consecutive pieces, carrying the state, equal one call
// (outputs and final state).
TYPED_TEST(LinearAttention, PiecesWithCarriedStateEqualOneCall) {
  Problem p;
  p.B = 1;
  p.Hq = 4;
  p.Hkv = 2;
  p.Lq = p.Lk = 150;
  p.D = 16;
  p.Dv = 12;
  const Inputs<TypeParam> in(p, 21);
  const auto map = attn::favor_plus(p.D, 32, 8);
  const index_t f = map.num_features(p.D);
  attn::LinearAttentionOptions opt;
  opt.causal = true;
  opt.chunk = 32;

  Tensor<TypeParam> whole(p.B, p.Hq, p.Lq, p.Dv), pieces(p.B, p.Hq, p.Lq, p.Dv);
  attn::LinearStateBuffer<TypeParam> s_whole(p.B, p.Hkv, f, p.Dv), s_pieces(p.B, p.Hkv, f, p.Dv);
  attn::linear_attention(in.q.view, in.k.view, in.v.view, whole.view, map, s_whole.state(), opt);
  const index_t cuts[] = {0, 37, 101, 150};
  for (int i = 0; i < 3; ++i) {
    const index_t l0 = cuts[i], len = cuts[i + 1] - cuts[i];
    attn::linear_attention(seq_slice(in.q.view, l0, len), seq_slice(in.k.view, l0, len),
                           seq_slice(in.v.view, l0, len), seq_slice(pieces.view, l0, len), map,
                           s_pieces.state(), opt);
  }
  const double tol = linear_tolerance<TypeParam>(f, p.Lk, max_abs(in.v));
  EXPECT_LE(max_abs_diff(pieces, whole), tol);
  const auto& a = s_whole.state();
  const auto& b = s_pieces.state();
  for (index_t h = 0; h < p.Hkv; ++h)
    for (index_t r = 0; r < f; ++r) {
      const double z = static_cast<double>(a.z(0, h, r));
      EXPECT_NEAR(static_cast<double>(b.z(0, h, r)), z, tol * z);
      for (index_t c = 0; c < p.Dv; ++c)
        EXPECT_NEAR(static_cast<double>(b.s(0, h, r, c)), static_cast<double>(a.s(0, h, r, c)),
                    tol * z * max_abs(in.v));
    }
}

// A state whose rows are not contiguous (here: every other element of a
// buffer twice the size) is copied in and out instead of used in place; the
// arithmetic is the same, so outputs and final state are bit for bit equal.
TYPED_TEST(LinearAttention, StridedStateEqualsContiguousState) {
  Problem p;
  p.B = 2;
  p.Hq = p.Hkv = 2;
  p.Lq = p.Lk = 60;
  p.D = 8;
  p.Dv = 5;
  const Inputs<TypeParam> in(p, 5);
  attn::LinearAttentionOptions opt;
  opt.causal = true;
  attn::LinearStateBuffer<TypeParam> dense(p.B, p.Hkv, p.D, p.Dv);
  std::vector<TypeParam> s_buf(static_cast<std::size_t>(2 * p.B * p.Hkv * p.D * p.Dv)),
      z_buf(static_cast<std::size_t>(2 * p.B * p.Hkv * p.D));
  const attn::LinearState<TypeParam> strided{
      attn::TensorView<TypeParam, 4>(s_buf.data(), {p.B, p.Hkv, p.D, p.Dv},
                                     {2 * p.Hkv * p.D * p.Dv, 2 * p.D * p.Dv, 2 * p.Dv, 2}),
      attn::TensorView<TypeParam, 3>(z_buf.data(), {p.B, p.Hkv, p.D},
                                     {2 * p.Hkv * p.D, 2 * p.D, 2})};
  Tensor<TypeParam> a(p.B, p.Hq, p.Lq, p.Dv), b(p.B, p.Hq, p.Lq, p.Dv);
  for (int call = 0; call < 2; ++call) {  // the second call starts from a non-zero state
    attn::linear_attention(in.q.view, in.k.view, in.v.view, a.view, attn::elu_plus_one(),
                           dense.state(), opt);
    attn::linear_attention(in.q.view, in.k.view, in.v.view, b.view, attn::elu_plus_one(), strided,
                           opt);
    EXPECT_EQ(max_abs_diff(a, b), 0.0);
  }
  for (index_t i = 0; i < p.B; ++i)
    for (index_t h = 0; h < p.Hkv; ++h)
      for (index_t r = 0; r < p.D; ++r) {
        EXPECT_EQ(strided.z(i, h, r), dense.state().z(i, h, r));
        for (index_t c = 0; c < p.Dv; ++c)
          EXPECT_EQ(strided.s(i, h, r, c), dense.state().s(i, h, r, c));
      }
}

// Decoding one token at a time (Lq = Lk = 1 per call) equals one causal call.
TYPED_TEST(LinearAttention, TokenByTokenDecodingEqualsOneCausalCall) {
  Problem p;
  p.B = 2;
  p.Hq = 3;
  p.Hkv = 1;
  p.Lq = p.Lk = 70;
  p.D = 12;
  p.Dv = 20;
  const Inputs<TypeParam> in(p, 4);
  attn::LinearAttentionOptions opt;
  opt.causal = true;
  Tensor<TypeParam> whole(p.B, p.Hq, p.Lq, p.Dv), decoded(p.B, p.Hq, p.Lq, p.Dv);
  attn::linear_attention(in.q.view, in.k.view, in.v.view, whole.view, attn::elu_plus_one(), opt);
  attn::LinearStateBuffer<TypeParam> state(p.B, p.Hkv, p.D, p.Dv);
  for (index_t t = 0; t < p.Lq; ++t)
    attn::linear_attention(seq_slice(in.q.view, t, 1), seq_slice(in.k.view, t, 1),
                           seq_slice(in.v.view, t, 1), seq_slice(decoded.view, t, 1),
                           attn::elu_plus_one(), state.state(), opt);
  EXPECT_LE(max_abs_diff(decoded, whole), linear_tolerance<TypeParam>(p.D, p.Lk, max_abs(in.v)));
}

// Non-causal with a state: the queries see the earlier keys (in the state)
// and all of this call's keys, as one call over the concatenated keys.
TYPED_TEST(LinearAttention, NonCausalStateAddsEarlierKeys) {
  Problem p;
  p.Hq = 2;
  p.Hkv = 2;
  p.Lq = 40;
  p.Lk = 90;
  p.D = 8;
  p.Dv = 8;
  const Inputs<TypeParam> in(p, 13);
  const Tensor<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v);
  Tensor<double> ref(p.B, p.Hq, p.Lq, p.Dv);
  attn::reference::linear_attention(q.cview(), k.cview(), v.cview(), ref.view, attn::relu());

  attn::LinearStateBuffer<TypeParam> state(p.B, p.Hkv, p.D, p.Dv);
  Tensor<TypeParam> first(p.B, p.Hq, p.Lq, p.Dv), out(p.B, p.Hq, p.Lq, p.Dv);
  const index_t cut = 55;
  attn::linear_attention(in.q.view, seq_slice(in.k.view, 0, cut), seq_slice(in.v.view, 0, cut),
                         first.view, attn::relu(), state.state());
  attn::linear_attention(in.q.view, seq_slice(in.k.view, cut, p.Lk - cut),
                         seq_slice(in.v.view, cut, p.Lk - cut), out.view, attn::relu(),
                         state.state());
  EXPECT_LE(max_abs_diff(out, ref), linear_tolerance<TypeParam>(p.D, p.Lk, max_abs(in.v)));
}

// elu + 1 element by element, against std::exp in double: ordinary values of
// both signs (every lane of a vector and a tail), and the special values,
// -inf -> 0, +inf -> +inf, NaN -> NaN, -0 -> 1.
TYPED_TEST(LinearAttention, EluPlusOneElementwise) {
  using T = TypeParam;
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> xs = {-inf, inf, std::nan(""), -0.0, 0.0, -87.0, -100.0, 30.0};
  for (int i = 0; i < 37; ++i) xs.push_back(-6.0 + 0.33 * i);
  const index_t n = static_cast<index_t>(xs.size());
  std::vector<T> x(xs.begin(), xs.end()), phi(xs.size(), T(-7));
  attn::elu_plus_one().features<T>(
      attn::FeatureInput<T>(x.data(), 1, n, Eigen::OuterStride<>(n)),
      attn::FeatureOutput<T>(phi.data(), 1, n, Eigen::OuterStride<>(n)));
  for (index_t i = 0; i < n; ++i) {
    const double xi = static_cast<double>(x[i]), got = static_cast<double>(phi[i]);
    if (std::isnan(xi)) {
      EXPECT_TRUE(std::isnan(got)) << i;
      continue;
    }
    const double want = xi > 0 ? xi + 1 : std::exp(xi);
    if (std::isinf(want))
      EXPECT_EQ(got, want) << "x = " << xi;
    else  // a few ulp, relative; values below the smallest normal may flush to 0
      EXPECT_NEAR(got, want, 4 * eps<T>() * want + std::numeric_limits<T>::min()) << "x = " << xi;
  }
}

// -------------------------------------------------------------- FAVOR+ --

TEST(FavorPlus, SameSeedSameFeaturesOtherSeedOrRedrawOthers) {
  const auto a = attn::favor_plus(16, 40, 42), b = attn::favor_plus(16, 40, 42);
  const auto c = attn::favor_plus(16, 40, 43);
  EXPECT_EQ(a.projection(), b.projection());
  EXPECT_NE(a.projection(), c.projection());
  auto r = attn::favor_plus(16, 40, 42);
  r.redraw();
  EXPECT_EQ(r.draws(), 2);
  EXPECT_NE(r.projection(), a.projection());
  auto r2 = attn::favor_plus(16, 40, 42);
  r2.redraw();
  EXPECT_EQ(r.projection(), r2.projection());

  // Same seed, same outputs, bit for bit.
  Problem p;
  p.Lq = p.Lk = 33;
  const Inputs<float> in(p, 2);
  Tensor<float> o1(p.B, p.Hq, p.Lq, p.Dv), o2(p.B, p.Hq, p.Lq, p.Dv);
  attn::linear_attention(in.q.view, in.k.view, in.v.view, o1.view, a);
  attn::linear_attention(in.q.view, in.k.view, in.v.view, o2.view, b);
  EXPECT_EQ(o1.buf, o2.buf);
}

// Within a block of D rows the directions are orthogonal; norms vary (chi).
TEST(FavorPlus, DirectionsAreOrthogonalWithinABlock) {
  const index_t d = 8;
  const auto m = attn::favor_plus(d, 20, 5);  // blocks of 8, 8, 4 rows
  const auto& w = m.projection();
  ASSERT_EQ(w.rows(), 20);
  for (index_t r = 0; r < 20; ++r)
    for (index_t s = r + 1; s < 20 && s / d == r / d; ++s)
      EXPECT_NEAR(w.row(r).dot(w.row(s)), 0.0, 1e-12 * w.row(r).norm() * w.row(s).norm());
  EXPECT_GT(w.rowwise().norm().maxCoeff() - w.rowwise().norm().minCoeff(), 0.1);
}

// The stabilised features times their scales are the features of the
// definition φ(x)_r = exp(w_rᵀx' - |x'|²/2)/sqrt(F), x' = x·D^(-1/4).
TEST(FavorPlus, ScaledFeaturesEqualTheDefinition) {
  const index_t d = 6, f = 10, rows = 5;
  const auto m = attn::favor_plus(d, f, 11);
  const attn::RowMatrix<double> x = attn::RowMatrix<double>::Random(rows, d) * 1.5;
  attn::RowMatrix<double> qphi(rows, f), kphi(rows, f);
  Eigen::VectorXd log_scale(rows);
  const attn::FeatureInput<double> in(x.data(), rows, d, Eigen::OuterStride<>(d));
  m.queries<double>(in, attn::FeatureOutput<double>(qphi.data(), rows, f, Eigen::OuterStride<>(f)),
                    log_scale.data());
  m.keys<double>(in, attn::FeatureOutput<double>(kphi.data(), rows, f, Eigen::OuterStride<>(f)));
  const double quarter = std::pow(static_cast<double>(d), -0.25);
  for (index_t i = 0; i < rows; ++i) {
    const Eigen::VectorXd xs = x.row(i).transpose() * quarter;
    for (index_t r = 0; r < f; ++r) {
      const double phi =
          std::exp(m.projection().row(r).dot(xs) - 0.5 * xs.squaredNorm()) / std::sqrt(double(f));
      EXPECT_NEAR(qphi(i, r) * std::exp(log_scale(i)), phi, 1e-12 * phi);
      EXPECT_NEAR(kphi(i, r) * std::exp(m.key_log_scale()), phi, 1e-12 * phi);
      EXPECT_LE(kphi(i, r), 1.0);
      EXPECT_LE(qphi(i, r), 1.0);
    }
  }
}

// Mean |FAVOR+ linear attention - softmax attention| over 4 fixed seeds; q and k
// entries N(0, 0.25), where the estimator's variance is moderate.
double favor_error(index_t features) {
  Problem p;
  p.B = 1;
  p.Hq = p.Hkv = 2;
  p.Lq = p.Lk = 64;
  p.D = p.Dv = 16;
  double total = 0;
  for (std::uint32_t seed = 0; seed < 4; ++seed) {
    const Inputs<double> in(p, 100 + seed, 0.5);
    Tensor<double> soft(p.B, p.Hq, p.Lq, p.Dv), lin(p.B, p.Hq, p.Lq, p.Dv);
    attn::reference::attention(in.q.cview(), in.k.cview(), in.v.cview(), soft.view);
    attn::linear_attention(in.q.view, in.k.view, in.v.view, lin.view,
                           attn::favor_plus(p.D, features, 1000 + seed));
    for (std::size_t i = 0; i < soft.buf.size(); ++i) total += std::abs(soft.buf[i] - lin.buf[i]);
  }
  return total / (4.0 * static_cast<double>(p.B * p.Hq * p.Lq * p.Dv));
}

// The Monte-Carlo error falls like 1/sqrt(F): each 4× step should halve it;
// assert at least a 1/1.4 drop per step.
TEST(FavorPlus, ApproximationErrorFallsWithMoreFeatures) {
  double prev = favor_error(16);
  for (index_t f : {64, 256, 1024}) {
    const double err = favor_error(f);
    SCOPED_TRACE("features " + std::to_string(f));
    EXPECT_LT(err, prev / 1.4) << "previous " << prev;
    prev = err;
  }
  EXPECT_LT(prev, 0.05);
}

// ------------------------------------------------------------ bad input --

struct BadInput : ::testing::Test {
  Problem p;
  Inputs<float> in;
  Tensor<float> out;
  attn::LinearStateBuffer<float> state;
  BadInput() : p(make()), in(p, 1), out(p.B, p.Hq, p.Lq, p.Dv), state(1, 2, 16, 9) {
    std::fill(out.buf.begin(), out.buf.end(), 42.f);
  }
  static Problem make() {
    Problem p;
    p.Hq = 4;
    p.Hkv = 2;
    p.Lq = p.Lk = 10;
    p.D = 16;
    p.Dv = 9;
    return p;
  }
  template <class F>
  void expect_error(F call, const std::string& text) {
    try {
      call();
      ADD_FAILURE() << "no attn::Error; expected " << text;
    } catch (const attn::Error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
    for (float x : out.buf) ASSERT_EQ(x, 42.f);
  }
};

TEST_F(BadInput, WrongStateShape) {
  attn::LinearStateBuffer<float> wrong_s(1, 2, 16, 8), wrong_z(1, 2, 16, 9);
  const attn::LinearState<float> bad_z{
      wrong_z.state().s, attn::TensorView<float, 3>(wrong_z.state().z.data(), {1, 1, 16})};
  expect_error(
      [&] {
        attn::linear_attention(in.q.view, in.k.view, in.v.view, out.view, attn::elu_plus_one(),
                               wrong_s.state());
      },
      "state s has shape [1, 2, 16, 8], expected [1, 2, 16, 9]");
  expect_error(
      [&] {
        attn::linear_attention(in.q.view, in.k.view, in.v.view, out.view, attn::elu_plus_one(),
                               bad_z);
      },
      "state z has shape [1, 1, 16], expected [1, 2, 16]");
  // FAVOR+ with 32 features needs F = 32 rows of state.
  expect_error(
      [&] {
        attn::linear_attention(in.q.view, in.k.view, in.v.view, out.view, attn::favor_plus(16, 32),
                               state.state());
      },
      "expected [1, 2, 32, 9]");
}

TEST_F(BadInput, StateOverlappingTheOutput) {
  const attn::LinearState<float> aliased{attn::TensorView<float, 4>(out.buf.data(), {1, 2, 16, 9}),
                                         state.state().z};
  expect_error(
      [&] {
        attn::linear_attention(in.q.view, in.k.view, in.v.view, out.view, attn::elu_plus_one(),
                               aliased);
      },
      "state s overlaps out");
}

TEST_F(BadInput, EpsNotPositive) {
  for (double e : {0.0, -1e-6}) {
    attn::LinearAttentionOptions opt;
    opt.eps = e;
    expect_error(
        [&] {
          attn::linear_attention(in.q.view, in.k.view, in.v.view, out.view, attn::elu_plus_one(),
                                 opt);
        },
        std::string(e == 0 ? "eps is 0" : "eps is -1e-06") + ", must be finite and > 0");
  }
}

TEST_F(BadInput, NegativeChunk) {
  attn::LinearAttentionOptions opt;
  opt.chunk = -3;
  expect_error(
      [&] { attn::linear_attention(in.q.view, in.k.view, in.v.view, out.view, attn::relu(), opt); },
      "chunk is -3, must be >= 0");
}

TEST_F(BadInput, ZeroFeaturesOrWrongHeadDim) {
  expect_error([] { attn::favor_plus(16, 0); }, "favor_plus: features is 0, must be > 0");
  expect_error(
      [&] {
        attn::linear_attention(in.q.view, in.k.view, in.v.view, out.view, attn::favor_plus(8, 32));
      },
      "drawn for head dim 8, but q has head dim 16");
}

// A user map with no features is refused by linear_attention itself.
struct NoFeatures : attn::SimpleFeatureMap<NoFeatures> {
  index_t num_features(index_t) const { return 0; }
  template <class Acc>
  void features(attn::FeatureInput<Acc>, attn::FeatureOutput<Acc>) const {}
};

TEST_F(BadInput, UserMapWithZeroFeatures) {
  expect_error(
      [&] { attn::linear_attention(in.q.view, in.k.view, in.v.view, out.view, NoFeatures()); },
      "the feature map gives 0 features for head dim 16");
}

// A user-supplied map: φ(x) = x² elementwise (a degree-2 kernel), held
// against the reference.
struct Square : attn::SimpleFeatureMap<Square> {
  index_t num_features(index_t d) const { return d; }
  template <class Acc>
  void features(attn::FeatureInput<Acc> x, attn::FeatureOutput<Acc> phi) const {
    phi.array() = x.array().square();
  }
};

TYPED_TEST(LinearAttention, UserSuppliedMap) {
  Problem p;
  p.Hq = 2;
  p.Hkv = 1;
  p.Lq = p.Lk = 45;
  attn::LinearAttentionOptions opt;
  opt.causal = true;
  opt.chunk = 16;
  expect_linear_matches_reference<TypeParam>(p, Square(), opt);
}

}  // namespace
