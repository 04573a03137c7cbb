// CrossAttention's varlen (packed) form: forward_varlen and backward_varlen
// with query and memory sequences of their own lengths. Against the batched
// layer run once per sequence (outputs and lse, dx and dmemory rows,
// parameter gradients summed), sequences with no queries or no memory rows,
// central finite differences in double, bitwise determinism across thread
// counts, and argument errors with nothing written.
#include "layer_grads.hpp"

#include <attn/cross.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace attn_test;
/// GQA, Dv != D, a memory narrower than d_model.
attn::MultiHeadConfig config() {
  attn::MultiHeadConfig c;
  c.d_model = 12;
  c.d_kv_in = 10;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.head_dim = 4;
  c.v_head_dim = 3;
  return attn::detail::resolve_config(c);
}

/// One problem: packed queries x, packed memory m, the output's cotangent r.
struct Packed {
  std::vector<index_t> cq, ck;
  std::vector<double> x, m, r;
  Packed(const attn::MultiHeadConfig& c, std::vector<index_t> cu_q, std::vector<index_t> cu_k,
         std::uint32_t seed)
      : cq(std::move(cu_q)), ck(std::move(cu_k)) {
    x = random_rows(cq.back(), c.d_model, seed);
    m = random_rows(ck.back(), c.d_kv_in, seed + 1);
    r = random_rows(cq.back(), c.d_model, seed + 2);
  }
};

/// Everything a training step produces, in double.
struct Result {
  std::vector<double> out, lse, dx, dm, p[8];
};

/// forward_varlen with a context (and options.lse), then backward_varlen, in
/// T; `reuse`, if given, is the layer's context (kept between calls).
template <class T, class Mask, class Mod>
Result varlen_step(const attn::MultiHeadConfig& c, const LayerParams& w, const Packed& pk,
                   const Mask& mask, const Mod& mod, attn::AttentionOptions opt = {},
                   attn::AttentionContext<T>* reuse = nullptr) {
  const index_t tq = pk.cq.back(), tk = pk.ck.back(), dm = c.d_model, dk = c.d_kv_in;
  const std::vector<T> x = cast<T>(pk.x), m = cast<T>(pk.m), r = cast<T>(pk.r);
  std::vector<T> out(x.size()), dx(x.size()), dmem(m.size());
  std::vector<float> lse(static_cast<std::size_t>(c.q_heads * tq));
  opt.lse = attn::TensorView<float, 3>(lse.data(), {1, c.q_heads, tq});
  attn::CrossAttention<T> layer(c);
  w.load(layer);
  attn::AttentionContext<T> local;
  attn::AttentionContext<T>& ctx = reuse ? *reuse : local;
  attn::AttentionGrads<T> g;
  layer.forward_varlen(rows2(x, tq, dm), pk.cq, rows2(m, tk, dk), pk.ck, rows2(out, tq, dm), mask,
                       mod, opt, ctx);
  EXPECT_TRUE(ctx.varlen());
  EXPECT_EQ(ctx.cu_seqlens_k(), pk.ck);
  opt.lse = {};
  layer.backward_varlen(ctx, rows2(x, tq, dm), pk.cq, rows2(m, tk, dk), pk.ck, rows2(r, tq, dm),
                        rows2(dx, tq, dm), rows2(dmem, tk, dk), g, mask, mod, opt);
  Result res;
  res.out.assign(out.begin(), out.end());
  res.lse.assign(lse.begin(), lse.end());
  res.dx.assign(dx.begin(), dx.end());
  res.dm.assign(dmem.begin(), dmem.end());
  collect_grads(g, res.p);
  return res;
}

