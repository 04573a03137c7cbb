// Backward pass: the fp64 reference against central finite differences, then
// attn::attention_backward against the reference for every mask, score
// modifier, combination, GQA, odd sizes, tile boundaries, layouts and dtypes;
// fully masked rows; bitwise determinism across thread counts; errors.
#include "support.hpp"

#include <attn/ops/backward.hpp>
#include <attn/reference/backward.hpp>

#include <functional>

namespace {

using namespace attn_test;

// ------------------------------------------------------------------ helpers --

Problem shape(index_t lq, index_t lk, index_t hq = 2, index_t hkv = 1, index_t d = 24,
              index_t dv = 24, Layout layout = Layout::bhsd) {
  Problem p = make(2, hq, hkv, lq, lk, d, dv, layout);
  return p;
}

attn::AttentionOptions tiles(index_t bq, index_t bk) {
  attn::AttentionOptions opt;
  opt.block_q = bq;
  opt.block_k = bk;
  return opt;
}

template <class T>
struct Grads {
  Tensor<T> dq, dk, dv;
  Grads(const Problem& p)
      : dq(p.B, p.Hq, p.Lq, p.D, p.layout), dk(p.B, p.Hkv, p.Lk, p.D, p.layout),
        dv(p.B, p.Hkv, p.Lk, p.Dv, p.layout) {}
};

/// Row log-sum-exp in double from the reference's probabilities.
template <class T, class Mask, class Mod>
std::vector<double> lse_double(const Inputs<T>& in, const Problem& p, const Mask& mask,
                               const Mod& mod, const attn::AttentionOptions& opt) {
  const Tensor<double> q = to_double(in.q), k = to_double(in.k);
  attn::AttentionShape s;
  s.batch = p.B, s.q_heads = p.Hq, s.kv_heads = p.Hkv, s.lq = p.Lq, s.lk = p.Lk, s.d = p.D,
  s.dv = p.Dv;
  const Mask m = mask.bind(s);
  const Mod md = mod.bind(s);
  const double scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(p.D)));
  std::vector<double> r, pr, l;
  for (index_t b = 0; b < p.B; ++b)
    for (index_t h = 0; h < p.Hq; ++h) {
      attn::reference::probabilities(q.cview(), k.cview(), s, m, md, scale, b, h, pr, l);
      r.insert(r.end(), l.begin(), l.end());
    }
  return r;
}

/// Runs forward, its lse in the accumulation type (double for T = double),
/// then backward in T.
template <class T, class Mask, class Mod, class Backward>
Grads<T> run_backward(const Inputs<T>& in, const Problem& p, const Mask& mask, const Mod& mod,
                      attn::AttentionOptions opt, Backward&& backward) {
  using L = attn::detail::accum_t<T>;
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
  std::vector<L> lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
  attn::AttentionOptions fopt = opt;
  fopt.lse = attn::TensorView<L, 3>(lse.data(), {p.B, p.Hq, p.Lq});
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, mask, mod, fopt);
  Grads<T> g(p);
  backward(out, attn::TensorView<const L, 3>(lse.data(), {p.B, p.Hq, p.Lq}), g);
  return g;
}

template <class T>
double grad_tolerance(const Problem& p, double ref_max) {
  return 16.0 * eps<T>() *
         (std::sqrt(static_cast<double>(p.D)) + std::sqrt(static_cast<double>(p.Lk)) + 4.0) *
         std::max(ref_max, 1.0);
}

/// attention_backward in T against the fp64 reference backward.
template <class T, class Mask, class Mod = attn::NoScoreMod>
void expect_backward_matches(const Problem& p, const Mask& mask, const Mod& mod = {},
                             attn::AttentionOptions opt = {}, std::uint32_t seed = 3,
                             double tol_factor = 1.0) {
  SCOPED_TRACE(p.str());
  const Inputs<T> in(p, seed);
  const Tensor<T> dout = random_tensor<T>(p.B, p.Hq, p.Lq, p.Dv, seed + 9, p.layout);
  const Grads<T> g =
      run_backward(in, p, mask, mod, opt, [&](const auto& out, const auto& lse, auto& gr) {
        attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view, lse, dout.view,
                                 gr.dq.view, gr.dk.view, gr.dv.view, mask, mod, opt);
      });
  const Tensor<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v),
                       d = to_double(dout);
  Grads<double> r(make(p.B, p.Hq, p.Hkv, p.Lq, p.Lk, p.D, p.Dv));
  attn::reference::attention_backward(q.cview(), k.cview(), v.cview(), d.cview(), r.dq.view,
                                      r.dk.view, r.dv.view, mask, mod, opt);
  EXPECT_LE(max_abs_diff(g.dq, r.dq), tol_factor * grad_tolerance<T>(p, max_abs(r.dq))) << "dq";
  EXPECT_LE(max_abs_diff(g.dk, r.dk), tol_factor * grad_tolerance<T>(p, max_abs(r.dk))) << "dk";
  EXPECT_LE(max_abs_diff(g.dv, r.dv), tol_factor * grad_tolerance<T>(p, max_abs(r.dv))) << "dv";
}

