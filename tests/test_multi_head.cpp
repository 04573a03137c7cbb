// The self-attention layer (MHA, GQA, MQA; masks, biases, RoPE) against a
// naive fp64 layer in plain Eigen, its properties, and its argument checks.
#include "layer_reference.hpp"

#include <attn/multi_head.hpp>

#include <string>

namespace {

using namespace attn_test;

template <class T>
class MultiHead : public ::testing::Test {};
TYPED_TEST_SUITE(MultiHead, FloatTypes, );

attn::MultiHeadConfig config(index_t d_model, index_t hq, index_t hkv) {
  attn::MultiHeadConfig c;
  c.d_model = d_model;
  c.q_heads = hq;
  c.kv_heads = hkv;
  return attn::detail::resolve_config(c);
}

template <class T>
std::vector<MatD> batches(const Sequence<T>& s) {
  std::vector<MatD> r;
  for (index_t b = 0; b < s.B; ++b) r.push_back(s.batch(b));
  return r;
}

// ------------------------------------------------------- against reference --

// Every combination of head grouping (8 over 8, 2, 1), bias and RoPE pairing,
// each under one of no mask, causal and key padding in turn (the layer hands
// the mask to the engine unchanged); L = 150 so 128-row tiles split each head.
TYPED_TEST(MultiHead, MatchesNaiveEigenLayer) {
  using T = TypeParam;
  const index_t B = 2, L = 150;
  const std::vector<index_t> lengths{150, 61};
  const KeepFn causal = [](index_t, index_t, index_t i, index_t j) { return j <= i; };
  const KeepFn padding = [&](index_t b, index_t, index_t, index_t j) {
    return j < lengths[static_cast<std::size_t>(b)];
  };
  int combo = 0;
  for (index_t hkv : {8, 2, 1})
    for (bool bias : {false, true})
      for (int rope : {0, 1, 2}) {
        attn::MultiHeadConfig c = config(64, 8, hkv);
        if (rope) {
          attn::Rope r;
          r.pairing = rope == 1 ? attn::RopePairing::half_split : attn::RopePairing::interleaved;
          r.offset = rope == 1 ? 0 : 5;
          r.theta = rope == 1 ? 10000.0 : 500.0;
          c.rope = r;
        }
        const LayerWeights<T> w(c, bias, 11 + static_cast<std::uint32_t>(hkv));
        attn::MultiHeadAttention<T> layer(c);
        w.load(layer);
        const Sequence<T> x = random_sequence<T>(B, L, c.d_model, 3);
        const auto xs = batches(x);
        Sequence<T> out(B, L, c.d_model);
        const int mask = combo++ % 3;
        SCOPED_TRACE("hkv=" + std::to_string(hkv) + " bias=" + std::to_string(bias) +
                     " rope=" + std::to_string(rope) + " mask=" + std::to_string(mask));
        if (mask == 0) layer.forward(x.cview(), out.view());
        if (mask == 1) layer.forward(x.cview(), out.view(), attn::causal());
        if (mask == 2) layer.forward(x.cview(), out.view(), attn::key_padding(lengths));
        const KeepFn keep = mask == 0 ? KeepFn{} : mask == 1 ? causal : padding;
        EXPECT_LE(max_layer_diff(out, reference_layer(c, w, xs, xs, keep).out),
                  layer_tolerance<T>(c, L));
      }
}

// A score modifier, a custom scale, odd sizes (d_model 60 = 4 heads of 15 with
// Dv 7) and Lq = 1 all pass through the layer.
TYPED_TEST(MultiHead, ScoreModAndOddSizesMatchReference) {
  using T = TypeParam;
  attn::MultiHeadConfig c;
  c.d_model = 60;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.v_head_dim = 7;
  c = attn::detail::resolve_config(c);
  const LayerWeights<T> w(c, true, 5);
  attn::MultiHeadAttention<T> layer(c);
  w.load(layer);
  const std::vector<double> slopes = attn::alibi_slopes(4);
  for (index_t L : {1, 33}) {
    const Sequence<T> x = random_sequence<T>(3, L, c.d_model, 9);
    const auto xs = batches(x);
    Sequence<T> out(3, L, c.d_model);
    layer.forward(x.cview(), out.view(), attn::causal(), attn::alibi(slopes));
    const KeepFn keep = [](index_t, index_t, index_t i, index_t j) { return j <= i; };
    const BiasFn alibi = [&](index_t, index_t h, index_t i, index_t j) {
      return -slopes[static_cast<std::size_t>(h)] * std::abs(double(i - j));
    };
    EXPECT_LE(max_layer_diff(out, reference_layer(c, w, xs, xs, keep, alibi).out),
              layer_tolerance<T>(c, L))
        << "L=" << L;
  }
}

// ------------------------------------------------------------- properties --

// With one head and Wo = I, the layer is SDPA on (x·Wq, x·Wk, x·Wv).
TYPED_TEST(MultiHead, SingleHeadEqualsSdpaOnProjections) {
  using T = TypeParam;
  using M = attn::RowMatrix<T>;
  const index_t B = 2, L = 40, d = 24;
  const attn::MultiHeadConfig c = config(d, 1, 1);
  attn::MultiHeadAttention<T> layer(c);
  const M wq = random_matrix(d, d, 1, 0.2).cast<T>(), wk = random_matrix(d, d, 2, 0.2).cast<T>(),
          wv = random_matrix(d, d, 3, 0.2).cast<T>();
  layer.set_wq(wq);
  layer.set_wk(wk);
  layer.set_wv(wv);
  layer.set_wo(M::Identity(d, d));
  const Sequence<T> x = random_sequence<T>(B, L, d, 4);
  Sequence<T> out(B, L, d);
  layer.forward(x.cview(), out.view(), attn::causal());

  const Eigen::Map<const M> xm(x.buf.data(), B * L, d);
  M q = xm * wq, k = xm * wk, v = xm * wv, o(B * L, d);
  attn::masked_attention(
      attn::bshd<const T>(q.data(), B, L, 1, d), attn::bshd<const T>(k.data(), B, L, 1, d),
      attn::bshd<const T>(v.data(), B, L, 1, d), attn::bshd(o.data(), B, L, 1, d), attn::causal());
  const Eigen::Map<const M> om(out.buf.data(), B * L, d);
  EXPECT_LE((om - o).cwiseAbs().maxCoeff(),
            4 * eps<T>() * std::sqrt(double(d)) * o.cwiseAbs().maxCoeff());
}

// GQA (8 query heads over 2 kv heads) equals MHA whose Wk, Wv repeat each kv
// head's columns for the 4 query heads of its group.
TYPED_TEST(MultiHead, GroupedQueryEqualsMhaWithRepeatedKv) {
  using T = TypeParam;
  const attn::MultiHeadConfig gqa = config(64, 8, 2), mha = config(64, 8, 8);
  const LayerWeights<T> w(gqa, true, 21);
  attn::MultiHeadAttention<T> lg(gqa), lm(mha);
  w.load(lg);
  const index_t D = gqa.head_dim;
  MatD wk(64, 8 * D), wv(64, 8 * D);
  VecD bk(8 * D), bv(8 * D);
  for (index_t h = 0; h < 8; ++h) {
    wk.middleCols(h * D, D) = w.wk.middleCols((h / 4) * D, D);
    wv.middleCols(h * D, D) = w.wv.middleCols((h / 4) * D, D);
    bk.segment(h * D, D) = w.bk.segment((h / 4) * D, D);
    bv.segment(h * D, D) = w.bv.segment((h / 4) * D, D);
  }
  lm.set_wq(as<T>(w.wq));
  lm.set_wk(wk.cast<T>());
  lm.set_wv(wv.cast<T>());
  lm.set_wo(as<T>(w.wo));
  lm.set_bq(as<T>(w.bq));
  lm.set_bk(bk.cast<T>());
  lm.set_bv(bv.cast<T>());
  lm.set_bo(as<T>(w.bo));
  const Sequence<T> x = random_sequence<T>(2, 70, 64, 8);
  Sequence<T> og(2, 70, 64), om(2, 70, 64);
  lg.forward(x.cview(), og.view(), attn::causal());
  lm.forward(x.cview(), om.view(), attn::causal());
  EXPECT_LE(max_layer_diff(og, batches(om)), layer_tolerance<T>(gqa, 70));
}

// The free function on the layer's weight views gives the layer's output
// bitwise, with or without a workspace; a workspace that shrinks and grows
// across calls (and a repeated call of the layer) changes nothing.
TYPED_TEST(MultiHead, FreeFunctionAndRepeatedCallsAgreeBitwise) {
  using T = TypeParam;
  attn::MultiHeadConfig c = config(32, 4, 2);
  c.rope = attn::Rope{};
  const LayerWeights<T> w(c, true, 2);
  attn::MultiHeadAttention<T> layer(c);
  w.load(layer);
  attn::MultiHeadWorkspace<T> ws;
  for (index_t L : {50, 7, 90}) {
    const Sequence<T> x = random_sequence<T>(2, L, 32, static_cast<std::uint32_t>(L));
    Sequence<T> a(2, L, 32), b(2, L, 32), d(2, L, 32);
    layer.forward(x.cview(), a.view(), attn::causal());
    layer.forward(x.cview(), b.view(), attn::causal());
    attn::multi_head_attention<T>(x.cview(), d.view(), c, layer.weights(), attn::causal(),
                                  attn::no_score_mod(), {}, &ws);
    EXPECT_EQ(a.buf, b.buf) << "L=" << L;
    EXPECT_EQ(a.buf, d.buf) << "L=" << L;
  }
}

// Strided x and out (each row padded, batches not back to back) and weights
// given transposed (a column-major view, e.g. PyTorch's [out, in] storage).
TYPED_TEST(MultiHead, StridedSequencesAndTransposedWeights) {
  using T = TypeParam;
  const attn::MultiHeadConfig c = config(32, 4, 4);
  const LayerWeights<T> w(c, false, 6);
  const index_t B = 2, L = 20, pad = 5;
  const Sequence<T> x = random_sequence<T>(B, L, 32, 1);
  std::vector<T> xs(static_cast<std::size_t>(B * L * (32 + pad)), T(0)),
      os(static_cast<std::size_t>(B * L * (32 + pad) + 3), T(0));
  for (index_t r = 0; r < B * L; ++r)
    for (index_t j = 0; j < 32; ++j)
      xs[static_cast<std::size_t>(r * (32 + pad) + j)] =
          x.buf[static_cast<std::size_t>(r * 32 + j)];
  // Batches in reverse order in memory: stride(0) negative.
  const attn::TensorView<const T, 3> xv(xs.data(), {B, L, 32}, {L * (32 + pad), 32 + pad, 1});
  const attn::TensorView<T, 3> ov(os.data() + L * (32 + pad) + 3, {B, L, 32},
                                  {-L * (32 + pad), 32 + pad, 1});
  using CM = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  const CM wq = as<T>(w.wq), wk = as<T>(w.wk), wv = as<T>(w.wv), wo = as<T>(w.wo);
  auto colmajor = [](const CM& m) {
    return attn::TensorView<const T, 2>(m.data(), {m.rows(), m.cols()}, {1, m.rows()});
  };
  attn::MultiHeadWeights<T> wv_;
  wv_.wq = colmajor(wq);
  wv_.wk = colmajor(wk);
  wv_.wv = colmajor(wv);
  wv_.wo = colmajor(wo);
  attn::multi_head_attention<T>(xv, ov, c, wv_);
  const auto ref = reference_layer(c, w, batches(x), batches(x)).out;
  double diff = 0;
  for (index_t b = 0; b < B; ++b)
    for (index_t i = 0; i < L; ++i)
      for (index_t j = 0; j < 32; ++j)
        diff =
            std::max(diff, std::abs(double(ov(b, i, j)) - ref[static_cast<std::size_t>(b)](i, j)));
  EXPECT_LE(diff, layer_tolerance<T>(c, L));
}

// The layer's attention map equals the reference probabilities; each row
// that sees a key sums to 1, a row that sees none is zero.
TYPED_TEST(MultiHead, AttentionWeightsEqualReferenceProbabilities) {
  using T = TypeParam;
  attn::MultiHeadConfig c = config(32, 4, 2);
  c.rope = attn::Rope{};
  const LayerWeights<T> w(c, true, 30);
  attn::MultiHeadAttention<T> layer(c);
  w.load(layer);
  const index_t B = 2, L = 45;
  const std::vector<index_t> lengths{45, 0};
  const Sequence<T> x = random_sequence<T>(B, L, 32, 31);
  std::vector<float> p(static_cast<std::size_t>(B * 4 * L * L), -1.f);
  const attn::Tensor4<float> pv = attn::bhsd(p.data(), B, 4, L, L);
  layer.attention_weights(x.cview(), pv, attn::causal() & attn::key_padding(lengths));
  const KeepFn keep = [&](index_t b, index_t, index_t i, index_t j) {
    return j <= i && j < lengths[static_cast<std::size_t>(b)];
  };
  const auto ref = reference_layer(c, w, batches(x), batches(x), keep);
  const double tol = 8 * eps<float>() + layer_tolerance<T>(c, L);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < 4; ++h)
      for (index_t i = 0; i < L; ++i) {
        double sum = 0;
        for (index_t j = 0; j < L; ++j) {
          sum += pv(b, h, i, j);
          ASSERT_NEAR(pv(b, h, i, j),
                      ref.probs[static_cast<std::size_t>(b)][static_cast<std::size_t>(h)](i, j),
                      tol)
              << b << ' ' << h << ' ' << i << ' ' << j;
        }
        EXPECT_NEAR(sum, b == 0 ? 1.0 : 0.0, 1e-5) << b << ' ' << h << ' ' << i;
      }
}

