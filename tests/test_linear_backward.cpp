// Linear attention backward: the fp64 reference against central finite
// differences (with and without the recurrent state), the engine against the
// reference in float and double, and bitwise determinism across threads.
#include "support.hpp"

#include <attn/linear/backward.hpp>
#include <attn/reference/linear_backward.hpp>

#include <functional>

namespace {

using namespace attn_test;

struct State {
  std::vector<double> s, z;
  attn::LinearState<double> view;
  State(index_t B, index_t H, index_t F, index_t Dv, std::uint32_t seed, double stddev)
      : s(static_cast<std::size_t>(B * H * F * Dv)), z(static_cast<std::size_t>(B * H * F)) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<double> u(0.0, stddev);  // non-negative, as sums of features are
    for (auto& x : s) x = u(gen) - stddev / 4;
    for (auto& x : z) x = u(gen);
    view = {attn::TensorView<double, 4>(s.data(), {B, H, F, Dv}),
            attn::TensorView<double, 3>(z.data(), {B, H, F})};
  }
};

template <class T>
struct Grads {
  Tensor<T> dq, dk, dv;
  explicit Grads(const Problem& p)
      : dq(p.B, p.Hq, p.Lq, p.D, p.layout), dk(p.B, p.Hkv, p.Lk, p.D, p.layout),
        dv(p.B, p.Hkv, p.Lk, p.Dv, p.layout) {}
};

void expect_fd(std::vector<double>& x, const std::vector<double>& grad,
               const std::function<double()>& f, const char* name) {
  const double h = 1e-6;
  double worst = 0, scale = 1;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f();
    x[i] = x0 - h;
    const double fm = f();
    x[i] = x0;
    worst = std::max(worst, std::abs((fp - fm) / (2 * h) - grad[i]));
    scale = std::max(scale, std::abs(grad[i]));
  }
  EXPECT_LE(worst, 1e-6 * scale) << name;
}

/// L = Σ out ∘ W + Σ S_final ∘ Ws + Σ z_final ∘ Wz through linear_attention in double (state form).
template <class Map>
void expect_reference_matches_fd(const Problem& p, const Map& map, bool causal) {
  SCOPED_TRACE(p.str() + (causal ? " causal" : ""));
  attn::LinearAttentionOptions opt;
  opt.causal = causal;
  opt.eps = 1e-3;
  Inputs<double> in(p, 3);
  const Tensor<double> w = random_tensor<double>(p.B, p.Hq, p.Lq, p.Dv, 4);
  State s0(p.B, p.Hkv, p.D, p.Dv, 5, 1.0);
  const State ws(p.B, p.Hkv, p.D, p.Dv, 6, 1.0);
  auto loss = [&] {
    State st = s0;  // the forward updates its state in place
    st.view = {attn::TensorView<double, 4>(st.s.data(), s0.view.s.shape()),
               attn::TensorView<double, 3>(st.z.data(), s0.view.z.shape())};
    Tensor<double> out(p.B, p.Hq, p.Lq, p.Dv);
    attn::linear_attention(in.q.cview(), in.k.cview(), in.v.cview(), out.view, map, st.view, opt);
    double l = 0;
    for (std::size_t i = 0; i < out.buf.size(); ++i) l += out.buf[i] * w.buf[i];
    for (std::size_t i = 0; i < st.s.size(); ++i) l += st.s[i] * ws.s[i];
    for (std::size_t i = 0; i < st.z.size(); ++i) l += st.z[i] * ws.z[i];
    return l;
  };
  Grads<double> g(p);
  State ds = ws;
  ds.view = {attn::TensorView<double, 4>(ds.s.data(), s0.view.s.shape()),
             attn::TensorView<double, 3>(ds.z.data(), s0.view.z.shape())};
  attn::reference::linear_attention_backward(in.q.cview(), in.k.cview(), in.v.cview(), w.cview(),
                                             g.dq.view, g.dk.view, g.dv.view, map, opt, &s0.view,
                                             &ds.view);
  expect_fd(in.q.buf, g.dq.buf, loss, "dq");
  expect_fd(in.k.buf, g.dk.buf, loss, "dk");
  expect_fd(in.v.buf, g.dv.buf, loss, "dv");
  expect_fd(s0.s, ds.s, loss, "dS0");
  expect_fd(s0.z, ds.z, loss, "dz0");
}

TEST(LinearBackwardReference, MatchesFiniteDifferences) {
  for (bool causal : {false, true}) {
    expect_reference_matches_fd(make(2, 4, 2, 6, 6, 3, 4), attn::elu_plus_one(), causal);
    expect_reference_matches_fd(make(1, 2, 1, 5, 8, 4, 3), attn::elu_plus_one(), causal);
    expect_reference_matches_fd(make(1, 2, 2, 7, 4, 3, 2), attn::relu(), causal);
  }
}

template <class T>
class LinearBackward : public ::testing::Test {};
TYPED_TEST_SUITE(LinearBackward, FloatTypes);

