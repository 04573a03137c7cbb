// Gradients of MultiHeadAttention's varlen (packed) form: forward_varlen
// with an AttentionContext, then backward_varlen. Against the batched
// backward run once per sequence (weights summed over sequences, dx
// concatenated), against central finite differences in double, GradMode::
// accumulate, a relative-bias table's gradient summed over sequences,
// bitwise determinism across thread counts, and argument errors.
#include "layer_grads.hpp"

#include <attn/multi_head.hpp>
#include <attn/policy/t5_bias.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace attn_test;
/// Gradients in double: dx (packed rows) and the eight parameter gradients.
struct Grads {
  std::vector<double> dx, p[8];
};

/// forward_varlen with a context, then backward_varlen, in T.
template <class T, class Mask, class Mod>
Grads varlen_grads(const attn::MultiHeadConfig& c, const LayerParams& w,
                   const std::vector<index_t>& cu, const std::vector<double>& x64,
                   const std::vector<double>& r64, const Mask& mask, const Mod& mod,
                   const attn::AttentionOptions& opt = {}) {
  const index_t total = cu.back(), dm = c.d_model;
  const std::vector<T> x = cast<T>(x64), r = cast<T>(r64);
  std::vector<T> out(x.size()), dx(x.size());
  attn::MultiHeadAttention<T> layer(c);
  w.load(layer);
  attn::AttentionContext<T> ctx;
  attn::AttentionGrads<T> g;
  layer.forward_varlen(rows2(x, total, dm), cu, rows2(out, total, dm), mask, mod, opt, ctx);
  EXPECT_TRUE(ctx.varlen());
  layer.backward_varlen(ctx, rows2(x, total, dm), cu, rows2(r, total, dm), rows2(dx, total, dm), g,
                        mask, mod, opt);
  Grads res;
  res.dx.assign(dx.begin(), dx.end());
  collect_grads(g, res.p);
  return res;
}

/// The batched forward + backward on each sequence alone (batch 1): dx rows
/// concatenated, parameter gradients summed over the sequences (in double).
template <class T, class Mask, class Mod>
Grads per_sequence_grads(const attn::MultiHeadConfig& c, const LayerParams& w,
                         const std::vector<index_t>& cu, const std::vector<double>& x64,
                         const std::vector<double>& r64, const Mask& mask, const Mod& mod,
                         const attn::AttentionOptions& opt = {}) {
  const index_t dm = c.d_model;
  const std::vector<T> x = cast<T>(x64), r = cast<T>(r64);
  attn::MultiHeadAttention<T> layer(c);
  w.load(layer);
  Grads res;
  res.dx.assign(x.size(), 0.0);
  for (std::size_t s = 0; s + 1 < cu.size(); ++s) {
    const index_t r0 = cu[s], len = cu[s + 1] - cu[s];
    if (len == 0) continue;
    std::vector<T> out(static_cast<std::size_t>(len * dm)), dx(out.size());
    attn::AttentionContext<T> ctx;
    attn::AttentionGrads<T> g;
    const attn::TensorView<const T, 3> xs(x.data() + r0 * dm, {1, len, dm});
    const attn::TensorView<const T, 3> rs(r.data() + r0 * dm, {1, len, dm});
    layer.forward(xs, attn::TensorView<T, 3>(out.data(), {1, len, dm}), mask, mod, opt, ctx);
    layer.backward(ctx, xs, rs, attn::TensorView<T, 3>(dx.data(), {1, len, dm}), g, mask, mod, opt);
    for (index_t i = 0; i < len * dm; ++i)
      res.dx[static_cast<std::size_t>(r0 * dm + i)] = dx[static_cast<std::size_t>(i)];
    Grads one;
    collect_grads(g, one.p);
    for (int i = 0; i < 8; ++i) {
      if (res.p[i].empty()) res.p[i].assign(one.p[i].size(), 0.0);
      for (std::size_t j = 0; j < one.p[i].size(); ++j) res.p[i][j] += one.p[i][j];
    }
  }
  return res;
}