// -------------------------------------------------- Philox known answers --

TEST(Philox, KnownAnswerVectors) {
  // Philox-4x32-10 known-answer triples published with Random123 (Salmon et al., SC 2011).
  using W = std::array<std::uint32_t, 4>;
  EXPECT_EQ(attn::detail::philox4x32_10({0, 0, 0, 0}, {0, 0}),
            (W{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  EXPECT_EQ(attn::detail::philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
                                        {0xffffffffu, 0xffffffffu}),
            (W{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
  EXPECT_EQ(attn::detail::philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
                                        {0xa4093822u, 0x299f31d0u}),
            (W{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

// ------------------------------------------- reference vs finite differences --

/// L = Σ out ∘ W through reference::attention, in double.
template <class Mask, class Mod>
double loss(const Tensor<double>& q, const Tensor<double>& k, const Tensor<double>& v,
            const Tensor<double>& w, const Mask& mask, const Mod& mod,
            const attn::AttentionOptions& opt) {
  Tensor<double> out(w.extent(0), w.extent(1), w.extent(2), w.extent(3));
  attn::AttentionOptions o = opt;
  o.lse = {};
  attn::reference::attention(q.cview(), k.cview(), v.cview(), out.view, mask, mod, o);
  double l = 0;
  for (std::size_t i = 0; i < out.buf.size(); ++i) l += out.buf[i] * w.buf[i];
  return l;
}

/// Central differences of L w.r.t. every element of `x` against `grad`.
void expect_fd(std::vector<double>& x, const std::vector<double>& grad,
               const std::function<double()>& f, const char* name) {
  const double h = 1e-5;
  double worst = 0, scale = 1;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f();
    x[i] = x0 - h;
    const double fm = f();
    x[i] = x0;
    const double fd = (fp - fm) / (2 * h);
    worst = std::max(worst, std::abs(fd - grad[i]));
    scale = std::max(scale, std::abs(grad[i]));
  }
  // Truncation h²·f'''/6 and rounding eps·|L|/h, both ~1e-10 here.
  EXPECT_LE(worst, 1e-7 * scale) << name;
}

template <class Mask, class Mod>
void expect_reference_matches_fd(const Problem& p, const Mask& mask, const Mod& mod,
                                 attn::AttentionOptions opt = {}) {
  SCOPED_TRACE(p.str());
  Inputs<double> in(p, 11);
  const Tensor<double> w = random_tensor<double>(p.B, p.Hq, p.Lq, p.Dv, 99);
  Grads<double> g(p);
  attn::reference::attention_backward(in.q.cview(), in.k.cview(), in.v.cview(), w.cview(),
                                      g.dq.view, g.dk.view, g.dv.view, mask, mod, opt);
  auto f = [&] { return loss(in.q, in.k, in.v, w, mask, mod, opt); };
  expect_fd(in.q.buf, g.dq.buf, f, "dq");
  expect_fd(in.k.buf, g.dk.buf, f, "dk");
  expect_fd(in.v.buf, g.dv.buf, f, "dv");
}

TEST(ReferenceBackward, MatchesFiniteDifferences) {
  const Problem p = make(2, 4, 2, 5, 7, 3, 4);
  expect_reference_matches_fd(p, attn::no_mask(), attn::no_score_mod());
  expect_reference_matches_fd(p, attn::causal(), attn::softcap(2.0));
  expect_reference_matches_fd(
      make(2, 4, 2, 7, 5, 3, 4), attn::causal_top_left(),
      attn::compose(attn::alibi(attn::alibi_slopes(4)), attn::softcap(1.5)));
  expect_reference_matches_fd(p, attn::key_padding({0, 4}) & attn::window(1, 2),
                              attn::softcap(3.0));
  auto cube = attn::custom_score_mod(
      [](index_t, index_t, index_t, index_t, auto x) { return x + 0.1 * x * x * x; },
      [](index_t, index_t, index_t, index_t, auto x) { return 1 + 0.3 * x * x; });
  expect_reference_matches_fd(p, attn::no_mask(), cube);
  attn::AttentionOptions drop;
  drop.dropout = {0.3, 42, 7};
  expect_reference_matches_fd(p, attn::causal(), attn::softcap(2.0), drop);
}

TEST(ReferenceBackward, BiasGradientMatchesFiniteDifferences) {
  const Problem p = make(2, 4, 2, 5, 6, 3, 4);
  Inputs<double> in(p, 5);
  const Tensor<double> w = random_tensor<double>(p.B, p.Hq, p.Lq, p.Dv, 98);
  for (auto [bb, bh] : {std::pair<index_t, index_t>{2, 4}, {1, 4}, {2, 1}, {1, 1}}) {
    Tensor<double> bias = random_tensor<double>(bb, bh, p.Lq, p.Lk, 31);
    Tensor<double> dbias(bb, bh, p.Lq, p.Lk);
    Grads<double> g(p);
    // bias first, then soft-capping: dbias is the gradient before the cap.
    const auto mod =
        attn::compose(attn::additive_bias(bias.cview(), dbias.view), attn::softcap(2.0));
    attn::reference::attention_backward(in.q.cview(), in.k.cview(), in.v.cview(), w.cview(),
                                        g.dq.view, g.dk.view, g.dv.view, attn::causal(), mod);
    auto f = [&] {
      return loss(in.q, in.k, in.v, w, attn::causal(),
                  attn::compose(attn::additive_bias(bias.cview()), attn::softcap(2.0)), {});
    };
    expect_fd(bias.buf, dbias.buf, f, "dbias");
  }
}

// ------------------------------------------------ engine vs reference --

template <class T>
class Backward : public ::testing::Test {};
TYPED_TEST_SUITE(Backward, FloatTypes);

TYPED_TEST(Backward, DenseSizesAroundTiles) {
  const attn::AttentionOptions t = tiles(16, 32);
  for (index_t n : {1, 15, 16, 17, 31, 32, 33, 70})
    expect_backward_matches<TypeParam>(shape(n, n), attn::no_mask(), attn::no_score_mod(), t);
  expect_backward_matches<TypeParam>(shape(40, 130, 4, 2, 59, 17), attn::no_mask(),
                                     attn::no_score_mod(), t);
  expect_backward_matches<TypeParam>(shape(130, 40, 4, 1, 11, 80), attn::no_mask(),
                                     attn::no_score_mod(), t);
  expect_backward_matches<TypeParam>(shape(150, 300, 2, 2, 64, 64), attn::no_mask());
}

TYPED_TEST(Backward, EveryMask) {
  const attn::AttentionOptions t = tiles(16, 32);
  for (auto [lq, lk] : {std::pair<index_t, index_t>{70, 70}, {40, 100}, {100, 40}}) {
    const Problem p = shape(lq, lk, 4, 2, 19, 13);
    expect_backward_matches<TypeParam>(p, attn::causal(), attn::no_score_mod(), t);
    expect_backward_matches<TypeParam>(p, attn::causal_top_left(), attn::no_score_mod(), t);
    expect_backward_matches<TypeParam>(p, attn::key_padding({0, lk / 2 + 1}), attn::no_score_mod(),
                                       t);
    expect_backward_matches<TypeParam>(p, attn::window(9, 3), attn::no_score_mod(), t);
    expect_backward_matches<TypeParam>(p, attn::window(-1, 5) & attn::key_padding({lk, 7}),
                                       attn::no_score_mod(), t);
    auto stripes = attn::custom_mask(
        [](index_t, index_t h, index_t q, index_t k) { return (q + 2 * k + h) % 3 != 0; });
    expect_backward_matches<TypeParam>(p, attn::causal() & stripes, attn::no_score_mod(), t);
    std::mt19937 gen(4);
    std::vector<char> storage(static_cast<std::size_t>(p.Hq * lq * lk));
    for (auto& x : storage) x = (gen() % 3) != 0;
    const attn::TensorView<const bool, 4> m(reinterpret_cast<const bool*>(storage.data()),
                                            {1, p.Hq, lq, lk});
    expect_backward_matches<TypeParam>(p, attn::bool_mask(m), attn::no_score_mod(), t);
  }
}

TYPED_TEST(Backward, BlockSparseAndWindowForms) {
  const Problem p = shape(96, 96, 2, 1, 16, 16);
  const auto layout = attn::bigbird(96, {16, 3, 2, 1, 5, 1});
  {
    SCOPED_TRACE("sparse_attention_backward");
    const Inputs<TypeParam> in(p, 8);
    const Tensor<TypeParam> dout = random_tensor<TypeParam>(p.B, p.Hq, p.Lq, p.Dv, 17);
    Tensor<TypeParam> out(p.B, p.Hq, p.Lq, p.Dv);
    std::vector<float> lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
    attn::AttentionOptions fo;
    fo.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
    attn::sparse_attention(in.q.view, in.k.view, in.v.view, out.view, layout, attn::causal(),
                           attn::no_score_mod(), fo);
    Grads<TypeParam> g(p), r(p);
    attn::sparse_attention_backward(in.q.view, in.k.view, in.v.view, out.view,
                                    attn::TensorView<const float, 3>(fo.lse.float_view()),
                                    dout.view, g.dq.view, g.dk.view, g.dv.view, layout,
                                    attn::causal());
    attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view,
                           attn::block_sparse(layout) & attn::causal(), fo);
    attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view,
                             attn::TensorView<const float, 3>(fo.lse.float_view()), dout.view,
                             r.dq.view, r.dk.view, r.dv.view,
                             attn::block_sparse(layout) & attn::causal(), tiles(16, 16));
    const double tol = grad_tolerance<float>(p, max_abs(r.dq) + max_abs(r.dk) + max_abs(r.dv));
    EXPECT_LE(max_abs_diff(g.dq, r.dq), tol);
    EXPECT_LE(max_abs_diff(g.dk, r.dk), tol);
    EXPECT_LE(max_abs_diff(g.dv, r.dv), tol);
  }
  expect_backward_matches<TypeParam>(p, attn::block_sparse(layout), attn::no_score_mod(),
                                     tiles(16, 16));
  expect_backward_matches<TypeParam>(p, attn::block_sparse(layout), attn::no_score_mod(),
                                     tiles(24, 40));
}

TYPED_TEST(Backward, EveryScoreModifierAndCompositions) {
  const attn::AttentionOptions t = tiles(16, 32);
  const Problem p = shape(45, 66, 4, 2, 20, 12);
  const std::vector<double> slopes = attn::alibi_slopes(p.Hq);
  expect_backward_matches<TypeParam>(p, attn::no_mask(), attn::alibi(slopes), t);
  expect_backward_matches<TypeParam>(p, attn::causal(), attn::softcap(1.5), t);
  expect_backward_matches<TypeParam>(p, attn::window(7, 7),
                                     attn::compose(attn::alibi(slopes), attn::softcap(2.0)), t);
  expect_backward_matches<TypeParam>(p, attn::causal(),
                                     attn::compose(attn::softcap(2.0), attn::alibi(slopes)), t);
  auto cube = attn::custom_score_mod(
      [](index_t, index_t h, index_t, index_t, auto x) { return x + 0.05 * (h + 1) * x * x * x; },
      [](index_t, index_t h, index_t, index_t, auto x) { return 1 + 0.15 * (h + 1) * x * x; });
  expect_backward_matches<TypeParam>(p, attn::key_padding({30, 66}), cube, t);
}

TYPED_TEST(Backward, BiasGradientBroadcastDims) {
  const Problem p = shape(33, 47, 4, 2, 16, 16);
  const Inputs<TypeParam> in(p, 2);
  const Tensor<TypeParam> dout = random_tensor<TypeParam>(p.B, p.Hq, p.Lq, p.Dv, 12);
  for (auto [bb, bh] : {std::pair<index_t, index_t>{2, 4}, {1, 4}, {2, 1}, {1, 1}}) {
    SCOPED_TRACE(std::to_string(bb) + "x" + std::to_string(bh));
    Tensor<float> bias = random_tensor<float>(bb, bh, p.Lq, p.Lk, 31);
    Tensor<double> dbias(bb, bh, p.Lq, p.Lk), dbias_ref(bb, bh, p.Lq, p.Lk);
    std::fill(dbias.buf.begin(), dbias.buf.end(), 123.0);  // must be overwritten
    const auto mod =
        attn::compose(attn::softcap(3.0), attn::additive_bias(bias.cview(), dbias.view));
    const auto ref_mod =
        attn::compose(attn::softcap(3.0), attn::additive_bias(bias.cview(), dbias_ref.view));
    const attn::AttentionOptions t = tiles(16, 16);
    run_backward(in, p, attn::causal(), mod, t, [&](const auto& out, const auto& lse, auto& g) {
      attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view, lse, dout.view, g.dq.view,
                               g.dk.view, g.dv.view, attn::causal(), mod, t);
    });
    const Tensor<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v),
                         d = to_double(dout);
    Grads<double> r(p);
    attn::reference::attention_backward(q.cview(), k.cview(), v.cview(), d.cview(), r.dq.view,
                                        r.dk.view, r.dv.view, attn::causal(), ref_mod, t);
    EXPECT_LE(max_abs_diff(dbias, dbias_ref), grad_tolerance<TypeParam>(p, max_abs(dbias_ref)));
  }
}

TYPED_TEST(Backward, StridedBshdAndGqa) {
  const attn::AttentionOptions t = tiles(16, 32);
  expect_backward_matches<TypeParam>(shape(37, 53, 6, 2, 24, 8, Layout::bshd), attn::causal(),
                                     attn::softcap(2.0), t);
  expect_backward_matches<TypeParam>(shape(37, 53, 6, 1, 17, 33, Layout::bshd), attn::window(5, 5),
                                     attn::no_score_mod(), t);
}

// Regression (fuzz_backward): with GQA and a dq written in place (stored in the
// accumulation type, unit column stride), the engine offset the empty dQ
// accumulator's null data by the head's rows, undefined behaviour that
// clang's -fsanitize=undefined reports ("applying non-zero offset to null
// pointer"). A group of 2 and 3 query heads, one query row to 11.
TYPED_TEST(Backward, GqaWithDqInPlace) {
  expect_backward_matches<TypeParam>(shape(11, 1, 2, 1, 1, 1), attn::no_mask());
  expect_backward_matches<TypeParam>(shape(1, 9, 6, 2, 5, 3), attn::causal(), attn::no_score_mod(),
                                     tiles(1, 4));
}

// One sequence of multi-query attention is one (batch, KV head) unit: its
// queries are split into ranges, dK and dV summed over the ranges afterwards
// (dq in place for D = 64, through a buffer for D = 40).
TYPED_TEST(Backward, SingleSequenceMqaSplitsItsQueries) {
  expect_backward_matches<TypeParam>(make(1, 8, 1, 300, 200, 40, 24), attn::causal());
  expect_backward_matches<TypeParam>(make(1, 4, 1, 257, 130, 64, 64), attn::no_mask());
  expect_backward_matches<TypeParam>(make(1, 2, 1, 70, 90, 64, 32),
                                     attn::key_padding({60}) & attn::causal_top_left());
}

TYPED_TEST(Backward, DropoutMatchesReference) {
  attn::AttentionOptions t = tiles(16, 32);
  t.dropout = {0.25, 1234, 3};
  expect_backward_matches<TypeParam>(shape(45, 70, 4, 2, 16, 24), attn::causal(),
                                     attn::softcap(2.0), t);
  expect_backward_matches<TypeParam>(shape(33, 33, 2, 2, 16, 16), attn::no_mask(),
                                     attn::no_score_mod(), t);
}

// ------------------------------------------------------------ reduced precision --

template <class T>
void expect_reduced_precision_matches() {
  const Problem p = shape(40, 70, 4, 2, 32, 16);
  const Inputs<T> in(p, 21);
  const Tensor<T> dout = random_tensor<T>(p.B, p.Hq, p.Lq, p.Dv, 30);
  const attn::AttentionOptions t = tiles(16, 32);
  const Grads<T> g =
      run_backward(in, p, attn::causal(), attn::softcap(2.0), t,
                   [&](const auto& out, const auto& lse, auto& gr) {
                     attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view, lse,
                                              dout.view, gr.dq.view, gr.dk.view, gr.dv.view,
                                              attn::causal(), attn::softcap(2.0), t);
                   });
  const Tensor<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v),
                       d = to_double(dout);
  Grads<double> r(p);
  attn::reference::attention_backward(q.cview(), k.cview(), v.cview(), d.cview(), r.dq.view,
                                      r.dk.view, r.dv.view, attn::causal(), attn::softcap(2.0));
  // Inputs, out and the stored gradients are rounded to T; arithmetic is float.
  EXPECT_LE(max_abs_diff(g.dq, r.dq), grad_tolerance<T>(p, max_abs(r.dq)));
  EXPECT_LE(max_abs_diff(g.dk, r.dk), grad_tolerance<T>(p, max_abs(r.dk)));
  EXPECT_LE(max_abs_diff(g.dv, r.dv), grad_tolerance<T>(p, max_abs(r.dv)));
}

TEST(BackwardReduced, Half) { expect_reduced_precision_matches<Eigen::half>(); }
TEST(BackwardReduced, BFloat16) { expect_reduced_precision_matches<Eigen::bfloat16>(); }

// ---------------------------------------------------------------- properties --

TEST(BackwardProperties, FullyMaskedRowsGetZeroGradientsNotNaN) {
  // Lq > Lk under a bottom-right causal mask: the first rows see no key; batch 0 has no keys.
  const Problem p = shape(50, 20, 2, 1, 16, 16);
  const Inputs<float> in(p, 4);
  const Tensor<float> dout = random_tensor<float>(p.B, p.Hq, p.Lq, p.Dv, 5);
  const auto mask = attn::causal() & attn::key_padding({0, 20});
  const Grads<float> g =
      run_backward(in, p, mask, attn::softcap(2.0), tiles(16, 16),
                   [&](const auto& out, const auto& lse, auto& gr) {
                     attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view, lse,
                                              dout.view, gr.dq.view, gr.dk.view, gr.dv.view, mask,
                                              attn::softcap(2.0), tiles(16, 16));
                   });
  for (index_t h = 0; h < p.Hq; ++h)
    for (index_t i = 0; i < p.Lq; ++i)
      for (index_t c = 0; c < p.D; ++c) {
        ASSERT_EQ(g.dq(0, h, i, c), 0.f);
        if (i < p.Lq - p.Lk) {
          ASSERT_EQ(g.dq(1, h, i, c), 0.f) << i;
        }
      }
  for (float x : g.dk.buf) ASSERT_FALSE(std::isnan(x));
  for (index_t j = 0; j < p.Lk; ++j)
    for (index_t c = 0; c < p.Dv; ++c) ASSERT_EQ(g.dv(0, 0, j, c), 0.f);
}

