// Gradients of the attention layers (MultiHeadAttention, CrossAttention):
// against central finite differences of the layer's own forward in double,
// float against double, GradMode::accumulate, bitwise determinism across
// thread counts, strided inputs and outputs, and argument errors.
#include "layer_grads.hpp"

#include <attn/cross.hpp>
#include <attn/multi_head.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace attn_test;

/// A [B, L, w] buffer whose rows lie `pad` elements apart beyond w (a strided view).
template <class T>
struct Seq {
  std::vector<T> buf;
  index_t B, L, w, pad;
  Seq(index_t b, index_t l, index_t width, index_t p = 0)
      : buf(static_cast<std::size_t>(b * l * (width + p)), T(0)), B(b), L(l), w(width), pad(p) {}
  attn::TensorView<T, 3> view() {
    return attn::TensorView<T, 3>(buf.data(), {B, L, w}, {L * (w + pad), w + pad, 1});
  }
  attn::TensorView<const T, 3> cview() const {
    return attn::TensorView<const T, 3>(buf.data(), {B, L, w}, {L * (w + pad), w + pad, 1});
  }
  T& at(index_t b, index_t l, index_t j) {
    return buf[static_cast<std::size_t>((b * L + l) * (w + pad) + j)];
  }
  T at(index_t b, index_t l, index_t j) const {
    return buf[static_cast<std::size_t>((b * L + l) * (w + pad) + j)];
  }
};

template <class T>
Seq<T> random_seq(index_t B, index_t L, index_t w, std::uint32_t seed, index_t pad = 0) {
  Seq<T> s(B, L, w, pad);
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  for (index_t b = 0; b < B; ++b)
    for (index_t l = 0; l < L; ++l)
      for (index_t j = 0; j < w; ++j) s.at(b, l, j) = static_cast<T>(dist(gen));
  return s;
}

template <class T>
Seq<T> cast_seq(const Seq<double>& s) {
  Seq<T> r(s.B, s.L, s.w, s.pad);
  for (std::size_t i = 0; i < s.buf.size(); ++i) r.buf[i] = static_cast<T>(s.buf[i]);
  return r;
}

/// One layer setup: self-attention over x [B, Lq, d_model], or cross
/// attention of x over memory [B, Lk, d_kv_in].
struct Problem {
  attn::MultiHeadConfig cfg;
  bool cross = false;
  index_t B = 2, Lq = 5, Lk = 5, pad = 0;  // pad: extra row stride of x, memory, dx, dmemory
};

/// Gradients in double: dx, dmemory and the eight parameter gradients
/// (wq, wk, wv, wo as [in, out] row-major, then bq, bk, bv, bo).
struct Grads {
  std::vector<double> dx, dmem, p[8];
};

/// The forward (no context) of the layer in double: L = Σ out ∘ r.
template <class Mask>
double loss(const Problem& pr, const LayerParams& w, const Seq<double>& x, const Seq<double>& mem,
            const Seq<double>& r, const Mask& mask) {
  Seq<double> out(pr.B, pr.Lq, pr.cfg.d_model);
  attn::AttentionOptions one;
  one.num_threads = 1;  // tiny problems: no thread team per call
  if (pr.cross) {
    attn::CrossAttention<double> layer(pr.cfg);
    w.load(layer);
    layer.forward(x.cview(), mem.cview(), out.view(), mask, attn::no_score_mod(), one);
  } else {
    attn::MultiHeadAttention<double> layer(pr.cfg);
    w.load(layer);
    layer.forward(x.cview(), out.view(), mask, attn::no_score_mod(), one);
  }
  double s = 0;
  for (std::size_t i = 0; i < out.buf.size(); ++i) s += out.buf[i] * r.buf[i];
  return s;
}

template <class T>
void collect(const attn::AttentionGrads<T>& g, Grads& r) {
  collect_grads(g, r.p);
}

template <class T>
std::vector<double> flat(const Seq<T>& s) {
  std::vector<double> v;
  for (index_t b = 0; b < s.B; ++b)
    for (index_t l = 0; l < s.L; ++l)
      for (index_t j = 0; j < s.w; ++j) v.push_back(static_cast<double>(s.at(b, l, j)));
  return v;
}

