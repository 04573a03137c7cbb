// Training a small causal attention block with attn's backward pass.
//
// Task: reverse a sequence of 8 digits. Each example is
//   [x1 … x8, SEP, y1 … y8]  with  y = reverse(x),
// and the model predicts token t+1 from tokens ≤ t (teacher forcing); the loss
// is the cross-entropy on the 8 positions that predict y.
//
// Model (one block; embeddings, residual and readout written here in Eigen):
//   h0 = E[token] + P[position]                                (B·L, d)
//   a = attn::MultiHeadAttention(h0) under causal()  (q, k, v, o projections;
//       the training forward keeps what the backward needs in a context)
//   h1 = h0 + a;   logits = h1·Wout                             (B·L, vocab)
// Backward: hand-written for the readout and embeddings; the layer's
// backward gives dh0 through the attention and dWq, dWk, dWv, dWo, with
// attention dropout (p = 0.1, a new offset each step) fused in both passes.
// Adam updates every weight (and hands the four projections back to the layer).
//
// It prints the loss and the accuracy on the reversed half falling, and the
// time per step.
#include <attn/attn.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using attn::index_t;
using Mat = attn::RowMatrix<float>;

constexpr index_t kDigits = 10, kSep = 10, kVocab = 11, kHalf = 8, kLen = 2 * kHalf + 1;
constexpr index_t kBatch = 32, kModel = 64, kHeads = 4, kHeadDim = 16;

/// Adam on one parameter matrix.
struct Param {
  Mat w, g, m, v;
  Param(index_t r, index_t c, float stddev, std::mt19937& gen)
      : w(r, c), g(Mat::Zero(r, c)), m(Mat::Zero(r, c)), v(Mat::Zero(r, c)) {
    std::normal_distribution<float> dist(0.f, stddev);
    for (index_t i = 0; i < w.size(); ++i) w.data()[i] = dist(gen);
  }
  void adam(float lr, int step) {
    constexpr float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g.cwiseProduct(g);
    const float c1 = 1 - std::pow(b1, static_cast<float>(step)),
                c2 = 1 - std::pow(b2, static_cast<float>(step));
    w.array() -= lr * (m.array() / c1) / ((v.array() / c2).sqrt() + eps);
    g.setZero();
  }
};

}  // namespace

