// tests/support.hpp — helpers shared by the attn tests: owning tensors in
// either memory layout, seeded random fill, the fp64 reference run and the
// tolerance every comparison uses.
#pragma once

#include <attn/attn.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace attn_test {

using attn::index_t;

enum class Layout { bhsd, bshd };

inline const char* layout_name(Layout l) { return l == Layout::bhsd ? "bhsd" : "bshd"; }

/// Owning storage for a logical [B, H, L, D] tensor kept in `layout` order.
template <class T>
struct Tensor {
  std::vector<T> buf;
  attn::Tensor4<T> view;

  Tensor() = default;
  Tensor(index_t B, index_t H, index_t L, index_t D, Layout layout = Layout::bhsd)
      : buf(static_cast<std::size_t>(B * H * L * D), T(0)) {
    view = layout == Layout::bhsd ? attn::bhsd(buf.data(), B, H, L, D)
                                  : attn::bshd(buf.data(), B, L, H, D);
  }
  Tensor(const Tensor& o) : buf(o.buf), view(buf.data(), o.view.shape(), o.view.strides()) {}
  Tensor& operator=(const Tensor& o) {
    buf = o.buf;
    view = attn::Tensor4<T>(buf.data(), o.view.shape(), o.view.strides());
    return *this;
  }
  attn::Tensor4<const T> cview() const { return view; }
  index_t extent(int i) const { return view.extent(i); }
  T& operator()(index_t b, index_t h, index_t l, index_t d) { return view(b, h, l, d); }
  T operator()(index_t b, index_t h, index_t l, index_t d) const { return view(b, h, l, d); }
};

/// N(0, stddev²) entries, reproducible from `seed`.
template <class T>
Tensor<T> random_tensor(index_t B, index_t H, index_t L, index_t D, std::uint32_t seed,
                        Layout layout = Layout::bhsd, double stddev = 1.0) {
  Tensor<T> t(B, H, L, D, layout);
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, stddev);
  for (auto& x : t.buf) x = static_cast<T>(dist(gen));
  return t;
}

/// The same logical tensor in double (always bhsd).
template <class T>
Tensor<double> to_double(const Tensor<T>& t) {
  Tensor<double> r(t.extent(0), t.extent(1), t.extent(2), t.extent(3));
  for (index_t b = 0; b < t.extent(0); ++b)
    for (index_t h = 0; h < t.extent(1); ++h)
      for (index_t l = 0; l < t.extent(2); ++l)
        for (index_t d = 0; d < t.extent(3); ++d)
          r(b, h, l, d) = static_cast<double>(t(b, h, l, d));
  return r;
}

/// Machine epsilon of the storage type, 2^(1 - digits). (Eigen 3.4's
/// NumTraits<Eigen::half>::epsilon() is 2^-13, not half's 2^-10.)
template <class T>
double eps() {
  return std::ldexp(1.0, 1 - std::numeric_limits<T>::digits);
}

/// Allowed |fast - fp64 reference| for one output element of attention with
/// head dim d over lk keys, values bounded by vmax, scores bounded by smax.
/// Each score is a d-term dot product rounded in T: its error grows like
/// sqrt(d)·eps·|q||k|·scale, and a score error δ perturbs the probabilities
/// by a relative δ; the output is a convex combination of lk rows of v, and
/// the P·V sum adds a random-walk error ~sqrt(lk)·eps. With the exponent
/// trick, large scores (smax) add relative error ~eps·smax. A safety factor
/// of 8 covers the constants.
template <class T>
double tolerance(index_t d, index_t lk, double vmax = 4.0, double smax = 4.0) {
  const double e = eps<T>();
  return 8.0 * e * (std::sqrt(static_cast<double>(d)) + std::sqrt(static_cast<double>(lk)) + smax) *
         std::max(vmax, 1.0);
}

template <class T>
double max_abs(const Tensor<T>& t) {
  double m = 0;
  for (const auto& x : t.buf) m = std::max(m, std::abs(static_cast<double>(x)));
  return m;
}