// A double forward asked for a double lse keeps it to double rounding, a merge
// of two key halves by that lse stays there, and a backward fed it keeps
// double precision. With scores in the hundreds a float lse is off by up to
// |lse|·2^-24 (about 1e-5): P = exp(s - lse) and every gradient inherit that.
TEST(BackwardProperties, DoubleLseKeepsDoublePrecision) {
  const Problem p = shape(37, 46, 2, 1, 24, 24);
  attn::AttentionOptions opt;
  opt.scale = 80.0;  // entries of q, k in [-1, 1]: scores in the hundreds
  const Inputs<double> in(p, 5);
  const auto mask = attn::causal();
  const std::vector<double> ref = lse_double(in, p, mask, attn::no_score_mod(), opt);
  const std::size_t n = ref.size();
  const std::array<index_t, 3> rows{p.B, p.Hq, p.Lq};

  // Per score, the two computations of s differ by at most D·scale·max|q|·max|k|
  // roundings; the softmax sum adds Lk, and lse itself one of |lse|.
  double lmax = 0;
  for (double l : ref) lmax = std::max(lmax, std::abs(l));
  ASSERT_GT(lmax, 100.0);
  const double bound =
      4.0 * eps<double>() *
      (static_cast<double>(p.D) * *opt.scale * max_abs(in.q) * max_abs(in.k) + p.Lk + lmax);
  auto err = [&](const auto& l) {
    double e = 0;
    for (std::size_t i = 0; i < n; ++i)
      e = std::max(e, std::abs(static_cast<double>(l[i]) - ref[i]));
    return e;
  };

  // Forward: one call into a double lse, one into a float lse.
  Tensor<double> out(p.B, p.Hq, p.Lq, p.Dv), out32(p.B, p.Hq, p.Lq, p.Dv);
  std::vector<double> l64(n);
  std::vector<float> l32(n);
  attn::AttentionOptions o = opt;
  o.lse = attn::TensorView<double, 3>(l64.data(), rows);
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, mask, o);
  o.lse = attn::TensorView<float, 3>(l32.data(), rows);
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out32.view, mask, o);
  EXPECT_LE(err(l64), bound);
  EXPECT_GT(err(l32), 1e3 * bound) << "these scores must show a float lse's rounding";

  // The keys in two halves at their global positions, merged by a double lse.
  {
    const index_t half = p.Lk / 2;
    Tensor<double> a(p.B, p.Hq, p.Lq, p.Dv), b(p.B, p.Hq, p.Lq, p.Dv);
    std::vector<double> la(n), lb(n);
    for (int part = 0; part < 2; ++part) {
      const index_t k0 = part == 0 ? 0 : half, len = part == 0 ? half : p.Lk - half;
      attn::AttentionOptions po = opt;
      po.positions.k_offset = k0;
      po.positions.k_length = p.Lk;
      po.lse = attn::TensorView<double, 3>((part == 0 ? la : lb).data(), rows);
      auto keys = [&](const auto& t) {
        return attn::Tensor4<const double>(
            t.data() + k0 * t.stride(2), {t.extent(0), t.extent(1), len, t.extent(3)}, t.strides());
      };
      attn::masked_attention(in.q.view, keys(in.k.view), keys(in.v.view), (part == 0 ? a : b).view,
                             mask, po);
    }
    attn::merge_partials(a.view, attn::TensorView<double, 3>(la.data(), rows), b.view,
                         attn::TensorView<const double, 3>(lb.data(), rows));
    EXPECT_LE(err(la), 2.0 * bound) << "merged lse";
  }

  // Backward against the fp64 reference: a relative error δ of every P moves
  // each gradient by at most a few δ of its largest entry.
  const Tensor<double> dout = random_tensor<double>(p.B, p.Hq, p.Lq, p.Dv, 8);
  Grads<double> r(p), g64(p), g32(p);
  attn::reference::attention_backward(in.q.cview(), in.k.cview(), in.v.cview(), dout.cview(),
                                      r.dq.view, r.dk.view, r.dv.view, mask, attn::no_score_mod(),
                                      opt);
  attn::attention_backward(in.q.view, in.k.view, in.v.view, out.cview(),
                           attn::TensorView<const double, 3>(l64.data(), rows), dout.view,
                           g64.dq.view, g64.dk.view, g64.dv.view, mask, opt);
  attn::attention_backward(in.q.view, in.k.view, in.v.view, out.cview(),
                           attn::TensorView<const float, 3>(l32.data(), rows), dout.view,
                           g32.dq.view, g32.dk.view, g32.dv.view, mask, opt);
  for (auto [got, lo, want, name] :
       {std::tuple{&g64.dq, &g32.dq, &r.dq, "dq"}, std::tuple{&g64.dk, &g32.dk, &r.dk, "dk"},
        std::tuple{&g64.dv, &g32.dv, &r.dv, "dv"}}) {
    const double tol = grad_tolerance<double>(p, max_abs(*want)) + 8.0 * bound * max_abs(*want);
    EXPECT_LE(max_abs_diff(*got, *want), tol) << name;
    EXPECT_GT(max_abs_diff(*lo, *want), 10.0 * tol) << name << ": the float lse should miss it";
  }
}

