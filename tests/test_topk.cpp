// Top-k attention against the reference that sorts each row in double: every
// mask, ties (integer inputs make many equal scores), k_best at and past the
// visible keys, fully masked rows, k_best = Lk against softmax attention,
// modifiers, thread determinism, and argument errors.
#include "support.hpp"
#include "type_names.hpp"

#include <attn/ops/topk.hpp>
#include <attn/policy/neighborhood.hpp>
#include <attn/policy/t5_bias.hpp>
#include <attn/reference/topk.hpp>
#include <attn/sliding_window.hpp>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace attn_test;

/// Inputs with small integer entries in [-2, 2]: with scale 1 every score is
/// an exact integer in any precision, so equal scores (ties) are common and
/// the fast path and the reference must pick the same keys.
template <class T>
Inputs<T> integer_inputs(const Problem& p, std::uint32_t seed) {
  Inputs<T> in(p, seed);
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(-2, 2);
  for (auto* t : {&in.q, &in.k}) {
    for (auto& x : t->buf) x = static_cast<T>(dist(gen));
  }
  return in;
}

struct TopkRun {
  Tensor<double> out;
  std::vector<float> lse;
  std::vector<std::int64_t> idx;
};

/// Runs the fast path in T (kind 0) or the reference in double (kind 1).
template <class T, class Mask, class Mod>
TopkRun run(const Inputs<T>& in, const Problem& p, index_t k_best, const Mask& mask, const Mod& mod,
            attn::TopkOptions opt, bool reference) {
  TopkRun r;
  r.lse.assign(static_cast<std::size_t>(p.B * p.Hq * p.Lq), 7.f);
  r.idx.assign(static_cast<std::size_t>(p.B * p.Hq * p.Lq * k_best), 99);
  opt.lse = attn::TensorView<float, 3>(r.lse.data(), {p.B, p.Hq, p.Lq});
  const attn::TensorView<std::int64_t, 4> idx(r.idx.data(), {p.B, p.Hq, p.Lq, k_best});
  if (reference) {
    const Tensor<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v);
    r.out = Tensor<double>(p.B, p.Hq, p.Lq, p.Dv);
    attn::reference::topk_attention(q.cview(), k.cview(), v.cview(), r.out.view, k_best, mask, mod,
                                    opt, idx);
  } else {
    Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
    opt.indices = idx;
    attn::topk_attention(in.q.view, in.k.view, in.v.view, out.view, k_best, mask, mod, opt);
    r.out = to_double(out);
  }
  return r;
}

template <class T, class Mask, class Mod = attn::NoScoreMod>
void expect_topk_matches(const Inputs<T>& in, const Problem& p, index_t k_best, const Mask& mask,
                         const Mod& mod = {}, attn::TopkOptions opt = {}) {
  SCOPED_TRACE(p.str() + " k_best=" + std::to_string(k_best));
  const TopkRun ref = run(in, p, k_best, mask, mod, opt, true);
  const TopkRun fast = run(in, p, k_best, mask, mod, opt, false);
  ASSERT_EQ(fast.idx, ref.idx);
  expect_close(fast.out, ref.out, fast.lse, ref.lse,
               tolerance<T>(p.D, std::min(k_best, p.Lk), max_abs(in.v), 32.0));
}

template <class T>
class Topk : public ::testing::Test {};
TYPED_TEST_SUITE(Topk, FloatTypes, StorageTypeNames);

