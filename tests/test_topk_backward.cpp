// Gradients of top-k attention against the fp64 reference that sorts each row
// and materialises the selected P: every mask, modifiers (with their bias and
// table gradients), GQA, Lq != Lk, odd sizes, ties, k_best at and past the
// visible keys (= the dense attention_backward), fully masked rows, central
// finite differences, thread determinism, and argument errors.
#include "support.hpp"
#include "type_names.hpp"

#include <attn/ops/backward.hpp>
#include <attn/ops/topk.hpp>
#include <attn/ops/topk_backward.hpp>
#include <attn/policy/t5_bias.hpp>
#include <attn/reference/topk.hpp>
#include <attn/sliding_window.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace attn_test;

/// q and k with small integer entries in [-2, 2] and scale 1/4 (a power of
/// two): every score is exact in any precision, so ties are common and the
/// fast path and the reference select the same keys.
template <class T>
Inputs<T> integer_inputs(const Problem& p, std::uint32_t seed) {
  Inputs<T> in(p, seed);
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(-2, 2);
  for (auto* t : {&in.q, &in.k})
    for (auto& x : t->buf) x = static_cast<T>(dist(gen));
  return in;
}

template <class T>
struct Grads {
  Tensor<T> dq, dk, dv;
  Grads(const Problem& p, Layout layout)
      : dq(p.B, p.Hq, p.Lq, p.D, layout), dk(p.B, p.Hkv, p.Lk, p.D, layout),
        dv(p.B, p.Hkv, p.Lk, p.Dv, layout) {
    for (auto* t : {&dq, &dk, &dv})
      for (auto& x : t->buf) x = T(99);  // every element must be written
  }
};

/// Forward (saving the selection) then backward in T; `pass_indices` false
/// makes the backward recompute the selection.
template <class T, class Mask, class Mod>
Grads<T> fast_grads(const Inputs<T>& in, const Tensor<T>& dout, const Problem& p, index_t kb,
                    const Mask& mask, const Mod& mod, attn::TopkOptions opt,
                    bool pass_indices = true) {
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
  std::vector<std::int64_t> idx(static_cast<std::size_t>(p.B * p.Hq * p.Lq * kb));
  opt.indices = attn::TensorView<std::int64_t, 4>(idx.data(), {p.B, p.Hq, p.Lq, kb});
  attn::topk_attention(in.q.view, in.k.view, in.v.view, out.view, kb, mask, mod, opt);
  if (!pass_indices) opt.indices = {};
  Grads<T> g(p, p.layout);
  attn::topk_attention_backward(in.q.cview(), in.k.cview(), in.v.cview(), out.cview(), dout.cview(),
                                g.dq.view, g.dk.view, g.dv.view, kb, mask, mod, opt);
  return g;
}

template <class T, class Mask, class Mod>
Grads<double> reference_grads(const Inputs<T>& in, const Tensor<T>& dout, const Problem& p,
                              index_t kb, const Mask& mask, const Mod& mod,
                              const attn::AttentionOptions& opt) {
  const Tensor<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v),
                       d = to_double(dout);
  Grads<double> g(p, Layout::bhsd);
  attn::reference::topk_attention_backward(q.cview(), k.cview(), v.cview(), d.cview(), g.dq.view,
                                           g.dk.view, g.dv.view, kb, mask, mod, opt);
  return g;
}

/// Allowed gradient error: each gradient element is a sum over at most
/// min(k_best, Lk) selected keys (dq, per row) or over the rows that selected
/// a key (dk, dv, at most group·Lq) of terms that carry the score error
/// ~sqrt(D)·eps; a factor 16 covers the constants (as test_backward's).
template <class T>
double grad_tolerance(const Problem& p, index_t kb, double ref_max) {
  const double terms = static_cast<double>(std::min(kb, p.Lk) + p.Lq * (p.Hq / p.Hkv));
  return 16.0 * eps<T>() * (std::sqrt(static_cast<double>(p.D)) + std::sqrt(terms) + 4.0) *
         std::max(ref_max, 1.0);
}

