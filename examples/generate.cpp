// generate — a small decoder serving several sequences at once from a paged
// KV cache: prefill each prompt, then decode a few hundred tokens for all of
// them together, one token per sequence per step.
//
// The model (random weights; the tokens are meaningless, the work is real):
// an embedding table, `kLayers` attention layers with RoPE and grouped-query
// heads (x += Wo·attention(RoPE(x·Wq), RoPE(x·Wk), x·Wv)), and logits by the
// transposed embedding; the next token is the argmax. Each layer keeps its
// keys and values in its own PagedKVCache (blocks of 16 tokens), so memory
// follows each sequence's real length. Prints prefill and decode tokens/s,
// cache bytes, and the fraction of the machine's read bandwidth (a streaming
// sum measured first) that the decode steps' K/V reads reach.
#include <attn/attn.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using attn::index_t;
using Mat = attn::RowMatrix<float>;

constexpr index_t kVocab = 2000, kModel = 512, kHq = 16, kHkv = 4, kD = 64, kLayers = 4;
constexpr index_t kBlock = 16, kSteps = 256;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Read bandwidth: a streaming sum over 1 GiB, 16 lanes per thread, best of 3.
double stream_gbps() {
  std::vector<float> buf(std::size_t(1) << 28, 1.0f);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    float total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (std::size_t blk = 0; blk < buf.size() / 1024; ++blk) {
      float acc[16] = {};
      for (int i = 0; i < 1024; i += 16)
        for (int l = 0; l < 16; ++l) acc[l] += buf[blk * 1024 + i + l];
      for (float a : acc) total += a;
    }
    const double t = seconds_since(t0);
    if (total != static_cast<float>(buf.size())) std::printf("(sum %g)\n", total);
    best = std::max(best, static_cast<double>(buf.size() * sizeof(float)) / t * 1e-9);
  }
  return best;
}

struct Layer {
  Mat wq, wk, wv, wo;  // [model, Hq·D], [model, Hkv·D] ×2, [Hq·D, model]
  attn::PagedKVCache<float> cache;
  Layer(std::mt19937& gen, index_t blocks)
      : wq(kModel, kHq * kD), wk(kModel, kHkv * kD), wv(kModel, kHkv * kD), wo(kHq * kD, kModel),
        cache(blocks, kBlock, kHkv, kD) {
    std::normal_distribution<float> n(0.f, 1.f / std::sqrt(static_cast<float>(kModel)));
    for (Mat* w : {&wq, &wk, &wv, &wo})
      for (index_t i = 0; i < w->size(); ++i) w->data()[i] = n(gen);
  }
};

struct Model {
  Mat embed;  // [vocab, model]
  std::vector<Layer> layers;
  Model(std::mt19937& gen, index_t blocks) : embed(kVocab, kModel) {
    std::normal_distribution<float> n(0.f, 1.f);
    for (index_t i = 0; i < embed.size(); ++i) embed.data()[i] = n(gen);
    for (index_t l = 0; l < kLayers; ++l) layers.emplace_back(gen, blocks);
  }

  /// Runs `tokens` of sequence slots `seqs` through the model: rows of x are
  /// the new tokens of each sequence in order (n_new tokens per sequence,
  /// starting at position pos[i]); returns the next token of each sequence.
  std::vector<int> step(const std::vector<index_t>& seqs, const std::vector<index_t>& pos,
                        const std::vector<int>& tokens, index_t n_new) {
    const index_t n = static_cast<index_t>(seqs.size()), rows = n * n_new;
    Mat x(rows, kModel);
    for (index_t r = 0; r < rows; ++r) x.row(r) = embed.row(tokens[static_cast<std::size_t>(r)]);
    Mat q(rows, kHq * kD), k(rows, kHkv * kD), v(rows, kHkv * kD), a(rows, kHq * kD);
    for (Layer& layer : layers) {
      q.noalias() = x * layer.wq;
      k.noalias() = x * layer.wk;
      v.noalias() = x * layer.wv;
      for (index_t i = 0; i < n; ++i) {  // RoPE at each sequence's positions, then append K/V
        attn::Rope rope;
        rope.offset = pos[static_cast<std::size_t>(i)];
        attn::apply_rope(attn::bshd(q.data() + i * n_new * kHq * kD, 1, n_new, kHq, kD), rope, 1);
        const auto ki = attn::bshd(k.data() + i * n_new * kHkv * kD, 1, n_new, kHkv, kD);
        attn::apply_rope(ki, rope, 1);
        const auto vi =
            attn::bshd<const float>(v.data() + i * n_new * kHkv * kD, 1, n_new, kHkv, kD);
        layer.cache.append(seqs[static_cast<std::size_t>(i)], attn::Tensor4<const float>(ki), vi);
      }
      // q [n, Hq, n_new, D] against each sequence's cache, causal.
      attn::paged_attention(attn::bshd<const float>(q.data(), n, n_new, kHq, kD), layer.cache, seqs,
                            attn::bshd(a.data(), n, n_new, kHq, kD), attn::causal());
      x.noalias() += a * layer.wo;
    }
    std::vector<int> next(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) {
      Eigen::Index best = 0;
      (embed * x.row((i + 1) * n_new - 1).transpose()).maxCoeff(&best);
      next[static_cast<std::size_t>(i)] = static_cast<int>(best);
    }
    return next;
  }
};

}  // namespace