template <class T, class Map>
void expect_engine_matches(const Problem& p, const Map& map, bool causal, bool with_state,
                           int threads = 0) {
  SCOPED_TRACE(p.str() + (causal ? " causal" : "") + (with_state ? " state" : ""));
  using Acc = attn::detail::accum_t<T>;
  attn::LinearAttentionOptions opt;
  opt.causal = causal;
  opt.num_threads = threads;
  const Inputs<T> in(p, 7);
  const Tensor<T> dout = random_tensor<T>(p.B, p.Hq, p.Lq, p.Dv, 8, p.layout);
  const State s0(p.B, p.Hkv, p.D, p.Dv, 9, 4.0), ws(p.B, p.Hkv, p.D, p.Dv, 10, 1.0);
  // The engine's state in Acc.
  std::vector<Acc> s_in(s0.s.begin(), s0.s.end()), z_in(s0.z.begin(), s0.z.end()),
      ds(ws.s.begin(), ws.s.end()), dz(ws.z.begin(), ws.z.end());
  const attn::LinearState<Acc> st{attn::TensorView<Acc, 4>(s_in.data(), s0.view.s.shape()),
                                  attn::TensorView<Acc, 3>(z_in.data(), s0.view.z.shape())};
  const attn::LinearState<Acc> dst{attn::TensorView<Acc, 4>(ds.data(), s0.view.s.shape()),
                                   attn::TensorView<Acc, 3>(dz.data(), s0.view.z.shape())};
  Grads<T> g(p);
  if (with_state)
    attn::linear_attention_backward(in.q.view, in.k.view, in.v.view, dout.view, g.dq.view,
                                    g.dk.view, g.dv.view, map, st, dst, opt);
  else
    attn::linear_attention_backward(in.q.view, in.k.view, in.v.view, dout.view, g.dq.view,
                                    g.dk.view, g.dv.view, map, opt);
  const Tensor<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v),
                       d = to_double(dout);
  Grads<double> r(make(p.B, p.Hq, p.Hkv, p.Lq, p.Lk, p.D, p.Dv));
  State rds = ws;
  rds.view = {attn::TensorView<double, 4>(rds.s.data(), s0.view.s.shape()),
              attn::TensorView<double, 3>(rds.z.data(), s0.view.z.shape())};
  attn::reference::linear_attention_backward(
      q.cview(), k.cview(), v.cview(), d.cview(), r.dq.view, r.dk.view, r.dv.view, map, opt,
      with_state ? &s0.view : nullptr, with_state ? &rds.view : nullptr);
  // Sums of Lk rank-1 terms and a division: error ~ eps·(Lk + F)·|terms|; 32·eps·(Lk + D) bound.
  auto tol = [&](double m) {
    return 32.0 * eps<T>() * static_cast<double>(p.Lk + p.D) * std::max(m, 1.0);
  };
  EXPECT_LE(max_abs_diff(g.dq, r.dq), tol(max_abs(r.dq))) << "dq";
  EXPECT_LE(max_abs_diff(g.dk, r.dk), tol(max_abs(r.dk))) << "dk";
  EXPECT_LE(max_abs_diff(g.dv, r.dv), tol(max_abs(r.dv))) << "dv";
  if (with_state) {
    double worst = 0, m = 0;
    for (std::size_t i = 0; i < ds.size(); ++i) {
      worst = std::max(worst, std::abs(static_cast<double>(ds[i]) - rds.s[i]));
      m = std::max(m, std::abs(rds.s[i]));
    }
    for (std::size_t i = 0; i < dz.size(); ++i) {
      worst = std::max(worst, std::abs(static_cast<double>(dz[i]) - rds.z[i]));
      m = std::max(m, std::abs(rds.z[i]));
    }
    EXPECT_LE(worst, tol(m)) << "dstate";
  }
}

TYPED_TEST(LinearBackward, MatchesReference) {
  for (bool causal : {false, true})
    for (bool st : {false, true}) {
      expect_engine_matches<TypeParam>(make(2, 4, 2, 37, 37, 16, 8), attn::elu_plus_one(), causal,
                                       st);
      expect_engine_matches<TypeParam>(make(1, 3, 1, 20, 45, 8, 12, Layout::bshd), attn::relu(),
                                       causal, st);
      expect_engine_matches<TypeParam>(make(2, 2, 2, 45, 20, 12, 5), attn::elu_plus_one(), causal,
                                       st);
      expect_engine_matches<TypeParam>(make(1, 1, 1, 1, 1, 3, 2), attn::relu(), causal, st);
    }
}

TEST(LinearBackwardProperties, BitwiseAcrossThreads) {
  const Problem p = make(2, 4, 2, 60, 60, 16, 16);
  const Inputs<float> in(p, 1);
  const Tensor<float> dout = random_tensor<float>(p.B, p.Hq, p.Lq, p.Dv, 2);
  attn::LinearAttentionOptions opt;
  opt.causal = true;
  std::vector<std::vector<float>> runs;
  for (int t : {1, 2, 3}) {
    opt.num_threads = t;
    Grads<float> g(p);
    attn::linear_attention_backward(in.q.view, in.k.view, in.v.view, dout.view, g.dq.view,
                                    g.dk.view, g.dv.view, attn::elu_plus_one(), opt);
    std::vector<float> all = g.dq.buf;
    all.insert(all.end(), g.dk.buf.begin(), g.dk.buf.end());
    all.insert(all.end(), g.dv.buf.begin(), g.dv.buf.end());
    runs.push_back(all);
  }
  EXPECT_EQ(runs[0], runs[1]);
  EXPECT_EQ(runs[0], runs[2]);
}

TEST(LinearBackwardErrors, ShapesAndOverlaps) {
  const Problem p = make(1, 2, 1, 5, 5, 4, 4);
  Inputs<float> in(p, 1);
  Tensor<float> dout(p.B, p.Hq, p.Lq, p.Dv);
  Grads<float> g(p);
  Tensor<float> bad(p.B, p.Hq, p.Lq, p.D + 1);
  try {
    attn::linear_attention_backward(in.q.view, in.k.view, in.v.view, dout.view, bad.view, g.dk.view,
                                    g.dv.view, attn::elu_plus_one());
    ADD_FAILURE() << "no error";
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find("dq has shape [1, 2, 5, 5], expected [1, 2, 5, 4]"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(
      attn::linear_attention_backward(in.q.view, in.k.view, in.v.view, dout.view, in.q.view,
                                      g.dk.view, g.dv.view, attn::elu_plus_one()),
      attn::Error);
}

}  // namespace