/// Forward with a context, then backward, in T (inputs given in double).
template <class T, class Mask>
Grads layer_grads(const Problem& pr, const LayerParams& w, const Seq<double>& x64,
                  const Seq<double>& mem64, const Seq<double>& r64, const Mask& mask,
                  attn::AttentionOptions opt = {}) {
  const Seq<T> x = cast_seq<T>(x64), mem = cast_seq<T>(mem64), r = cast_seq<T>(r64);
  Seq<T> out(pr.B, pr.Lq, pr.cfg.d_model), dx(pr.B, pr.Lq, pr.cfg.d_model, pr.pad);
  Seq<T> dmem(pr.B, pr.Lk, pr.cfg.d_kv_in, pr.pad);
  attn::AttentionContext<T> ctx;
  attn::AttentionGrads<T> g;
  if (pr.cross) {
    attn::CrossAttention<T> layer(pr.cfg);
    w.load(layer);
    layer.forward(x.cview(), mem.cview(), out.view(), mask, attn::no_score_mod(), opt, ctx);
    layer.backward(ctx, x.cview(), mem.cview(), r.cview(), dx.view(), dmem.view(), g, mask,
                   attn::no_score_mod(), opt);
  } else {
    attn::MultiHeadAttention<T> layer(pr.cfg);
    w.load(layer);
    layer.forward(x.cview(), out.view(), mask, attn::no_score_mod(), opt, ctx);
    layer.backward(ctx, x.cview(), r.cview(), dx.view(), g, mask, attn::no_score_mod(), opt);
  }
  Grads res;
  res.dx = flat(dx);
  if (pr.cross) res.dmem = flat(dmem);
  collect(g, res);
  return res;
}

/// Central differences of L with step h for every entry of x, memory and the parameters.
template <class Mask>
Grads finite_differences(const Problem& pr, const LayerParams& w0, const Seq<double>& x0,
                         const Seq<double>& mem0, const Seq<double>& r, const Mask& mask) {
  const double h = 1e-5;
  Grads res;
  auto seq_fd = [&](const Seq<double>& s0, bool is_mem) {
    std::vector<double> v;
    Seq<double> s = s0;
    for (index_t b = 0; b < s.B; ++b)
      for (index_t l = 0; l < s.L; ++l)
        for (index_t j = 0; j < s.w; ++j) {
          const double keep = s.at(b, l, j);
          s.at(b, l, j) = keep + h;
          const double up = is_mem ? loss(pr, w0, x0, s, r, mask) : loss(pr, w0, s, mem0, r, mask);
          s.at(b, l, j) = keep - h;
          const double dn = is_mem ? loss(pr, w0, x0, s, r, mask) : loss(pr, w0, s, mem0, r, mask);
          s.at(b, l, j) = keep;
          v.push_back((up - dn) / (2 * h));
        }
    return v;
  };
  res.dx = seq_fd(x0, false);
  if (pr.cross) res.dmem = seq_fd(mem0, true);
  LayerParams w = w0;
  for (int e = 0; e < 8; ++e) {
    double* p = w.data(e);
    for (index_t i = 0; i < w.size(e); ++i) {
      const double keep = p[i];
      p[i] = keep + h;
      const double up = loss(pr, w, x0, mem0, r, mask);
      p[i] = keep - h;
      const double dn = loss(pr, w, x0, mem0, r, mask);
      p[i] = keep;
      res.p[e].push_back((up - dn) / (2 * h));
    }
  }
  return res;
}

/// Every gradient of `got` within tol of `want` (relative to max(|want|, 1)).
void expect_close(const Grads& got, const Grads& want, double tol, const std::string& what) {
  double m = worst(got.dx, want.dx);
  for (int i = 0; i < 8; ++i) m = std::max(m, worst(got.p[i], want.p[i]));
  if (!want.dmem.empty()) m = std::max(m, worst(got.dmem, want.dmem));
  std::printf("%s: largest relative error %.3g (tolerance %.3g)\n", what.c_str(), m, tol);
  EXPECT_LE(worst(got.dx, want.dx), tol) << what << ": dx";
  if (!want.dmem.empty()) {
    EXPECT_LE(worst(got.dmem, want.dmem), tol) << what << ": dmemory";
  }
  for (int i = 0; i < 8; ++i)
    EXPECT_LE(worst(got.p[i], want.p[i]), tol) << what << ": " << kGradNames[i];
}

