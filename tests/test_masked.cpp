// Masked attention: every mask policy and score modifier, and their
// combinations, against the fp64 reference; and the semantics of each
// policy checked against the formula in DESIGN.md written out here.
#include "support.hpp"

namespace {

using namespace attn_test;

template <class T>
class Masked : public ::testing::Test {};
TYPED_TEST_SUITE(Masked, FloatTypes);

Problem shape(index_t lq, index_t lk, index_t hq = 2, index_t hkv = 1, index_t d = 24) {
  Problem p;
  p.B = 2;
  p.Hq = hq;
  p.Hkv = hkv;
  p.Lq = lq;
  p.Lk = lk;
  p.D = p.Dv = d;
  return p;
}

attn::AttentionOptions small_tiles() {
  attn::AttentionOptions opt;
  opt.block_q = 16;
  opt.block_k = 32;
  return opt;
}

// ----------------------------------------------------------- against reference --

TYPED_TEST(Masked, CausalBothAlignmentsAllLengthRelations) {
  for (auto [lq, lk] :
       {std::pair<index_t, index_t>{100, 100}, {40, 130}, {130, 40}, {1, 77}, {77, 1}})
    for (const auto& opt : {attn::AttentionOptions{}, small_tiles()}) {
      expect_matches_reference<TypeParam>(shape(lq, lk), attn::causal(), attn::no_score_mod(), opt);
      expect_matches_reference<TypeParam>(shape(lq, lk), attn::causal_top_left(),
                                          attn::no_score_mod(), opt);
    }
}

TYPED_TEST(Masked, KeyPaddingIncludingEmptyAndFullBatches) {
  for (const auto& opt : {attn::AttentionOptions{}, small_tiles()}) {
    expect_matches_reference<TypeParam>(shape(50, 90), attn::key_padding({0, 90}),
                                        attn::no_score_mod(), opt);
    expect_matches_reference<TypeParam>(shape(50, 90), attn::key_padding({33, 1}),
                                        attn::no_score_mod(), opt);
  }
}

TYPED_TEST(Masked, BoolMaskBroadcastAndFull) {
  const Problem p = shape(37, 71, 4, 2);
  std::mt19937 gen(5);
  for (auto [mb, mh] : {std::pair<index_t, index_t>{1, 1}, {p.B, 1}, {1, p.Hq}, {p.B, p.Hq}}) {
    std::vector<char> storage(static_cast<std::size_t>(mb * mh * p.Lq * p.Lk));
    for (auto& x : storage) x = (gen() % 3) != 0;  // about 2/3 kept
    const attn::TensorView<const bool, 4> m(reinterpret_cast<const bool*>(storage.data()),
                                            {mb, mh, p.Lq, p.Lk});
    expect_matches_reference<TypeParam>(p, attn::bool_mask(m), attn::no_score_mod(), small_tiles());
  }
}

TYPED_TEST(Masked, MaskConjunctions) {
  const Problem p = shape(60, 75, 4, 2);
  expect_matches_reference<TypeParam>(p, attn::causal() & attn::key_padding({50, 20}),
                                      attn::no_score_mod(), small_tiles());
  auto stripes = attn::custom_mask(
      [](index_t, index_t h, index_t q, index_t k) { return (q + k + h) % 3 != 0; });
  expect_matches_reference<TypeParam>(p, attn::causal_top_left() & stripes, attn::no_score_mod(),
                                      small_tiles());
}

TYPED_TEST(Masked, ScoreModifiersAndCompositions) {
  const Problem p = shape(45, 66, 4, 2);
  const std::vector<double> slopes = attn::alibi_slopes(p.Hq);
  Tensor<float> bias = random_tensor<float>(1, p.Hq, p.Lq, p.Lk, 21);
  expect_matches_reference<TypeParam>(p, attn::no_mask(), attn::additive_bias(bias.cview()));
  expect_matches_reference<TypeParam>(p, attn::no_mask(), attn::alibi(slopes), small_tiles());
  expect_matches_reference<TypeParam>(p, attn::no_mask(), attn::softcap(0.7));
  expect_matches_reference<TypeParam>(
      p, attn::causal(), attn::compose(attn::alibi(slopes), attn::softcap(2.0)), small_tiles());
  expect_matches_reference<TypeParam>(
      p, attn::causal() & attn::key_padding({66, 30}),
      attn::compose(attn::additive_bias(bias.cview()), attn::alibi(slopes), attn::softcap(5.0)),
      small_tiles());
}

// ------------------------------------------------------------ semantics, by formula --

/// Output of masked_attention on fixed random inputs.
template <class T, class Mask, class Mod = attn::NoScoreMod>
Tensor<T> run(const Problem& p, const Mask& mask, const Mod& mod = {},
              attn::AttentionOptions opt = small_tiles()) {
  const Inputs<T> in(p, 99);
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, mask, mod, opt);
  return out;
}