// Sizes around the tiles (16 × 32 here), k_best from hard attention to past Lk.
TYPED_TEST(Topk, TiesAndSizesUnderEveryMask) {
  using T = TypeParam;
  attn::TopkOptions opt;
  opt.scale = 1.0;
  opt.block_q = 16;
  opt.block_k = 32;
  for (const Problem& p : {make(1, 1, 1, 1, 1, 8, 8), make(1, 2, 1, 15, 31, 8, 5),
                           make(2, 2, 2, 16, 32, 7, 8, Layout::bshd), make(1, 4, 2, 17, 33, 8, 8),
                           make(2, 2, 1, 40, 100, 5, 9), make(1, 1, 1, 70, 20, 8, 8)})
    for (index_t kb : {index_t(1), index_t(3), index_t(40), p.Lk, p.Lk + 5}) {
      const Inputs<T> in = integer_inputs<T>(p, 11);
      std::vector<index_t> lens(static_cast<std::size_t>(p.B));
      for (index_t b = 0; b < p.B; ++b) lens[static_cast<std::size_t>(b)] = b == 0 ? p.Lk / 2 : 0;
      std::unique_ptr<bool[]> keep(new bool[static_cast<std::size_t>(p.Lq * p.Lk)]);
      std::mt19937 gen(3);
      for (index_t i = 0; i < p.Lq * p.Lk; ++i) keep[static_cast<std::size_t>(i)] = gen() % 3 != 0;
      const attn::TensorView<const bool, 4> bm(keep.get(), {1, 1, p.Lq, p.Lk});
      expect_topk_matches(in, p, kb, attn::no_mask(), attn::no_score_mod(), opt);
      expect_topk_matches(in, p, kb, attn::causal(), attn::no_score_mod(), opt);
      expect_topk_matches(in, p, kb, attn::causal_top_left(), attn::no_score_mod(), opt);
      expect_topk_matches(in, p, kb, attn::key_padding(lens), attn::no_score_mod(), opt);
      expect_topk_matches(in, p, kb, attn::window(5, 2), attn::no_score_mod(), opt);
      expect_topk_matches(in, p, kb, attn::bool_mask(bm) & attn::causal(), attn::no_score_mod(),
                          opt);
      expect_topk_matches(in, p, kb,
                          attn::custom_mask([](index_t, index_t h, index_t q, index_t k) {
                            return (q + k + h) % 4 != 0;
                          }),
                          attn::no_score_mod(), opt);
      expect_topk_matches(in, p, kb, attn::no_mask(), attn::alibi(attn::alibi_slopes(p.Hq)), opt);
    }
}

// Random scores under modifiers that are not exact in float: double only
// (the selection must agree exactly, so no near-ties from rounding).
TEST(TopkDouble, ModifiersAndDefaultTiles) {
  const Problem p = make(2, 4, 2, 300, 700, 24, 16, Layout::bshd);
  const Inputs<double> in(p, 5);
  std::vector<double> table(32 * 4);
  std::mt19937 gen(2);
  std::normal_distribution<double> dist(0.0, 1.0);
  for (auto& x : table) x = dist(gen);
  for (index_t kb : {1, 8, 64}) {
    expect_topk_matches(in, p, kb, attn::causal(), attn::softcap(5.0));
    expect_topk_matches(in, p, kb, attn::no_mask(), attn::t5_bias(table, 32, 128, true));
    expect_topk_matches(in, p, kb, attn::window(100, 0),
                        attn::compose(attn::alibi(attn::alibi_slopes(4)), attn::softcap(3.0)));
  }
  const Problem g = make(1, 2, 1, 12 * 13, 12 * 13, 16, 16);
  const Inputs<double> gin(g, 6);
  expect_topk_matches(gin, g, 9, attn::neighborhood({12, 13}, 5));
  expect_topk_matches(gin, g, 30, attn::neighborhood({12, 13}, 5));  // k_best > the 25 visible
}

// Default tiles past 512 query rows: 256-row tiles (topk_default_block_q), a
// tail tile of 8 rows, against the reference; integer inputs, so float is exact
// and ties are many. The tile count shows which tiles ran: 2 heads × 3 query
// tiles × 5 key tiles (it would be 2 × 5 × 5 with 128 rows).
TYPED_TEST(Topk, WideDefaultTiles) {
  using T = TypeParam;
  const Problem p = make(1, 2, 1, 520, 1100, 8, 8);
  const Inputs<T> in = integer_inputs<T>(p, 17);
  attn::TopkOptions opt;
  opt.scale = 1.0;
  for (index_t kb : {index_t(1), index_t(64)}) {
    expect_topk_matches(in, p, kb, attn::no_mask(), attn::no_score_mod(), opt);
    expect_topk_matches(in, p, kb, attn::causal(), attn::no_score_mod(), opt);
  }
  attn::AttentionStats stats;
  opt.stats = &stats;
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::topk_attention(in.q.view, in.k.view, in.v.view, out.view, 8, opt);
  EXPECT_EQ(stats.full_tiles + stats.partial_tiles, 2 * 3 * 5);
}