/// The batched layer (forward + backward) on each sequence alone, batch 1:
/// rows concatenated, parameter gradients summed over sequences (in
/// double). A sequence with queries and no memory has no batched call; what
/// the varlen form promises for it is written out here: out = bo, lse −inf,
/// dx = 0, and dout's rows still reach dbo (out = A·Wo + bo with A = 0). A
/// sequence with memory and no queries leaves dmemory = 0.
template <class T, class Mask, class Mod>
Result per_sequence_step(const attn::MultiHeadConfig& c, const LayerParams& w, const Packed& pk,
                         const Mask& mask, const Mod& mod, attn::AttentionOptions opt = {}) {
  const index_t dm = c.d_model, dk = c.d_kv_in, hq = c.q_heads, tq = pk.cq.back();
  const std::vector<T> x = cast<T>(pk.x), m = cast<T>(pk.m), r = cast<T>(pk.r);
  attn::CrossAttention<T> layer(c);
  w.load(layer);
  Result res;
  res.out.assign(x.size(), 0.0);
  res.lse.assign(static_cast<std::size_t>(hq * tq), 0.0);
  res.dx.assign(x.size(), 0.0);
  res.dm.assign(m.size(), 0.0);
  for (int i = 0; i < 8; ++i) res.p[i].assign(static_cast<std::size_t>(w.size(i)), 0.0);
  for (std::size_t s = 0; s + 1 < pk.cq.size(); ++s) {
    const index_t q0 = pk.cq[s], lq = pk.cq[s + 1] - q0, k0 = pk.ck[s], lk = pk.ck[s + 1] - k0;
    if (lq == 0) continue;
    if (lk == 0) {
      for (index_t i = 0; i < lq; ++i)
        for (index_t j = 0; j < dm; ++j) {
          res.out[static_cast<std::size_t>((q0 + i) * dm + j)] = w.b[3](j);
          res.p[7][static_cast<std::size_t>(j)] +=
              pk.r[static_cast<std::size_t>((q0 + i) * dm + j)];
        }
      for (index_t h = 0; h < hq; ++h)
        for (index_t i = 0; i < lq; ++i)
          res.lse[static_cast<std::size_t>(h * tq + q0 + i)] =
              -std::numeric_limits<double>::infinity();
      continue;
    }
    std::vector<T> out(static_cast<std::size_t>(lq * dm)), dx(out.size()),
        dmem(static_cast<std::size_t>(lk * dk));
    std::vector<float> lse(static_cast<std::size_t>(hq * lq));
    attn::AttentionOptions o = opt;
    o.lse = attn::TensorView<float, 3>(lse.data(), {1, hq, lq});
    attn::AttentionContext<T> ctx;
    attn::AttentionGrads<T> g;
    const attn::TensorView<const T, 3> xs(x.data() + q0 * dm, {1, lq, dm});
    const attn::TensorView<const T, 3> ms(m.data() + k0 * dk, {1, lk, dk});
    const attn::TensorView<const T, 3> rs(r.data() + q0 * dm, {1, lq, dm});
    layer.forward(xs, ms, attn::TensorView<T, 3>(out.data(), {1, lq, dm}), mask, mod, o, ctx);
    o.lse = {};
    layer.backward(ctx, xs, ms, rs, attn::TensorView<T, 3>(dx.data(), {1, lq, dm}),
                   attn::TensorView<T, 3>(dmem.data(), {1, lk, dk}), g, mask, mod, o);
    for (index_t i = 0; i < lq * dm; ++i) {
      res.out[static_cast<std::size_t>(q0 * dm + i)] = out[static_cast<std::size_t>(i)];
      res.dx[static_cast<std::size_t>(q0 * dm + i)] = dx[static_cast<std::size_t>(i)];
    }
    for (index_t i = 0; i < lk * dk; ++i)
      res.dm[static_cast<std::size_t>(k0 * dk + i)] = dmem[static_cast<std::size_t>(i)];
    for (index_t h = 0; h < hq; ++h)
      for (index_t i = 0; i < lq; ++i)
        res.lse[static_cast<std::size_t>(h * tq + q0 + i)] =
            lse[static_cast<std::size_t>(h * lq + i)];
    Result one;
    collect_grads(g, one.p);
    for (int i = 0; i < 8; ++i)
      for (std::size_t j = 0; j < one.p[i].size(); ++j) res.p[i][j] += one.p[i][j];
  }
  return res;
}

