// attn/linear.hpp — linear attention: feature maps, the non-causal and
// chunked causal forms, and a recurrent state carried between calls.
//
// With a feature map φ: R^D -> R^F (non-negative features), attention becomes
//
//   out_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + eps),   S = Σ_j φ(k_j) v_jᵀ  (F, Dv),   z = Σ_j φ(k_j)  (F)
//
// with the sums over every key (non-causal) or over the keys a query may see
// (causal, bottom-right aligned like the rest of attn: query i sees key j iff
// j <= i + Lk - Lq). Nothing of size Lq·Lk is formed: the non-causal form is
// O((Lq + Lk)·F·Dv); the causal form walks the sequence in chunks of C rows,
//
//   A    = tril(φ(Q_c) φ(K_c)ᵀ)                                   (C, C)
//   out  = (φ(Q_c) S + A V_c) / (φ(Q_c) z + A 1 + eps)             (C, Dv)
//   S   += φ(K_c)ᵀ V_c,   z += φ(K_c)ᵀ 1                            (F, Dv), (F)
//
// so almost all of its O(L·F·Dv + L·C·(F + Dv)) work is small dense products
// (detail/small_gemm.hpp: operands already in L1, no packing; the triangle's
// products stop at the diagonal). The state (S, z) of each (batch, key/value
// head) may come in from and go back to the caller (LinearState), so a long
// sequence can be processed in pieces, or decoded one token at a time, with
// the result of one call over the whole sequence.
#pragma once

#include "attn/detail/checks.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/detail/small_gemm.hpp"
#include "attn/detail/softmax.hpp"
#include "attn/engine/forward.hpp"
#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include "attn/core/eigen.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

namespace attn {

// ------------------------------------------------------ feature-map protocol --

/// Rows of feature-map input, (rows, D), row-major with a row stride.
template <class Acc>
using FeatureInput = Eigen::Map<const RowMatrix<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>;
/// Rows of feature-map output, (rows, F), row-major with a row stride.
template <class Acc>
using FeatureOutput = Eigen::Map<RowMatrix<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Marks a type as a feature map. A feature map M provides
///
///   index_t num_features(index_t d) const;
///       F for head dim d; throws attn::Error if the map cannot take d.
///   double key_log_scale() const;
///       c such that φ(k) = e^c · φ̃(k) for the key features φ̃ that keys() writes.
///   template <class Acc> void keys(FeatureInput<Acc> x, FeatureOutput<Acc> phi) const;
///       φ̃(k) of each row of x.
///   template <class Acc> void queries(FeatureInput<Acc> x, FeatureOutput<Acc> phi, Acc* log_scale)
///   const;
///       φ̃(q) and a per row such that φ(q) = e^a · φ̃(q).
///
/// The scales let a map keep its features in range (FAVOR+ features are
/// exponentials); linear_attention folds them back exactly. A map with no
/// scales derives from SimpleFeatureMap and writes only φ.
struct FeatureMapPolicy {};

template <class M>
inline constexpr bool is_feature_map_v = std::is_base_of<FeatureMapPolicy, M>::value;

/// Base of feature maps without scales: `Derived` provides
/// `index_t num_features(index_t d) const` and
/// `template <class Acc> void features(FeatureInput<Acc> x, FeatureOutput<Acc> phi) const`,
/// which writes φ of each row of x. Features must be non-negative (the
/// denominator is a sum of φ(q)ᵀφ(k)).
template <class Derived>
struct SimpleFeatureMap : FeatureMapPolicy {
  /// No scale: φ̃ = φ.
  double key_log_scale() const { return 0.0; }

  template <class Acc>
  void keys(FeatureInput<Acc> x, FeatureOutput<Acc> phi) const {
    static_cast<const Derived&>(*this).template features<Acc>(x, phi);
  }

  template <class Acc>
  void queries(FeatureInput<Acc> x, FeatureOutput<Acc> phi, Acc* log_scale) const {
    static_cast<const Derived&>(*this).template features<Acc>(x, phi);
    for (index_t r = 0; r < x.rows(); ++r) log_scale[r] = Acc(0);
  }
};

// ------------------------------------------------------- elu + 1 and ReLU --

/// φ(x) = elu(x) + 1, elementwise (x + 1 for x > 0, e^x otherwise); F = D.
/// The map of Katharopoulos et al., "Transformers are RNNs" (2020).
struct EluPlusOne : SimpleFeatureMap<EluPlusOne> {
  index_t num_features(index_t d) const { return d; }