void expect_close(const Grads& got, const Grads& want, double tol, const std::string& what) {
  double m = worst(got.dx, want.dx);
  for (int i = 0; i < 8; ++i) m = std::max(m, worst(got.p[i], want.p[i]));
  std::printf("%s: largest relative error %.3g (tolerance %.3g)\n", what.c_str(), m, tol);
  EXPECT_LE(worst(got.dx, want.dx), tol) << what << ": dx";
  for (int i = 0; i < 8; ++i)
    EXPECT_LE(worst(got.p[i], want.p[i]), tol) << what << ": " << kGradNames[i];
}

/// GQA, Dv != D, RoPE with an offset: every piece of the chain.
attn::MultiHeadConfig small_config() {
  attn::MultiHeadConfig c;
  c.d_model = 12;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.head_dim = 4;
  c.v_head_dim = 3;
  attn::Rope r;
  r.theta = 100.0;
  r.offset = 3;
  c.rope = r;
  return attn::detail::resolve_config(c);
}

// ------------------------------------------------------ against per-sequence --

// Sequences of 5, 0, 7, 1 and 17 rows (an empty one, a single row, one past
// a 16-row tile). Each sequence's attention is the same problem in both
// forms; what differs is the order of the products over rows: the weight
// gradients sum `total` rows at once instead of per sequence and then
// across, dx rows are independent. A sum of K terms reordered moves by at
// most (K - 1)·eps·Σ|terms|; the terms here are O(1) against gradients of
// O(1)–O(10), so 4·total·eps bounds it (and is far below a wrong position or
// a sequence leaking into another, which move gradients by O(1)).
template <class T>
void check_against_per_sequence() {
  const attn::MultiHeadConfig c = small_config();
  const std::vector<index_t> cu{0, 5, 5, 12, 13, 30};
  const index_t total = cu.back();
  const LayerParams w(c, 1);
  const std::vector<double> x = random_rows(total, c.d_model, 2),
                            r = random_rows(total, c.d_model, 3);
  const double tol = 4.0 * static_cast<double>(total) * eps<T>();
  const std::string tn = sizeof(T) == 4 ? "float" : "double";
  expect_close(varlen_grads<T>(c, w, cu, x, r, attn::causal(), attn::no_score_mod()),
               per_sequence_grads<T>(c, w, cu, x, r, attn::causal(), attn::no_score_mod()), tol,
               tn + ", causal");
  const auto mod = attn::compose(attn::alibi(attn::alibi_slopes(c.q_heads)), attn::softcap(5.0));
  expect_close(varlen_grads<T>(c, w, cu, x, r, attn::window(3, 1), mod),
               per_sequence_grads<T>(c, w, cu, x, r, attn::window(3, 1), mod), tol,
               tn + ", window, ALiBi + soft-cap");
  attn::AttentionOptions drop;
  drop.dropout.p = 0.25;
  drop.dropout.seed = 77;
  drop.scale = 0.7;
  expect_close(varlen_grads<T>(c, w, cu, x, r, attn::causal(), attn::no_score_mod(), drop),
               per_sequence_grads<T>(c, w, cu, x, r, attn::causal(), attn::no_score_mod(), drop),
               tol, tn + ", causal, dropout 0.25, scale 0.7");
  attn::MultiHeadConfig plain = c;  // no RoPE, no mask
  plain.rope.reset();
  expect_close(varlen_grads<T>(plain, w, cu, x, r, attn::no_mask(), attn::no_score_mod()),
               per_sequence_grads<T>(plain, w, cu, x, r, attn::no_mask(), attn::no_score_mod()),
               tol, tn + ", no mask, no RoPE");
}

TEST(LayerVarlenBackward, FloatEqualsPerSequenceBackward) { check_against_per_sequence<float>(); }
TEST(LayerVarlenBackward, DoubleEqualsPerSequenceBackward) { check_against_per_sequence<double>(); }

// A check that sees RoPE: the same rows read as one sequence (positions run
// on across the boundary) give gradients far outside the tolerance above.
TEST(LayerVarlenBackward, PerSequenceCheckSeesPositions) {
  const attn::MultiHeadConfig c = small_config();
  const std::vector<index_t> cu{0, 6, 13}, one{0, 13};
  const LayerParams w(c, 4);
  const std::vector<double> x = random_rows(13, c.d_model, 5), r = random_rows(13, c.d_model, 6);
  const Grads split = varlen_grads<double>(c, w, cu, x, r, attn::no_mask(), attn::no_score_mod());
  const Grads joined = varlen_grads<double>(c, w, one, x, r, attn::no_mask(), attn::no_score_mod());
  EXPECT_GT(worst(joined.p[0], split.p[0]), 1e-3);
  EXPECT_GT(worst(joined.dx, split.dx), 1e-3);
}