// The double path reads the forward's lse in float (as every attention
// backward does), so P = exp(s - lse) carries a relative error up to
// |lse|·eps<float>/2 (|lse| < 8 on these shapes); the finite differences
// (h = 1e-5) add ~1e-9. 16·eps<float> bounds both with room, and is far
// below the O(1) error of any wrong formula.
const double kFdTol = 16.0 * eps<float>();

attn::MultiHeadConfig self_config() {
  attn::MultiHeadConfig c;
  c.d_model = 12;
  c.q_heads = 4;
  c.kv_heads = 2;  // GQA
  c.head_dim = 4;
  c.v_head_dim = 3;  // Dv != D
  attn::Rope r;
  r.theta = 100.0;
  r.offset = 3;
  c.rope = r;
  return attn::detail::resolve_config(c);
}

// --------------------------------------------------------- finite differences --

TEST(LayerBackward, MultiHeadGqaRopeCausalMatchesFiniteDifferences) {
  Problem pr;
  pr.cfg = self_config();
  pr.B = 2, pr.Lq = pr.Lk = 6, pr.pad = 3;  // strided x and dx
  const LayerParams w(pr.cfg, 1);
  const Seq<double> x = random_seq<double>(pr.B, pr.Lq, pr.cfg.d_model, 2, pr.pad);
  const Seq<double> r = random_seq<double>(pr.B, pr.Lq, pr.cfg.d_model, 3);
  const Seq<double> none(0, 0, 0);
  for (attn::RopePairing pairing :
       {attn::RopePairing::half_split, attn::RopePairing::interleaved}) {
    pr.cfg.rope->pairing = pairing;
    const Grads got = layer_grads<double>(pr, w, x, none, r, attn::causal());
    const Grads fd = finite_differences(pr, w, x, none, r, attn::causal());
    expect_close(got, fd, kFdTol, "self, causal, GQA, RoPE");
  }
}

TEST(LayerBackward, CrossPaddingMatchesFiniteDifferences) {
  Problem pr;
  attn::MultiHeadConfig c;
  c.d_model = 8;
  c.q_heads = 4;
  c.kv_heads = 1;  // MQA
  c.head_dim = 4;
  c.v_head_dim = 5;
  c.d_kv_in = 7;
  pr.cfg = attn::detail::resolve_config(c);
  pr.cross = true;
  pr.B = 2, pr.Lq = 4, pr.Lk = 7, pr.pad = 2;
  const LayerParams w(pr.cfg, 4);
  const Seq<double> x = random_seq<double>(pr.B, pr.Lq, c.d_model, 5, pr.pad);
  const Seq<double> mem = random_seq<double>(pr.B, pr.Lk, c.d_kv_in, 6, pr.pad);
  const Seq<double> r = random_seq<double>(pr.B, pr.Lq, c.d_model, 7);
  const auto mask = attn::key_padding({7, 3});
  const Grads got = layer_grads<double>(pr, w, x, mem, r, mask);
  const Grads fd = finite_differences(pr, w, x, mem, r, mask);
  expect_close(got, fd, kFdTol, "cross, key padding, MQA");
  // padded memory rows (j >= 3 in batch 1) get exactly zero gradient
  for (index_t l = 3; l < pr.Lk; ++l)
    for (index_t j = 0; j < c.d_kv_in; ++j)
      EXPECT_EQ(got.dmem[static_cast<std::size_t>((pr.Lk + l) * c.d_kv_in + j)], 0.0);
}

// The check above would catch a wrong formula: dWq transposed (square here:
// d_model = Hq·D) or dx without the key/value paths is far outside kFdTol.
TEST(LayerBackward, FiniteDifferenceCheckCatchesWrongGradients) {
  Problem pr;
  attn::MultiHeadConfig c = self_config();
  c.d_model = 16;
  c.d_kv_in = 0;
  pr.cfg = attn::detail::resolve_config(c);
  const LayerParams w(pr.cfg, 8);
  const Seq<double> x = random_seq<double>(pr.B, pr.Lq, c.d_model, 9);
  const Seq<double> r = random_seq<double>(pr.B, pr.Lq, c.d_model, 10);
  const Seq<double> none(0, 0, 0);
  const Grads got = layer_grads<double>(pr, w, x, none, r, attn::causal());
  const Grads fd = finite_differences(pr, w, x, none, r, attn::causal());
  EXPECT_LE(worst(got.p[0], fd.p[0]), kFdTol);
  std::vector<double> transposed(got.p[0].size());
  const auto n = static_cast<std::size_t>(c.d_model);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < n; ++j) transposed[i * n + j] = got.p[0][j * n + i];
  EXPECT_GT(worst(transposed, fd.p[0]), 100 * kFdTol);
  // RoPE's backward with the other pairing (a wrong un-rotation) is caught too
  Problem other = pr;
  other.cfg.rope->pairing = attn::RopePairing::interleaved;
  const Grads wrong = layer_grads<double>(other, w, x, none, r, attn::causal());
  EXPECT_GT(worst(wrong.p[0], fd.p[0]), 100 * kFdTol);
  EXPECT_GT(worst(wrong.dx, fd.dx), 100 * kFdTol);
}