  template <class Acc>
  void features(FeatureInput<Acc> x, FeatureOutput<Acc> phi) const {
    // e^min(x,0) + max(x,0) is x + 1 for x > 0 and e^x otherwise (no select: vectorises)
    if constexpr (std::is_same<Acc, float>::value) {
      // the engine's branch-free exp, row by row; min and max by integer masks,
      // which vectorise where a float select may not (see detail/softmax.hpp)
      for (index_t r = 0; r < x.rows(); ++r) {
        const float* xr = x.data() + r * x.outerStride();
        float* pr = phi.data() + r * phi.outerStride();
        for (index_t j = 0; j < x.cols(); ++j) {
          std::uint32_t bits, neg_bits, pos_bits;
          std::memcpy(&bits, xr + j, sizeof bits);
          const std::uint32_t neg = 0u - static_cast<std::uint32_t>(xr[j] < 0.f);
          neg_bits = bits & neg;   // min(x, 0) (+0 for NaN)
          pos_bits = bits & ~neg;  // max(x, 0) (NaN for NaN)
          float lo, hi;
          std::memcpy(&lo, &neg_bits, sizeof lo);
          std::memcpy(&hi, &pos_bits, sizeof hi);
          pr[j] = detail::exp_nonpositive(lo) + hi;
        }
      }
    } else {
      phi.array() = x.array().min(Acc(0)).exp() + x.array().max(Acc(0));
    }
  }
  /// dφ/dx (for linear_attention_backward): 1 for x > 0, e^x otherwise.
  template <class Acc>
  Acc derivative(Acc x) const {
    return x > Acc(0) ? Acc(1) : std::exp(x);
  }
};

/// The elu + 1 feature map.
inline EluPlusOne elu_plus_one() { return {}; }

/// φ(x) = max(x, 0), elementwise; F = D. A query or key with no positive
/// entry sees nothing (its output is 0).
struct Relu : SimpleFeatureMap<Relu> {
  index_t num_features(index_t d) const { return d; }

  template <class Acc>
  void features(FeatureInput<Acc> x, FeatureOutput<Acc> phi) const {
    phi.array() = x.array().max(Acc(0));
  }
  /// dφ/dx (for linear_attention_backward): 1 for x > 0, 0 otherwise.
  template <class Acc>
  Acc derivative(Acc x) const {
    return x > Acc(0) ? Acc(1) : Acc(0);
  }
};

/// The ReLU feature map.
inline Relu relu() { return {}; }

// ---------------------------------------------------------------- FAVOR+ --

namespace detail {

/// N(0, 1) samples by Box–Muller from the raw 64-bit output of mt19937_64,
/// so a seed gives the same numbers with every standard library
/// (std::normal_distribution is implementation-defined).
class NormalStream {
 public:
  explicit NormalStream(std::mt19937_64& gen) : gen_(gen) {}

  double operator()() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    // u1 in (0, 1], u2 in [0, 1), each from the top 53 bits of one draw.
    const double u1 = 1.0 - static_cast<double>(gen_() >> 11) * 0x1.0p-53;
    const double u2 = static_cast<double>(gen_() >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double two_pi = 6.283185307179586476925286766559;
    spare_ = r * std::sin(two_pi * u2);
    has_spare_ = true;
    return r * std::cos(two_pi * u2);
  }

 private:
  std::mt19937_64& gen_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

}  // namespace detail

/// FAVOR+ positive orthogonal random features (Choromanski et al.,
/// "Rethinking Attention with Performers", 2021), approximating the softmax
/// kernel of attn's default scale:
///
///   φ(x)_r = exp(w_rᵀx' - |x'|²/2) / sqrt(F),   x' = x · D^(-1/4),   r < F
///   E[φ(q)ᵀφ(k)] = exp(q·k / sqrt(D))
///
/// The w_r come in blocks of D mutually orthogonal directions (QR of a
/// Gaussian D×D matrix), each rescaled by an independent chi(D) norm, so each
/// w_r is marginally N(0, I). Drawn from std::mt19937_64 with the given seed
/// (normals by Box–Muller from its raw output): the same seed and the same
/// number of redraw() calls give the same features.
///
/// Stabiliser: w_rᵀx' - |x'|²/2 <= |w_r|²/2 for every x. Keys are written as
/// φ̃(k) = φ(k)·e^-c with c = max_r |w_r|²/2 - log(F)/2, so φ̃(k) <= 1 and
/// key_log_scale() = c; queries as φ̃(q) = φ(q)·e^-a with a the largest log
/// feature of that row, so max φ̃(q) = 1. linear_attention divides by
/// φ̃(q)ᵀz̃ + eps·e^-(a+c), which is the unstabilised ratio exactly.
class FavorPlus : public FeatureMapPolicy {
 public:
  /// F = `features` random features for head dim `head_dim`, drawn from `seed`.
  FavorPlus(index_t head_dim, index_t features, std::uint64_t seed = 0)
      : d_(head_dim), f_(features), gen_(seed) {
    if (head_dim <= 0) detail::fail("favor_plus: head_dim is ", head_dim, ", must be > 0");
    if (features <= 0) detail::fail("favor_plus: features is ", features, ", must be > 0");
    redraw();
  }