void expect_close(const Result& got, const Result& want, double tol, const std::string& what,
                  bool forward = true) {
  if (forward) {
    EXPECT_LE(worst(got.out, want.out), tol) << what << ": out";
    EXPECT_LE(worst(got.lse, want.lse), tol) << what << ": lse";
  }
  EXPECT_LE(worst(got.dx, want.dx), tol) << what << ": dx";
  EXPECT_LE(worst(got.dm, want.dm), tol) << what << ": dmemory";
  for (int i = 0; i < 8; ++i)
    EXPECT_LE(worst(got.p[i], want.p[i]), tol) << what << ": " << kGradNames[i];
}

// ------------------------------------------------------ against per-sequence --

// Query lengths 5, 0, 7, 3, 17, 4 against memory lengths 9, 6, 1, 0, 20, 2:
// a sequence with memory but no queries, one with queries but no memory, a
// single key, rows past a 16-row tile, more queries than keys. Each
// sequence's attention is the same problem in both forms; what differs is
// the order of the projections' sums: weight gradients sum all packed rows
// at once instead of per sequence and then across. A sum of K terms
// reordered moves by at most (K − 1)·eps·Σ|terms| with O(1) terms against
// gradients of O(1)–O(10); 4·(total rows)·eps bounds it, far below a row
// read from the wrong sequence (an O(1) change).
template <class T>
void check_against_per_sequence() {
  const attn::MultiHeadConfig c = config();
  const Packed pk(c, {0, 5, 5, 12, 15, 32, 36}, {0, 9, 15, 16, 16, 36, 38}, 21);
  const LayerParams w(c, 22);
  const double tol = 4.0 * static_cast<double>(pk.cq.back() + pk.ck.back()) * eps<T>();
  const std::string tn = sizeof(T) == 4 ? "float" : "double";
  expect_close(varlen_step<T>(c, w, pk, attn::causal(), attn::no_score_mod()),
               per_sequence_step<T>(c, w, pk, attn::causal(), attn::no_score_mod()), tol,
               tn + ", causal (bottom-right per sequence)");
  const auto mod = attn::compose(attn::alibi(attn::alibi_slopes(c.q_heads)), attn::softcap(5.0));
  expect_close(varlen_step<T>(c, w, pk, attn::window(3, 2), mod),
               per_sequence_step<T>(c, w, pk, attn::window(3, 2), mod), tol,
               tn + ", window, ALiBi + soft-cap");
  attn::AttentionOptions drop;
  drop.dropout.p = 0.25;
  drop.dropout.seed = 5;
  drop.scale = 0.6;
  expect_close(varlen_step<T>(c, w, pk, attn::no_mask(), attn::no_score_mod(), drop),
               per_sequence_step<T>(c, w, pk, attn::no_mask(), attn::no_score_mod(), drop), tol,
               tn + ", dropout 0.25, scale 0.6");
}

TEST(CrossVarlen, FloatEqualsPerSequenceLayer) { check_against_per_sequence<float>(); }
TEST(CrossVarlen, DoubleEqualsPerSequenceLayer) { check_against_per_sequence<double>(); }

// The comparison above sees which memory rows a sequence reads: shifting the
// memory boundaries by one row moves the output far past its tolerance.
TEST(CrossVarlen, PerSequenceCheckSeesTheMemoryBoundaries) {
  const attn::MultiHeadConfig c = config();
  const LayerParams w(c, 23);
  const Packed a(c, {0, 6, 13}, {0, 8, 17}, 24);
  Packed b = a;
  b.ck = {0, 9, 17};
  const Result ra = varlen_step<double>(c, w, a, attn::no_mask(), attn::no_score_mod());
  const Result rb = varlen_step<double>(c, w, b, attn::no_mask(), attn::no_score_mod());
  EXPECT_GT(worst(rb.out, ra.out), 1e-3);
  EXPECT_GT(worst(rb.dm, ra.dm), 1e-3);
}

