// external_memory — queries attend to their local context and to the top-k
// entries of a large memory bank (Memorizing Transformers), two calls merged
// by their log-sum-exp.
//
//   local    sliding_window_attention over the last 128 tokens of the context
//   memory   topk_attention over a bank of 131072 (key, value) pairs, k_best = 32,
//            returning which entries each query chose
//   merge    attn::merge_partials: softmax over (window ∪ chosen memory) exactly
//
// The bank is random, except that for a few queries a "fact" was planted: an
// entry whose key is the query's own direction, so the query should retrieve
// it first. The program prints the chosen entries of those queries, checks
// the merged output of some rows against a direct computation in double, and
// times the memory call against dense attention over the whole bank.
// Usage: external_memory [THREADS]
#include <attn/attn.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

using attn::index_t;

constexpr index_t kHeads = 2, kDim = 64, kContext = 1024, kWindow = 128, kBank = 131072, kBest = 32;

std::vector<float> normal(std::size_t n, std::uint32_t seed, float stddev = 1.f) {
  std::vector<float> v(n);
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, stddev);
  for (auto& x : v) x = dist(gen);
  return v;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 0;

  // [1, H, L, D] buffers (bhsd): the context's q, k, v and the memory bank's k, v.
  std::vector<float> q = normal(kHeads * kContext * kDim, 1), k = normal(q.size(), 2),
                     v = normal(q.size(), 3);
  std::vector<float> mem_k = normal(kHeads * kBank * kDim, 4), mem_v = normal(mem_k.size(), 5);

  // Plant facts: memory entry fact(i) holds query i's direction, scaled up, for a few queries.
  const std::vector<index_t> probes = {100, 500, 1000};
  auto fact = [](index_t i) { return (i * 7919) % kBank; };
  for (index_t h = 0; h < kHeads; ++h)
    for (index_t i : probes)
      for (index_t c = 0; c < kDim; ++c)
        mem_k[static_cast<std::size_t>((h * kBank + fact(i)) * kDim + c)] =
            3.f * q[static_cast<std::size_t>((h * kContext + i) * kDim + c)];

  const auto Q = attn::bhsd(q.data(), 1, kHeads, kContext, kDim);
  const auto K = attn::bhsd(k.data(), 1, kHeads, kContext, kDim);
  const auto V = attn::bhsd(v.data(), 1, kHeads, kContext, kDim);
  const auto MK = attn::bhsd(mem_k.data(), 1, kHeads, kBank, kDim);
  const auto MV = attn::bhsd(mem_v.data(), 1, kHeads, kBank, kDim);

  std::vector<float> out(q.size()), out_mem(q.size()), lse(kHeads * kContext), lse_mem(lse.size());
  std::vector<std::int64_t> chosen(static_cast<std::size_t>(kHeads * kContext * kBest));
  const auto O = attn::bhsd(out.data(), 1, kHeads, kContext, kDim);
  const auto OM = attn::bhsd(out_mem.data(), 1, kHeads, kContext, kDim);

  // Local context: causal window of 128 keys, with its log-sum-exp.
  attn::AttentionOptions local;
  local.num_threads = threads;
  const attn::TensorView<float, 3> L(lse.data(), {1, kHeads, kContext});
  local.lse = L;
  auto t0 = std::chrono::steady_clock::now();
  attn::sliding_window_attention(Q, K, V, O, attn::window(kWindow - 1, 0), local);
  const double t_local = seconds_since(t0);

  // Memory: the 32 best entries of the bank per query, with their indices and log-sum-exp.
  attn::TopkOptions mem;
  mem.num_threads = threads;
  const attn::TensorView<const float, 3> LM(lse_mem.data(), {1, kHeads, kContext});
  mem.lse = attn::TensorView<float, 3>(lse_mem.data(), {1, kHeads, kContext});
  mem.indices = attn::TensorView<std::int64_t, 4>(chosen.data(), {1, kHeads, kContext, kBest});
  t0 = std::chrono::steady_clock::now();
  attn::topk_attention(Q, MK, MV, OM, kBest, mem);
  const double t_topk = seconds_since(t0);

  // Softmax over (window ∪ chosen memory entries): merge the two results by lse.
  attn::merge_partials(O, L, attn::TensorView<const float, 4>(OM), LM, threads);

  std::printf("context %ld tokens, window %ld, memory bank %ld entries, k_best %ld, H %ld, D %ld\n",
              static_cast<long>(kContext), static_cast<long>(kWindow), static_cast<long>(kBank),
              static_cast<long>(kBest), static_cast<long>(kHeads), static_cast<long>(kDim));
  for (index_t i : probes) {
    const std::int64_t* row = &chosen[static_cast<std::size_t>(i * kBest)];  // head 0
    std::printf(
        "query %4ld: planted fact at entry %6ld; chosen (best first): %ld %ld %ld %ld ...%s\n",
        static_cast<long>(i), static_cast<long>(fact(i)), static_cast<long>(row[0]),
        static_cast<long>(row[1]), static_cast<long>(row[2]), static_cast<long>(row[3]),
        row[0] == fact(i) ? "  (found)" : "  (missed)");
  }

  // Check a few merged rows against softmax over the same key set in double.
  double worst = 0;
  for (index_t h = 0; h < kHeads; ++h)
    for (index_t i : {index_t(0), index_t(5), index_t(500), kContext - 1}) {
      std::vector<std::pair<double, const float*>> keys;  // (score, value row)
      auto dot = [&](const float* a, const float* b) {
        double s = 0;
        for (index_t c = 0; c < kDim; ++c) s += static_cast<double>(a[c]) * b[c];
        return s / std::sqrt(static_cast<double>(kDim));
      };
      const float* qi = &q[static_cast<std::size_t>((h * kContext + i) * kDim)];
      for (index_t j = std::max<index_t>(0, i - kWindow + 1); j <= i; ++j)
        keys.emplace_back(dot(qi, &k[static_cast<std::size_t>((h * kContext + j) * kDim)]),
                          &v[static_cast<std::size_t>((h * kContext + j) * kDim)]);
      for (index_t j = 0; j < kBest; ++j) {
        const auto e =
            static_cast<index_t>(chosen[static_cast<std::size_t>((h * kContext + i) * kBest + j)]);
        keys.emplace_back(dot(qi, &mem_k[static_cast<std::size_t>((h * kBank + e) * kDim)]),
                          &mem_v[static_cast<std::size_t>((h * kBank + e) * kDim)]);
      }
      double mx = -1e300, sum = 0;
      for (const auto& kv : keys) mx = std::max(mx, kv.first);
      for (const auto& kv : keys) sum += std::exp(kv.first - mx);
      for (index_t c = 0; c < kDim; ++c) {
        double acc = 0;
        for (const auto& kv : keys) acc += std::exp(kv.first - mx) / sum * kv.second[c];
        worst = std::max(
            worst, std::abs(acc - out[static_cast<std::size_t>((h * kContext + i) * kDim + c)]));
      }
    }
  std::printf(
      "merged output vs softmax over (window + chosen entries) in double: max |diff| = %.2e\n",
      worst);

  // What attending to the whole bank densely would cost.
  attn::AttentionOptions dense;
  dense.num_threads = threads;
  t0 = std::chrono::steady_clock::now();
  attn::scaled_dot_product_attention(Q, MK, MV, OM, dense);
  const double t_dense = seconds_since(t0);
  std::printf(
      "time: window %.1f ms, top-%ld memory %.1f ms, dense attention over the bank %.1f ms "
      "(%.2fx the top-k call)\n",
      t_local * 1e3, static_cast<long>(kBest), t_topk * 1e3, t_dense * 1e3, t_dense / t_topk);
  return worst < 1e-4 ? 0 : 1;
}
