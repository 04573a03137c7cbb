// Properties of the engine that hold whatever the inputs: tile shapes and
// thread counts change nothing (bitwise for threads, within tolerance for
// tiles), the tile classification never changes a result, and masked work
// is really skipped.
#include "support.hpp"

namespace {

using namespace attn_test;

template <class T>
class Properties : public ::testing::Test {};
TYPED_TEST_SUITE(Properties, FloatTypes);

Problem problem() {
  Problem p;
  p.B = 2;
  p.Hq = 4;
  p.Hkv = 2;
  p.Lq = 150;
  p.Lk = 270;
  p.D = 40;
  p.Dv = 24;
  p.layout = Layout::bshd;
  return p;
}

template <class T, class Mask>
Tensor<T> run(const Inputs<T>& in, const Problem& p, const Mask& mask, attn::AttentionOptions opt,
              std::vector<float>* lse = nullptr) {
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
  if (lse) {
    lse->assign(static_cast<std::size_t>(p.B * p.Hq * p.Lq), 0.f);
    opt.lse = attn::TensorView<float, 3>(lse->data(), {p.B, p.Hq, p.Lq});
  }
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, mask, opt);
  return out;
}

TYPED_TEST(Properties, BitwiseIdenticalAcrossRunsAndThreadCounts) {
  const Problem p = problem();
  const Inputs<TypeParam> in(p, 12);
  attn::AttentionOptions opt;
  opt.block_q = 32;
  opt.block_k = 64;
  opt.num_threads = 1;
  std::vector<float> lse1, lse;
  const Tensor<TypeParam> one = run(in, p, attn::causal(), opt, &lse1);
  for (int threads : {1, 2, 3, 4}) {
    opt.num_threads = threads;
    EXPECT_EQ(run(in, p, attn::causal(), opt, &lse).buf, one.buf) << threads << " threads";
    EXPECT_EQ(lse, lse1) << threads << " threads";
  }
}

TYPED_TEST(Properties, TileSizesAgreeWithinTolerance) {
  const Problem p = problem();
  const Inputs<TypeParam> in(p, 13);
  const Tensor<TypeParam> base = run(in, p, attn::causal(), {});
  for (auto [bq, bk] :
       {std::pair<index_t, index_t>{1, 1}, {7, 300}, {64, 16}, {150, 270}, {1000, 1000}}) {
    attn::AttentionOptions opt;
    opt.block_q = bq;
    opt.block_k = bk;
    EXPECT_LE(max_abs_diff(run(in, p, attn::causal(), opt), base), tolerance<TypeParam>(p.D, p.Lk))
        << bq << "x" << bk;
  }
}

// The same causal pattern as a structured mask (full, partial and skipped
// tiles) and as an opaque predicate (every tile partial, none skipped) gives
// the same result: masked entries contribute exact zeros, so only the
// grouping of sums can differ.
TYPED_TEST(Properties, FullAndPartialTilesGiveTheSameResult) {
  const Problem p = problem();
  const Inputs<TypeParam> in(p, 14);
  attn::AttentionOptions opt;
  opt.block_q = 32;
  opt.block_k = 32;
  const index_t off = p.Lk - p.Lq;
  auto predicate =
      attn::custom_mask([off](index_t, index_t, index_t q, index_t k) { return k <= q + off; });
  EXPECT_LE(max_abs_diff(run(in, p, attn::causal(), opt), run(in, p, predicate, opt)),
            tolerance<TypeParam>(p.D, p.Lk));
  // an all-true bool mask classifies every tile full, like no mask at all
  std::vector<char> ones(static_cast<std::size_t>(p.Lq * p.Lk), 1);
  const attn::TensorView<const bool, 4> all(reinterpret_cast<const bool*>(ones.data()),
                                            {1, 1, p.Lq, p.Lk});
  EXPECT_EQ(run(in, p, attn::bool_mask(all), opt).buf, run(in, p, attn::no_mask(), opt).buf);
}

// Causal skips the tiles above the diagonal: with square tiles on Lq = Lk,
// the computed scores are the lower triangle of tiles, and no tile past the
// diagonal is ever computed.
TEST(Properties, CausalComputesOnlyTheLowerTriangleOfTiles) {
  Problem p;
  p.Hq = p.Hkv = 1;
  p.Lq = p.Lk = 256;
  const Inputs<float> in(p, 15);
  Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::AttentionStats stats;
  attn::AttentionOptions opt;
  opt.block_q = opt.block_k = 32;
  opt.stats = &stats;
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(), opt);
  const index_t n = 256 / 32;                    // tiles per side
  EXPECT_EQ(stats.partial_tiles, n);             // the diagonal
  EXPECT_EQ(stats.full_tiles, n * (n - 1) / 2);  // strictly below it
  EXPECT_EQ(stats.scores, (n * (n + 1) / 2) * 32 * 32);
}