// ------------------------------------------------------------ float vs double --

// The float layer against the double one. The float path rounds every
// product of depth K ≤ max(B·L, d_model, Hq·Dv) and the attention; 64·eps
// covers sqrt(K)-growth for these sizes (K ≤ 2·37), far below a wrong formula.
TEST(LayerBackward, FloatAgreesWithDouble) {
  Problem pr;
  pr.cfg = self_config();
  pr.B = 2, pr.Lq = pr.Lk = 37;
  const LayerParams w(pr.cfg, 11);
  const Seq<double> x = random_seq<double>(pr.B, pr.Lq, pr.cfg.d_model, 12);
  const Seq<double> r = random_seq<double>(pr.B, pr.Lq, pr.cfg.d_model, 13);
  const Seq<double> none(0, 0, 0);
  const Grads g64 = layer_grads<double>(pr, w, x, none, r, attn::causal());
  const Grads g32 = layer_grads<float>(pr, w, x, none, r, attn::causal());
  expect_close(g32, g64, 64 * eps<float>(), "float vs double (self)");

  Problem cr;
  attn::MultiHeadConfig c;
  c.d_model = 16, c.q_heads = 4, c.kv_heads = 2, c.head_dim = 8, c.v_head_dim = 6, c.d_kv_in = 10;
  cr.cfg = attn::detail::resolve_config(c);
  cr.cross = true;
  cr.B = 2, cr.Lq = 19, cr.Lk = 41;
  const LayerParams wc(cr.cfg, 14);
  const Seq<double> xc = random_seq<double>(cr.B, cr.Lq, c.d_model, 15);
  const Seq<double> mc = random_seq<double>(cr.B, cr.Lk, c.d_kv_in, 16);
  const Seq<double> rc = random_seq<double>(cr.B, cr.Lq, c.d_model, 17);
  const auto mask = attn::key_padding({41, 20});
  expect_close(layer_grads<float>(cr, wc, xc, mc, rc, mask),
               layer_grads<double>(cr, wc, xc, mc, rc, mask), 64 * eps<float>(),
               "float vs double (cross)");
}

// ---------------------------------------------------------------- RoPE backward --

// apply_rope_backward is the transpose of apply_rope: <R·x, g> = <x, Rᵀ·g>
// for every pairing, a partial rotary dim and an offset; Rᵀ·R·x = x.
TEST(LayerBackward, RopeBackwardIsTheTranspose) {
  const index_t B = 2, H = 3, L = 7, D = 10;
  for (attn::RopePairing pairing : {attn::RopePairing::half_split, attn::RopePairing::interleaved})
    for (index_t rd : {0, 6}) {
      attn::Rope r;
      r.pairing = pairing;
      r.rotary_dim = rd;
      r.offset = 11;
      r.theta = 50.0;
      Tensor<double> x = random_tensor<double>(B, H, L, D, 51, Layout::bshd),
                     g = random_tensor<double>(B, H, L, D, 52);
      const Tensor<double> x0 = x, g0 = g;
      attn::apply_rope(x.view, r);
      attn::apply_rope_backward(g.view, r);
      double lhs = 0, rhs = 0;
      for (index_t b = 0; b < B; ++b)
        for (index_t h = 0; h < H; ++h)
          for (index_t l = 0; l < L; ++l)
            for (index_t d = 0; d < D; ++d) {
              lhs += x(b, h, l, d) * g0(b, h, l, d);
              rhs += x0(b, h, l, d) * g(b, h, l, d);
            }
      EXPECT_NEAR(lhs, rhs, 64 * eps<double>() * (std::abs(lhs) + 1));
      attn::apply_rope_backward(x.view, r);
      for (std::size_t i = 0; i < x.buf.size(); ++i)
        EXPECT_NEAR(x.buf[i], x0.buf[i], 8 * eps<double>() * (std::abs(x0.buf[i]) + 1));
    }
}