  /// Draws a fresh set of features, continuing the random stream.
  void redraw() {
    detail::NormalStream normal(gen_);
    w_.resize(f_, d_);
    for (index_t r0 = 0; r0 < f_; r0 += d_) {
      RowMatrix<double> g(d_, d_);
      for (index_t i = 0; i < d_; ++i)
        for (index_t j = 0; j < d_; ++j) g(i, j) = normal();
      // G = Q·R; Q·diag(sign(R_ii)) is Haar-distributed (Q alone is not: the
      // Householder signs tie it to G), so each column is a uniform direction.
      const Eigen::HouseholderQR<RowMatrix<double>> qr(g);
      RowMatrix<double> dirs = qr.householderQ();  // (D, D), orthonormal columns
      for (index_t j = 0; j < d_; ++j)
        if (qr.matrixQR()(j, j) < 0) dirs.col(j) = -dirs.col(j);
      const index_t rows = std::min(d_, f_ - r0);
      for (index_t i = 0; i < rows; ++i) {
        double chi2 = 0;  // |N(0, I_D)|² ~ chi²(D)
        for (index_t j = 0; j < d_; ++j) {
          const double x = normal();
          chi2 += x * x;
        }
        w_.row(r0 + i) = dirs.col(i).transpose() * std::sqrt(chi2);
      }
    }
    const double quarter = std::pow(static_cast<double>(d_), -0.25);
    wd_ = (w_ * quarter).transpose();  // columns w_r · D^(-1/4): w_rᵀx' = (w_r D^(-1/4))ᵀ x
    wf_ = wd_.cast<float>();
    max_half_norm2_ = 0.5 * w_.rowwise().squaredNorm().maxCoeff();
    ++draws_;
  }

  /// F; throws attn::Error if the features were drawn for another head dim.
  index_t num_features(index_t d) const {
    if (d != d_)
      detail::fail("favor_plus features were drawn for head dim ", d_, ", but q has head dim ", d);
    return f_;
  }
  /// c = max_r |w_r|²/2 - log(F)/2: φ(k) = e^c · φ̃(k).
  double key_log_scale() const { return max_half_norm2_ - 0.5 * std::log(static_cast<double>(f_)); }
  /// The directions w_r, (F, D), before the D^(-1/4) scaling.
  const RowMatrix<double>& projection() const { return w_; }
  /// How many sets of features were drawn (1 after construction).
  int draws() const { return draws_; }

  template <class Acc>
  void keys(FeatureInput<Acc> x, FeatureOutput<Acc> phi) const {
    project(x, phi);
    // φ̃_r = exp(w_rᵀx' - |x'|²/2 - max_s |w_s|²/2) <= 1
    const Acc shift = static_cast<Acc>(max_half_norm2_);
    for (index_t r = 0; r < x.rows(); ++r) {
      const Acc half_norm2 = x.row(r).squaredNorm() * half_inv_sqrt_d<Acc>();
      phi.row(r).array() = (phi.row(r).array() - (half_norm2 + shift)).exp();
    }
  }

  template <class Acc>
  void queries(FeatureInput<Acc> x, FeatureOutput<Acc> phi, Acc* log_scale) const {
    project(x, phi);
    // a = max_r w_rᵀx' - |x'|²/2 - log(F)/2;  φ̃_r = exp(w_rᵀx' - max_s w_sᵀx')
    const Acc log_sqrt_f = static_cast<Acc>(0.5 * std::log(static_cast<double>(f_)));
    for (index_t r = 0; r < x.rows(); ++r) {
      const Acc m = phi.row(r).maxCoeff();
      phi.row(r).array() = (phi.row(r).array() - m).exp();
      log_scale[r] = m - x.row(r).squaredNorm() * half_inv_sqrt_d<Acc>() - log_sqrt_f;
    }
  }

 private:
  template <class Acc>
  Acc half_inv_sqrt_d() const {  // |x'|²/2 = |x|² / (2 sqrt(D))
    return static_cast<Acc>(0.5 / std::sqrt(static_cast<double>(d_)));
  }

  // phi = x · (W D^(-1/4))ᵀ                                         (rows, F)
  template <class Acc>
  void project(FeatureInput<Acc> x, FeatureOutput<Acc> phi) const {
    static_assert(std::is_same<Acc, float>::value || std::is_same<Acc, double>::value,
                  "attn: FAVOR+ computes in float or double");
    const Acc* w = nullptr;
    if constexpr (std::is_same<Acc, float>::value)
      w = wf_.data();
    else
      w = wd_.data();
    detail::small_gemm<Acc>(x.rows(), f_, d_, x.data(), x.outerStride(), w, f_, phi.data(),
                            phi.outerStride(), false);
  }

