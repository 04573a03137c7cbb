// Shared by the layer gradient tests (test_layer_varlen_backward,
// test_cross_varlen, test_layer_backward): a layer's parameters drawn in
// double and loaded into a layer of either type, packed row buffers, and a
// layer's gradients as double vectors.
#pragma once

#include "support.hpp"

#include <attn/multi_head.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace attn_test {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using VecD = Eigen::VectorXd;

/// An [r, c] matrix of N(0, sd²) draws from `gen`, row by row.
inline MatD random_mat(index_t r, index_t c, std::mt19937& gen, double sd) {
  std::normal_distribution<double> dist(0.0, sd);
  MatD m(r, c);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
  return m;
}

/// Parameters of a layer in double (wq, wk, wv, wo, then bq, bk, bv, bo,
/// drawn in that order): weights with standard deviation 1/sqrt(fan-in),
/// biases 0.3. wk, wv read d_kv_in (d_model for self-attention).
struct LayerParams {
  MatD w[4];
  VecD b[4];
  LayerParams(const attn::MultiHeadConfig& c, std::uint32_t seed) {
    std::mt19937 gen(seed);
    const double sq = 1.0 / std::sqrt(static_cast<double>(c.d_model)),
                 sk = 1.0 / std::sqrt(static_cast<double>(c.d_kv_in));
    w[0] = random_mat(c.d_model, c.q_heads * c.head_dim, gen, sq);
    w[1] = random_mat(c.d_kv_in, c.kv_heads * c.head_dim, gen, sk);
    w[2] = random_mat(c.d_kv_in, c.kv_heads * c.v_head_dim, gen, sk);
    w[3] = random_mat(c.q_heads * c.v_head_dim, c.d_model, gen,
                      1.0 / std::sqrt(static_cast<double>(c.q_heads * c.v_head_dim)));
    for (int i = 0; i < 4; ++i) b[i] = random_mat(w[i].cols(), 1, gen, 0.3);
  }
  template <class T>
  void load(attn::AttentionProjections<T>& l) const {
    l.set_wq(w[0].cast<T>().eval());
    l.set_wk(w[1].cast<T>().eval());
    l.set_wv(w[2].cast<T>().eval());
    l.set_wo(w[3].cast<T>().eval());
    l.set_bq(b[0].cast<T>().eval());
    l.set_bk(b[1].cast<T>().eval());
    l.set_bv(b[2].cast<T>().eval());
    l.set_bo(b[3].cast<T>().eval());
  }
  /// Parameter i in the order above, and its size.
  double* data(int i) { return i < 4 ? w[i].data() : b[i - 4].data(); }
  index_t size(int i) const { return i < 4 ? w[i].size() : b[i - 4].size(); }
};

/// Names of the eight parameter gradients, in LayerParams' order.
inline const char* const kGradNames[] = {"dWq", "dWk", "dWv", "dWo", "dbq", "dbk", "dbv", "dbo"};

/// A layer's eight parameter gradients into p[0..7] (LayerParams' order).
template <class T>
void collect_grads(const attn::AttentionGrads<T>& g, std::vector<double> (&p)[8]) {
  auto put = [](const auto& m, std::vector<double>& v) {
    v.assign(static_cast<std::size_t>(m.size()), 0.0);
    for (index_t i = 0; i < m.size(); ++i) v[static_cast<std::size_t>(i)] = m.data()[i];
  };
  put(g.wq, p[0]);
  put(g.wk, p[1]);
  put(g.wv, p[2]);
  put(g.wo, p[3]);
  put(g.bq, p[4]);
  put(g.bk, p[5]);
  put(g.bv, p[6]);
  put(g.bo, p[7]);
}

/// rows·w N(0, 1) draws, row-major.
inline std::vector<double> random_rows(index_t rows, index_t w, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<double> v(static_cast<std::size_t>(rows * w));
  for (double& e : v) e = dist(gen);
  return v;
}

template <class T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

/// A row-major buffer as a [rows, w] view.
template <class T>
attn::TensorView<const T, 2> rows2(const std::vector<T>& v, index_t rows, index_t w) {
  return attn::TensorView<const T, 2>(v.data(), {rows, w});
}
template <class T>
attn::TensorView<T, 2> rows2(std::vector<T>& v, index_t rows, index_t w) {
  return attn::TensorView<T, 2>(v.data(), {rows, w});
}

/// Largest error of `got` against `want` relative to max(max|want|, 1); an
/// infinity must be matched exactly (else the result is infinite).
inline double worst(const std::vector<double>& got, const std::vector<double>& want) {
  EXPECT_EQ(got.size(), want.size());
  double err = 0, ref = 0;
  for (std::size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    if (std::isinf(want[i]) || std::isinf(got[i])) {
      if (got[i] != want[i]) return std::numeric_limits<double>::infinity();
      continue;
    }
    err = std::max(err, std::abs(got[i] - want[i]));
    ref = std::max(ref, std::abs(want[i]));
  }
  return err / std::max(ref, 1.0);
}

}  // namespace attn_test
