// Linear attention against dense flash attention and against a token-by-token
// recurrence, B = 1, H = 8, D = Dv = 64, float, elu + 1 features (F = 64).
//
//   bench_linear             short run: N = 1024 and 4096
//   bench_linear --sweep     N = 256 … 65536 (flash rows over 2 TFLOP per call,
//                            N >= 32768, are skipped with a note)
//
// Baselines run first at each N: flash/full and flash/causal (dense softmax
// attention on the flash engine), then causal_plain_recurrence (the RNN form
// written directly with Eigen). Counters: GFLOPs (a rate, GFLOP/s, over the
// products each path computes), roofline_frac against roofline/gemm,
// x_baseline = flash time / this row's time (linear rows), x_recurrence =
// recurrence time / this row's time (causal rows), tokens/s.
// Compare within one run: --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include "bench_support.hpp"

#include <attn/attn.hpp>
#include <attn/detail/small_gemm.hpp>
#include <attn/linear.hpp>

#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using attn::index_t;

constexpr index_t kBatch = 1, kHeads = 8, kDim = 64;

struct Problem {
  std::vector<float> q, k, v, out;
  explicit Problem(index_t n)
      : q(static_cast<std::size_t>(kBatch * kHeads * n * kDim)), k(q.size()), v(q.size()),
        out(q.size()) {
    std::mt19937 gen(1);
    std::normal_distribution<float> dist(0.f, 1.f);
    for (auto* buf : {&q, &k, &v})
      for (float& x : *buf) x = dist(gen);
  }
  attn::Tensor4<const float> view(const std::vector<float>& b, index_t n) const {
    return attn::bhsd(b.data(), kBatch, kHeads, n, kDim);
  }
};

// Product FLOPs of the linear engine (see linear.hpp), F = Dv = 64, one kv
// head per query head: non-causal 2·(Lq + Lk)·F·Dv; causal per chunk of c
// rows 4·c·F·Dv (product with the state, state update) + the triangle,
// c(c+1)/2 pairs each costing 2·F (φ(Q)φ(K)ᵀ) + 2·Dv (times V).
double linear_flops(index_t n, bool causal, index_t chunk) {
  const double f = kDim, dv = kDim, heads = kBatch * kHeads;
  if (!causal) return heads * 2.0 * 2.0 * n * f * dv;
  double total = 0;
  for (index_t c0 = 0; c0 < n; c0 += chunk) {
    const double c = static_cast<double>(std::min(chunk, n - c0));
    total += 4.0 * c * f * dv + c * (c + 1) * (f + dv);
  }
  return heads * total;
}

std::string key(const char* what, index_t n) {
  return std::string(what) + "/N:" + std::to_string(n);
}