  index_t d_ = 0, f_ = 0;
  std::mt19937_64 gen_;
  RowMatrix<double> w_;   // (F, D) w_r
  RowMatrix<double> wd_;  // (D, F) (W · D^(-1/4))ᵀ, the row-major right operand of project()
  RowMatrix<float> wf_;   // the same in float
  double max_half_norm2_ = 0;
  int draws_ = 0;
};

/// FAVOR+ features for head dim `head_dim`: `features` of them, from `seed`.
inline FavorPlus favor_plus(index_t head_dim, index_t features, std::uint64_t seed = 0) {
  return FavorPlus(head_dim, features, seed);
}

// ------------------------------------------------------- options and state --

/// Options of linear_attention.
struct LinearAttentionOptions {
  /// Causal (bottom-right: query i sees key j iff j <= i + Lk - Lq) or not.
  bool causal = false;
  /// Added to every denominator φ(q)ᵀz; must be > 0.
  double eps = 1e-6;
  /// Rows per chunk of the causal form (and per block of the non-causal
  /// one). 0: chosen by the library (LinearTraits::chunk).
  index_t chunk = 0;
  /// Worker threads. 0: all that OpenMP offers (1 without OpenMP).
  int num_threads = 0;
};

/// Tile constants of linear attention. A chunk of C rows costs 4·F·Dv flops
/// per row for the state (product with S, update of S) plus about C·(F+Dv)
/// per row inside the chunk (the triangle of φ(Q)φ(K)ᵀ and its product with
/// V). At F = Dv = 64 on the target machine (AVX2, one thread) C = 16–32 was
/// fastest, C = 24 by a few percent (C = 64: +13%, C = 128: +37% time); 24
/// is also four of the product kernel's 6-row blocks.
struct LinearTraits {
  static constexpr index_t chunk = 24;
  static_assert(chunk > 0, "chunks must be non-empty");
};

/// The recurrent state of linear attention, one per (batch, key/value head),
/// in the accumulation type Acc (double if any operand is double, else float):
///   s: [B, Hkv, F, Dv]  S = Σ_j φ̃(k_j) v_jᵀ
///   z: [B, Hkv, F]      z = Σ_j φ̃(k_j)
/// over the keys seen so far (φ̃ = φ·e^-c, c = the map's key_log_scale(); c = 0
/// for elu+1 and ReLU). linear_attention reads it as the sum over keys before
/// its k and writes back the sum including them; zeros start a sequence.
template <class Acc>
struct LinearState {
  TensorView<Acc, 4> s;
  TensorView<Acc, 3> z;
};

/// Owning storage for a LinearState, zero-initialised.
template <class Acc>
class LinearStateBuffer {
 public:
  /// Throws attn::Error for a non-positive size or one whose element count
  /// overflows, before allocating.
  LinearStateBuffer(index_t batch, index_t kv_heads, index_t features, index_t dv)
      : s_(elements({batch, kv_heads, features, dv}), Acc(0)),
        z_(elements({batch, kv_heads, features}), Acc(0)),
        state_{TensorView<Acc, 4>(s_.data(), {batch, kv_heads, features, dv}),
               TensorView<Acc, 3>(z_.data(), {batch, kv_heads, features})} {}
  LinearStateBuffer(const LinearStateBuffer&) = delete;
  LinearStateBuffer& operator=(const LinearStateBuffer&) = delete;

  /// Views of the storage.
  const LinearState<Acc>& state() const { return state_; }
  /// Back to zeros (the start of a sequence).
  void reset() {
    std::fill(s_.begin(), s_.end(), Acc(0));
    std::fill(z_.begin(), z_.end(), Acc(0));
  }

 private:
  static std::size_t elements(std::initializer_list<index_t> dims) {
    static const char* const names[] = {"batch", "kv_heads", "features", "dv"};
    index_t n = 1, i = 0;
    for (index_t e : dims) {
      if (e <= 0) detail::fail("LinearStateBuffer ", names[i], " is ", e, ", must be > 0");
      n = detail::checked_mul(n, e, "LinearStateBuffer batch · kv_heads · features · dv");
      ++i;
    }
    if (static_cast<std::uint64_t>(n) > std::vector<Acc>().max_size())
      detail::fail("LinearStateBuffer of ", n, " elements is larger than a vector holds");
    return static_cast<std::size_t>(n);
  }