template <class T>
void expect_grads_close(const Grads<T>& g, const Grads<double>& r, const Problem& p, index_t kb) {
  EXPECT_LE(max_abs_diff(g.dq, r.dq), grad_tolerance<T>(p, kb, max_abs(r.dq))) << "dq";
  EXPECT_LE(max_abs_diff(g.dk, r.dk), grad_tolerance<T>(p, kb, max_abs(r.dk))) << "dk";
  EXPECT_LE(max_abs_diff(g.dv, r.dv), grad_tolerance<T>(p, kb, max_abs(r.dv))) << "dv";
}

template <class T, class Mask, class Mod = attn::NoScoreMod>
void expect_backward_matches(const Inputs<T>& in, const Problem& p, index_t kb, const Mask& mask,
                             const Mod& mod = {}, attn::TopkOptions opt = {}) {
  SCOPED_TRACE(p.str() + " k_best=" + std::to_string(kb));
  const Tensor<T> dout = random_tensor<T>(p.B, p.Hq, p.Lq, p.Dv, 17, p.layout);
  const Grads<double> r = reference_grads(in, dout, p, kb, mask, mod, opt);
  const Grads<T> g = fast_grads(in, dout, p, kb, mask, mod, opt);
  expect_grads_close(g, r, p, kb);
  // Recomputing the selection gives the same gradients, bitwise.
  const Grads<T> again = fast_grads(in, dout, p, kb, mask, mod, opt, false);
  ASSERT_EQ(g.dq.buf, again.dq.buf);
  ASSERT_EQ(g.dk.buf, again.dk.buf);
  ASSERT_EQ(g.dv.buf, again.dv.buf);
}

template <class T>
class TopkBackward : public ::testing::Test {};
TYPED_TEST_SUITE(TopkBackward, FloatTypes, StorageTypeNames);

// Sizes around the tiles (16 × 32 here), GQA, Lq != Lk, odd head dims, a
// strided (bshd) layout, k_best from hard attention to past Lk, every mask.
TYPED_TEST(TopkBackward, TiesSizesAndMasks) {
  using T = TypeParam;
  attn::TopkOptions opt;
  opt.scale = 0.25;
  opt.block_q = 16;
  opt.block_k = 32;
  for (const Problem& p : {make(1, 1, 1, 1, 1, 8, 8), make(1, 2, 1, 15, 31, 7, 5),
                           make(2, 2, 2, 16, 32, 8, 8, Layout::bshd), make(1, 4, 2, 17, 33, 9, 8),
                           make(1, 3, 1, 70, 20, 5, 11)})
    for (index_t kb : {index_t(1), index_t(3), index_t(12), p.Lk, p.Lk + 5}) {
      const Inputs<T> in = integer_inputs<T>(p, 11);
      std::vector<index_t> lens(static_cast<std::size_t>(p.B));
      for (index_t b = 0; b < p.B; ++b) lens[static_cast<std::size_t>(b)] = b == 0 ? p.Lk / 2 : 0;
      expect_backward_matches(in, p, kb, attn::no_mask(), attn::no_score_mod(), opt);
      expect_backward_matches(in, p, kb, attn::causal(), attn::no_score_mod(), opt);
      expect_backward_matches(in, p, kb, attn::causal_top_left(), attn::no_score_mod(), opt);
      expect_backward_matches(in, p, kb, attn::key_padding(lens), attn::no_score_mod(), opt);
      expect_backward_matches(in, p, kb, attn::window(5, 2), attn::no_score_mod(), opt);
      expect_backward_matches(in, p, kb, attn::no_mask(), attn::alibi(attn::alibi_slopes(p.Hq)),
                              opt);
    }
}

// Half storage: dk and dv accumulate in a float buffer, then are rounded once.
TEST(TopkBackwardHalf, ReducedPrecisionStorage) {
  using T = Eigen::half;
  attn::TopkOptions opt;
  opt.scale = 0.25;
  for (const Problem& p : {make(1, 4, 2, 33, 70, 16, 12), make(2, 2, 1, 9, 40, 8, 8, Layout::bshd)})
    for (index_t kb : {1, 5, 64}) {
      const Inputs<T> in = integer_inputs<T>(p, 4);
      expect_backward_matches(in, p, kb, attn::causal(), attn::no_score_mod(), opt);
    }
}

