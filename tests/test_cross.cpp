// Cross attention (queries from x, keys/values from a memory of another
// length and width) against the naive fp64 layer, reuse of a projected
// memory, and argument checks.
#include "layer_reference.hpp"

#include <attn/cross.hpp>

#include <string>

namespace {

using namespace attn_test;

template <class T>
class Cross : public ::testing::Test {};
TYPED_TEST_SUITE(Cross, FloatTypes, );

attn::MultiHeadConfig cross_config(index_t hkv) {
  attn::MultiHeadConfig c;
  c.d_model = 64;
  c.q_heads = 4;
  c.kv_heads = hkv;
  c.d_kv_in = 40;  // memory width differs from d_model
  return attn::detail::resolve_config(c);
}

template <class T>
std::vector<MatD> batches(const Sequence<T>& s) {
  std::vector<MatD> r;
  for (index_t b = 0; b < s.B; ++b) r.push_back(s.batch(b));
  return r;
}

// MHA, GQA and MQA, with and without biases, memory of length 300 (two key
// tiles) padded per batch, Lq = 23.
TYPED_TEST(Cross, MatchesNaiveEigenLayer) {
  using T = TypeParam;
  const index_t B = 2, Lq = 23, Lk = 300;
  const std::vector<index_t> lengths{300, 111};
  const KeepFn keep = [&](index_t b, index_t, index_t, index_t j) {
    return j < lengths[static_cast<std::size_t>(b)];
  };
  for (index_t hkv : {4, 2, 1})
    for (bool bias : {false, true}) {
      SCOPED_TRACE("hkv=" + std::to_string(hkv) + " bias=" + std::to_string(bias));
      const attn::MultiHeadConfig c = cross_config(hkv);
      const LayerWeights<T> w(c, bias, 40 + static_cast<std::uint32_t>(hkv));
      attn::CrossAttention<T> layer(c);
      w.load(layer);
      const Sequence<T> x = random_sequence<T>(B, Lq, 64, 1),
                        mem = random_sequence<T>(B, Lk, 40, 2);
      Sequence<T> out(B, Lq, 64), out_fn(B, Lq, 64);
      layer.forward(x.cview(), mem.cview(), out.view(), attn::key_padding(lengths));
      const auto ref = reference_layer(c, w, batches(x), batches(mem), keep);
      EXPECT_LE(max_layer_diff(out, ref.out), layer_tolerance<T>(c, Lk));
      // The free function on the same weights computes the same thing.
      attn::cross_attention<T>(x.cview(), mem.cview(), out_fn.view(), c, layer.weights(),
                               attn::key_padding(lengths));
      EXPECT_EQ(out.buf, out_fn.buf);
    }
}

// A decoder: the memory is projected once, then attended step by step (one
// query per call). Each step equals the matching row of one call over all
// queries, and the memory projected on the fly.
TYPED_TEST(Cross, ProjectedMemoryIsReusedAcrossDecoderSteps) {
  using T = TypeParam;
  const index_t B = 2, Lq = 9, Lk = 31;
  const attn::MultiHeadConfig c = cross_config(2);
  const LayerWeights<T> w(c, true, 3);
  attn::CrossAttention<T> layer(c);
  w.load(layer);
  const Sequence<T> x = random_sequence<T>(B, Lq, 64, 4), mem = random_sequence<T>(B, Lk, 40, 5);
  const attn::ProjectedMemory<T> kv = layer.project_memory(mem.cview());
  ASSERT_EQ(kv.length(), Lk);
  Sequence<T> all(B, Lq, 64), fresh(B, Lq, 64);
  layer.forward(x.cview(), kv, all.view(), attn::key_padding({31, 20}));
  layer.forward(x.cview(), mem.cview(), fresh.view(), attn::key_padding({31, 20}));
  EXPECT_EQ(all.buf, fresh.buf);
  const double tol = layer_tolerance<T>(c, Lk);
  for (index_t t = 0; t < Lq; ++t) {
    // x[:, t] as a [B, 1, d_model] view (batch stride Lq·d_model).
    const attn::TensorView<const T, 3> xt(x.buf.data() + t * 64, {B, 1, 64}, {Lq * 64, 64, 1});
    Sequence<T> step(B, 1, 64);
    layer.forward(xt, kv, step.view(), attn::key_padding({31, 20}));
    for (index_t b = 0; b < B; ++b)
      for (index_t j = 0; j < 64; ++j)
        EXPECT_NEAR(double(step.buf[static_cast<std::size_t>(b * 64 + j)]),
                    double(all.buf[static_cast<std::size_t>((b * Lq + t) * 64 + j)]), tol)
            << "step " << t;
  }
}

// A causal mask works across lengths (bottom-right: query i sees keys
// j <= i + Lk - Lq), and attention_weights of the layer equal the
// reference probabilities.
TYPED_TEST(Cross, CausalAndAttentionWeightsMatchReference) {
  using T = TypeParam;
  const index_t B = 1, Lq = 12, Lk = 20;
  const attn::MultiHeadConfig c = cross_config(1);
  const LayerWeights<T> w(c, true, 8);
  attn::CrossAttention<T> layer(c);
  w.load(layer);
  const Sequence<T> x = random_sequence<T>(B, Lq, 64, 6), mem = random_sequence<T>(B, Lk, 40, 7);
  const KeepFn keep = [&](index_t, index_t, index_t i, index_t j) { return j <= i + Lk - Lq; };
  const auto ref = reference_layer(c, w, batches(x), batches(mem), keep);
  Sequence<T> out(B, Lq, 64);
  layer.forward(x.cview(), mem.cview(), out.view(), attn::causal());
  EXPECT_LE(max_layer_diff(out, ref.out), layer_tolerance<T>(c, Lk));
  std::vector<float> p(static_cast<std::size_t>(B * 4 * Lq * Lk));
  const attn::Tensor4<float> pv = attn::bhsd(p.data(), B, 4, Lq, Lk);
  layer.attention_weights(x.cview(), layer.project_memory(mem.cview()), pv, attn::causal());
  for (index_t h = 0; h < 4; ++h)
    for (index_t i = 0; i < Lq; ++i)
      for (index_t j = 0; j < Lk; ++j)
        ASSERT_NEAR(pv(0, h, i, j), ref.probs[0][static_cast<std::size_t>(h)](i, j),
                    8 * eps<float>() + layer_tolerance<T>(c, Lk));
}

TEST(CrossErrors, BadShapesThrowAndLeaveOutputUnchanged) {
  const attn::MultiHeadConfig c = cross_config(2);
  attn::CrossAttention<float> layer(c);
  Sequence<float> x(2, 5, 64), mem(2, 7, 40), out(2, 5, 64);
  std::fill(out.buf.begin(), out.buf.end(), 7.f);
  Sequence<float> wide(2, 7, 64);
  EXPECT_TRUE(
      throws_with([&] { layer.forward(x.cview(), wide.cview(), out.view()); },
                  "memory has shape [2, 7, 64]: last dim 64, but the layer's d_kv_in is 40"));
  Sequence<float> mem3(3, 7, 40);
  EXPECT_TRUE(throws_with([&] { layer.forward(x.cview(), mem3.cview(), out.view()); },
                          "x has batch 2, but the memory has batch 3"));
  EXPECT_TRUE(throws_with(
      [&] {
        layer.forward(x.cview(), mem.cview(), out.view(), attn::key_padding({7, 8}));
      },
      "key_padding length of batch 1 is 8, outside [0, Lk = 7]"));
  attn::ProjectedMemory<float> none;
  EXPECT_TRUE(throws_with([&] { layer.forward(x.cview(), none, out.view()); },
                          "the projected memory is empty"));
  for (float v : out.buf) ASSERT_EQ(v, 7.f);

  attn::MultiHeadConfig other = cross_config(4);
  attn::CrossAttention<float> layer4(other);
  const attn::ProjectedMemory<float> kv4 = layer4.project_memory(mem.cview());
  EXPECT_TRUE(
      throws_with([&] { layer.forward(x.cview(), kv4, out.view()); },
                  "the projected memory has 4 heads of dim 16/16, but the layer has 2 kv heads"));
  attn::MultiHeadConfig with_rope = c;
  with_rope.rope = attn::Rope{};
  EXPECT_TRUE(throws_with([&] { attn::CrossAttention<float> l(with_rope); },
                          "cross attention takes no rope"));
  for (float v : out.buf) ASSERT_EQ(v, 7.f);
}

}  // namespace