/// A [1, 1, Lq, Lk] bool mask from a predicate.
template <class F>
std::vector<char> pattern(const Problem& p, F keep) {
  std::vector<char> m(static_cast<std::size_t>(p.Lq * p.Lk));
  for (index_t i = 0; i < p.Lq; ++i)
    for (index_t j = 0; j < p.Lk; ++j) m[static_cast<std::size_t>(i * p.Lk + j)] = keep(i, j);
  return m;
}
attn::TensorView<const bool, 4> view_of(const std::vector<char>& m, const Problem& p) {
  return {reinterpret_cast<const bool*>(m.data()), {1, 1, p.Lq, p.Lk}};
}

// DESIGN.md: bottom-right causal, query i sees key j iff j <= i + (Lk - Lq);
// top-left: j <= i. Both equal the bool mask of that pattern (within rounding:
// the structured mask ends its last key tile earlier, which regroups sums).
TYPED_TEST(Masked, CausalEqualsBoolMaskOfTheDesignFormula) {
  for (auto [lq_, lk_] : {std::pair<index_t, index_t>{50, 50}, {30, 90}, {90, 30}}) {
    const index_t lq = lq_, lk = lk_;  // lambdas cannot capture structured bindings in C++17
    const Problem p = shape(lq, lk);
    const auto br = pattern(p, [&](index_t i, index_t j) { return j <= i + (lk - lq); });
    const auto tl = pattern(p, [&](index_t i, index_t j) { return j <= i; });
    const double tol = tolerance<TypeParam>(p.D, p.Lk);
    EXPECT_LE(max_abs_diff(run<TypeParam>(p, attn::causal()),
                           run<TypeParam>(p, attn::bool_mask(view_of(br, p)))),
              tol);
    EXPECT_LE(max_abs_diff(run<TypeParam>(p, attn::causal_top_left()),
                           run<TypeParam>(p, attn::bool_mask(view_of(tl, p)))),
              tol);
  }
}

// DESIGN.md: ALiBi adds -slope[h]·|i + (Lk - Lq) - j|; the same bias as a tensor agrees.
TYPED_TEST(Masked, AlibiEqualsItsBiasTensor) {
  const Problem p = shape(40, 70, 4, 4);
  const std::vector<double> slopes = attn::alibi_slopes(p.Hq);
  Tensor<double> bias(1, p.Hq, p.Lq, p.Lk);
  for (index_t h = 0; h < p.Hq; ++h)
    for (index_t i = 0; i < p.Lq; ++i)
      for (index_t j = 0; j < p.Lk; ++j)
        bias(0, h, i, j) = -slopes[static_cast<std::size_t>(h)] *
                           std::abs(static_cast<double>(i + (p.Lk - p.Lq) - j));
  const Tensor<TypeParam> a = run<TypeParam>(p, attn::no_mask(), attn::alibi(slopes));
  const Tensor<TypeParam> b = run<TypeParam>(p, attn::no_mask(), attn::additive_bias(bias.cview()));
  EXPECT_LE(max_abs_diff(a, b), tolerance<TypeParam>(p.D, p.Lk));
}

// The standard ALiBi slopes for 8 heads are 2^-1 ... 2^-8.
TEST(Alibi, SlopesOfPowerOfTwoHeadCount) {
  const std::vector<double> s = attn::alibi_slopes(8);
  ASSERT_EQ(s.size(), 8u);
  for (int i = 0; i < 8; ++i)
    EXPECT_DOUBLE_EQ(s[static_cast<std::size_t>(i)], std::ldexp(1.0, -(i + 1)));
  EXPECT_EQ(attn::alibi_slopes(12).size(), 12u);
}