// Random scores (no ties) under modifiers: ALiBi, softcap, their composition,
// an additive bias and a T5 table with their gradients, at default tiles.
TEST(TopkBackwardDouble, ModifiersAndTheirGradients) {
  const Problem p = make(2, 4, 2, 70, 150, 13, 9, Layout::bshd);
  const Inputs<double> in(p, 5);
  const Tensor<double> dout = random_tensor<double>(p.B, p.Hq, p.Lq, p.Dv, 23, p.layout);
  const attn::TopkOptions opt;
  for (index_t kb : {1, 8, 40}) {
    SCOPED_TRACE("k_best=" + std::to_string(kb));
    expect_backward_matches(in, p, kb, attn::causal(), attn::softcap(5.0), opt);
    attn::TopkOptions shard;  // the queries are rows 80..149 of a 150-query sequence
    shard.positions.q_offset = 80;
    shard.positions.q_length = 150;
    expect_backward_matches(in, p, kb, attn::causal(), attn::alibi(attn::alibi_slopes(4)), shard);
    expect_backward_matches(in, p, kb, attn::window(60, 3),
                            attn::compose(attn::alibi(attn::alibi_slopes(4)), attn::softcap(3.0)),
                            opt);

    // additive bias [1, Hq, Lq, Lk] with dbias (summed over the batch)
    const Tensor<double> bias = random_tensor<double>(1, p.Hq, p.Lq, p.Lk, 31);
    Tensor<double> db(1, p.Hq, p.Lq, p.Lk), db_ref(1, p.Hq, p.Lq, p.Lk);
    const Grads<double> g = fast_grads(in, dout, p, kb, attn::causal(),
                                       attn::additive_bias(bias.cview(), db.view), opt);
    const Grads<double> r = reference_grads(in, dout, p, kb, attn::causal(),
                                            attn::additive_bias(bias.cview(), db_ref.view), opt);
    expect_grads_close(g, r, p, kb);
    EXPECT_LE(max_abs_diff(db, db_ref), grad_tolerance<double>(p, kb, max_abs(db_ref))) << "dbias";

    // T5 table [32, Hq] with its gradient (one task per KV head over the batch)
    std::vector<double> table(32 * 4);
    std::mt19937 gen(2);
    std::normal_distribution<double> dist(0.0, 1.0);
    for (auto& x : table) x = dist(gen);
    std::vector<double> dt(table.size(), 5.0), dt_ref(table.size(), 5.0);
    const auto t5 = attn::t5_bias(table, 32, 64, true);
    const Grads<double> gt =
        fast_grads(in, dout, p, kb, attn::no_mask(),
                   t5.with_table_grad(attn::TensorView<double, 2>(dt.data(), {32, 4})), opt);
    const Grads<double> rt = reference_grads(
        in, dout, p, kb, attn::no_mask(),
        t5.with_table_grad(attn::TensorView<double, 2>(dt_ref.data(), {32, 4})), opt);
    expect_grads_close(gt, rt, p, kb);
    double dt_max = 0, dt_err = 0;
    for (std::size_t i = 0; i < dt.size(); ++i) {
      dt_max = std::max(dt_max, std::abs(dt_ref[i]));
      dt_err = std::max(dt_err, std::abs(dt[i] - dt_ref[i]));
    }
    EXPECT_LE(dt_err, grad_tolerance<double>(p, kb, dt_max) * std::sqrt(double(p.B * p.Lk)))
        << "dtable";
  }
}

