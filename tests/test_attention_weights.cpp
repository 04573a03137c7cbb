// attention_weights: the softmax probabilities under masks, score modifiers
// and GQA, against the fp64 reference; rows sum to 1; argument checks.
#include "layer_reference.hpp"

#include <attn/attention_weights.hpp>

#include <memory>

namespace {

using namespace attn_test;

template <class T>
class AttentionWeights : public ::testing::Test {};
TYPED_TEST_SUITE(AttentionWeights, FloatTypes, );

/// Checks weights of the inputs against reference::probabilities (fp64),
/// and that every row sums to 1 or is all zeros when the reference row is.
template <class T, class Mask, class Mod>
void expect_weights_match(const Problem& p, const Mask& mask, const Mod& mod,
                          attn::AttentionOptions opt = {}) {
  SCOPED_TRACE(p.str());
  const Inputs<T> in(p, 17);
  std::vector<float> w(static_cast<std::size_t>(p.B * p.Hq * p.Lq * p.Lk), -1.f);
  const attn::Tensor4<float> wv = attn::bhsd(w.data(), p.B, p.Hq, p.Lq, p.Lk);
  attn::attention_weights(in.q.cview(), in.k.cview(), wv, mask, mod, opt);

  const Tensor<double> q = to_double(in.q), k = to_double(in.k);
  attn::AttentionShape s;
  s.batch = p.B;
  s.q_heads = p.Hq;
  s.kv_heads = p.Hkv;
  s.lq = p.Lq;
  s.lk = p.Lk;
  s.d = s.dv = p.D;
  const double scale = opt.scale.value_or(1.0 / std::sqrt(double(p.D)));
  std::vector<double> ref, lse;
  // Probabilities are in [0, 1]: the score error of tolerance<T> bounds their error.
  const double tol = tolerance<T>(p.D, p.Lk, 1.0) + 4 * eps<float>();
  for (index_t b = 0; b < p.B; ++b)
    for (index_t h = 0; h < p.Hq; ++h) {
      attn::reference::probabilities(q.cview(), k.cview(), s, mask.bind(s), mod.bind(s), scale, b,
                                     h, ref, lse);
      for (index_t i = 0; i < p.Lq; ++i) {
        double sum = 0;
        for (index_t j = 0; j < p.Lk; ++j) {
          const double r = ref[static_cast<std::size_t>(i * p.Lk + j)];
          ASSERT_NEAR(wv(b, h, i, j), r, tol) << b << ' ' << h << ' ' << i << ' ' << j;
          if (std::isinf(lse[static_cast<std::size_t>(i)])) {
            ASSERT_EQ(wv(b, h, i, j), 0.f);  // a row that sees no key is exactly zero
          }
          sum += wv(b, h, i, j);
        }
        EXPECT_NEAR(sum, std::isinf(lse[static_cast<std::size_t>(i)]) ? 0.0 : 1.0, 1e-5)
            << b << ' ' << h << ' ' << i;
      }
    }
}

TYPED_TEST(AttentionWeights, DenseCausalAndPaddedWithGqa) {
  Problem p;
  p.B = 2;
  p.Hq = 4;
  p.Hkv = 2;
  p.Lq = 70;
  p.Lk = 90;
  p.D = p.Dv = 16;
  expect_weights_match<TypeParam>(p, attn::no_mask(), attn::no_score_mod());
  expect_weights_match<TypeParam>(p, attn::causal(), attn::no_score_mod());
  expect_weights_match<TypeParam>(p, attn::causal_top_left() & attn::key_padding({90, 0}),
                                  attn::no_score_mod());
  p.layout = Layout::bshd;
  p.Hkv = 1;
  expect_weights_match<TypeParam>(p, attn::key_padding({33, 90}), attn::no_score_mod());
}

TYPED_TEST(AttentionWeights, ScoreModsScaleAndBoolMask) {
  Problem p;
  p.B = 1;
  p.Hq = 2;
  p.Hkv = 2;
  p.Lq = 20;
  p.Lk = 30;
  p.D = 8;
  attn::AttentionOptions opt;
  opt.scale = 0.7;
  expect_weights_match<TypeParam>(
      p, attn::causal(), attn::compose(attn::alibi(attn::alibi_slopes(2)), attn::softcap(5.0)),
      opt);
  const auto n = static_cast<std::size_t>(p.Lq * p.Lk);
  std::unique_ptr<bool[]> keep(new bool[n]);
  for (std::size_t i = 0; i < n; ++i) keep[i] = (i * 7) % 5 != 0;
  const attn::TensorView<const bool, 4> mv(keep.get(), {1, 1, p.Lq, p.Lk});
  expect_weights_match<TypeParam>(p, attn::bool_mask(mv), attn::no_score_mod());
}

TEST(AttentionWeightsErrors, WrongShapeThrowsAndLeavesWeightsUnchanged) {
  const Tensor<float> q = random_tensor<float>(1, 4, 5, 8, 1),
                      k = random_tensor<float>(1, 2, 6, 8, 2);
  std::vector<float> w(4 * 5 * 5, 3.f);
  EXPECT_TRUE(throws_with(
      [&] { attn::attention_weights(q.cview(), k.cview(), attn::bhsd(w.data(), 1, 4, 5, 5)); },
      "weights has shape [1, 4, 5, 5], expected [1, 4, 5, 6]"));
  const Tensor<float> k3 = random_tensor<float>(1, 3, 6, 8, 2);
  std::vector<float> w6(4 * 5 * 6, 3.f);
  EXPECT_TRUE(throws_with(
      [&] { attn::attention_weights(q.cview(), k3.cview(), attn::bhsd(w6.data(), 1, 4, 5, 6)); },
      "k has 3 heads, which does not divide q's 4 heads"));
  for (float v : w) ASSERT_EQ(v, 3.f);
  for (float v : w6) ASSERT_EQ(v, 3.f);
}

}  // namespace