  std::vector<Acc> s_, z_;
  LinearState<Acc> state_;
};

namespace detail {

// --------------------------------------------------------------- checks --

/// Checks the attention views (as every entry point does), the options, the
/// feature count and the state; returns the shape and F.
template <class Q, class K, class V, class O, class Map, class Acc>
AttentionShape check_linear(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                            const TensorView<V, 4>& v, const TensorView<O, 4>& out, const Map& map,
                            const LinearState<Acc>* state, const LinearAttentionOptions& opt,
                            index_t& features) {
  const AttentionShape s = check_attention(q, k, v, out, AttentionOptions{});
  if (!(opt.eps > 0) || !std::isfinite(opt.eps))
    fail("eps is ", opt.eps, ", must be finite and > 0");
  if (!(opt.eps <= accum_max_v<Q, K, V, O>))  // added to float denominators
    fail("eps is ", opt.eps, ", must be finite in the accumulation type ",
         accum_name(accum_max_v<Q, K, V, O>));
  if (opt.chunk < 0) fail("chunk is ", opt.chunk, ", must be >= 0 (0 = automatic)");
  if (opt.num_threads < 0) fail("num_threads is ", opt.num_threads, ", must be >= 0");
  features = map.num_features(s.d);
  if (features <= 0)
    fail("the feature map gives ", features, " features for head dim ", s.d, ", must be > 0");
  {  // per-worker scratch: (g·n, F + n), (F, Dv), (g·n, Dv) with n <= chunk
    const index_t g = s.q_heads / s.kv_heads;
    const index_t n =
        std::min(opt.chunk > 0 ? opt.chunk : LinearTraits::chunk, std::max(s.lq, s.lk));
    const char* what = "linear attention scratch (query heads per kv head · chunk · (F + chunk))";
    (void)checked_mul(checked_mul(g, n, what), checked_add(features, n, what), what);
    (void)checked_mul(features, s.dv, "linear attention state F · Dv");
    (void)checked_mul(checked_mul(g, n, what), s.dv, what);
  }
  if (state) {
    const auto& st = state->s;
    const auto& z = state->z;
    if (st.extent(0) != s.batch || st.extent(1) != s.kv_heads || st.extent(2) != features ||
        st.extent(3) != s.dv)
      fail("state s has shape ", shape_str(st), ", expected [", s.batch, ", ", s.kv_heads, ", ",
           features, ", ", s.dv, "] (batch, kv heads, features, Dv)");
    if (z.extent(0) != s.batch || z.extent(1) != s.kv_heads || z.extent(2) != features)
      fail("state z has shape ", shape_str(z), ", expected [", s.batch, ", ", s.kv_heads, ", ",
           features, "] (batch, kv heads, features)");
    check_view(st, "state s");
    check_view(z, "state z");
    check_not_self_overlapping(st, "state s");
    check_not_self_overlapping(z, "state z");
    check_no_overlap(st, "state s", z, "state z");
    check_no_overlap(st, "state s", q, "q");
    check_no_overlap(st, "state s", k, "k");
    check_no_overlap(st, "state s", v, "v");
    check_no_overlap(st, "state s", out, "out");
    check_no_overlap(z, "state z", q, "q");
    check_no_overlap(z, "state z", k, "k");
    check_no_overlap(z, "state z", v, "v");
    check_no_overlap(z, "state z", out, "out");
  }
  return s;
}

// --------------------------------------------------------------- engine --

/// Per-worker scratch of linear attention; g = query heads per kv head,
/// n = chunk rows, F features.
template <class Acc>
struct LinearScratch {
  using Mat = RowMatrix<Acc>;
  using Vec = Eigen::Matrix<Acc, Eigen::Dynamic, 1>;
  Mat x;           // (n, D)       q or k rows, when they cannot be read in place
  Mat lhs;         // (g·n, F + n) [φ̃(Q) | A], A = tril(φ̃(Q) φ̃(K)ᵀ) per head
  Mat vals;        // (n, Dv)      v rows, when they cannot be read in place
  Vec qlog, qeps;  // (g·n)        log scale a of each query row, eps·e^-(a+c)
  Mat kphi;        // (n, F)       φ̃(K)
  Mat kphi_t;      // (F, n)       φ̃(K)ᵀ
  Mat s;           // (F, Dv)      S
  Vec z;           // (F)          z
  Mat num;         // (g·n, Dv)    numerators
  Vec den;         // (g·n)        denominators without eps