// k_best >= the visible keys selects them all: the dense attention_backward.
TYPED_TEST(TopkBackward, AllKeysEqualsDenseBackward) {
  using T = TypeParam;
  for (const Problem& p : {make(1, 2, 2, 33, 65, 16, 16), make(2, 4, 1, 40, 97, 11, 7)}) {
    SCOPED_TRACE(p.str());
    const Inputs<T> in(p, 9);
    const Tensor<T> dout = random_tensor<T>(p.B, p.Hq, p.Lq, p.Dv, 4, p.layout);
    const auto mod = attn::alibi(attn::alibi_slopes(p.Hq));
    const Grads<T> g = fast_grads(in, dout, p, p.Lk + 1, attn::causal(), mod, {});
    Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
    std::vector<float> lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
    attn::AttentionOptions opt;
    opt.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
    attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(), mod, opt);
    Grads<T> dense(p, p.layout);
    attn::attention_backward(in.q.cview(), in.k.cview(), in.v.cview(), out.cview(),
                             attn::TensorView<const float, 3>(opt.lse.float_view()), dout.cview(),
                             dense.dq.view, dense.dk.view, dense.dv.view, attn::causal(), mod);
    const Grads<double> r = reference_grads(in, dout, p, p.Lk, attn::causal(), mod, {});
    expect_grads_close(g, r, p, p.Lk);
    // The dense backward takes P from the float lse its forward wrote, so it
    // meets the reference only to float rounding, whatever T: the two agree
    // within twice float's tolerance.
    EXPECT_LE(max_abs_diff(g.dq, dense.dq), 2 * grad_tolerance<float>(p, p.Lk, max_abs(r.dq)));
    EXPECT_LE(max_abs_diff(g.dk, dense.dk), 2 * grad_tolerance<float>(p, p.Lk, max_abs(r.dk)));
    EXPECT_LE(max_abs_diff(g.dv, dense.dv), 2 * grad_tolerance<float>(p, p.Lk, max_abs(r.dv)));
  }
}

// Rows that see no key (padding of length 0; causal with Lq > Lk): zero
// gradients, never NaN; keys no row selected get zero dk, dv.
TEST(TopkBackwardMasked, EmptyRowsGiveZeroGradients) {
  const Problem p = make(2, 2, 1, 30, 20, 8, 8);
  const Inputs<float> in(p, 3);
  const Tensor<float> dout = random_tensor<float>(p.B, p.Hq, p.Lq, p.Dv, 5);
  const Grads<float> g = fast_grads(in, dout, p, 4, attn::key_padding({20, 0}),
                                    attn::no_score_mod(), attn::TopkOptions{});
  for (index_t h = 0; h < p.Hq; ++h)
    for (index_t i = 0; i < p.Lq; ++i)
      for (index_t c = 0; c < p.D; ++c) ASSERT_EQ(g.dq(1, h, i, c), 0.f);
  for (index_t j = 0; j < p.Lk; ++j)
    for (index_t c = 0; c < p.D; ++c) {
      ASSERT_EQ(g.dk(1, 0, j, c), 0.f);
      ASSERT_EQ(g.dv(1, 0, j, c), 0.f);
    }
  const Grads<float> c =
      fast_grads(in, dout, p, 4, attn::causal(), attn::no_score_mod(), attn::TopkOptions{});
  for (const auto* t : {&c.dq, &c.dk, &c.dv})
    for (float x : t->buf) ASSERT_TRUE(std::isfinite(x));
  for (index_t i = 0; i < p.Lq - p.Lk; ++i)  // query i sees keys j <= i - 10: none for i < 10
    for (index_t c0 = 0; c0 < p.D; ++c0) ASSERT_EQ(c.dq(0, 0, i, c0), 0.f);
  const Grads<double> r = reference_grads(in, dout, p, 4, attn::causal(), attn::no_score_mod(), {});
  expect_grads_close(c, r, p, 4);
}