// ------------------------------------------------------ finite differences --

/// L = Σ out ∘ r of the layer's inference forward_varlen, in double.
template <class Mask>
double loss(const attn::MultiHeadConfig& c, const LayerParams& w, const std::vector<index_t>& cu,
            const std::vector<double>& x, const std::vector<double>& r, const Mask& mask) {
  const index_t total = cu.back();
  std::vector<double> out(x.size());
  attn::MultiHeadAttention<double> layer(c);
  w.load(layer);
  attn::AttentionOptions one;
  one.num_threads = 1;
  layer.forward_varlen(rows2(x, total, c.d_model), cu, rows2(out, total, c.d_model), mask,
                       attn::no_score_mod(), one);
  double s = 0;
  for (std::size_t i = 0; i < out.size(); ++i) s += out[i] * r[i];
  return s;
}

// The double path reads the forward's lse in float (as every attention
// backward does): P = exp(s - lse) carries a relative error up to
// |lse|·eps<float>/2 (|lse| < 8 here); central differences with h = 1e-5
// add ~1e-9. 16·eps<float> bounds both, far below a wrong formula.
TEST(LayerVarlenBackward, MatchesFiniteDifferences) {
  const attn::MultiHeadConfig c = small_config();
  const std::vector<index_t> cu{0, 3, 3, 7, 8};
  const index_t total = cu.back();
  const LayerParams w0(c, 7);
  const std::vector<double> x0 = random_rows(total, c.d_model, 8),
                            r = random_rows(total, c.d_model, 9);
  for (attn::RopePairing pairing :
       {attn::RopePairing::half_split, attn::RopePairing::interleaved}) {
    attn::MultiHeadConfig cp = c;
    cp.rope->pairing = pairing;
    const Grads got = varlen_grads<double>(cp, w0, cu, x0, r, attn::causal(), attn::no_score_mod());
    const double h = 1e-5;
    Grads fd;
    std::vector<double> x = x0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double keep = x[i];
      x[i] = keep + h;
      const double up = loss(cp, w0, cu, x, r, attn::causal());
      x[i] = keep - h;
      const double dn = loss(cp, w0, cu, x, r, attn::causal());
      x[i] = keep;
      fd.dx.push_back((up - dn) / (2 * h));
    }
    LayerParams w = w0;
    for (int e = 0; e < 8; ++e)
      for (index_t i = 0; i < w.size(e); ++i) {
        double* p = w.data(e) + i;
        const double keep = *p;
        *p = keep + h;
        const double up = loss(cp, w, cu, x0, r, attn::causal());
        *p = keep - h;
        const double dn = loss(cp, w, cu, x0, r, attn::causal());
        *p = keep;
        fd.p[e].push_back((up - dn) / (2 * h));
      }
    expect_close(got, fd, 16.0 * eps<float>(), "finite differences, causal, GQA, RoPE");
  }
}

// ------------------------------------------------------- modifier gradients --

// A T5 bias table is shared by every sequence: its gradient is the sum of
// each sequence's (in double, in sequence order: the same sums as adding the
// per-sequence gradients here, so equal to rounding of the sum's order only).
TEST(LayerVarlenBackward, BiasTableGradientSumsOverSequences) {
  attn::MultiHeadConfig c = small_config();
  const std::vector<index_t> cu{0, 9, 10, 26};
  const index_t total = cu.back(), nb = 8;
  const LayerParams w(c, 11);
  const std::vector<double> x = random_rows(total, c.d_model, 12),
                            r = random_rows(total, c.d_model, 13);
  const std::vector<double> table = random_rows(nb, c.q_heads, 14);
  std::vector<double> g(table.size(), 5.0), sum(table.size(), 0.0);
  const attn::TensorView<double, 2> gv(g.data(), {nb, c.q_heads});
  const auto mod = attn::t5_bias(table, nb, 20, true).with_table_grad(gv);
  varlen_grads<double>(c, w, cu, x, r, attn::causal(), mod);
  for (std::size_t s = 0; s + 1 < cu.size(); ++s) {
    const std::vector<index_t> one{0, cu[s + 1] - cu[s]};
    const std::vector<double> xs(x.begin() + cu[s] * c.d_model, x.begin() + cu[s + 1] * c.d_model),
        rs(r.begin() + cu[s] * c.d_model, r.begin() + cu[s + 1] * c.d_model);
    std::vector<double> gs(table.size(), 0.0);
    const auto ms = attn::t5_bias(table, nb, 20, true)
                        .with_table_grad(attn::TensorView<double, 2>(gs.data(), {nb, c.q_heads}));
    varlen_grads<double>(c, w, one, xs, rs, attn::causal(), ms);
    for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += gs[i];
  }
  EXPECT_LE(worst(g, sum), 4.0 * eps<double>());
  EXPECT_GT(*std::max_element(sum.begin(), sum.end()), 0.0);
}

