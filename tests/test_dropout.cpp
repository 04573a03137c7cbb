// Dropout on attention probabilities: the keep rate, the decisions as a pure
// function of (seed, offset, batch, head, query, key), the fused forward
// against the reference that applies attn::dropout_mask, and independence
// from thread count and tile size.
#include "support.hpp"

#include <attn/policy/dropout.hpp>

namespace {

using namespace attn_test;

std::vector<char> decisions(index_t B, index_t H, index_t Lq, index_t Lk, attn::Dropout d) {
  std::vector<char> m(static_cast<std::size_t>(B * H * Lq * Lk));
  attn::dropout_mask(attn::TensorView<bool, 4>(reinterpret_cast<bool*>(m.data()), {B, H, Lq, Lk}),
                     d);
  return m;
}

TEST(Dropout, KeepRateWithinBinomialBound) {
  for (double p : {0.1, 0.5, 0.9}) {
    const std::vector<char> m = decisions(2, 3, 101, 257, {p, 5, 1});
    double kept = 0;
    for (char x : m) kept += x ? 1 : 0;
    const double n = static_cast<double>(m.size());
    const double sigma = std::sqrt(p * (1 - p) / n);
    EXPECT_NEAR(kept / n, 1 - p, 5 * sigma) << "p = " << p;  // fails by chance with prob ~6e-7
  }
}

TEST(Dropout, DecisionsArePureFunctionsOfSeedOffsetAndIndex) {
  const attn::Dropout a{0.3, 42, 0};
  EXPECT_EQ(decisions(2, 2, 33, 65, a), decisions(2, 2, 33, 65, a));
  EXPECT_NE(decisions(2, 2, 33, 65, a), decisions(2, 2, 33, 65, {0.3, 43, 0}));
  EXPECT_NE(decisions(2, 2, 33, 65, a), decisions(2, 2, 33, 65, {0.3, 42, 1}));
  // A longer key axis does not change the decisions of the shared keys.
  const std::vector<char> shortk = decisions(1, 2, 9, 30, a), longk = decisions(1, 2, 9, 71, a);
  for (index_t r = 0; r < 2 * 9; ++r)
    for (index_t c = 0; c < 30; ++c)
      ASSERT_EQ(shortk[static_cast<std::size_t>(r * 30 + c)],
                longk[static_cast<std::size_t>(r * 71 + c)]);
  // p = 0 keeps everything.
  for (char x : decisions(1, 1, 5, 5, {0, 1, 0})) EXPECT_TRUE(x);
}

TEST(Dropout, ReferenceAppliesDropoutMask) {
  const Problem p = make(1, 2, 1, 13, 21, 8, 5);
  const Inputs<double> in(p, 3);
  attn::AttentionOptions opt;
  opt.dropout = {0.4, 9, 2};
  Tensor<double> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::reference::attention(in.q.cview(), in.k.cview(), in.v.cview(), out.view, attn::no_mask(),
                             attn::no_score_mod(), opt);
  const std::vector<char> m = decisions(p.B, p.Hq, p.Lq, p.Lk, opt.dropout);
  attn::AttentionShape s;
  s.batch = p.B, s.q_heads = p.Hq, s.kv_heads = p.Hkv, s.lq = p.Lq, s.lk = p.Lk, s.d = p.D,
  s.dv = p.Dv;
  std::vector<double> prob, lse;
  for (index_t h = 0; h < p.Hq; ++h) {
    attn::reference::probabilities(in.q.cview(), in.k.cview(), s, attn::NoMask{}.bind(s),
                                   attn::no_score_mod(), 1 / std::sqrt(8.0), 0, h, prob, lse);
    for (index_t i = 0; i < p.Lq; ++i)
      for (index_t c = 0; c < p.Dv; ++c) {
        double acc = 0;
        for (index_t j = 0; j < p.Lk; ++j)
          if (m[static_cast<std::size_t>((h * p.Lq + i) * p.Lk + j)])
            acc += prob[static_cast<std::size_t>(i * p.Lk + j)] / 0.6 * in.v(0, 0, j, c);
        EXPECT_NEAR(out(0, h, i, c), acc, 1e-12);
      }
  }
}

template <class T>
class DropoutForward : public ::testing::Test {};
TYPED_TEST_SUITE(DropoutForward, FloatTypes);

TYPED_TEST(DropoutForward, MatchesReferenceForEveryTileSize) {
  for (auto [bq, bk] : {std::pair<index_t, index_t>{16, 32}, {7, 50}, {0, 0}, {64, 13}}) {
    attn::AttentionOptions opt;
    opt.block_q = bq;
    opt.block_k = bk;
    opt.dropout = {0.2, 1234, 5};
    expect_matches_reference<TypeParam>(make(2, 4, 2, 70, 90, 24, 16), attn::causal(),
                                        attn::softcap(2.0), opt);
    expect_matches_reference<TypeParam>(make(1, 2, 2, 33, 33, 16, 16, Layout::bshd),
                                        attn::no_mask(), attn::no_score_mod(), opt);
  }
}

TEST(DropoutForwardProperties, BitwiseAcrossThreadsAndZeroPIsNoDropout) {
  const Problem p = make(2, 4, 2, 130, 150, 32, 32);
  const Inputs<float> in(p, 5);
  auto run = [&](int threads, attn::Dropout d) {
    Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
    attn::AttentionOptions opt;
    opt.num_threads = threads;
    opt.dropout = d;
    attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(), opt);
    return out.buf;
  };
  const std::vector<float> one = run(1, {0.3, 8, 0});
  EXPECT_EQ(one, run(2, {0.3, 8, 0}));
  EXPECT_EQ(one, run(3, {0.3, 8, 0}));
  EXPECT_NE(one, run(1, {0.3, 8, 1}));
  EXPECT_EQ(run(2, {0, 8, 0}), run(2, {}));
}

TEST(DropoutErrors, ProbabilityAndOffsetChecked) {
  const Problem p = make(1, 1, 1, 4, 4, 4, 4);
  const Inputs<float> in(p, 1);
  Tensor<float> out(1, 1, 4, 4);
  for (double bad : {-0.1, 1.0, std::nan("")}) {
    attn::AttentionOptions opt;
    opt.dropout.p = bad;
    try {
      attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::no_mask(), opt);
      ADD_FAILURE() << "no error for p = " << bad;
    } catch (const attn::Error& e) {
      EXPECT_NE(std::string(e.what()).find("dropout p is"), std::string::npos) << e.what();
    }
  }
  attn::AttentionOptions opt;
  opt.dropout = {0.5, 1, std::uint64_t{1} << 32};
  EXPECT_THROW(
      attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::no_mask(), opt),
      attn::Error);
  for (float x : out.buf) EXPECT_EQ(x, 0.f);
}

}  // namespace