// GFLOPs, roofline_frac and tokens/s of a row that took `t` seconds per call.
void set_counters(benchmark::State& state, double flops_per_iter, double t, index_t n) {
  attn_bench::set_gflops(state, flops_per_iter, t);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(kBatch * kHeads * n),
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

// x_recurrence = the recurrence's time at this N / t (no counter if it did not run).
void set_recurrence_ratio(benchmark::State& state, index_t n, double t) {
  const double base = attn_bench::baseline_seconds(key("recurrence", n));
  if (base > 0 && t > 0) state.counters["x_recurrence"] = base / t;
}

// Linear attention: args N, causal, chunk (0 = default; 1 = the engine run
// token by token: per token φ(q)ᵀS and a rank-1 state update).
void BM_Linear(benchmark::State& state) {
  const index_t n = state.range(0);
  const bool causal = state.range(1) != 0;
  Problem p(n);
  attn::LinearAttentionOptions opt;
  opt.causal = causal;
  opt.chunk = state.range(2);
  auto out = attn::bhsd(p.out.data(), kBatch, kHeads, n, kDim);
  const double t = attn_bench::timed_loop(state, [&] {
    attn::linear_attention(p.view(p.q, n), p.view(p.k, n), p.view(p.v, n), out,
                           attn::elu_plus_one(), opt);
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  });
  set_counters(
      state, linear_flops(n, causal, opt.chunk > 0 ? opt.chunk : attn::LinearTraits::chunk), t, n);
  attn_bench::set_ratio(state, key(causal ? "causal" : "full", n), t);
  if (causal) set_recurrence_ratio(state, n, t);
}

// Decoding through the public API, one call per token carrying the state:
// the recurrence plus each call's checks and scratch setup.
void BM_LinearDecodeCalls(benchmark::State& state) {
  const index_t n = state.range(0);
  Problem p(n);
  attn::LinearAttentionOptions opt;
  opt.causal = true;
  opt.num_threads = 1;
  attn::LinearStateBuffer<float> st(kBatch, kHeads, kDim, kDim);
  const auto slice = [&](const std::vector<float>& b, index_t t) {
    return attn::Tensor4<const float>(b.data() + t * kDim, {kBatch, kHeads, 1, kDim},
                                      {kHeads * n * kDim, n * kDim, kDim, 1});
  };
  const double t = attn_bench::timed_loop(state, [&] {
    st.reset();
    for (index_t i = 0; i < n; ++i)
      attn::linear_attention(
          slice(p.q, i), slice(p.k, i), slice(p.v, i),
          attn::Tensor4<float>(p.out.data() + i * kDim, {kBatch, kHeads, 1, kDim},
                               {kHeads * n * kDim, n * kDim, kDim, 1}),
          attn::elu_plus_one(), st.state(), opt);
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  });
  set_counters(state, linear_flops(n, true, 1), t, n);
  set_recurrence_ratio(state, n, t);
}

// The baseline recurrence written directly, one token at a time per (batch,
// head), heads in parallel: [S | z] += φ(k_t) [v_t | 1]ᵀ (rank-1), then
// out_t = φ(q_t)ᵀ S / (φ(q_t)ᵀ z + eps) (one GEMV) — the RNN form of
// Katharopoulos et al.
void BM_PlainRecurrence(benchmark::State& state) {
  const index_t n = state.range(0);
  Problem p(n);
  const float eps = 1e-6f;
  using Vec = Eigen::Matrix<float, Eigen::Dynamic, 1>;
  using RowVec = Eigen::Matrix<float, 1, Eigen::Dynamic>;
  const double t = attn_bench::timed_loop(state, [&] {
#pragma omp parallel for schedule(dynamic, 1)
    for (index_t h = 0; h < kBatch * kHeads; ++h) {
      const auto q = Eigen::Map<const attn::RowMatrix<float>>(p.q.data() + h * n * kDim, n, kDim);
      const auto k = Eigen::Map<const attn::RowMatrix<float>>(p.k.data() + h * n * kDim, n, kDim);
      const auto v = Eigen::Map<const attn::RowMatrix<float>>(p.v.data() + h * n * kDim, n, kDim);
      auto out = Eigen::Map<attn::RowMatrix<float>>(p.out.data() + h * n * kDim, n, kDim);
      attn::RowMatrix<float> s = attn::RowMatrix<float>::Zero(kDim, kDim + 1);  // [S | z]
      Vec phi_k(kDim), phi_q(kDim);
      RowVec v_aug(kDim + 1), num(kDim + 1);
      v_aug(kDim) = 1.f;
      for (index_t i = 0; i < n; ++i) {
        // φ = elu + 1 = e^min(x,0) + max(x,0)
        phi_k = (k.row(i).array().min(0.f).exp() + k.row(i).array().max(0.f)).transpose();
        phi_q = (q.row(i).array().min(0.f).exp() + q.row(i).array().max(0.f)).transpose();
        v_aug.head(kDim) = v.row(i);
        s.noalias() += phi_k * v_aug;
        num.noalias() = phi_q.transpose() * s;
        out.row(i) = num.head(kDim) / (num(kDim) + eps);
      }
    }
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  });
  attn_bench::record_time(state, key("recurrence", n), t);
  set_counters(state, 4.0 * kBatch * kHeads * n * kDim * kDim, t, n);
}

// The ceiling of the chunked form on this machine: the product kernel it
// runs (detail/small_gemm.hpp) on one chunk-sized product with operands in
// L1, φ(Q_c)[24×64] · S[64×64], every thread on its own buffers.
void BM_ChunkKernel(benchmark::State& state) {
  const index_t m = attn::LinearTraits::chunk, k = kDim, n = kDim, reps = 2048;
  const int threads = attn_bench::max_threads();
  std::vector<std::vector<float>> a(threads, std::vector<float>(m * k, 0.5f)),
      b(threads, std::vector<float>(k * n, 0.25f)), c(threads, std::vector<float>(m * n));
  const double t = attn_bench::timed_loop(state, [&] {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int i = 0; i < threads; ++i)  // one buffer set per thread
      for (index_t r = 0; r < reps; ++r) {
        attn::detail::small_gemm<float>(m, n, k, a[i].data(), k, b[i].data(), n, c[i].data(), n,
                                        r > 0);
        benchmark::DoNotOptimize(c[i].data());
      }
  });
  attn_bench::set_gflops(state, 2.0 * m * n * k * reps * threads, t);
}