// ---------------------------------------------------------------- accumulate --

TEST(LayerVarlenBackward, AccumulateAddsToGradients) {
  const attn::MultiHeadConfig c = small_config();
  const std::vector<index_t> cu{0, 4, 11};
  const index_t total = cu.back(), dm = c.d_model;
  attn::MultiHeadAttention<double> layer(c);
  LayerParams(c, 21).load(layer);
  const std::vector<double> x = random_rows(total, dm, 22), r = random_rows(total, dm, 23);
  std::vector<double> out(x.size()), dx(x.size());
  attn::AttentionContext<double> ctx;
  attn::AttentionGrads<double> once, acc;
  layer.forward_varlen(rows2(x, total, dm), cu, rows2(out, total, dm), attn::causal(),
                       attn::no_score_mod(), {}, ctx);
  layer.backward_varlen(ctx, rows2(x, total, dm), cu, rows2(r, total, dm), rows2(dx, total, dm),
                        once, attn::causal());
  acc.mode = attn::GradMode::accumulate;
  layer.zero_grads(acc);
  layer.backward_varlen(ctx, rows2(x, total, dm), cu, rows2(r, total, dm), rows2(dx, total, dm),
                        acc, attn::causal());
  EXPECT_EQ(acc.wq, once.wq);  // 0 + g is g, bitwise
  EXPECT_EQ(acc.bo, once.bo);
  layer.backward_varlen(ctx, rows2(x, total, dm), cu, rows2(r, total, dm),
                        attn::TensorView<double, 2>(), acc, attn::causal());  // dx skipped
  EXPECT_LE((acc.wk - 2 * once.wk).cwiseAbs().maxCoeff(),
            4 * eps<double>() * once.wk.cwiseAbs().maxCoeff());
  EXPECT_LE((acc.bv - 2 * once.bv).cwiseAbs().maxCoeff(),
            4 * eps<double>() * once.bv.cwiseAbs().maxCoeff());
}

// ---------------------------------------------------------------- determinism --

TEST(LayerVarlenBackward, BitwiseIdenticalForAnyThreadCount) {
  attn::MultiHeadConfig c;
  c.d_model = 64, c.q_heads = 8, c.kv_heads = 2, c.head_dim = 16;
  c.rope = attn::Rope();
  c = attn::detail::resolve_config(c);
  const std::vector<index_t> cu{0, 130, 131, 131, 300, 365};
  const index_t total = cu.back();
  const LayerParams w(c, 31);
  const std::vector<double> x = random_rows(total, c.d_model, 32),
                            r = random_rows(total, c.d_model, 33);
  attn::AttentionOptions o;
  o.num_threads = 1;
  const Grads one = varlen_grads<float>(c, w, cu, x, r, attn::causal(), attn::no_score_mod(), o);
  for (int t : {2, 3}) {
    o.num_threads = t;
    const Grads many = varlen_grads<float>(c, w, cu, x, r, attn::causal(), attn::no_score_mod(), o);
    EXPECT_EQ(many.dx, one.dx) << t << " threads";
    for (int i = 0; i < 8; ++i)
      EXPECT_EQ(many.p[i], one.p[i]) << kGradNames[i] << ", " << t << " threads";
  }
}

// -------------------------------------------------------------------- errors --

