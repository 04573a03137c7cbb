// tests/layer_reference.hpp — an attention layer written naively in plain
// Eigen and fp64 (projections, per-head attention with materialised scores,
// concatenation, output projection), the RoPE formula, and the tolerance of a
// whole layer. Shared by the multi-head, cross and RoPE tests.
#pragma once

#include "support.hpp"

#include <attn/cross.hpp>
#include <attn/multi_head.hpp>
#include <attn/rope.hpp>

#include <Eigen/Dense>

#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace attn_test {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using VecD = Eigen::VectorXd;

/// Entries N(0, stddev²), reproducible from seed.
inline MatD random_matrix(index_t rows, index_t cols, std::uint32_t seed, double stddev = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, stddev);
  MatD m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) m(i, j) = dist(gen);
  return m;
}

/// An fp64 matrix or vector converted to T (same orientation).
template <class T, class M>
auto as(const Eigen::MatrixBase<M>& m) {
  return m.template cast<T>().eval();
}

/// A [B, L, d] sequence kept as one row-major [B·L, d] matrix, in T.
template <class T>
struct Sequence {
  std::vector<T> buf;
  index_t B = 0, L = 0, d = 0;
  Sequence() = default;
  Sequence(index_t b, index_t l, index_t width)
      : buf(static_cast<std::size_t>(b * l * width), T(0)), B(b), L(l), d(width) {}
  attn::TensorView<T, 3> view() { return attn::TensorView<T, 3>(buf.data(), {B, L, d}); }
  attn::TensorView<const T, 3> cview() const {
    return attn::TensorView<const T, 3>(buf.data(), {B, L, d});
  }
  /// Batch b as an fp64 [L, d] matrix.
  MatD batch(index_t b) const {
    MatD m(L, d);
    for (index_t i = 0; i < L; ++i)
      for (index_t j = 0; j < d; ++j)
        m(i, j) = static_cast<double>(buf[static_cast<std::size_t>((b * L + i) * d + j)]);
    return m;
  }
};

template <class T>
Sequence<T> random_sequence(index_t B, index_t L, index_t d, std::uint32_t seed) {
  Sequence<T> s(B, L, d);
  const MatD m = random_matrix(B * L, d, seed);
  for (index_t i = 0; i < B * L * d; ++i)
    s.buf[static_cast<std::size_t>(i)] = static_cast<T>(m.data()[i]);
  return s;
}

/// Weights of a layer in fp64 (biases empty when absent). Entries are
/// N(0, 1/fan_in) so every stage keeps values of order 1; rounded through T
/// so the layer under test and the reference use the same numbers.
template <class T>
struct LayerWeights {
  MatD wq, wk, wv, wo;
  VecD bq, bk, bv, bo;

  LayerWeights(const attn::MultiHeadConfig& c, bool bias, std::uint32_t seed) {
    auto round = [](MatD m) { return MatD(m.cast<T>().template cast<double>()); };
    const index_t nq = c.q_heads * c.head_dim, nk = c.kv_heads * c.head_dim,
                  nv = c.kv_heads * c.v_head_dim, no = c.q_heads * c.v_head_dim;
    wq = round(random_matrix(c.d_model, nq, seed, 1.0 / std::sqrt(double(c.d_model))));
    wk = round(random_matrix(c.d_kv_in, nk, seed + 1, 1.0 / std::sqrt(double(c.d_kv_in))));
    wv = round(random_matrix(c.d_kv_in, nv, seed + 2, 1.0 / std::sqrt(double(c.d_kv_in))));
    wo = round(random_matrix(no, c.d_model, seed + 3, 1.0 / std::sqrt(double(no))));
    if (bias) {
      bq = round(random_matrix(nq, 1, seed + 4, 0.5));
      bk = round(random_matrix(nk, 1, seed + 5, 0.5));
      bv = round(random_matrix(nv, 1, seed + 6, 0.5));
      bo = round(random_matrix(c.d_model, 1, seed + 7, 0.5));
    }
  }
  /// Copies the weights into a layer through the Eigen setters.
  void load(attn::AttentionProjections<T>& layer) const {
    layer.set_wq(wq.cast<T>());
    layer.set_wk(wk.cast<T>());
    layer.set_wv(wv.cast<T>());
    layer.set_wo(wo.cast<T>());
    if (bq.size()) {
      layer.set_bq(bq.cast<T>());
      layer.set_bk(bk.cast<T>());
      layer.set_bv(bv.cast<T>());
      layer.set_bo(bo.cast<T>());
    }
  }
};

/// RoPE by its definition, on the rows of m (row i at position offset + i):
/// pair p of dims (a, b) turns by angle pos·theta^(-2p/R).
inline void rope_reference(MatD& m, const attn::Rope& r) {
  const index_t d = m.cols(), rd = r.rotary_dim ? r.rotary_dim : d, half = rd / 2;
  for (index_t i = 0; i < m.rows(); ++i)
    for (index_t p = 0; p < half; ++p) {
      const index_t a = r.pairing == attn::RopePairing::half_split ? p : 2 * p;
      const index_t b = r.pairing == attn::RopePairing::half_split ? p + half : 2 * p + 1;
      const double angle = double(r.offset + i) * std::pow(r.theta, -2.0 * double(p) / double(rd));
      // (a + ib)·e^{iθ}
      const double x = m(i, a), y = m(i, b);
      m(i, a) = x * std::cos(angle) - y * std::sin(angle);
      m(i, b) = x * std::sin(angle) + y * std::cos(angle);
    }
}