// ---------------------------------------------------------------- determinism --

// Sizes where every product and the attention run in parallel.
TEST(LayerBackward, BitwiseIdenticalForAnyThreadCount) {
  Problem pr;
  attn::MultiHeadConfig c;
  c.d_model = 128, c.q_heads = 8, c.kv_heads = 2, c.head_dim = 16;
  attn::Rope rope;
  c.rope = rope;
  pr.cfg = attn::detail::resolve_config(c);
  pr.B = 2, pr.Lq = pr.Lk = 300;
  const LayerParams w(pr.cfg, 21);
  const Seq<double> x = random_seq<double>(pr.B, pr.Lq, c.d_model, 22);
  const Seq<double> r = random_seq<double>(pr.B, pr.Lq, c.d_model, 23);
  const Seq<double> none(0, 0, 0);
  attn::AttentionOptions o;
  o.num_threads = 1;
  const Grads one = layer_grads<float>(pr, w, x, none, r, attn::causal(), o);
  for (int t : {2, 3}) {
    o.num_threads = t;
    const Grads many = layer_grads<float>(pr, w, x, none, r, attn::causal(), o);
    EXPECT_EQ(many.dx, one.dx) << t << " threads";
    for (int i = 0; i < 8; ++i)
      EXPECT_EQ(many.p[i], one.p[i]) << kGradNames[i] << ", " << t << " threads";
  }
}

// ---------------------------------------------------------------- accumulate --

TEST(LayerBackward, AccumulateAddsToGradients) {
  const attn::MultiHeadConfig c = self_config();
  attn::MultiHeadAttention<double> layer(c);
  LayerParams(c, 31).load(layer);
  const index_t B = 2, L = 9;
  const Seq<double> x = random_seq<double>(B, L, c.d_model, 32);
  const Seq<double> r = random_seq<double>(B, L, c.d_model, 33);
  Seq<double> out(B, L, c.d_model), dx(B, L, c.d_model);
  attn::AttentionContext<double> ctx;
  attn::AttentionGrads<double> once, acc;
  layer.forward(x.cview(), out.view(), attn::causal(), attn::no_score_mod(), {}, ctx);
  layer.backward(ctx, x.cview(), r.cview(), dx.view(), once, attn::causal());
  acc.mode = attn::GradMode::accumulate;
  EXPECT_THROW(layer.backward(ctx, x.cview(), r.cview(), dx.view(), acc, attn::causal()),
               attn::Error);  // not sized yet
  layer.zero_grads(acc);
  layer.backward(ctx, x.cview(), r.cview(), dx.view(), acc, attn::causal());
  EXPECT_EQ(acc.wq, once.wq);  // 0 + g is g, bitwise
  EXPECT_EQ(acc.bo, once.bo);
  layer.backward(ctx, x.cview(), r.cview(), dx.view(), acc, attn::causal());
  EXPECT_LE((acc.wk - 2 * once.wk).cwiseAbs().maxCoeff(),
            4 * eps<double>() * once.wk.cwiseAbs().maxCoeff());
  EXPECT_LE((acc.bv - 2 * once.bv).cwiseAbs().maxCoeff(),
            4 * eps<double>() * once.bv.cwiseAbs().maxCoeff());
  // a layer without biases has empty bias gradients
  layer.clear_biases();
  layer.forward(x.cview(), out.view(), attn::causal(), attn::no_score_mod(), {}, ctx);
  layer.backward(ctx, x.cview(), r.cview(), dx.view(), once, attn::causal());
  EXPECT_EQ(once.bq.size(), 0);
  EXPECT_EQ(once.wq.rows(), c.d_model);
}