// ------------------------------------------------------------- bad input --

TEST(MultiHeadErrors, WrongDModelLeavesOutputUnchanged) {
  attn::MultiHeadAttention<float> layer(config(64, 8, 2));
  Sequence<float> x(2, 5, 60), out(2, 5, 64);
  std::fill(out.buf.begin(), out.buf.end(), 7.f);
  EXPECT_TRUE(throws_with([&] { layer.forward(x.cview(), out.view()); },
                          "x has shape [2, 5, 60]: last dim 60, but the layer's d_model is 64"));
  Sequence<float> x2(2, 5, 64), out2(2, 4, 64);
  std::fill(out2.buf.begin(), out2.buf.end(), 7.f);
  EXPECT_TRUE(throws_with([&] { layer.forward(x2.cview(), out2.view()); },
                          "out has shape [2, 4, 64], expected [2, 5, 64]"));
  EXPECT_TRUE(throws_with(
      [&] {
        layer.forward(x2.cview(), out.view(), attn::key_padding({5, 6}));
      },
      "key_padding length of batch 1 is 6, outside [0, Lk = 5]"));
  for (float v : out.buf) ASSERT_EQ(v, 7.f);
  for (float v : out2.buf) ASSERT_EQ(v, 7.f);
}

TEST(MultiHeadErrors, HeadsThatDoNotDivide) {
  EXPECT_TRUE(throws_with([] { attn::MultiHeadAttention<float> l(config(64, 8, 3)); },
                          "kv_heads 3 does not divide q_heads 8"));
  EXPECT_TRUE(throws_with([] { attn::MultiHeadAttention<float> l(config(60, 8, 8)); },
                          "d_model 60 is not divisible by q_heads 8"));
  attn::MultiHeadConfig c;
  c.d_model = 30;
  c.q_heads = 2;  // head dim 15: odd, cannot be rotated in pairs
  c.rope = attn::Rope{};
  EXPECT_TRUE(
      throws_with([&] { attn::MultiHeadAttention<double> l(c); }, "rotary dim is 15 (odd)"));
}