// Central finite differences of L = Σ dout ∘ out in double, on a tiny shape,
// with steps small enough that no selection changes (checked: the selected
// keys at x ± h equal those at x).
TEST(TopkBackwardDouble, FiniteDifferences) {
  const Problem p = make(1, 2, 1, 5, 9, 3, 2);
  Inputs<double> in(p, 21);
  const Tensor<double> dout = random_tensor<double>(p.B, p.Hq, p.Lq, p.Dv, 22);
  const index_t kb = 3;
  const auto mod = attn::compose(attn::alibi(attn::alibi_slopes(2)), attn::softcap(2.0));
  const auto mask = attn::causal_top_left();
  auto loss = [&](std::vector<std::int64_t>* sel) {
    Tensor<double> out(p.B, p.Hq, p.Lq, p.Dv);
    std::vector<std::int64_t> idx(static_cast<std::size_t>(p.B * p.Hq * p.Lq * kb));
    attn::TopkOptions opt;
    opt.indices = attn::TensorView<std::int64_t, 4>(idx.data(), {p.B, p.Hq, p.Lq, kb});
    attn::topk_attention(in.q.view, in.k.view, in.v.view, out.view, kb, mask, mod, opt);
    if (sel) *sel = idx;
    double l = 0;
    for (std::size_t i = 0; i < out.buf.size(); ++i) l += out.buf[i] * dout.buf[i];
    return l;
  };
  std::vector<std::int64_t> base;
  (void)loss(&base);
  const Grads<double> g = fast_grads(in, dout, p, kb, mask, mod, {});
  const double h = 1e-6;
  auto check = [&](Tensor<double>& x, const Tensor<double>& grad, const char* name) {
    for (std::size_t e = 0; e < x.buf.size(); ++e) {
      const double x0 = x.buf[e];
      std::vector<std::int64_t> sp, sm;
      x.buf[e] = x0 + h;
      const double lp = loss(&sp);
      x.buf[e] = x0 - h;
      const double lm = loss(&sm);
      x.buf[e] = x0;
      ASSERT_EQ(sp, base) << name << " element " << e << ": the step changed the selection";
      ASSERT_EQ(sm, base) << name << " element " << e << ": the step changed the selection";
      // central difference: truncation ~h²·L''' and cancellation ~eps·|L|/h
      EXPECT_NEAR((lp - lm) / (2 * h), grad.buf[e], 1e-7 + 1e-6 * std::abs(grad.buf[e]))
          << name << " element " << e;
    }
  };
  check(in.q, g.dq, "q");
  check(in.k, g.dk, "k");
  check(in.v, g.dv, "v");
}

// Same inputs and tiles: bitwise the same gradients for 1, 2 and 3 threads
// (GQA: dk, dv sum over the group in a fixed order), dbias included.
TEST(TopkBackwardDeterminism, AnyThreadCount) {
  const Problem p = make(2, 4, 2, 90, 200, 32, 24);
  const Inputs<float> in(p, 8);
  const Tensor<float> dout = random_tensor<float>(p.B, p.Hq, p.Lq, p.Dv, 9);
  const Tensor<float> bias = random_tensor<float>(1, 1, p.Lq, p.Lk, 10);
  std::vector<Grads<float>> runs;
  std::vector<Tensor<float>> dbias;
  for (int threads : {1, 2, 3}) {
    attn::TopkOptions opt;
    opt.num_threads = threads;
    opt.block_q = 32;
    dbias.emplace_back(1, 1, p.Lq, p.Lk);
    runs.push_back(fast_grads(in, dout, p, 16, attn::causal(), attn::no_score_mod(), opt));
    (void)fast_grads(in, dout, p, 16, attn::causal(),
                     attn::additive_bias(bias.cview(), dbias.back().view), opt);
  }
  for (std::size_t t = 1; t < runs.size(); ++t) {
    ASSERT_EQ(runs[t].dq.buf, runs[0].dq.buf);
    ASSERT_EQ(runs[t].dk.buf, runs[0].dk.buf);
    ASSERT_EQ(runs[t].dv.buf, runs[0].dv.buf);
    ASSERT_EQ(dbias[t].buf, dbias[0].buf);
  }
}

// ------------------------------------------------------------------ errors --