// The elu + 1 feature map alone over the q and k rows of N tokens, 8 heads,
// heads over threads: a part of every linear path that is not a product.
void BM_FeatureMap(benchmark::State& state) {
  const index_t n = state.range(0);
  Problem p(n);
  std::vector<float> phi(p.q.size());
  for (auto _ : state) {
#pragma omp parallel for schedule(static)
    for (index_t h = 0; h < 2 * kBatch * kHeads; ++h) {
      const float* x = (h % 2 ? p.k.data() : p.q.data()) + (h / 2) * n * kDim;
      attn::elu_plus_one().features<float>(
          attn::FeatureInput<float>(x, n, kDim, Eigen::OuterStride<>(kDim)),
          attn::FeatureOutput<float>(phi.data() + (h / 2) * n * kDim, n, kDim,
                                     Eigen::OuterStride<>(kDim)));
    }
    benchmark::DoNotOptimize(phi.data());
    benchmark::ClobberMemory();
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(kBatch * kHeads * n),
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

// Dense softmax attention on the flash engine (the baseline), causal or not.
void BM_Flash(benchmark::State& state) {
  const index_t n = state.range(0);
  const bool causal = state.range(1) != 0;
  const double pairs = causal ? 0.5 * n * (n + 1.0) : 1.0 * n * n;
  if (attn_bench::skip_over_limits(state, "flash", 0, 4.0 * kBatch * kHeads * pairs * kDim)) return;
  Problem p(n);
  auto out = attn::bhsd(p.out.data(), kBatch, kHeads, n, kDim);
  attn::AttentionStats stats;
  attn::AttentionOptions opt;
  opt.stats = &stats;
  const double t = attn_bench::timed_loop(state, [&] {
    if (causal)
      attn::masked_attention(p.view(p.q, n), p.view(p.k, n), p.view(p.v, n), out, attn::causal(),
                             attn::no_score_mod(), opt);
    else
      attn::scaled_dot_product_attention(p.view(p.q, n), p.view(p.k, n), p.view(p.v, n), out, opt);
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  });
  attn_bench::record_time(state, key(causal ? "causal" : "full", n), t);
  set_counters(state, stats.flops(kDim, kDim), t, n);
}

void register_all(bool sweep) {
  const std::vector<index_t> sizes = attn_bench::lengths(sweep, {1024, 4096});
  const std::vector<index_t> decode_n =
      sweep ? std::vector<index_t>{4096, 16384} : std::vector<index_t>{4096};
  attn_bench::register_roofline_row();
  // baselines first: a row's ratio counters read times recorded earlier in the run
  for (index_t n : sizes) {
    for (int causal : {0, 1})
      benchmark::RegisterBenchmark(("flash/" + std::string(causal ? "causal" : "full")).c_str(),
                                   BM_Flash)
          ->Args({n, causal})
          ->ArgNames({"N", "causal"})
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    benchmark::RegisterBenchmark("linear/causal_plain_recurrence", BM_PlainRecurrence)
        ->Arg(n)
        ->ArgName("N")
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  for (int causal : {0, 1})
    for (index_t n : sizes)
      benchmark::RegisterBenchmark(("linear/" + std::string(causal ? "causal" : "full")).c_str(),
                                   BM_Linear)
          ->Args({n, causal, 0})
          ->ArgNames({"N", "causal", "chunk"})
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
  for (index_t n : decode_n) {
    benchmark::RegisterBenchmark("linear/causal_chunk1", BM_Linear)
        ->Args({n, 1, 1})
        ->ArgNames({"N", "causal", "chunk"})
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark("linear/causal_decode_calls", BM_LinearDecodeCalls)
        ->Arg(n)
        ->ArgName("N")
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark("linear/feature_map", BM_FeatureMap)
        ->Arg(n)
        ->ArgName("N")
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  benchmark::RegisterBenchmark("linear/chunk_kernel", BM_ChunkKernel)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  if (sweep)
    for (index_t chunk : {8, 16, 24, 32, 64, 128})
      benchmark::RegisterBenchmark("linear/causal_chunk_sweep", BM_Linear)
          ->Args({16384, 1, chunk})
          ->ArgNames({"N", "causal", "chunk"})
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  bool sweep = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--sweep") == 0)
      sweep = true;
    else
      args.push_back(argv[i]);
  }
  int n = static_cast<int>(args.size());
  register_all(sweep);
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
