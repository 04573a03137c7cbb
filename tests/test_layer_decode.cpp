// MultiHeadAttention::forward against a KVCache (incremental decoding): a
// prefill and single-token steps equal the last rows of one forward over the
// whole sequence (RoPE positions taken from the cache), sequences of different
// lengths in one batch, and every misuse refused before the cache or the
// output is written.
#include "support.hpp"

#include <attn/kv/cache.hpp>
#include <attn/multi_head.hpp>

#include <random>
#include <string>
#include <vector>

namespace {

using attn::index_t;
using attn::KVCache;
using attn::MultiHeadAttention;
using attn::MultiHeadConfig;

constexpr index_t kModel = 24, kHq = 4, kHkv = 2, kD = 8, kDv = 6;

MultiHeadConfig config(bool rope) {
  MultiHeadConfig c;
  c.d_model = kModel;
  c.q_heads = kHq;
  c.kv_heads = kHkv;
  c.head_dim = kD;
  c.v_head_dim = kDv;
  if (rope) c.rope = attn::Rope{};
  return c;
}

/// A layer with random weights and biases.
MultiHeadAttention<double> layer(bool rope, unsigned seed) {
  MultiHeadAttention<double> l(config(rope));
  std::mt19937 gen(seed);
  std::normal_distribution<double> n(0.0, 0.4);
  auto fill = [&](index_t r, index_t c) {
    attn::RowMatrix<double> m(r, c);
    for (index_t i = 0; i < m.size(); ++i) m.data()[i] = n(gen);
    return m;
  };
  l.set_wq(fill(kModel, kHq * kD));
  l.set_wk(fill(kModel, kHkv * kD));
  l.set_wv(fill(kModel, kHkv * kDv));
  l.set_wo(fill(kHq * kDv, kModel));
  l.set_bq(fill(kHq * kD, 1).col(0));
  l.set_bk(fill(kHkv * kD, 1).col(0));
  l.set_bv(fill(kHkv * kDv, 1).col(0));
  l.set_bo(fill(kModel, 1).col(0));
  return l;
}

std::vector<double> tokens(index_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<double> x(static_cast<std::size_t>(n * kModel));
  for (double& v : x) v = d(gen);
  return x;
}

attn::TensorView<const double, 3> rows3(const double* p, index_t b, index_t l) {
  return attn::TensorView<const double, 3>(p, {b, l, kModel});
}
attn::TensorView<double, 3> rows3(double* p, index_t b, index_t l) {
  return attn::TensorView<double, 3>(p, {b, l, kModel});
}

/// out of one causal forward over the first `len` tokens of `x` (one sequence).
std::vector<double> full_forward(MultiHeadAttention<double>& l, const std::vector<double>& x,
                                 index_t len) {
  std::vector<double> out(static_cast<std::size_t>(len * kModel));
  l.forward(rows3(x.data(), 1, len), rows3(out.data(), 1, len), attn::causal());
  return out;
}

// The cached path and the one-shot forward sum in different orders (other
// tiles, other GEMM shapes): agreement to a few hundred double roundings.
constexpr double kTol = 1e-12;

TEST(LayerDecode, PrefillThenStepsEqualTheWholeSequence) {
  for (bool rope : {false, true}) {
    SCOPED_TRACE(rope ? "rope" : "no rope");
    MultiHeadAttention<double> l = layer(rope, 3);
    const index_t prompt = 5, steps = 4, total = prompt + steps, B = 2;
    const std::vector<double> x0 = tokens(total, 10), x1 = tokens(total, 11);
    KVCache<double> cache(B, kHkv, total, kD, kDv);

    // Prefill both sequences with one call: x [2, prompt, d_model].
    std::vector<double> x(static_cast<std::size_t>(B * prompt * kModel)),
        out(static_cast<std::size_t>(B * prompt * kModel));
    std::copy(x0.begin(), x0.begin() + prompt * kModel, x.begin());
    std::copy(x1.begin(), x1.begin() + prompt * kModel, x.begin() + prompt * kModel);
    l.forward(rows3(x.data(), B, prompt), cache, rows3(out.data(), B, prompt), attn::causal());
    EXPECT_EQ(cache.length(0), prompt);
    const std::vector<double> ref0 = full_forward(l, x0, prompt),
                              ref1 = full_forward(l, x1, prompt);
    for (index_t i = 0; i < prompt * kModel; ++i) {
      ASSERT_NEAR(out[static_cast<std::size_t>(i)], ref0[static_cast<std::size_t>(i)], kTol);
      ASSERT_NEAR(out[static_cast<std::size_t>(prompt * kModel + i)],
                  ref1[static_cast<std::size_t>(i)], kTol);
    }

    // One token per step for both.
    for (index_t t = prompt; t < total; ++t) {
      std::vector<double> xt(static_cast<std::size_t>(B * kModel)),
          ot(static_cast<std::size_t>(B * kModel));
      std::copy(x0.begin() + t * kModel, x0.begin() + (t + 1) * kModel, xt.begin());
      std::copy(x1.begin() + t * kModel, x1.begin() + (t + 1) * kModel, xt.begin() + kModel);
      l.forward(rows3(xt.data(), B, 1), cache, rows3(ot.data(), B, 1), attn::causal());
      const std::vector<double> f0 = full_forward(l, x0, t + 1), f1 = full_forward(l, x1, t + 1);
      for (index_t c = 0; c < kModel; ++c) {
        ASSERT_NEAR(ot[static_cast<std::size_t>(c)], f0[static_cast<std::size_t>(t * kModel + c)],
                    kTol)
            << "step " << t;
        ASSERT_NEAR(ot[static_cast<std::size_t>(kModel + c)],
                    f1[static_cast<std::size_t>(t * kModel + c)], kTol)
            << "step " << t;
      }
    }
    EXPECT_EQ(cache.length(1), total);
  }
}

// Sequences of different lengths in one batch: each new token sits at its own
// sequence's position (RoPE) and sees only its own sequence's keys.
TEST(LayerDecode, SequencesOfDifferentLengths) {
  MultiHeadAttention<double> l = layer(true, 5);
  const index_t B = 2, prompt = 6;
  const std::vector<double> x0 = tokens(prompt + 1, 20), x1 = tokens(prompt + 1, 21);
  KVCache<double> cache(B, kHkv, prompt + 1, kD, kDv);
  std::vector<double> x(static_cast<std::size_t>(B * prompt * kModel)),
      out(static_cast<std::size_t>(B * prompt * kModel));
  std::copy(x0.begin(), x0.begin() + prompt * kModel, x.begin());
  std::copy(x1.begin(), x1.begin() + prompt * kModel, x.begin() + prompt * kModel);
  l.forward(rows3(x.data(), B, prompt), cache, rows3(out.data(), B, prompt), attn::causal());
  cache.truncate(1, 2);  // sequence 1 keeps its first 2 tokens

  // Sequence 0's next token is x0[prompt]; sequence 1's is x1[prompt] at position 2.
  std::vector<double> xt(static_cast<std::size_t>(B * kModel)),
      ot(static_cast<std::size_t>(B * kModel));
  std::copy(x0.begin() + prompt * kModel, x0.end(), xt.begin());
  std::copy(x1.begin() + prompt * kModel, x1.end(), xt.begin() + kModel);
  l.forward(rows3(xt.data(), B, 1), cache, rows3(ot.data(), B, 1), attn::causal());
  EXPECT_EQ(cache.length(0), prompt + 1);
  EXPECT_EQ(cache.length(1), 3);

  const std::vector<double> f0 = full_forward(l, x0, prompt + 1);
  std::vector<double> seq1(static_cast<std::size_t>(3 * kModel));  // x1[0], x1[1], x1[prompt]
  std::copy(x1.begin(), x1.begin() + 2 * kModel, seq1.begin());
  std::copy(x1.begin() + prompt * kModel, x1.end(), seq1.begin() + 2 * kModel);
  const std::vector<double> f1 = full_forward(l, seq1, 3);
  for (index_t c = 0; c < kModel; ++c) {
    EXPECT_NEAR(ot[static_cast<std::size_t>(c)], f0[static_cast<std::size_t>(prompt * kModel + c)],
                kTol);
    EXPECT_NEAR(ot[static_cast<std::size_t>(kModel + c)],
                f1[static_cast<std::size_t>(2 * kModel + c)], kTol);
  }
}

TEST(LayerDecode, MisuseThrowsBeforeWritingTheCacheOrOut) {
  MultiHeadAttention<double> l = layer(true, 7);
  const std::vector<double> x = tokens(3, 30);
  auto expect_refused = [&](KVCache<double>& cache, const std::string& needle,
                            const attn::AttentionOptions& opt, index_t B = 1, index_t L = 3) {
    const std::vector<index_t> before = cache.lengths();
    std::vector<double> out(static_cast<std::size_t>(B * L * kModel), -5.0);
    try {
      l.forward(rows3(x.data(), B, L), cache, rows3(out.data(), B, L), attn::causal(), opt);
      ADD_FAILURE() << "accepted; expected an error with '" << needle << "'";
    } catch (const attn::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_EQ(cache.lengths(), before) << needle;
    for (double v : out) ASSERT_EQ(v, -5.0) << needle;
  };
  const attn::AttentionOptions plain;
  KVCache<double> wrong_heads(1, kHkv + 1, 8, kD, kDv);
  expect_refused(wrong_heads, "kv heads", plain);
  KVCache<double> wrong_batch(2, kHkv, 8, kD, kDv);
  expect_refused(wrong_batch, "holds 2 sequences", plain);
  KVCache<double> small(1, kHkv, 4, kD, kDv);
  std::vector<double> out1(static_cast<std::size_t>(kModel));
  l.forward(rows3(x.data(), 1, 1), small, rows3(out1.data(), 1, 1), attn::causal());
  l.forward(rows3(x.data(), 1, 1), small, rows3(out1.data(), 1, 1), attn::causal());
  expect_refused(small, "no room for 3 more", plain);  // 2 held of 4
  KVCache<double> ok(1, kHkv, 8, kD, kDv);
  attn::AttentionOptions drop;
  drop.dropout.p = 0.1;
  expect_refused(ok, "dropout", drop);
  attn::AttentionOptions pos;
  pos.positions.q_offset = 1;
  expect_refused(ok, "positions", pos);
  std::vector<float> lse(5);
  attn::AttentionOptions bad_lse;
  bad_lse.lse = attn::TensorView<float, 3>(lse.data(), {1, kHq, 1});
  expect_refused(ok, "options.lse has shape", bad_lse);
  // RoPE positions: a table over the whole capacity must fit 64 bits.
  l.rope()->offset = std::numeric_limits<index_t>::max() - 3;
  expect_refused(ok, "rope offset", plain);
}

}  // namespace