  LinearScratch(index_t g, index_t n, index_t d, index_t f, index_t dv, bool pack, bool pack_v)
      : x(pack ? n : 0, d), lhs(g * n, f + n), vals(pack_v ? n : 0, dv), qlog(g * n), qeps(g * n),
        kphi(n, f), kphi_t(f, n), s(f, dv), z(f), num(g * n, dv), den(g * n) {}
};

/// Whether rows of t can be handed to a feature map in place: Acc storage,
/// unit column stride and disjoint rows going forward (a plain row-major matrix).
template <class Acc, class T>
bool readable_in_place(const TensorView<const T, 4>& t) {
  return std::is_same<T, Acc>::value && t.stride(3) == 1 && t.stride(2) >= t.extent(3);
}

/// Rows [row0, row0 + rows) of head (b, h) of t as a feature-map input: in
/// place when readable_in_place, else converted into `pack`.
template <class Acc, class T>
FeatureInput<Acc> feature_input(const TensorView<const T, 4>& t, index_t b, index_t h, index_t row0,
                                index_t rows, RowMatrix<Acc>& pack) {
  if constexpr (std::is_same<T, Acc>::value) {
    if (readable_in_place<Acc>(t))
      return FeatureInput<Acc>(t.data() + b * t.stride(0) + h * t.stride(1) + row0 * t.stride(2),
                               rows, t.extent(3), Eigen::OuterStride<>(t.stride(2)));
  }
  pack.topRows(rows) = matrix(t, b, h).middleRows(row0, rows).template cast<Acc>();
  return FeatureInput<Acc>(pack.data(), rows, pack.cols(), Eigen::OuterStride<>(pack.cols()));
}

/// The engine, for one call; arguments are checked.
template <class Acc, class Q, class K, class V, class O, class Map>
void linear_forward(const TensorView<const Q, 4>& q, const TensorView<const K, 4>& k,
                    const TensorView<const V, 4>& v, const TensorView<O, 4>& out,
                    const AttentionShape& shape, index_t f, const Map& map,
                    const LinearState<Acc>* state, const LinearAttentionOptions& opt) {
  const index_t g = shape.q_heads / shape.kv_heads;
  const index_t d = shape.d, dv = shape.dv;
  const index_t n =
      std::min(opt.chunk > 0 ? opt.chunk : LinearTraits::chunk, std::max(shape.lq, shape.lk));
  const index_t tasks = shape.batch * shape.kv_heads;
  const int threads = resolve_threads(opt.num_threads, tasks);
  const double key_log_scale = map.key_log_scale();
  const bool pack = !readable_in_place<Acc>(q) || !readable_in_place<Acc>(k);
  const bool pack_v = !readable_in_place<Acc>(v);
  const bool out_in_place = std::is_same<O, Acc>::value && out.stride(3) == 1;
  const bool state_in_place = state && state->s.stride(3) == 1 && state->z.stride(2) == 1;

  auto make_scratch = [&] {
    return std::make_unique<LinearScratch<Acc>>(g, n, d, f, dv, pack, pack_v);
  };

  auto run_task = [&](LinearScratch<Acc>& sc, index_t t) {
    const index_t b = t / shape.kv_heads;
    const index_t hk = t % shape.kv_heads;
    const index_t ldl = f + n;
    Acc* st = sc.s.data();  // S, (F, Dv), rows of lds
    Acc* zp = sc.z.data();  // z, (F)
    index_t lds = dv;
    const Acc* vals = nullptr;  // V of the current chunk, rows of ldv
    index_t ldv = dv;

    // S and z: the caller's state in place when its rows are contiguous (a
    // decoding step then copies nothing), else copied in and out; or zeros.
    if (state && state_in_place) {
      st = &state->s(b, hk, 0, 0);
      lds = state->s.stride(2);
      zp = &state->z(b, hk, 0);
    } else if (state) {
      for (index_t r = 0; r < f; ++r) {
        for (index_t c = 0; c < dv; ++c) st[r * dv + c] = state->s(b, hk, r, c);
        zp[r] = state->z(b, hk, r);
      }
    } else {
      sc.s.setZero();
      sc.z.setZero();
    }
    const Eigen::Map<const Eigen::Matrix<Acc, Eigen::Dynamic, 1>> z(zp, f);

    // φ̃(K), φ̃(K)ᵀ and V of keys [j0, j0 + rows).
    auto load_keys = [&](index_t j0, index_t rows) {
      map.template keys<Acc>(feature_input<Acc>(k, b, hk, j0, rows, sc.x),
                             FeatureOutput<Acc>(sc.kphi.data(), rows, f, Eigen::OuterStride<>(f)));
      sc.kphi_t.leftCols(rows) = sc.kphi.topRows(rows).transpose();
      if constexpr (std::is_same<V, Acc>::value) {
        if (!pack_v) {
          ldv = v.stride(2);
          vals = v.data() + b * v.stride(0) + hk * v.stride(1) + j0 * ldv;
          return;
        }
      }
      sc.vals.topRows(rows) = matrix(v, b, hk).middleRows(j0, rows).template cast<Acc>();
      vals = sc.vals.data();
      ldv = dv;
    };
    // S += φ̃(K)ᵀ V,  z += φ̃(K)ᵀ 1
    auto absorb_keys = [&](index_t rows) {
      small_gemm<Acc>(f, dv, rows, sc.kphi_t.data(), n, vals, ldv, st, lds, true);
      for (index_t r = 0; r < rows; ++r) {  // row by row: contiguous, vectorises
        const Acc* kr = sc.kphi.data() + r * f;
        for (index_t c = 0; c < f; ++c) zp[c] += kr[c];
      }
    };
    // φ̃(Q) of queries [i0, i0 + rows) of the g heads into lhs, row u·rows + r for head u.
    auto load_queries = [&](index_t i0, index_t rows) {
      for (index_t u = 0; u < g; ++u)
        map.template queries<Acc>(
            feature_input<Acc>(q, b, hk * g + u, i0, rows, sc.x),
            FeatureOutput<Acc>(sc.lhs.data() + u * rows * ldl, rows, f, Eigen::OuterStride<>(ldl)),
            sc.qlog.data() + u * rows);
      // eps·e^-(a + c) keeps num / (den + eps) the unstabilised ratio
      for (index_t r = 0; r < g * rows; ++r) {
        const double a = static_cast<double>(sc.qlog(r)) + key_log_scale;  // 0 for elu+1, ReLU
        sc.qeps(r) = static_cast<Acc>(a == 0 ? opt.eps : opt.eps * std::exp(-a));
      }
    };
    // φ̃(Q) of lhs rows [r0, r0 + rows) as an Eigen block
    auto phi_q = [&](index_t r0, index_t rows) {
      return Eigen::Map<RowMatrix<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>(
          sc.lhs.data() + r0 * ldl, rows, f, Eigen::OuterStride<>(ldl));
    };
    // out = num / (den + eps·e^-(a+c))
    auto store = [&](index_t i0, index_t rows) {
      for (index_t u = 0; u < g; ++u) {
        auto dst = matrix(out, b, hk * g + u).middleRows(i0, rows);
        for (index_t r = 0; r < rows; ++r) {
          const index_t row = u * rows + r;
          const Acc inv = Acc(1) / (sc.den(row) + sc.qeps(row));
          const Acc* src = sc.num.data() + row * dv;
          if constexpr (std::is_same<O, Acc>::value) {
            if (out_in_place) {  // unit stride: a plain loop the compiler vectorises
              Acc* o = &dst(r, 0);
              for (index_t c = 0; c < dv; ++c) o[c] = src[c] * inv;
              continue;
            }
          }
          dst.row(r) = (sc.num.row(row) * inv).template cast<O>();
        }
      }
    };
    // Queries [i0, i1) that see exactly the keys in the state: num = φ̃(Q) S, den = φ̃(Q) z.
    auto queries_on_state = [&](index_t i0, index_t i1) {
      for (; i0 < i1; i0 += n) {
        const index_t rows = std::min(n, i1 - i0);
        load_queries(i0, rows);
        small_gemm<Acc>(g * rows, dv, f, sc.lhs.data(), ldl, st, lds, sc.num.data(), dv, false);
        sc.den.head(g * rows).noalias() = phi_q(0, g * rows) * z;
        store(i0, rows);
      }
    };
    // Keys [j0, j1) into the state.
    auto keys_into_state = [&](index_t j0, index_t j1) {
      for (; j0 < j1; j0 += n) {
        const index_t rows = std::min(n, j1 - j0);
        load_keys(j0, rows);
        absorb_keys(rows);
      }
    };

    if (!opt.causal) {
      keys_into_state(0, shape.lk);
      queries_on_state(0, shape.lq);
    } else {
      // Keys before the diagonal (Lk > Lq) are seen by every query; queries
      // before it (Lq > Lk) see only the incoming state.
      const index_t off = shape.diagonal_offset();
      const index_t k_diag = std::max<index_t>(0, off), q_diag = std::max<index_t>(0, -off);
      keys_into_state(0, k_diag);
      queries_on_state(0, q_diag);
      // On the diagonal, query q_diag + i sees keys up to k_diag + i.
      for (index_t c0 = 0; q_diag + c0 < shape.lq; c0 += n) {
        const index_t rows = std::min(n, shape.lq - q_diag - c0);
        load_queries(q_diag + c0, rows);
        load_keys(k_diag + c0, rows);
        for (index_t u = 0; u < g; ++u) {
          Acc* lhs_u = sc.lhs.data() + u * rows * ldl;
          Acc* a = lhs_u + f;  // A of head u, (rows, rows) with row stride ldl
          // A = φ̃(Q) φ̃(K)ᵀ on and below the diagonal, then zero above it
          small_gemm<Acc>(rows, rows, f, lhs_u, ldl, sc.kphi_t.data(), n, a, ldl, false,
                          GemmBand{-1, 0});
          for (index_t r = 0; r + 1 < rows; ++r)
            std::fill(a + r * ldl + r + 1, a + r * ldl + rows, Acc(0));
          // num = φ̃(Q) S (exclusive prefix) + A V (this chunk; row blocks stop
          // at the diagonal)
          Acc* num_u = sc.num.data() + u * rows * dv;
          small_gemm<Acc>(rows, dv, f, lhs_u, ldl, st, lds, num_u, dv, false);
          small_gemm<Acc>(rows, dv, rows, a, ldl, vals, ldv, num_u, dv, true, GemmBand{0, -1});
          // den = φ̃(Q) z + A 1
          sc.den.segment(u * rows, rows).noalias() =
              phi_q(u * rows, rows) * z +
              Eigen::Map<RowMatrix<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>(
                  a, rows, rows, Eigen::OuterStride<>(ldl))
                  .rowwise()
                  .sum();
        }
        store(q_diag + c0, rows);
        absorb_keys(rows);
      }
    }

    if (state && !state_in_place) {
      for (index_t r = 0; r < f; ++r) {
        for (index_t c = 0; c < dv; ++c) state->s(b, hk, r, c) = st[r * dv + c];
        state->z(b, hk, r) = zp[r];
      }
    }
  };

  parallel_tasks(tasks, threads, make_scratch, run_task, [](const LinearScratch<Acc>&) {});
}

template <class Q, class K, class V, class O, class Map, class Acc>
void linear_entry(const TensorView<Q, 4>& q, const TensorView<K, 4>& k, const TensorView<V, 4>& v,
                  const TensorView<O, 4>& out, const Map& map, const LinearState<Acc>* state,
                  const LinearAttentionOptions& opt) {
  static_assert(is_storage_type_v<std::remove_cv_t<Q>> && is_storage_type_v<std::remove_cv_t<K>> &&
                    is_storage_type_v<std::remove_cv_t<V>> && is_storage_type_v<O>,
                "attn: element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(!std::is_const<O>::value, "attn: the output view must be writable");
  static_assert(is_feature_map_v<Map>,
                "attn: the feature_map argument must be a feature map (derive from "
                "attn::FeatureMapPolicy or attn::SimpleFeatureMap)");
  static_assert(std::is_same<Acc, accum_t<Q, K, V, O>>::value,
                "attn: the state must be in the accumulation type: double if any of q, k, v, "
                "out is double, float otherwise");
  index_t f = 0;
  const AttentionShape shape = check_linear(q, k, v, out, map, state, opt, f);
  linear_forward<Acc, std::remove_cv_t<Q>, std::remove_cv_t<K>, std::remove_cv_t<V>, O>(
      q, k, v, out, shape, f, map, state, opt);
}

}  // namespace detail

// ------------------------------------------------------------ entry points --

/// Linear attention out_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + eps), S = Σ_j φ(k_j) v_jᵀ,
/// z = Σ_j φ(k_j), over all keys or (options.causal) keys j <= i + Lk - Lq.
///
/// q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D], v: [B, Hkv, Lk, Dv], out: [B, Hq, Lq, Dv];
/// Hkv divides Hq and query head h reads key/value head h / (Hq / Hkv).
/// feature_map: elu_plus_one(), relu(), favor_plus(D, F, seed) or any
/// FeatureMapPolicy. Throws attn::Error before writing anything if an argument
/// is wrong. O((Lq + Lk)·F·Dv) time non-causal, O(L·F·Dv + L·C·(F + Dv)) causal
/// (C = options.chunk); memory O(C·(F + D + Dv + C)) per thread.
template <class Q, class K, class V, class O, class Map>
void linear_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                      const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                      const Map& feature_map, const LinearAttentionOptions& options = {}) {
  using Acc = detail::accum_t<Q, K, V, O>;
  detail::linear_entry(q, k, v, out, feature_map, static_cast<const LinearState<Acc>*>(nullptr),
                       options);
}

/// Linear attention continuing from `state` (see LinearState): the sums
/// start from state's S and z, and state receives the sums including this
/// call's keys. Calls over consecutive pieces of a sequence (each piece
/// causal with Lq = Lk, or one token at a time) give the result of one call
/// over the whole sequence.
template <class Q, class K, class V, class O, class Map, class Acc>
void linear_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                      const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                      const Map& feature_map, const LinearState<Acc>& state,
                      const LinearAttentionOptions& options = {}) {
  detail::linear_entry(q, k, v, out, feature_map, &state, options);
}

// -------------------------------------------------------------- reference --

namespace reference {

/// Reference of linear_attention, written for clarity: in double, it forms
/// φ(Q) and φ(K) (the map's scales folded back), the full [Lq, Lk] matrix
/// A = φ(Q) φ(K)ᵀ (entries j > i + Lk - Lq zeroed when causal), and
/// out_i = Σ_j A_ij v_j / (Σ_j A_ij + eps). No state.
template <class Q, class K, class V, class O, class Map>
void linear_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                      const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                      const Map& feature_map, const LinearAttentionOptions& opt = {}) {
  index_t f = 0;
  const AttentionShape s = detail::check_linear(
      q, k, v, out, feature_map, static_cast<const LinearState<double>*>(nullptr), opt, f);
  const double c = feature_map.key_log_scale();
  RowMatrix<double> x, phi_q(s.lq, f), phi_k(s.lk, f);
  Eigen::VectorXd log_q(s.lq);
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.q_heads; ++h) {
      const index_t hk = s.kv_head(h);
      x = matrix(q, b, h).template cast<double>();
      feature_map.template queries<double>(
          FeatureInput<double>(x.data(), s.lq, s.d, Eigen::OuterStride<>(s.d)),
          FeatureOutput<double>(phi_q.data(), s.lq, f, Eigen::OuterStride<>(f)), log_q.data());
      for (index_t i = 0; i < s.lq; ++i) phi_q.row(i) *= std::exp(log_q(i));
      x = matrix(k, b, hk).template cast<double>();
      feature_map.template keys<double>(
          FeatureInput<double>(x.data(), s.lk, s.d, Eigen::OuterStride<>(s.d)),
          FeatureOutput<double>(phi_k.data(), s.lk, f, Eigen::OuterStride<>(f)));
      phi_k *= std::exp(c);
      RowMatrix<double> a = phi_q * phi_k.transpose();  // (Lq, Lk)
      if (opt.causal)
        for (index_t i = 0; i < s.lq; ++i)
          for (index_t j = std::max<index_t>(0, i + s.diagonal_offset() + 1); j < s.lk; ++j)
            a(i, j) = 0;
      const RowMatrix<double> vd = matrix(v, b, hk).template cast<double>();
      const RowMatrix<double> num = a * vd;  // (Lq, Dv)
      for (index_t i = 0; i < s.lq; ++i) {
        const double den = a.row(i).sum() + opt.eps;
        for (index_t col = 0; col < s.dv; ++col)
          out(b, h, i, col) = static_cast<O>(num(i, col) / den);
      }
    }
}

}  // namespace reference
}  // namespace attn