TEST(TopkBackwardErrors, ThrowBeforeWriting) {
  const Problem p = make(1, 2, 2, 10, 20, 8, 8);
  const Inputs<float> in(p, 1);
  const Tensor<float> out = random_tensor<float>(1, 2, 10, 8, 2);
  const Tensor<float> dout = random_tensor<float>(1, 2, 10, 8, 3);
  Grads<float> g(p, Layout::bhsd);
  std::vector<std::int64_t> idx(2 * 10 * 4);
  for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<std::int64_t>(i % 4);
  const attn::TensorView<std::int64_t, 4> iv(idx.data(), {1, 2, 10, 4});
  auto expect = [&](auto&& call, const std::string& what) {
    try {
      call();
      FAIL() << "no error for " << what;
    } catch (const attn::Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    for (const auto* t : {&g.dq, &g.dk, &g.dv})
      for (float x : t->buf) ASSERT_EQ(x, 99.f);
  };
  auto run = [&](index_t kb, const attn::TopkOptions& opt, const auto& mask) {
    return [&, kb, opt] {
      attn::topk_attention_backward(in.q.cview(), in.k.cview(), in.v.cview(), out.cview(),
                                    dout.cview(), g.dq.view, g.dk.view, g.dv.view, kb, mask,
                                    attn::no_score_mod(), opt);
    };
  };
  attn::TopkOptions opt;
  expect(run(0, opt, attn::no_mask()), "k_best is 0, must be >= 1");
  opt.indices = iv;
  expect(run(3, opt, attn::no_mask()), "indices has shape [1, 2, 10, 4], expected [1, 2, 10, 3]");
  idx[5] = 20;
  expect(run(4, opt, attn::no_mask()),
         "indices(0, 0, 1, 1) is 20, expected a key in [0, 20) (Lk) or -1");
  idx[5] = -1;
  expect(run(4, opt, attn::no_mask()), "indices(0, 0, 1, 2) is 2, after a -1");
  idx[5] = 1;
  expect(run(4, opt, attn::causal_top_left()),
         "indices(0, 0, 0, 1) is key 1, which the mask hides from query 0");
  attn::TopkOptions drop;
  drop.dropout.p = 0.1;
  expect(run(4, drop, attn::no_mask()), "dropout.p is 0.1, but top-k attention has no dropout");
  const std::vector<float> sink_logits{0.5f, 0.5f};
  attn::TopkOptions sinks;
  sinks.sinks = attn::TensorView<const float, 1>(sink_logits.data(), {2});
  expect(run(4, sinks, attn::no_mask()), "top-k attention has no attention sinks");
  // the forward refuses both too (it used to ignore them)
  Tensor<float> fwd_out(1, 2, 10, 8);
  expect([&] { attn::topk_attention(in.q.view, in.k.view, in.v.view, fwd_out.view, 4, drop); },
         "dropout.p is 0.1, but top-k attention has no dropout");
  expect([&] { attn::topk_attention(in.q.view, in.k.view, in.v.view, fwd_out.view, 4, sinks); },
         "top-k attention has no attention sinks");
  for (float x : fwd_out.buf) ASSERT_EQ(x, 0.f);

  // gradient outputs overlapping an input or the indices
  Tensor<float> dk_bad(1, 2, 20, 8);
  auto alias = [&](const attn::Tensor4<float>& dq_view, const attn::Tensor4<float>& dk_view,
                   const attn::TopkOptions& o) {
    return [&, dq_view, dk_view, o] {
      attn::topk_attention_backward(in.q.cview(), in.k.cview(), in.v.cview(), out.cview(),
                                    dout.cview(), dq_view, dk_view, g.dv.view, 4, o);
    };
  };
  const attn::Tensor4<float> dq_on_q(const_cast<float*>(in.q.buf.data()), {1, 2, 10, 8});
  expect(alias(dq_on_q, g.dk.view, {}), "dq overlaps q");
  const attn::Tensor4<float> dk_on_idx(reinterpret_cast<float*>(idx.data()), {1, 2, 20, 8});
  expect(alias(g.dq.view, dk_on_idx, opt), "dk overlaps indices");
  const attn::Tensor4<float> dq_wrong(dk_bad.buf.data(), {1, 2, 11, 8});
  expect(alias(dq_wrong, g.dk.view, {}), "dq has shape [1, 2, 11, 8], expected [1, 2, 10, 8]");
}

}  // namespace