// Scores that only the order of floating-point values tells apart: +0 and -0
// (equal, so the lower key wins), subnormals of both signs, -inf and NaN (never
// selectable), long runs of one value. Lk is several times the candidate
// buffer, so each row's buffer is cut back many times with such values at its
// k-th place (k_best = 200: more than the positive scores, so the k-th best is
// a zero of either sign); the reference sorts in double.
TYPED_TEST(Topk, SignedZerosSubnormalsAndRunsOfTies) {
  using T = TypeParam;
  const double sub = 1e-40;  // subnormal in float, normal in double: the order is the same
  const double table[] = {0.0,
                          -0.0,
                          -std::numeric_limits<double>::infinity(),
                          std::numeric_limits<double>::quiet_NaN(),
                          1.5,
                          1.5,
                          -1e30,
                          sub,
                          -sub,
                          3.0,
                          -0.0,
                          0.0,
                          1.5};
  const auto pattern = attn::custom_score_mod(
      [&table](index_t, index_t h, index_t q, index_t k, auto s) -> decltype(s) {
        // Keys past 400 score 0 (+0 or -0) only: every later buffer fills with ties.
        const std::size_t i = static_cast<std::size_t>(k < 400            ? (k * 7 + q * 3 + h) % 13
                                                       : (k + q) % 2 == 0 ? 0
                                                                          : 1);
        return static_cast<decltype(s)>(table[i]);
      });
  const Problem p = make(1, 2, 1, 9, 1500, 8, 8);
  const Inputs<T> in(p, 21);
  attn::TopkOptions opt;
  opt.block_q = 4;
  opt.block_k = 64;
  for (index_t kb : {index_t(1), index_t(2), index_t(7), index_t(40), index_t(200)})
    expect_topk_matches(in, p, kb, attn::no_mask(), pattern, opt);
}

// k_best >= Lk selects every visible key: softmax attention.
TYPED_TEST(Topk, AllKeysEqualsSoftmaxAttention) {
  using T = TypeParam;
  for (const Problem& p : {make(1, 2, 2, 33, 65, 16, 16), make(2, 4, 1, 129, 257, 11, 7)}) {
    SCOPED_TRACE(p.str());
    const Inputs<T> in(p, 9);
    std::vector<float> lse_ref, lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
    const Tensor<double> ref =
        reference_output(in, p, attn::causal(), attn::no_score_mod(), {}, &lse_ref);
    attn::TopkOptions opt;
    opt.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
    Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
    attn::topk_attention(in.q.view, in.k.view, in.v.view, out.view, p.Lk, attn::causal(),
                         attn::no_score_mod(), opt);
    expect_close(out, ref, lse, lse_ref, tolerance<T>(p.D, p.Lk, max_abs(in.v)));
  }
}

// Hard attention: k_best = 1 outputs exactly the best key's value row.
TEST(TopkHard, OutputsTheBestValueRow) {
  const Problem p = make(1, 1, 1, 50, 300, 16, 12);
  const Inputs<float> in(p, 4);
  std::vector<std::int64_t> idx(50);
  attn::TopkOptions opt;
  opt.indices = attn::TensorView<std::int64_t, 4>(idx.data(), {1, 1, 50, 1});
  Tensor<float> out(1, 1, 50, 12);
  attn::topk_attention(in.q.view, in.k.view, in.v.view, out.view, 1, opt);
  for (index_t i = 0; i < 50; ++i) {
    ASSERT_GE(idx[static_cast<std::size_t>(i)], 0);
    for (index_t c = 0; c < 12; ++c)
      ASSERT_EQ(out(0, 0, i, c), in.v(0, 0, idx[static_cast<std::size_t>(i)], c));
  }
}