// RoPE positions offset .. offset + L - 1 past 2^63 - 1: refused by every
// entry point of the layer before out, lse or weights are written.
TEST(MultiHeadErrors, RopePositionsThatOverflow) {
  attn::MultiHeadConfig c = config(16, 2, 2);
  attn::Rope r;
  r.offset = std::numeric_limits<index_t>::max() - 2;
  c.rope = r;
  attn::MultiHeadAttention<float> layer(c);
  Sequence<float> x(1, 5, 16), out(1, 5, 16);
  std::fill(out.buf.begin(), out.buf.end(), 7.f);
  const char* needle = "rope offset 9223372036854775805 plus 5 rows overflows a 64-bit position";
  EXPECT_TRUE(throws_with([&] { layer.forward(x.cview(), out.view()); }, needle));
  std::vector<float> w(2 * 5 * 5, 7.f), lse(2 * 7, 7.f);
  EXPECT_TRUE(throws_with(
      [&] { layer.attention_weights(x.cview(), attn::bhsd(w.data(), 1, 2, 5, 5)); }, needle));
  // Packed sequences of 2 and 5 rows: the longest decides, before the first one's lse is written.
  attn::AttentionOptions o;
  o.lse = attn::TensorView<float, 3>(lse.data(), {1, 2, 7});
  std::vector<float> xs(7 * 16, 0.5f), os(7 * 16, 7.f);
  EXPECT_TRUE(throws_with(
      [&] {
        layer.forward_varlen(attn::TensorView<const float, 2>(xs.data(), {7, 16}), {0, 2, 7},
                             attn::TensorView<float, 2>(os.data(), {7, 16}), attn::no_mask(),
                             attn::no_score_mod(), o);
      },
      needle));
  for (float v : out.buf) ASSERT_EQ(v, 7.f);
  for (float v : w) ASSERT_EQ(v, 7.f);
  for (float v : lse) ASSERT_EQ(v, 7.f);
  for (float v : os) ASSERT_EQ(v, 7.f);
  r.offset -= 2;  // positions up to exactly 2^63 - 1: accepted
  c.rope = r;
  attn::MultiHeadAttention<float> edge(c);
  edge.forward(x.cview(), out.view());
  for (float v : out.buf) ASSERT_TRUE(std::isfinite(v));
}