template <class Mod>
void expect_bitwise_across_threads(const Mod& mod, attn::AttentionOptions opt) {
  const Problem p = shape(130, 150, 8, 2, 32, 32);
  const Inputs<float> in(p, 6);
  const Tensor<float> dout = random_tensor<float>(p.B, p.Hq, p.Lq, p.Dv, 7);
  Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
  std::vector<float> lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
  attn::AttentionOptions fo = opt;
  fo.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(), mod, fo);
  std::vector<Grads<float>> runs;
  for (int threads : {1, 2, 3, 5}) {
    attn::AttentionOptions o = opt;
    o.num_threads = threads;
    runs.emplace_back(p);
    auto& g = runs.back();
    attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view,
                             attn::TensorView<const float, 3>(fo.lse.float_view()), dout.view,
                             g.dq.view, g.dk.view, g.dv.view, attn::causal(), mod, o);
  }
  for (std::size_t i = 1; i < runs.size(); ++i) {
    EXPECT_EQ(0, std::memcmp(runs[0].dq.buf.data(), runs[i].dq.buf.data(),
                             runs[0].dq.buf.size() * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(runs[0].dk.buf.data(), runs[i].dk.buf.data(),
                             runs[0].dk.buf.size() * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(runs[0].dv.buf.data(), runs[i].dv.buf.data(),
                             runs[0].dv.buf.size() * sizeof(float)));
  }
}

TEST(BackwardProperties, BitwiseIdenticalForAnyThreadCount) {
  attn::AttentionOptions opt = tiles(32, 64);
  expect_bitwise_across_threads(attn::softcap(2.0), opt);
  opt.dropout = {0.1, 77, 0};
  expect_bitwise_across_threads(attn::no_score_mod(), opt);
}

TEST(BackwardProperties, GlobalPositionsShardsEqualOneShot) {
  // Query shards [0, 40) and [40, 100) of a causal ALiBi problem with dropout, each with
  // positions.q_offset: dq rows equal the one-shot call's, and dk, dv of the shards add up to it.
  const Problem p = shape(100, 100, 4, 2, 16, 16);
  const Inputs<double> in(p, 9);
  const Tensor<double> dout = random_tensor<double>(p.B, p.Hq, p.Lq, p.Dv, 10);
  const auto mod = attn::alibi(attn::alibi_slopes(p.Hq));
  attn::AttentionOptions opt = tiles(16, 32);
  opt.dropout = {0.2, 5, 1};
  Tensor<double> out(p.B, p.Hq, p.Lq, p.Dv);
  std::vector<double> lse = lse_double(in, p, attn::causal(), mod, opt);
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(), mod, opt);
  Grads<double> full(p);
  attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view,
                           attn::TensorView<const double, 3>(lse.data(), {p.B, p.Hq, p.Lq}),
                           dout.view, full.dq.view, full.dk.view, full.dv.view, attn::causal(), mod,
                           opt);
  Tensor<double> dk_sum(p.B, p.Hkv, p.Lk, p.D), dv_sum(p.B, p.Hkv, p.Lk, p.Dv);
  for (const auto& range : {std::pair<index_t, index_t>{0, 40}, {40, 100}}) {
    const index_t q0 = range.first, n = range.second - range.first;
    auto rows = [&](const auto& t, index_t last) {  // rows [q0, q1) of a [B, H, L, last] view
      auto v = t.view;
      return attn::Tensor4<std::remove_reference_t<decltype(*v.data())>>(
          v.data() + q0 * v.stride(2), {v.extent(0), v.extent(1), n, last}, v.strides());
    };
    attn::AttentionOptions o = opt;
    o.positions.q_offset = q0;
    o.positions.q_length = p.Lq;
    Grads<double> g(make(p.B, p.Hq, p.Hkv, n, p.Lk, p.D, p.Dv));
    const attn::TensorView<const double, 3> l(lse.data() + q0, {p.B, p.Hq, n},
                                              {p.Hq * p.Lq, p.Lq, 1});
    attn::attention_backward(rows(in.q, p.D), in.k.view, in.v.view, rows(out, p.Dv), l,
                             rows(dout, p.Dv), g.dq.view, g.dk.view, g.dv.view, attn::causal(), mod,
                             o);
    for (index_t b = 0; b < p.B; ++b)
      for (index_t h = 0; h < p.Hq; ++h)
        for (index_t i = 0; i < n; ++i)
          for (index_t c = 0; c < p.D; ++c)
            ASSERT_NEAR(g.dq(b, h, i, c), full.dq(b, h, q0 + i, c), 1e-12);
    for (std::size_t i = 0; i < dk_sum.buf.size(); ++i) dk_sum.buf[i] += g.dk.buf[i];
    for (std::size_t i = 0; i < dv_sum.buf.size(); ++i) dv_sum.buf[i] += g.dv.buf[i];
  }
  EXPECT_LE(max_abs_diff(dk_sum, full.dk), 1e-12 * std::max(1.0, max_abs(full.dk)));
  EXPECT_LE(max_abs_diff(dv_sum, full.dv), 1e-12 * std::max(1.0, max_abs(full.dv)));
}