// Same inputs and tiles: bitwise the same output for any thread count.
TEST(TopkDeterminism, AnyThreadCount) {
  const Problem p = make(2, 4, 2, 200, 500, 32, 32);
  const Inputs<float> in(p, 8);
  Tensor<float> a(p.B, p.Hq, p.Lq, p.Dv), b(p.B, p.Hq, p.Lq, p.Dv);
  attn::TopkOptions opt;
  opt.block_q = 32;
  opt.num_threads = 1;
  attn::topk_attention(in.q.view, in.k.view, in.v.view, a.view, 16, attn::causal(),
                       attn::no_score_mod(), opt);
  opt.num_threads = 3;
  attn::topk_attention(in.q.view, in.k.view, in.v.view, b.view, 16, attn::causal(),
                       attn::no_score_mod(), opt);
  ASSERT_EQ(a.buf, b.buf);
}

// A shard of the queries at their global positions equals those rows of the
// one-shot call (causal mask and T5 bias both use the global positions).
TEST(TopkPositions, QueryShardEqualsOneShotRows) {
  const Problem p = make(1, 2, 1, 100, 100, 16, 16);
  const Inputs<double> in(p, 12);
  std::vector<double> table(32 * 2, 0.0);
  for (std::size_t i = 0; i < table.size(); ++i) table[i] = 0.1 * static_cast<double>(i % 7);
  const auto mod = attn::t5_bias(table, 32, 64, false);
  Tensor<double> full(1, 2, 100, 16);
  attn::topk_attention(in.q.view, in.k.view, in.v.view, full.view, 5, attn::causal(), mod);
  Tensor<double> qs(1, 2, 30, 16), part(1, 2, 30, 16);
  for (index_t h = 0; h < 2; ++h)
    for (index_t i = 0; i < 30; ++i)
      for (index_t c = 0; c < 16; ++c) qs(0, h, i, c) = in.q(0, h, 40 + i, c);
  attn::TopkOptions opt;
  opt.positions.q_offset = 40;
  opt.positions.q_length = 100;
  attn::topk_attention(qs.view, in.k.view, in.v.view, part.view, 5, attn::causal(), mod, opt);
  for (index_t h = 0; h < 2; ++h)
    for (index_t i = 0; i < 30; ++i)
      for (index_t c = 0; c < 16; ++c) ASSERT_EQ(part(0, h, i, c), full(0, h, 40 + i, c));
}

// ------------------------------------------------------------------ errors --

TEST(TopkErrors, ThrowBeforeWriting) {
  const Problem p = make(1, 2, 2, 10, 20, 8, 8);
  const Inputs<float> in(p, 1);
  Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
  for (auto& x : out.buf) x = 42.f;
  std::vector<std::int64_t> idx(2 * 10 * 4, 5);
  auto expect = [&](index_t kb, const attn::TopkOptions& opt, const std::string& what) {
    try {
      attn::topk_attention(in.q.view, in.k.view, in.v.view, out.view, kb, opt);
      FAIL() << "no error for " << what;
    } catch (const attn::Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    for (float x : out.buf) ASSERT_EQ(x, 42.f);
    for (auto x : idx) ASSERT_EQ(x, 5);
  };
  expect(0, {}, "k_best is 0, must be >= 1");
  attn::TopkOptions opt;
  opt.indices = attn::TensorView<std::int64_t, 4>(idx.data(), {1, 2, 10, 4});
  expect(3, opt, "indices has shape [1, 2, 10, 4], expected [1, 2, 10, 3]");
  attn::TopkOptions alias;
  alias.indices = attn::TensorView<std::int64_t, 4>(reinterpret_cast<std::int64_t*>(out.buf.data()),
                                                    {1, 2, 10, 4});
  expect(4, alias, "indices overlaps out");
}

}  // namespace