// The inference forward_varlen writes what the training one does.
TEST(CrossVarlen, InferenceForwardEqualsTrainingForward) {
  const attn::MultiHeadConfig c = config();
  const LayerParams w(c, 25);
  const Packed pk(c, {0, 4, 4, 11}, {0, 3, 9, 9}, 26);
  const index_t tq = pk.cq.back(), tk = pk.ck.back();
  const std::vector<float> x = cast<float>(pk.x), m = cast<float>(pk.m);
  std::vector<float> out(x.size(), -5.0f);
  attn::CrossAttention<float> layer(c);
  w.load(layer);
  layer.forward_varlen(rows2(x, tq, c.d_model), pk.cq, rows2(m, tk, c.d_kv_in), pk.ck,
                       rows2(out, tq, c.d_model), attn::causal());
  const Result train = varlen_step<float>(c, w, pk, attn::causal(), attn::no_score_mod());
  EXPECT_EQ(std::vector<double>(out.begin(), out.end()), train.out);
}

// ------------------------------------------------------ finite differences --

/// L = Σ out ∘ r of the inference forward_varlen, in double.
double loss(const attn::MultiHeadConfig& c, const LayerParams& w, const Packed& pk) {
  const index_t tq = pk.cq.back(), tk = pk.ck.back();
  std::vector<double> out(pk.x.size());
  attn::CrossAttention<double> layer(c);
  w.load(layer);
  attn::AttentionOptions one;
  one.num_threads = 1;
  layer.forward_varlen(rows2(pk.x, tq, c.d_model), pk.cq, rows2(pk.m, tk, c.d_kv_in), pk.ck,
                       rows2(out, tq, c.d_model), attn::causal(), attn::no_score_mod(), one);
  double s = 0;
  for (std::size_t i = 0; i < out.size(); ++i) s += out[i] * pk.r[i];
  return s;
}

// Every input and parameter, including a sequence with no memory (its rows
// reach only bo) and one with no queries (its memory rows get zero
// gradient). The double path reads the forward's lse in float: P = exp(s −
// lse) carries a relative error up to |lse|·eps<float>/2 (|lse| < 8 here);
// central differences with h = 1e-5 add ~1e-9. 16·eps<float> bounds both.
TEST(CrossVarlen, MatchesFiniteDifferences) {
  const attn::MultiHeadConfig c = config();
  const Packed p0(c, {0, 3, 3, 5, 9}, {0, 4, 6, 6, 11}, 27);
  const LayerParams w0(c, 28);
  const Result got = varlen_step<double>(c, w0, p0, attn::causal(), attn::no_score_mod());
  const double h = 1e-5;
  Result fd;
  auto central = [&](double& e, const LayerParams& w, const Packed& pk) {
    const double keep = e;
    e = keep + h;
    const double up = loss(c, w, pk);
    e = keep - h;
    const double dn = loss(c, w, pk);
    e = keep;
    return (up - dn) / (2 * h);
  };
  Packed pk = p0;
  for (double& e : pk.x) fd.dx.push_back(central(e, w0, pk));
  for (double& e : pk.m) fd.dm.push_back(central(e, w0, pk));
  LayerParams w = w0;
  for (int i = 0; i < 8; ++i)
    for (index_t j = 0; j < w.size(i); ++j) fd.p[i].push_back(central(w.data(i)[j], w, p0));
  expect_close(got, fd, 16.0 * eps<float>(), "finite differences", /*forward=*/false);
  // the memory rows of the sequence without queries (rows 4, 5) get nothing
  for (index_t i = 4 * c.d_kv_in; i < 6 * c.d_kv_in; ++i)
    EXPECT_EQ(got.dm[static_cast<std::size_t>(i)], 0.0);
}

// ------------------------------------------------------------- determinism --