int main() {
  const std::vector<index_t> prompts = {37, 410, 1200, 2600, 90, 800};
  const index_t n = static_cast<index_t>(prompts.size());
  index_t blocks = 0;
  for (index_t p : prompts) blocks += (p + kSteps + kBlock - 1) / kBlock;

  std::printf("measuring read bandwidth...\n");
  const double bw = stream_gbps();
  std::mt19937 gen(7);
  Model model(gen, blocks);

  // Prefill: each prompt on its own (different lengths), through the same cache.
  std::vector<index_t> seqs(static_cast<std::size_t>(n)), pos(static_cast<std::size_t>(n));
  std::vector<int> next(static_cast<std::size_t>(n));
  std::uniform_int_distribution<int> tok(0, kVocab - 1);
  auto t0 = std::chrono::steady_clock::now();
  index_t prefill_tokens = 0;
  for (index_t i = 0; i < n; ++i) {
    for (Layer& layer : model.layers)
      seqs[static_cast<std::size_t>(i)] = layer.cache.add_sequence();
    std::vector<int> prompt(static_cast<std::size_t>(prompts[static_cast<std::size_t>(i)]));
    for (int& t : prompt) t = tok(gen);
    next[static_cast<std::size_t>(i)] = model.step({seqs[static_cast<std::size_t>(i)]}, {0}, prompt,
                                                   prompts[static_cast<std::size_t>(i)])[0];
    pos[static_cast<std::size_t>(i)] = prompts[static_cast<std::size_t>(i)];
    prefill_tokens += prompts[static_cast<std::size_t>(i)];
  }
  const double t_prefill = seconds_since(t0);

  // Decode: one token per sequence per step, all sequences in one call per layer.
  double kv_bytes = 0;
  t0 = std::chrono::steady_clock::now();
  double t_attention = 0;
  for (index_t s = 0; s < kSteps; ++s) {
    for (index_t i = 0; i < n; ++i)  // K/V bytes this step's attention reads (after the append)
      kv_bytes += static_cast<double>(kLayers * (pos[static_cast<std::size_t>(i)] + 1) * kHkv * 2 *
                                      kD * sizeof(float));
    next = model.step(seqs, pos, next, 1);
    for (index_t& p : pos) ++p;
  }
  const double t_decode = seconds_since(t0);

  // The attention alone, timed over the final caches (same shapes as the last step).
  {
    const std::vector<float> qb(static_cast<std::size_t>(n * kHq * kD), 0.1f);
    std::vector<float> ob(qb.size());
    double bytes = 0;
    for (index_t p : pos) bytes += static_cast<double>(p * kHkv * 2 * kD * sizeof(float));
    const auto ta = std::chrono::steady_clock::now();
    const int reps = 20;
    for (int r = 0; r < reps; ++r)
      attn::paged_attention(attn::bshd<const float>(qb.data(), n, 1, kHq, kD),
                            model.layers[0].cache, seqs, attn::bshd(ob.data(), n, 1, kHq, kD),
                            attn::causal());
    t_attention = seconds_since(ta) / reps;
    std::printf(
        "decode attention alone (one layer, %td sequences): %.3f ms, %.1f GB/s = %.0f%% of "
        "the read bandwidth\n",
        n, t_attention * 1e3, bytes / t_attention * 1e-9, 100 * bytes / t_attention * 1e-9 / bw);
  }

  std::size_t cache_bytes = 0;
  for (const Layer& layer : model.layers) cache_bytes += layer.cache.bytes();
  std::printf("model: %td layers, d_model %td, %td query heads over %td kv heads, head dim %td\n",
              kLayers, kModel, kHq, kHkv, kD);
  std::printf("sequences: %td, prompts", n);
  for (index_t p : prompts) std::printf(" %td", p);
  std::printf("; %td decode steps\n", kSteps);
  std::printf("prefill: %td tokens in %.2f s = %.0f tokens/s\n", prefill_tokens, t_prefill,
              static_cast<double>(prefill_tokens) / t_prefill);
  std::printf("decode:  %td tokens in %.2f s = %.0f tokens/s (%.2f ms per step)\n", n * kSteps,
              t_decode, static_cast<double>(n * kSteps) / t_decode, t_decode / kSteps * 1e3);
  std::printf("cache:   %.1f MiB in %td-token blocks (%td blocks per layer, %td free at the end)\n",
              static_cast<double>(cache_bytes) / (1 << 20), kBlock, blocks,
              model.layers[0].cache.free_blocks());
  std::printf(
      "read bandwidth %.1f GB/s; K/V reads over the whole decode: %.1f GB/s = %.0f%% of it "
      "(projections and logits included in the time)\n",
      bw, kv_bytes / t_decode * 1e-9, 100 * kv_bytes / t_decode * 1e-9 / bw);
  return 0;
}