// A fully false bool-mask tile is skipped, not computed.
TEST(Properties, BoolMaskSkipsEmptyTiles) {
  Problem p;
  p.Lq = 64;
  p.Lk = 128;
  std::vector<char> m(static_cast<std::size_t>(p.Lq * p.Lk), 0);
  for (index_t i = 0; i < p.Lq; ++i)
    for (index_t j = 64; j < 128; ++j)
      m[static_cast<std::size_t>(i * p.Lk + j)] = 1;  // right half only
  const attn::TensorView<const bool, 4> mv(reinterpret_cast<const bool*>(m.data()),
                                           {1, 1, p.Lq, p.Lk});
  const Inputs<float> in(p, 16);
  Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::AttentionStats stats;
  attn::AttentionOptions opt;
  opt.block_q = opt.block_k = 64;
  opt.stats = &stats;
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::bool_mask(mv), opt);
  EXPECT_EQ(stats.skipped_tiles, 1);
  EXPECT_EQ(stats.full_tiles, 1);
  EXPECT_EQ(stats.partial_tiles, 0);
}

// One head of a multi-head problem equals that head computed alone.
TYPED_TEST(Properties, EachHeadEqualsSingleHeadAttention) {
  const Problem p = problem();
  const Inputs<TypeParam> in(p, 17);
  const Tensor<TypeParam> all = run(in, p, attn::causal(), {});
  for (index_t h = 0; h < p.Hq; ++h) {
    const index_t hk = h / (p.Hq / p.Hkv);
    const auto& s = in.q.view;
    attn::TensorView<const TypeParam, 4> q1(s.data() + h * s.stride(1), {p.B, 1, p.Lq, p.D},
                                            s.strides());
    attn::TensorView<const TypeParam, 4> k1(in.k.view.data() + hk * in.k.view.stride(1),
                                            {p.B, 1, p.Lk, p.D}, in.k.view.strides());
    attn::TensorView<const TypeParam, 4> v1(in.v.view.data() + hk * in.v.view.stride(1),
                                            {p.B, 1, p.Lk, p.Dv}, in.v.view.strides());
    Tensor<TypeParam> one(p.B, 1, p.Lq, p.Dv);
    attn::masked_attention(q1, k1, v1, one.view, attn::causal());
    for (index_t b = 0; b < p.B; ++b)
      for (index_t i = 0; i < p.Lq; ++i)
        for (index_t c = 0; c < p.Dv; ++c) ASSERT_EQ(one(b, 0, i, c), all(b, h, i, c));
  }
}

}  // namespace

namespace {
using namespace attn_test;

// Masks that describe each row's keys as one interval must describe exactly
// the keys keep() accepts: the engine masks partial tiles by that interval.
template <class Mask>
void expect_row_keys_match_keep(const Mask& spec, const attn::AttentionShape& s) {
  const Mask m = spec.bind(s);
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t q = 0; q < s.lq; ++q) {
      const attn::KeyRange r = m.row_keys(b, 0, q);
      for (index_t k = 0; k < s.lk; ++k)
        ASSERT_EQ(m.keep(b, 0, q, k), k >= r.begin && k < r.end)
            << "b=" << b << " q=" << q << " k=" << k;
    }
}

TEST(Properties, RowKeyIntervalsEqualKeep) {
  for (auto [lq, lk] : {std::pair<index_t, index_t>{20, 20}, {7, 30}, {30, 7}}) {
    attn::AttentionShape s;
    s.batch = 2;
    s.q_heads = s.kv_heads = 1;
    s.lq = lq;
    s.lk = lk;
    s.d = s.dv = 4;
    expect_row_keys_match_keep(attn::causal(), s);
    expect_row_keys_match_keep(attn::causal_top_left(), s);
    expect_row_keys_match_keep(attn::key_padding({lk / 2, 0}), s);
    expect_row_keys_match_keep(attn::causal() & attn::key_padding({3, lk}), s);
    static_assert(!attn::has_row_keys_v<attn::BoolMask>, "bool masks have no row interval");
    static_assert(!attn::has_row_keys_v<decltype(attn::causal() & attn::BoolMask{})>,
                  "a conjunction has one only when both sides do");
  }
}
}  // namespace