TEST(CrossVarlen, BitwiseIdenticalForAnyThreadCount) {
  const attn::MultiHeadConfig c = config();
  const LayerParams w(c, 29);
  const Packed pk(c, {0, 40, 41, 90}, {0, 70, 75, 150}, 30);
  Result first;
  for (int threads : {1, 2, 3}) {
    attn::AttentionOptions o;
    o.num_threads = threads;
    o.block_q = 16;
    o.block_k = 16;
    const Result r = varlen_step<float>(c, w, pk, attn::causal(), attn::no_score_mod(), o);
    if (threads == 1) {
      first = r;
      continue;
    }
    EXPECT_EQ(r.out, first.out) << threads << " threads";
    EXPECT_EQ(r.dx, first.dx) << threads << " threads";
    EXPECT_EQ(r.dm, first.dm) << threads << " threads";
    for (int i = 0; i < 8; ++i)
      EXPECT_EQ(r.p[i], first.p[i]) << threads << " threads, " << kGradNames[i];
  }
}

// A context keeps its buffers between steps: a sequence without queries or
// without memory must not leave the previous step's gradient rows in them.
TEST(CrossVarlen, ReusedContextLeavesNoStaleRows) {
  const attn::MultiHeadConfig c = config();
  const LayerParams w(c, 33);
  const Packed full(c, {0, 4, 9, 12}, {0, 5, 8, 14}, 34);
  Packed gaps = full;
  gaps.cq = {0, 4, 4, 12};  // sequence 1: memory rows 5..7, no queries
  gaps.ck = {0, 5, 8, 8};   // sequence 2: queries 4..11, no memory
  gaps.m.resize(static_cast<std::size_t>(8 * c.d_kv_in));
  attn::AttentionContext<float> ctx;
  (void)varlen_step<float>(c, w, full, attn::no_mask(), attn::no_score_mod(), {}, &ctx);
  const Result reused =
      varlen_step<float>(c, w, gaps, attn::no_mask(), attn::no_score_mod(), {}, &ctx);
  const Result fresh = varlen_step<float>(c, w, gaps, attn::no_mask(), attn::no_score_mod());
  EXPECT_EQ(reused.dx, fresh.dx);
  EXPECT_EQ(reused.dm, fresh.dm);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(reused.p[i], fresh.p[i]) << kGradNames[i];
  for (index_t i = 5 * c.d_kv_in; i < 8 * c.d_kv_in; ++i)
    EXPECT_EQ(reused.dm[static_cast<std::size_t>(i)], 0.0);
  for (index_t i = 4 * c.d_model; i < 12 * c.d_model; ++i)
    EXPECT_EQ(reused.dx[static_cast<std::size_t>(i)], 0.0);
}

// ----------------------------------------------------------------- errors --

/// Runs f; expects an attn::Error whose message contains `part`.
template <class F>
void expect_error_contains(F&& f, const std::string& part) {
  try {
    f();
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
        << "message: " << e.what() << "\nexpected to contain: " << part;
    return;
  }
  ADD_FAILURE() << "no attn::Error; expected one containing: " << part;
}