int main() {
  Eigen::setNbThreads(1);  // the products are small: one thread for everything
  std::mt19937 gen(1);
  const float s_emb = 0.5f, s_proj = 1.0f / std::sqrt(static_cast<float>(kModel));
  Param emb(kVocab, kModel, s_emb, gen), pos(kLen, kModel, s_emb, gen);
  Param wq(kModel, kHeads * kHeadDim, s_proj, gen), wk(kModel, kHeads * kHeadDim, s_proj, gen),
      wv(kModel, kHeads * kHeadDim, s_proj, gen), wo(kHeads * kHeadDim, kModel, s_proj, gen),
      wout(kModel, kVocab, s_proj, gen);
  Param* params[] = {&emb, &pos, &wq, &wk, &wv, &wo, &wout};

  attn::MultiHeadConfig cfg;
  cfg.d_model = kModel;
  cfg.q_heads = kHeads;
  cfg.head_dim = kHeadDim;
  attn::MultiHeadAttention<float> mha(cfg);
  attn::AttentionContext<float> ctx;  // what the forward keeps for the backward
  attn::AttentionGrads<float> grads;  // dWq, dWk, dWv, dWo ([in, out], like Param::w)

  const index_t rows = kBatch * kLen;
  Mat h0(rows, kModel), a(rows, kModel), h1(rows, kModel), logits(rows, kVocab),
      dlogits(rows, kVocab), dh1(rows, kModel), dx(rows, kModel), dh0(rows, kModel);
  auto view = [&](Mat& m) { return attn::TensorView<float, 3>(m.data(), {kBatch, kLen, kModel}); };
  auto cview = [&](const Mat& m) {
    return attn::TensorView<const float, 3>(m.data(), {kBatch, kLen, kModel});
  };
  std::vector<int> tokens(static_cast<std::size_t>(rows));
  std::uniform_int_distribution<int> digit(0, kDigits - 1);

  const int steps = 300;
  std::vector<double> step_ms;
  std::printf("step   loss    accuracy(reversed half)   ms/step\n");
  for (int step = 1; step <= steps; ++step) {
    const auto start = std::chrono::steady_clock::now();
    // A fresh batch: x, SEP, reverse(x).
    for (index_t b = 0; b < kBatch; ++b) {
      int* t = &tokens[static_cast<std::size_t>(b * kLen)];
      for (index_t i = 0; i < kHalf; ++i) t[i] = digit(gen);
      t[kHalf] = kSep;
      for (index_t i = 0; i < kHalf; ++i) t[kHalf + 1 + i] = t[kHalf - 1 - i];
    }
    attn::AttentionOptions opt;
    opt.dropout = {0.1, 2026, static_cast<std::uint64_t>(step)};
    opt.num_threads = 1;  // a tiny problem: a thread team costs more than it saves

    // ---- forward
    for (index_t r = 0; r < rows; ++r)
      h0.row(r) = emb.w.row(tokens[static_cast<std::size_t>(r)]) + pos.w.row(r % kLen);
    mha.set_wq(wq.w);
    mha.set_wk(wk.w);
    mha.set_wv(wv.w);
    mha.set_wo(wo.w);
    mha.forward(cview(h0), view(a), attn::causal(), attn::no_score_mod(), opt, ctx);
    h1 = h0 + a;
    logits.noalias() = h1 * wout.w;

    // ---- loss: positions kHalf … 2·kHalf - 1 predict y1 … y8
    double loss = 0;
    int correct = 0;
    dlogits.setZero();
    const float inv_n = 1.0f / static_cast<float>(kBatch * kHalf);
    for (index_t b = 0; b < kBatch; ++b)
      for (index_t i = kHalf; i < 2 * kHalf; ++i) {
        const index_t r = b * kLen + i;
        const int target = tokens[static_cast<std::size_t>(r + 1)];
        Eigen::RowVectorXf z = logits.row(r);
        const float mx = z.maxCoeff();
        Eigen::RowVectorXf p = (z.array() - mx).exp().matrix();
        const float sum = p.sum();
        p /= sum;
        loss -= std::log(std::max(p(target), 1e-30f));
        index_t arg = 0;
        z.maxCoeff(&arg);
        correct += arg == target;
        p(target) -= 1;
        dlogits.row(r) = p * inv_n;  // d(mean cross-entropy)/d logits
      }
    loss /= static_cast<double>(kBatch * kHalf);

    // ---- backward
    wout.g.noalias() += h1.transpose() * dlogits;
    dh1.noalias() = dlogits * wout.w.transpose();
    mha.backward(ctx, cview(h0), cview(dh1), view(dx), grads, attn::causal(), attn::no_score_mod(),
                 opt);
    wq.g += grads.wq;
    wk.g += grads.wk;
    wv.g += grads.wv;
    wo.g += grads.wo;
    dh0 = dh1 + dx;  // residual + attention
    for (index_t r = 0; r < rows; ++r) {
      emb.g.row(tokens[static_cast<std::size_t>(r)]) += dh0.row(r);
      pos.g.row(r % kLen) += dh0.row(r);
    }
    for (Param* p : params) p->adam(3e-3f, step);

    const std::chrono::duration<double, std::milli> ms = std::chrono::steady_clock::now() - start;
    step_ms.push_back(ms.count());
    if (step == 1 || step % 25 == 0)
      std::printf("%4d   %.4f  %6.1f%%                    %.2f\n", step, loss,
                  100.0 * correct / static_cast<double>(kBatch * kHalf), ms.count());
  }
  std::sort(step_ms.begin(), step_ms.end());
  std::printf("median %.2f ms per step (batch %td, length %td, d_model %td, %td heads)\n",
              step_ms[step_ms.size() / 2], kBatch, kLen, kModel, kHeads);
  return 0;
}
