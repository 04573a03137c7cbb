// Training a small causal attention block with attn's backward pass.
//
// Task: reverse a sequence of 8 digits. Each example is
//   [x1 … x8, SEP, y1 … y8]  with  y = reverse(x),
// and the model predicts token t+1 from tokens ≤ t (teacher forcing); the loss
// is the cross-entropy on the 8 positions that predict y.
//
// Model (one block, all written here in Eigen except the attention):
//   h0 = E[token] + P[position]                                (B·L, d)
//   q, k, v = h0·Wq, h0·Wk, h0·Wv, as [B, L, H, D] views (bshd)
//   o = attn::masked_attention(q, k, v, causal())   (lse kept for the backward)
//   h1 = h0 + o·Wo;   logits = h1·Wout                          (B·L, vocab)
// Backward: hand-written for the projections and embeddings, and
// attn::attention_backward for the attention, with attention dropout (p = 0.1,
// a new offset each step) fused in both passes. Adam updates every weight.
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

  const index_t rows = kBatch * kLen, hd = kHeads * kHeadDim;
  Mat h0(rows, kModel), q(rows, hd), k(rows, hd), v(rows, hd), o(rows, hd), h1(rows, kModel),
      logits(rows, kVocab), dlogits(rows, kVocab), dh1(rows, kModel), dout(rows, hd), dq(rows, hd),
      dk(rows, hd), dv(rows, hd), dh0(rows, kModel);
  std::vector<float> lse(static_cast<std::size_t>(kBatch * kHeads * kLen));
  std::vector<int> tokens(static_cast<std::size_t>(rows));
  auto view = [&](Mat& m) { return attn::bshd(m.data(), kBatch, kLen, kHeads, kHeadDim); };
  const attn::TensorView<float, 3> lse_view(lse.data(), {kBatch, kHeads, kLen});
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
    opt.lse = lse_view;
    opt.dropout = {0.1, 2026, static_cast<std::uint64_t>(step)};
    opt.num_threads = 1;  // a tiny problem: a thread team costs more than it saves

    // ---- forward
    for (index_t r = 0; r < rows; ++r)
      h0.row(r) = emb.w.row(tokens[static_cast<std::size_t>(r)]) + pos.w.row(r % kLen);
    q.noalias() = h0 * wq.w;
    k.noalias() = h0 * wk.w;
    v.noalias() = h0 * wv.w;
    attn::masked_attention(view(q), view(k), view(v), view(o), attn::causal(), opt);
    h1 = h0;
    h1.noalias() += o * wo.w;
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
    wo.g.noalias() += o.transpose() * dh1;
    dout.noalias() = dh1 * wo.w.transpose();
    attn::attention_backward(view(q), view(k), view(v), view(o),
                             attn::TensorView<const float, 3>(lse_view), view(dout), view(dq),
                             view(dk), view(dv), attn::causal(), opt);
    wq.g.noalias() += h0.transpose() * dq;
    wk.g.noalias() += h0.transpose() * dk;
    wv.g.noalias() += h0.transpose() * dv;
    dh0 = dh1;  // residual
    dh0.noalias() += dq * wq.w.transpose();
    dh0.noalias() += dk * wk.w.transpose();
    dh0.noalias() += dv * wv.w.transpose();
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