TEST(CrossVarlen, BadArgumentsThrowBeforeWriting) {
  const attn::MultiHeadConfig c = config();
  const LayerParams w(c, 31);
  const Packed pk(c, {0, 3, 7}, {0, 5, 6}, 32);
  const index_t tq = 7, tk = 6, dm = c.d_model, dk = c.d_kv_in;
  std::vector<float> x = cast<float>(pk.x), m = cast<float>(pk.m);
  std::vector<float> out(x.size(), 9.0f);
  attn::CrossAttention<float> layer(c);
  w.load(layer);
  auto fwd = [&](const std::vector<index_t>& cq, const std::vector<index_t>& ck,
                 attn::AttentionOptions o = {}) {
    layer.forward_varlen(rows2(x, tq, dm), cq, rows2(m, tk, dk), ck, rows2(out, tq, dm),
                         attn::no_mask(), attn::no_score_mod(), o);
  };
  expect_error_contains([&] { fwd(pk.cq, {0, 5, 7}); }, "cu_seqlens_k ends at 7");
  expect_error_contains([&] { fwd({0, 3, 2, 7}, {0, 1, 2, 6}); }, "cu_seqlens_q[2] = 2");
  expect_error_contains([&] { fwd(pk.cq, {0, 2, 4, 6}); }, "cu_seqlens_q has 3 entries");
  std::vector<float> lse(static_cast<std::size_t>(c.q_heads * tq));
  attn::AttentionOptions bad_lse;
  bad_lse.lse = attn::TensorView<float, 3>(lse.data(), {1, c.q_heads, tq - 1});
  expect_error_contains([&] { fwd(pk.cq, pk.ck, bad_lse); }, "options.lse has shape");
  // a mask bound per sequence: a bool mask of one sequence's shape fails on the other
  bool keep[3 * 5];
  std::fill(keep, keep + 15, true);
  const attn::TensorView<const bool, 4> km(keep, {1, 1, 3, 5});
  expect_error_contains(
      [&] {
        layer.forward_varlen(rows2(x, tq, dm), pk.cq, rows2(m, tk, dk), pk.ck, rows2(out, tq, dm),
                             attn::bool_mask(km));
      },
      "mask");
  // out over the memory it reads
  expect_error_contains(
      [&] {
        layer.forward_varlen(rows2(x, tq, dm), pk.cq, rows2(m, tk, dk), pk.ck,
                             attn::TensorView<float, 2>(m.data(), {tq, dm - 6}));
      },
      "out");
  for (float e : out) ASSERT_EQ(e, 9.0f);

  // backward: another key cu_seqlens, dmemory over memory, a batched ctx
  attn::AttentionContext<float> ctx;
  fwd(pk.cq, pk.ck);
  const std::vector<float> r = cast<float>(pk.r);
  std::vector<float> dx(x.size(), 4.0f), dmem(m.size(), 4.0f);
  attn::AttentionGrads<float> g;
  layer.forward_varlen(rows2(x, tq, dm), pk.cq, rows2(m, tk, dk), pk.ck, rows2(out, tq, dm),
                       attn::no_mask(), attn::no_score_mod(), {}, ctx);
  auto bwd = [&](const std::vector<index_t>& ck, attn::TensorView<float, 2> dm_view) {
    layer.backward_varlen(ctx, rows2(x, tq, dm), pk.cq, rows2(m, tk, dk), ck, rows2(r, tq, dm),
                          rows2(dx, tq, dm), dm_view, g);
  };
  expect_error_contains(
      [&] {
        bwd({0, 4, 6}, rows2(dmem, tk, dk));
      },
      "cu_seqlens_k[1] is 4, but the forward that filled ctx had 5");
  expect_error_contains([&] { bwd(pk.ck, rows2(m, tk, dk)); }, "dmemory");
  expect_error_contains([&] { bwd(pk.ck, rows2(dmem, tk - 1, dk)); }, "dmemory has shape");
  for (float e : dx) ASSERT_EQ(e, 4.0f);
  for (float e : dmem) ASSERT_EQ(e, 4.0f);
  EXPECT_EQ(g.wq.size(), 0);
  attn::AttentionContext<float> batched;
  const attn::TensorView<const float, 3> x3(x.data(), {1, tq, dm}), m3(m.data(), {1, tk, dk});
  layer.forward(x3, m3, attn::TensorView<float, 3>(out.data(), {1, tq, dm}), attn::no_mask(),
                attn::no_score_mod(), {}, batched);
  expect_error_contains(
      [&] {
        layer.backward_varlen(batched, rows2(x, tq, dm), pk.cq, rows2(m, tk, dk), pk.ck,
                              rows2(r, tq, dm), rows2(dx, tq, dm), rows2(dmem, tk, dk), g);
      },
      "call backward, not backward_varlen");
}

}  // namespace