TEST(MultiHeadErrors, WeightShapesThatDoNotMatch) {
  attn::MultiHeadAttention<float> layer(config(64, 8, 2));
  EXPECT_TRUE(throws_with([&] { layer.set_wq(attn::RowMatrix<float>::Zero(64, 60)); },
                          "Wq has shape [64, 60], expected [64, 64]"));
  EXPECT_TRUE(throws_with([&] { layer.set_wk(attn::RowMatrix<float>::Zero(64, 64)); },
                          "Wk has shape [64, 64], expected [64, 16]"));
  std::vector<float> buf(64 * 17);
  EXPECT_TRUE(throws_with([&] { layer.set_wv(buf.data(), 64, 17, attn::WeightLayout::in_out); },
                          "Wv has shape [64, 17], expected [64, 16]"));
  EXPECT_TRUE(throws_with([&] { layer.set_bo(buf.data(), 63); },
                          "bo has shape [63, 1], expected a vector of 64"));

  // The free function checks caller-owned views before writing out.
  attn::MultiHeadWeights<float> w = layer.weights();
  w.wo = attn::TensorView<const float, 2>(buf.data(), {17, 64});
  Sequence<float> x(1, 3, 64), out(1, 3, 64);
  std::fill(out.buf.begin(), out.buf.end(), 7.f);
  EXPECT_TRUE(throws_with(
      [&] { attn::multi_head_attention<float>(x.cview(), out.view(), layer.config(), w); },
      "Wo has shape [17, 64], expected [64, 64]"));
  for (float v : out.buf) ASSERT_EQ(v, 7.f);
}

TEST(MultiHeadErrors, SelfAttentionNeedsMatchingKvInput) {
  attn::MultiHeadConfig c = config(64, 8, 8);
  c.d_kv_in = 32;
  attn::MultiHeadAttention<float> layer(c);
  Sequence<float> x(1, 3, 64), out(1, 3, 64);
  EXPECT_TRUE(throws_with([&] { layer.forward(x.cview(), out.view()); },
                          "self-attention needs d_kv_in == d_model, but d_kv_in is 32"));
}

}  // namespace