template <class F>
std::string message(F&& f) {
  try {
    f();
  } catch (const attn::Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(LayerVarlenBackward, ErrorsBeforeWriting) {
  const attn::MultiHeadConfig c = small_config();
  attn::MultiHeadAttention<double> layer(c);
  LayerParams(c, 41).load(layer);
  const std::vector<index_t> cu{0, 2, 5};
  const index_t total = 5, dm = c.d_model;
  std::vector<double> x = random_rows(total, dm, 42);
  const std::vector<double> r = random_rows(total, dm, 43);
  std::vector<double> out(x.size()), dx(x.size(), 7.0), wrong((total + 1) * dm, 7.0);
  std::vector<double> dbias(static_cast<std::size_t>(c.q_heads * 2 * 2), 7.0);
  attn::AttentionContext<double> ctx;
  attn::AttentionGrads<double> g;
  auto untouched = [&] {
    EXPECT_TRUE(std::all_of(dx.begin(), dx.end(), [](double v) { return v == 7.0; }));
    EXPECT_TRUE(std::all_of(dbias.begin(), dbias.end(), [](double v) { return v == 7.0; }));
    EXPECT_EQ(g.wq.size(), 0);
  };
  auto has = [](const std::string& m, const char* needle) {
    EXPECT_NE(m.find(needle), std::string::npos) << m;
  };
  const auto X = rows2(x, total, dm);
  const auto R = rows2(r, total, dm);
  const auto DX = rows2(dx, total, dm);
  has(message([&] { layer.backward_varlen(ctx, X, cu, R, DX, g); }), "ctx is empty");
  layer.forward(attn::TensorView<const double, 3>(x.data(), {1, total, dm}),
                attn::TensorView<double, 3>(out.data(), {1, total, dm}), attn::no_mask(),
                attn::no_score_mod(), {}, ctx);
  has(message([&] { layer.backward_varlen(ctx, X, cu, R, DX, g); }),
      "ctx was filled by a batched forward: call backward, not backward_varlen");
  layer.forward_varlen(X, cu, rows2(out, total, dm), attn::causal(), attn::no_score_mod(), {}, ctx);
  has(message([&] {
        layer.backward(ctx, attn::TensorView<const double, 3>(x.data(), {1, total, dm}),
                       attn::TensorView<const double, 3>(r.data(), {1, total, dm}),
                       attn::TensorView<double, 3>(dx.data(), {1, total, dm}), g);
      }),
      "ctx was filled by forward_varlen: call backward_varlen");
  has(message([&] {
        layer.backward_varlen(ctx, X, {0, 3, 5}, R, DX, g, attn::causal());
      }),
      "cu_seqlens[1] is 3, but the forward that filled ctx had 2");
  has(message([&] {
        layer.backward_varlen(ctx, X, {0, 5}, R, DX, g, attn::causal());
      }),
      "cu_seqlens has 2 entries, but the forward that filled ctx had 3");
  has(message([&] {
        layer.backward_varlen(ctx, rows2(wrong, total + 1, dm), cu, R, DX, g, attn::causal());
      }),
      "x has shape [6, 12], expected [5, 12] (the forward's x: packed rows, d_model)");
  has(message([&] {
        layer.backward_varlen(ctx, X, cu, R, rows2(wrong, total + 1, dm), g, attn::causal());
      }),
      "dx has shape [6, 12]");
  has(message([&] { layer.backward_varlen(ctx, X, cu, R, rows2(x, total, dm), g); }),
      "dx overlaps x");
  has(message([&] {
        layer.backward_varlen(ctx, X, cu, R, DX, g, attn::causal(), attn::no_score_mod(), [] {
          attn::AttentionOptions o;
          o.dropout.p = 1.5;
          return o;
        }());
      }),
      "dropout p is 1.5");
  // a bias (with dbias) of 2×2 binds the first sequence (2 rows) but not the second (3 rows):
  // the first sequence's backward must not have written dbias when the second one's check fails
  std::vector<double> bias(dbias.size(), 0.5);
  const auto mod =
      attn::additive_bias(attn::TensorView<const double, 4>(bias.data(), {1, c.q_heads, 2, 2}),
                          attn::TensorView<double, 4>(dbias.data(), {1, c.q_heads, 2, 2}));
  has(message([&] { layer.backward_varlen(ctx, X, cu, R, DX, g, attn::causal(), mod); }),
      "additive_bias");
  untouched();
  layer.set_bo(VecD::Zero(dm));
  has(message([&] { layer.backward_varlen(ctx, X, cu, R, DX, g, attn::causal()); }),
      "weights changed");
  untouched();
}

}  // namespace