/// Largest |a - b| over the logical elements; NaN counts as infinitely far.
template <class A, class B>
double max_abs_diff(const Tensor<A>& a, const Tensor<B>& b) {
  double m = 0;
  for (index_t i = 0; i < a.extent(0); ++i)
    for (index_t h = 0; h < a.extent(1); ++h)
      for (index_t l = 0; l < a.extent(2); ++l)
        for (index_t d = 0; d < a.extent(3); ++d) {
          const double x = static_cast<double>(a(i, h, l, d)),
                       y = static_cast<double>(b(i, h, l, d));
          const double diff = std::abs(x - y);
          m = std::max(m, std::isnan(diff) ? std::numeric_limits<double>::infinity() : diff);
        }
  return m;
}

/// Sizes of one attention problem.
struct Problem {
  index_t B = 1, Hq = 1, Hkv = 1, Lq = 1, Lk = 1, D = 16, Dv = 16;
  Layout layout = Layout::bhsd;
  std::string str() const {
    return "B=" + std::to_string(B) + " Hq=" + std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) +
           " Lq=" + std::to_string(Lq) + " Lk=" + std::to_string(Lk) + " D=" + std::to_string(D) +
           " Dv=" + std::to_string(Dv) + " " + layout_name(layout);
  }
};

/// A problem from its sizes.
inline Problem make(index_t B, index_t Hq, index_t Hkv, index_t Lq, index_t Lk, index_t D,
                    index_t Dv, Layout layout = Layout::bhsd) {
  Problem p;
  p.B = B;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.Lq = Lq;
  p.Lk = Lk;
  p.D = D;
  p.Dv = Dv;
  p.layout = layout;
  return p;
}

/// Inputs of one problem: q, k, v in T.
template <class T>
struct Inputs {
  Tensor<T> q, k, v;
  Inputs(const Problem& p, std::uint32_t seed, double stddev = 1.0)
      : q(random_tensor<T>(p.B, p.Hq, p.Lq, p.D, seed, p.layout, stddev)),
        k(random_tensor<T>(p.B, p.Hkv, p.Lk, p.D, seed + 1, p.layout, stddev)),
        v(random_tensor<T>(p.B, p.Hkv, p.Lk, p.Dv, seed + 2, p.layout)) {}
};

/// fp64 reference output of masked attention on the inputs; lse into `lse` if non-null.
template <class T, class Mask, class Mod>
Tensor<double> reference_output(const Inputs<T>& in, const Problem& p, const Mask& mask,
                                const Mod& mod, attn::AttentionOptions opt = {},
                                std::vector<float>* lse = nullptr) {
  const Tensor<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v);
  Tensor<double> out(p.B, p.Hq, p.Lq, p.Dv);
  opt.lse = {};
  if (lse) {
    lse->assign(static_cast<std::size_t>(p.B * p.Hq * p.Lq), 0.f);
    opt.lse = attn::TensorView<float, 3>(lse->data(), {p.B, p.Hq, p.Lq});
  }
  attn::reference::attention(q.cview(), k.cview(), v.cview(), out.view, mask, mod, opt);
  return out;
}

/// Output within `tol` of the reference; lse equal where the reference's is
/// infinite (rows that see no key) and within tol·(1 + |lse|) elsewhere.
template <class T>
void expect_close(const Tensor<T>& out, const Tensor<double>& ref, const std::vector<float>& lse,
                  const std::vector<float>& lse_ref, double tol) {
  EXPECT_LE(max_abs_diff(out, ref), tol);
  for (std::size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(lse_ref[i])) {
      ASSERT_EQ(lse[i], lse_ref[i]) << "lse row " << i;
    } else {
      ASSERT_NEAR(lse[i], lse_ref[i], tol * (1.0 + std::abs(lse_ref[i]))) << "lse row " << i;
    }
  }
}

/// Runs masked_attention in T and checks it against the fp64 reference,
/// log-sum-exp included.
template <class T, class Mask, class Mod = attn::NoScoreMod>
void expect_matches_reference(const Problem& p, const Mask& mask, const Mod& mod = {},
                              attn::AttentionOptions opt = {}, std::uint32_t seed = 7) {
  SCOPED_TRACE(p.str());
  const Inputs<T> in(p, seed);
  std::vector<float> lse_ref, lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq), 0.f);
  const Tensor<double> ref = reference_output(in, p, mask, mod, opt, &lse_ref);
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
  opt.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, mask, mod, opt);
  expect_close(out, ref, lse, lse_ref, tolerance<T>(p.D, p.Lk, max_abs(in.v)));
}

/// Typed-test list: every body runs in float and in double.
using FloatTypes = ::testing::Types<float, double>;

}  // namespace attn_test
