// Dense attention against the fp64 reference over the size sweep.
#include "support.hpp"

namespace {

using namespace attn_test;

template <class T>
class ScaledDotProduct : public ::testing::Test {};
TYPED_TEST_SUITE(ScaledDotProduct, FloatTypes);

// Lengths around the default tiles (Br = 128, Bc = 256) and small ones.
TYPED_TEST(ScaledDotProduct, LengthSweepMatchesReference) {
  for (index_t lq : {1, 2, 127, 128, 129, 300})
    for (index_t lk : {1, 255, 256, 257, 400}) {
      Problem p;
      p.B = 1;
      p.Hq = 2;
      p.Hkv = 2;
      p.Lq = lq;
      p.Lk = lk;
      p.D = p.Dv = 16;
      expect_matches_reference<TypeParam>(p, attn::no_mask());
    }
}

TYPED_TEST(ScaledDotProduct, HeadDimSweepMatchesReference) {
  for (index_t d : {1, 16, 59, 64, 80, 128, 256}) {
    Problem p;
    p.B = 2;
    p.Hq = 2;
    p.Hkv = 1;
    p.Lq = 70;
    p.Lk = 90;
    p.D = p.Dv = d;
    expect_matches_reference<TypeParam>(p, attn::no_mask());
  }
}

TYPED_TEST(ScaledDotProduct, DvDiffersFromD) {
  Problem p;
  p.Hq = 3;
  p.Hkv = 3;
  p.Lq = 33;
  p.Lk = 65;
  p.D = 59;
  p.Dv = 111;
  expect_matches_reference<TypeParam>(p, attn::no_mask());
  std::swap(p.D, p.Dv);
  expect_matches_reference<TypeParam>(p, attn::no_mask());
}

TYPED_TEST(ScaledDotProduct, GroupedAndMultiQueryHeadsInBothLayouts) {
  for (index_t hkv : {8, 2, 1})
    for (Layout layout : {Layout::bhsd, Layout::bshd}) {
      Problem p;
      p.B = 2;
      p.Hq = 8;
      p.Hkv = hkv;
      p.Lq = 45;
      p.Lk = 150;
      p.D = p.Dv = 32;
      p.layout = layout;
      expect_matches_reference<TypeParam>(p, attn::no_mask());
    }
}

TYPED_TEST(ScaledDotProduct, SeveralHundredWithSmallTilesAndCustomScale) {
  Problem p;
  p.B = 1;
  p.Hq = 2;
  p.Hkv = 2;
  p.Lq = 517;
  p.Lk = 389;
  p.D = p.Dv = 64;
  attn::AttentionOptions opt;
  opt.block_q = 37;
  opt.block_k = 50;
  opt.scale = 0.3;
  expect_matches_reference<TypeParam>(p, attn::no_mask(), attn::no_score_mod(), opt);
}

// The public dense entry agrees with masked_attention(no_mask) bit for bit:
// they are the same engine instantiation.
TYPED_TEST(ScaledDotProduct, EqualsMaskedAttentionWithNoMask) {
  Problem p;
  p.Hq = 4;
  p.Hkv = 2;
  p.Lq = 100;
  p.Lk = 300;
  p.D = p.Dv = 24;
  const Inputs<TypeParam> in(p, 3);
  Tensor<TypeParam> a(p.B, p.Hq, p.Lq, p.Dv), b(p.B, p.Hq, p.Lq, p.Dv);
  attn::scaled_dot_product_attention(in.q.view, in.k.view, in.v.view, a.view);
  attn::masked_attention(in.q.view, in.k.view, in.v.view, b.view, attn::no_mask());
  EXPECT_EQ(a.buf, b.buf);
}

// A view through const data works and a single key gives back that key's value.
TYPED_TEST(ScaledDotProduct, SingleKeyReturnsItsValue) {
  Problem p;
  p.Hq = 2;
  p.Hkv = 1;
  p.Lq = 5;
  p.Lk = 1;
  p.D = 7;
  p.Dv = 9;
  const Inputs<TypeParam> in(p, 11);
  Tensor<TypeParam> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::scaled_dot_product_attention(in.q.cview(), in.k.cview(), in.v.cview(), out.view);
  for (index_t h = 0; h < p.Hq; ++h)
    for (index_t i = 0; i < p.Lq; ++i)
      for (index_t c = 0; c < p.Dv; ++c) EXPECT_EQ(out(0, h, i, c), in.v(0, 0, 0, c));
}

}  // namespace

namespace {
using namespace attn_test;

// Dense attention computes every tile: Lq·Lk scores, nothing skipped.
TEST(AttentionStats, DenseCountsEveryScore) {
  Problem p;
  p.B = 2;
  p.Hq = 3;
  p.Hkv = 1;
  p.Lq = 130;
  p.Lk = 300;
  const Inputs<float> in(p, 5);
  Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::AttentionStats stats;
  attn::AttentionOptions opt;
  opt.stats = &stats;
  attn::scaled_dot_product_attention(in.q.view, in.k.view, in.v.view, out.view, opt);
  EXPECT_EQ(stats.scores, p.B * p.Hq * p.Lq * p.Lk);
  EXPECT_EQ(stats.full_tiles, p.B * p.Hq * 2 * 2);  // ceil(130/128) × ceil(300/256)
  EXPECT_EQ(stats.partial_tiles, 0);
  EXPECT_EQ(stats.skipped_tiles, 0);
}
}  // namespace