/// keep(b, h, i, j) of the reference; an empty function keeps everything.
using KeepFn = std::function<bool(index_t, index_t, index_t, index_t)>;
/// Additive score term (b, h, i, j) -> double, applied after scaling.
using BiasFn = std::function<double(index_t, index_t, index_t, index_t)>;

/// Output of the reference layer and, per (b, h), its probabilities [Lq, Lk].
struct LayerResult {
  std::vector<MatD> out;                 // [B] of [Lq, d_model]
  std::vector<std::vector<MatD>> probs;  // [B][Hq] of [Lq, Lk]
};

/// The naive layer: queries from x, keys/values from mem (x itself for self
/// attention), per head softmax(scale·QKᵀ + bias, masked)·V, concat, ·Wo.
template <class T>
LayerResult reference_layer(const attn::MultiHeadConfig& c, const LayerWeights<T>& w,
                            const std::vector<MatD>& x, const std::vector<MatD>& mem,
                            const KeepFn& keep = {}, const BiasFn& bias = {}) {
  // Serial Eigen products: Eigen's threaded GEMM spin-waits between its
  // threads, which is very slow on a shared machine, and the reference is small.
  Eigen::setNbThreads(1);
  const double scale = 1.0 / std::sqrt(double(c.head_dim));
  const index_t group = c.q_heads / c.kv_heads;
  LayerResult res;
  for (std::size_t b = 0; b < x.size(); ++b) {
    MatD q = x[b] * w.wq, k = mem[b] * w.wk, v = mem[b] * w.wv;
    if (w.bq.size()) {
      q.rowwise() += w.bq.transpose();
      k.rowwise() += w.bk.transpose();
      v.rowwise() += w.bv.transpose();
    }
    const index_t lq = q.rows(), lk = k.rows();
    MatD concat(lq, c.q_heads * c.v_head_dim);
    res.probs.emplace_back();
    for (index_t h = 0; h < c.q_heads; ++h) {
      const index_t g = h / group;
      MatD qh = q.middleCols(h * c.head_dim, c.head_dim);
      MatD kh = k.middleCols(g * c.head_dim, c.head_dim);
      const MatD vh = v.middleCols(g * c.v_head_dim, c.v_head_dim);
      if (c.rope) {
        rope_reference(qh, *c.rope);
        rope_reference(kh, *c.rope);
      }
      MatD s = scale * qh * kh.transpose();  // (Lq, Lk)
      MatD p = MatD::Zero(lq, lk);
      for (index_t i = 0; i < lq; ++i) {
        double mx = -std::numeric_limits<double>::infinity();
        for (index_t j = 0; j < lk; ++j) {
          if (bias) s(i, j) += bias(index_t(b), h, i, j);
          if (keep && !keep(index_t(b), h, i, j))
            s(i, j) = -std::numeric_limits<double>::infinity();
          mx = std::max(mx, s(i, j));
        }
        if (std::isinf(mx)) continue;  // the row sees no key: zeros
        double sum = 0;
        for (index_t j = 0; j < lk; ++j) sum += (p(i, j) = std::exp(s(i, j) - mx));
        p.row(i) /= sum;
      }
      concat.middleCols(h * c.v_head_dim, c.v_head_dim) = p * vh;
      res.probs.back().push_back(p);
    }
    MatD o = concat * w.wo;
    if (w.bo.size()) o.rowwise() += w.bo.transpose();
    res.out.push_back(o);
  }
  return res;
}

/// Largest |layer output - reference| over all batches.
template <class T>
double max_layer_diff(const Sequence<T>& out, const std::vector<MatD>& ref) {
  double m = 0;
  for (index_t b = 0; b < out.B; ++b) {
    const double d = (out.batch(b) - ref[static_cast<std::size_t>(b)]).cwiseAbs().maxCoeff();
    m = std::max(m, std::isnan(d) ? std::numeric_limits<double>::infinity() : d);
  }
  return m;
}

/// Allowed error of a layer output in T. Each stage is a dot product of
/// order-1 terms rounded in T: the projections (d_in terms) perturb the
/// scores and values by ~sqrt(d_in)·eps, attention adds what tolerance<T>
/// allows for (D, Lk), and the output projection sums Hq·Dv terms. A safety
/// factor of 8 covers the constants (as in tolerance<T>).
template <class T>
double layer_tolerance(const attn::MultiHeadConfig& c, index_t lk) {
  const double e = eps<T>();
  return tolerance<T>(c.head_dim, lk) +
         8.0 * e * 4.0 *
             (std::sqrt(double(c.d_model)) + std::sqrt(double(c.d_kv_in)) +
              std::sqrt(double(c.q_heads * c.v_head_dim)));
}

/// The message of the attn::Error that f throws ("(no attn::Error)" if none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const attn::Error& e) {
    return e.what();
  }
  return "(no attn::Error)";
}

/// Success iff f throws attn::Error whose message contains `part`.
template <class F>
::testing::AssertionResult throws_with(F&& f, const std::string& part) {
  const std::string msg = error_of(f);
  if (msg.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "message \"" << msg << "\" lacks \"" << part << "\"";
}

}  // namespace attn_test