// A null dx or dmemory skips it; what is computed is the same, bitwise.
TEST(LayerBackward, NullInputGradientsAreSkipped) {
  attn::MultiHeadConfig c;
  c.d_model = 8, c.q_heads = 2, c.d_kv_in = 6;
  attn::CrossAttention<float> cross(c);
  LayerParams(attn::detail::resolve_config(c), 61).load(cross);
  const Seq<float> x = random_seq<float>(2, 3, 8, 62), mem = random_seq<float>(2, 5, 6, 63),
                   r = random_seq<float>(2, 3, 8, 64);
  Seq<float> out(2, 3, 8), dx(2, 3, 8), dm(2, 5, 6), dx1(2, 3, 8), dm1(2, 5, 6);
  attn::AttentionContext<float> ctx;
  attn::AttentionGrads<float> all, g1, g2;
  cross.forward(x.cview(), mem.cview(), out.view(), attn::no_mask(), attn::no_score_mod(), {}, ctx);
  cross.backward(ctx, x.cview(), mem.cview(), r.cview(), dx.view(), dm.view(), all);
  cross.backward(ctx, x.cview(), mem.cview(), r.cview(), dx1.view(), attn::TensorView<float, 3>(),
                 g1);
  cross.backward(ctx, x.cview(), mem.cview(), r.cview(), attn::TensorView<float, 3>(), dm1.view(),
                 g2);
  EXPECT_EQ(dx1.buf, dx.buf);
  EXPECT_EQ(dm1.buf, dm.buf);
  EXPECT_EQ(g1.wk, all.wk);
  EXPECT_EQ(g2.wo, all.wo);
  EXPECT_GT(ctx.bytes(), std::size_t{0});
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

TEST(LayerBackward, ErrorsBeforeWriting) {
  const attn::MultiHeadConfig c = self_config();
  attn::MultiHeadAttention<double> layer(c), other(c);
  LayerParams(c, 41).load(layer);
  LayerParams(c, 41).load(other);
  const index_t B = 2, L = 5;
  Seq<double> x = random_seq<double>(B, L, c.d_model, 42);
  const Seq<double> r = random_seq<double>(B, L, c.d_model, 43);
  Seq<double> out(B, L, c.d_model), dx(B, L, c.d_model), wrong(B, L + 1, c.d_model);
  std::fill(dx.buf.begin(), dx.buf.end(), 7.0);
  attn::AttentionContext<double> ctx;
  attn::AttentionGrads<double> g;
  auto untouched = [&] {
    EXPECT_TRUE(std::all_of(dx.buf.begin(), dx.buf.end(), [](double v) { return v == 7.0; }));
    EXPECT_EQ(g.wq.size(), 0);
  };
  EXPECT_NE(message([&] {
              layer.backward(ctx, x.cview(), r.cview(), dx.view(), g);
            }).find("ctx is empty"),
            std::string::npos);
  layer.forward(x.cview(), out.view(), attn::causal(), attn::no_score_mod(), {}, ctx);
  EXPECT_NE(message([&] {
              other.backward(ctx, x.cview(), r.cview(), dx.view(), g);
            }).find("another layer"),
            std::string::npos);
  EXPECT_NE(message([&] {
              layer.backward(ctx, wrong.cview(), r.cview(), dx.view(), g);
            }).find("x has shape [2, 6, 12], expected [2, 5, 12]"),
            std::string::npos);
  EXPECT_NE(message([&] {
              layer.backward(ctx, x.cview(), r.cview(), wrong.view(), g);
            }).find("dx has shape [2, 6, 12]"),
            std::string::npos);
  EXPECT_NE(message([&] {
              layer.backward(ctx, x.cview(), r.cview(), x.view(), g);
            }).find("dx overlaps x"),
            std::string::npos);
  untouched();
  layer.set_bo(VecD::Zero(c.d_model));
  EXPECT_NE(message([&] {
              layer.backward(ctx, x.cview(), r.cview(), dx.view(), g);
            }).find("weights changed"),
            std::string::npos);
  untouched();

  attn::MultiHeadConfig cc;
  cc.d_model = 8, cc.q_heads = 2, cc.d_kv_in = 6;
  attn::CrossAttention<double> cross(cc);
  Seq<double> xq = random_seq<double>(1, 3, 8, 44), mem = random_seq<double>(1, 4, 6, 45);
  Seq<double> o(1, 3, 8), dq(1, 3, 8), dm(1, 4, 6);
  cross.forward(xq.cview(), mem.cview(), o.view(), attn::no_mask(), attn::no_score_mod(), {}, ctx);
  EXPECT_NE(message([&] {
              cross.backward(ctx, xq.cview(), mem.cview(), o.cview(), dq.view(), mem.view(), g);
            }).find("dmemory overlaps memory"),
            std::string::npos);
}

}  // namespace
