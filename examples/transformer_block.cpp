// A pre-norm transformer encoder block in plain Eigen on top of attn:
//
//   h = x + MHA(LayerNorm(x))              (RoPE on q and k)
//   y = h + W2·GELU(W1·LayerNorm(h) + b1) + b2
//
// with random weights, timed per token: bidirectional, causal, and causal
// within a sliding window of 128 keys.
#include <attn/multi_head.hpp>
#include <attn/sliding_window.hpp>

#include <Eigen/Core>

#include <chrono>
#include <cmath>
#include <cstdio>

namespace {

using attn::index_t;
using Mat = attn::RowMatrix<float>;
using Vec = Eigen::RowVectorXf;

/// Row-wise LayerNorm with gain g and bias b (eps 1e-5).
void layer_norm(const Mat& x, const Vec& g, const Vec& b, Mat& y) {
  for (index_t i = 0; i < x.rows(); ++i) {
    const float mean = x.row(i).mean();
    const float var = (x.row(i).array() - mean).square().mean();
    y.row(i) = ((x.row(i).array() - mean) / std::sqrt(var + 1e-5f)).matrix().cwiseProduct(g) + b;
  }
}

/// GELU, tanh form: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
void gelu(Mat& x) {
  const float c = std::sqrt(2.f / 3.14159265f);
  x = (0.5f * x.array() * (1.f + (c * (x.array() + 0.044715f * x.array().cube())).tanh())).matrix();
}

struct Block {
  index_t d, ffn;
  attn::MultiHeadAttention<float> mha;
  Vec g1, b1n, g2, b2n, b1, b2;
  Mat w1, w2;
  Mat n, a, h, f;  // scratch: normed, attention out, residual, MLP hidden

  Block(index_t d_model, index_t heads, index_t hidden)
      : d(d_model), ffn(hidden), mha([&] {
          attn::MultiHeadConfig c;
          c.d_model = d_model;
          c.q_heads = heads;
          c.rope = attn::Rope{};
          return c;
        }()) {
    const float s = 1.f / std::sqrt(float(d));
    mha.set_wq(Mat::Random(d, d) * s);
    mha.set_wk(Mat::Random(d, d) * s);
    mha.set_wv(Mat::Random(d, d) * s);
    mha.set_wo(Mat::Random(d, d) * s);
    g1 = g2 = Vec::Ones(d);
    b1n = b2n = Vec::Zero(d);
    w1 = Mat::Random(d, ffn) * s;
    w2 = Mat::Random(ffn, d) * (1.f / std::sqrt(float(ffn)));
    b1 = Vec::Random(ffn) * 0.1f;
    b2 = Vec::Random(d) * 0.1f;
  }

  /// y = block(x) for one sequence of L tokens, x and y [L, d].
  template <class Mask>
  void forward(const Mat& x, Mat& y, const Mask& mask) {
    const index_t L = x.rows();
    n.resize(L, d);
    a.resize(L, d);
    layer_norm(x, g1, b1n, n);
    mha.forward(attn::TensorView<const float, 3>(n.data(), {1, L, d}),
                attn::TensorView<float, 3>(a.data(), {1, L, d}), mask);
    h = x + a;  // residual
    layer_norm(h, g2, b2n, n);
    f.noalias() = n * w1;
    f.rowwise() += b1;
    gelu(f);
    y.noalias() = f * w2;
    y.rowwise() += b2;
    y += h;  // residual
  }
};

template <class Mask>
double seconds_per_token(Block& blk, const Mat& x, Mat& y, const Mask& mask) {
  blk.forward(x, y, mask);  // warm-up: sizes every buffer
  const int reps = 3;
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) blk.forward(x, y, mask);
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(t1 - t0).count() / (reps * double(x.rows()));
}

}  // namespace

int main() {
  const index_t d = 512, heads = 8, ffn = 2048, L = 512;
  Block blk(d, heads, ffn);
  const Mat x = Mat::Random(L, d);
  Mat y(L, d);
  const double dense = seconds_per_token(blk, x, y, attn::no_mask());
  const double causal = seconds_per_token(blk, x, y, attn::causal());
  const double windowed =
      seconds_per_token(blk, x, y, attn::window(127, 0));  // itself + 127 before
  std::printf("pre-norm block, d_model %ld, %ld heads, ffn %ld, L %ld\n", long(d), long(heads),
              long(ffn), long(L));
  std::printf("  bidirectional: %8.1f us/token\n", dense * 1e6);
  std::printf("  causal:        %8.1f us/token\n", causal * 1e6);
  std::printf("  window 128:    %8.1f us/token\n", windowed * 1e6);
  std::printf("  checksum %.6f\n", double(y.sum()));
  return 0;
}