// ------------------------------------------------------------------- errors --

TEST(BackwardErrors, ShapesAndOverlapsNamedBeforeWriting) {
  const Problem p = shape(8, 8, 2, 1, 4, 4);
  Inputs<float> in(p, 1);
  Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv), dout(p.B, p.Hq, p.Lq, p.Dv);
  std::vector<float> lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
  const attn::TensorView<const float, 3> l(lse.data(), {p.B, p.Hq, p.Lq});
  Grads<float> g(p);
  std::fill(g.dq.buf.begin(), g.dq.buf.end(), 5.f);
  const std::vector<float> before = g.dq.buf;
  auto expect_error = [&](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no error, expected: " << needle;
    } catch (const attn::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_EQ(g.dq.buf, before);
  };
  Tensor<float> small(p.B, p.Hq, p.Lq, p.D - 1);
  expect_error(
      [&] {
        attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view, l, dout.view,
                                 small.view, g.dk.view, g.dv.view);
      },
      "dq has shape [2, 2, 8, 3], expected [2, 2, 8, 4]");
  expect_error(
      [&] {
        attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view, l, dout.view, g.dq.view,
                                 g.dk.view, attn::Tensor4<float>(g.dq.view));
      },
      "dv has shape");
  expect_error(
      [&] {
        attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view, l, dout.view, g.dq.view,
                                 g.dk.view, g.dv.view, attn::no_mask(), attn::no_score_mod(), [] {
                                   attn::AttentionOptions o;
                                   o.dropout.p = 1.0;
                                   return o;
                                 }());
      },
      "dropout p is 1");
  expect_error(
      [&] {
        attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view, l, dout.view, g.dq.view,
                                 attn::Tensor4<float>(g.dq.buf.data(), in.k.view.shape()),
                                 g.dv.view);
      },
      "dq overlaps dk");
  expect_error(
      [&] {
        attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view, l, dout.view,
                                 attn::Tensor4<float>(dout.view), g.dk.view, g.dv.view);
      },
      "dq overlaps dout");
  Tensor<float> bias(1, 1, p.Lq, p.Lk);
  expect_error(
      [&] {
        attn::attention_backward(in.q.view, in.k.view, in.v.view, out.view, l, dout.view, g.dq.view,
                                 g.dk.view, g.dv.view, attn::no_mask(),
                                 attn::additive_bias(bias.cview(), bias.view));
      },
      "dbias overlaps additive_bias");
}

}  // namespace