// DESIGN.md: soft-capping is cap·tanh(score / cap) on the scaled score.
TYPED_TEST(Masked, SoftcapEqualsTheFormula) {
  const Problem p = shape(33, 44);
  const double cap = 0.5;
  auto formula = attn::custom_score_mod([cap](index_t, index_t, index_t, index_t, auto s) {
    using S = decltype(s);
    return static_cast<S>(cap * std::tanh(static_cast<double>(s) / cap));
  });
  const Tensor<TypeParam> a = run<TypeParam>(p, attn::no_mask(), attn::softcap(cap));
  const Tensor<TypeParam> b = run<TypeParam>(p, attn::no_mask(), formula);
  EXPECT_LE(max_abs_diff(a, b), tolerance<TypeParam>(p.D, p.Lk));
  // and a cap far below the scores changes the result
  const Tensor<TypeParam> c = run<TypeParam>(p, attn::no_mask());
  EXPECT_GT(max_abs_diff(a, c), 100 * tolerance<TypeParam>(p.D, p.Lk));
}

// Key padding is the bool mask j < lengths[b].
TYPED_TEST(Masked, KeyPaddingEqualsPrefixMask) {
  Problem p = shape(20, 50);
  p.B = 1;
  const auto m = pattern(p, [](index_t, index_t j) { return j < 17; });
  EXPECT_LE(max_abs_diff(run<TypeParam>(p, attn::key_padding({17})),
                         run<TypeParam>(p, attn::bool_mask(view_of(m, p)))),
            tolerance<TypeParam>(p.D, p.Lk));
}

// ----------------------------------------------------------------- edge cases --

// Rows that see no key give zeros and lse = -inf, never NaN: top rows of a
// bottom-right causal mask with Lq > Lk, and a batch whose padding length is 0.
TYPED_TEST(Masked, FullyMaskedRowsGiveZerosAndMinusInfinityLse) {
  Problem p = shape(50, 20);
  const Inputs<TypeParam> in(p, 1);
  Tensor<TypeParam> out(p.B, p.Hq, p.Lq, p.Dv);
  std::vector<float> lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
  attn::AttentionOptions opt = small_tiles();
  opt.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view,
                         attn::causal() & attn::key_padding({20, 0}), opt);
  for (index_t b = 0; b < p.B; ++b)
    for (index_t h = 0; h < p.Hq; ++h)
      for (index_t i = 0; i < p.Lq; ++i) {
        const bool empty = b == 1 || i + (p.Lk - p.Lq) < 0;
        const float l = opt.lse.float_view()(b, h, i);
        if (empty) {
          EXPECT_TRUE(std::isinf(l) && l < 0) << b << ' ' << h << ' ' << i;
          for (index_t c = 0; c < p.Dv; ++c) EXPECT_EQ(out(b, h, i, c), TypeParam(0));
        } else {
          EXPECT_TRUE(std::isfinite(l));
          for (index_t c = 0; c < p.Dv; ++c)
            EXPECT_TRUE(std::isfinite(static_cast<double>(out(b, h, i, c))));
        }
      }
}

// Scores of order 1e4 (inputs scaled by 100 at D = 16 with scale 1/4: |q·k|/4
// up to ~1e4) stay finite and match the reference: the running max keeps exp() in range.
TYPED_TEST(Masked, HugeLogitsStayFiniteAndCorrect) {
  const Problem p = shape(64, 300, 2, 2, 16);
  const Inputs<TypeParam> in(p, 8, 100.0);
  std::vector<float> lse_ref;
  const Tensor<double> ref =
      reference_output(in, p, attn::causal(), attn::no_score_mod(), {}, &lse_ref);
  Tensor<TypeParam> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(), small_tiles());
  double smax = 0;
  for (float l : lse_ref) smax = std::max(smax, std::abs(static_cast<double>(l)));
  ASSERT_GT(smax, 1e3);  // the test really reaches huge scores
  EXPECT_LE(max_abs_diff(out, ref), tolerance<TypeParam>(p.D, p.Lk, max_abs(in.v), smax));
}

// All scores equal (q = 0): every row is the plain mean of the values it sees.
TYPED_TEST(Masked, AllEqualScoresAverageTheValues) {
  Problem p = shape(30, 45);
  Inputs<TypeParam> in(p, 4);
  std::fill(in.q.buf.begin(), in.q.buf.end(), TypeParam(0));
  Tensor<TypeParam> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(), small_tiles());
  for (index_t b = 0; b < p.B; ++b)
    for (index_t i = 0; i < p.Lq; ++i) {
      const index_t seen = i + (p.Lk - p.Lq) + 1;
      for (index_t c = 0; c < p.Dv; ++c) {
        double mean = 0;
        for (index_t j = 0; j < seen; ++j) mean += static_cast<double>(in.v(b, 0, j, c));
        mean /= static_cast<double>(seen);
        EXPECT_NEAR(static_cast<double>(out(b, 1, i, c)), mean, tolerance<TypeParam>(p.D, seen));
      }
    }
}

}  // namespace
