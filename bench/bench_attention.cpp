// bench_attention — dense and causal forward: the flash engine against a
// naive Eigen attention and against plain GEMMs of the same size, in one binary.
//
//   flash   attn::scaled_dot_product_attention / masked_attention(causal())
//   naive   per head: S = scale·Q·Kᵀ (N×N), softmax rows, O = S·V; heads over
//           threads, one reused S buffer per thread (a careful hand-written Eigen version)
//   gemm    per head: the same two products without the softmax: the roofline
//           of what Eigen's GEMM reaches on these shapes on this machine
//   flash_bf16  the flash rows with Eigen::bfloat16 q, k, v and out (peak_frac
//           against the bf16 dot-product peak where the CPU has AVX512-BF16)
//   flash/isa:<isa>  dense and causal rows at the target shapes with the
//           kernels of each instruction set this CPU runs (attn::set_isa)
//
//   bench_attention           D = 64 and 128 at N = 512 ... 4096 (a short run)
//   bench_attention --sweep   D = 64 at N = 256 ... 65536 as well; rows past the
//                             limits of bench_support.hpp (N² buffers over 4 GiB,
//                             calls over 2 TFLOP) are skipped with a note
//
// Counters: peak_frac against the peak rows (fp32 FMA and bf16 dot peaks of
// each ISA, measured in the same run); GFLOPs (GFLOP/s) with flops = 4·B·H·Lq·Lk·D (dense) or
// 4·B·H·D·N(N+1)/2 (causal: only the pairs that are kept), for every row, so rows compare directly;
// roofline_frac against the row roofline/gemm (a 2048³ sgemm); x_baseline on flash rows = naive
// time / flash time at the same shape. Peak memory: BM_peak_rss runs each path once in a child
// process.
#include "bench_support.hpp"

#include <cmath>
#include <cstdlib>
#include <limits>

namespace {

using namespace attn_bench;
using attn::index_t;

constexpr index_t kBatch = 1, kHeads = 8;

struct Problem {
  index_t n, d;
  std::vector<float> q, k, v, o;
  Problem(index_t n_, index_t d_)
      : n(n_), d(d_), q(random_buffer(static_cast<std::size_t>(kBatch * kHeads * n * d), 1)),
        k(random_buffer(q.size(), 2)), v(random_buffer(q.size(), 3)), o(q.size()) {}
  attn::Tensor4<float> view(std::vector<float>& b) {
    return attn::bhsd(b.data(), kBatch, kHeads, n, d);
  }
};

/// The same problem stored in bfloat16.
struct ProblemBf16 {
  index_t n, d;
  std::vector<Eigen::bfloat16> q, k, v, o;
  static std::vector<Eigen::bfloat16> to_bf16(const std::vector<float>& f) {
    std::vector<Eigen::bfloat16> r(f.size());
    for (std::size_t i = 0; i < f.size(); ++i) r[i] = Eigen::bfloat16(f[i]);
    return r;
  }
  explicit ProblemBf16(const Problem& p)
      : n(p.n), d(p.d), q(to_bf16(p.q)), k(to_bf16(p.k)), v(to_bf16(p.v)), o(p.o.size()) {}
  attn::Tensor4<Eigen::bfloat16> view(std::vector<Eigen::bfloat16>& b) {
    return attn::bhsd(b.data(), kBatch, kHeads, n, d);
  }
};

double attention_flops(index_t n, index_t d, bool causal) {
  const double pairs = causal ? 0.5 * static_cast<double>(n) * static_cast<double>(n + 1)
                              : static_cast<double>(n) * static_cast<double>(n);
  return 4.0 * kBatch * kHeads * pairs * static_cast<double>(d);
}

/// Ratio key of one shape: "dense/N:1024/D:64".
std::string key(bool causal, index_t n, index_t d) {
  return std::string(causal ? "causal" : "dense") + "/N:" + std::to_string(n) +
         "/D:" + std::to_string(d);
}

// --------------------------------------------------------------------- flash --

void run_flash(Problem& p, bool causal) {
  auto q = p.view(p.q), k = p.view(p.k), v = p.view(p.v), o = p.view(p.o);
  if (causal)
    attn::masked_attention(q, k, v, o, attn::causal());
  else
    attn::scaled_dot_product_attention(q, k, v, o);
}

/// Flash engine; x_baseline against the naive row of the same shape.
void BM_flash(benchmark::State& state, bool causal) {
  const index_t n = state.range(0), d = state.range(1);
  const double flops = attention_flops(n, d, causal);
  if (skip_over_limits(state, causal ? "flash causal" : "flash dense", 0, flops)) return;
  Problem p(n, d);
  const double t = timed_loop(state, [&] {
    run_flash(p, causal);
    benchmark::DoNotOptimize(p.o.data());
    benchmark::ClobberMemory();
  });
  set_gflops(state, flops, t);
  set_ratio(state, key(causal, n, d), t);
}

/// bf16 storage: GFLOPs and peak_frac against the bf16 dot peak.
void BM_flash_bf16(benchmark::State& state, bool causal) {
  const index_t n = state.range(0), d = state.range(1);
  const double flops = attention_flops(n, d, causal);
  if (skip_over_limits(state, causal ? "flash bf16 causal" : "flash bf16 dense", 0, flops)) return;
  const Problem p32(n, d);
  ProblemBf16 p(p32);
  auto q = p.view(p.q), k = p.view(p.k), v = p.view(p.v), o = p.view(p.o);
  const double t = timed_loop(state, [&] {
    if (causal)
      attn::masked_attention(q, k, v, o, attn::causal());
    else
      attn::scaled_dot_product_attention(q, k, v, o);
    benchmark::DoNotOptimize(p.o.data());
    benchmark::ClobberMemory();
  });
  set_gflops(state, flops, t, 0, Peak::bf16);
}

/// The flash row with the kernels of one instruction set forced.
void BM_flash_isa(benchmark::State& state, attn::Isa isa, bool causal) {
  attn::set_isa(isa);
  const index_t n = state.range(0), d = state.range(1);
  const double flops = attention_flops(n, d, causal);
  Problem p(n, d);
  const double t = timed_loop(state, [&] {
    run_flash(p, causal);
    benchmark::DoNotOptimize(p.o.data());
    benchmark::ClobberMemory();
  });
  set_gflops(state, flops, t);
  state.counters["peak_frac"] = flops / t * 1e-9 / fp32_peak_gflops(isa);
  attn::reset_isa();
}

// --------------------------------------------------------------------- naive --

/// What an Eigen user writes: materialise S per head, softmax, multiply.
/// `softmax = false` leaves only the two GEMMs (the roofline).
void run_naive(Problem& p, bool causal, bool softmax) {
  using Mat = attn::RowMatrix<float>;
  using Map = Eigen::Map<const Mat>;
  const index_t n = p.n, d = p.d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel
  {
    Mat s(n, n);
#pragma omp for schedule(dynamic, 1)
    for (index_t h = 0; h < kBatch * kHeads; ++h) {
      const Map q(p.q.data() + h * n * d, n, d), k(p.k.data() + h * n * d, n, d),
          v(p.v.data() + h * n * d, n, d);
      Eigen::Map<Mat> o(p.o.data() + h * n * d, n, d);
      s.noalias() = q * k.transpose();  // (N, N)
      if (softmax) {
        s *= scale;
        if (causal)
          s.triangularView<Eigen::StrictlyUpper>().setConstant(
              -std::numeric_limits<float>::infinity());
        for (index_t i = 0; i < n; ++i) {  // row softmax
          auto row = s.row(i).array();
          row = (row - row.maxCoeff()).exp();
          row /= row.sum();
        }
      }
      o.noalias() = s * v;  // (N, D)
    }
  }
}

/// Skips a naive-path row whose per-thread N×N score buffers or dense GEMMs
/// pass the sweep limits.
bool skip_naive(benchmark::State& state, const char* what, index_t n, index_t d) {
  const double scores = static_cast<double>(n) * static_cast<double>(n) * sizeof(float);
  return skip_over_limits(state, what, scores * max_threads(), attention_flops(n, d, false));
}

/// Naive baseline: records its time for the flash row of the same shape.
void BM_naive(benchmark::State& state, bool causal) {
  const index_t n = state.range(0), d = state.range(1);
  if (skip_naive(state, causal ? "naive causal" : "naive dense", n, d)) return;
  Problem p(n, d);
  const double t = timed_loop(state, [&] {
    run_naive(p, causal, true);
    benchmark::DoNotOptimize(p.o.data());
    benchmark::ClobberMemory();
  });
  record_time(state, key(causal, n, d), t);
  set_gflops(state, attention_flops(n, d, causal), t);
}

void BM_gemm_roofline(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1);
  if (skip_naive(state, "gemm", n, d)) return;
  Problem p(n, d);
  const double t = timed_loop(state, [&] {
    run_naive(p, false, false);
    benchmark::DoNotOptimize(p.o.data());
    benchmark::ClobberMemory();
  });
  set_gflops(state, attention_flops(n, d, false), t);
}

/// Registers one family over the shapes: D = 64 and 128 at N = 512 ... 4096,
/// or with --sweep D = 64 at N = 256 ... 65536 and D = 128 at N = 512 ... 4096.
template <class F>
void register_shapes(const char* name, F fn, bool sweep) {
  auto* b = benchmark::RegisterBenchmark(name, fn);
  b->ArgNames({"N", "D"});
  for (index_t n : lengths(sweep, {512, 1024, 2048, 4096})) b->Args({n, 64});
  for (index_t n : {512, 1024, 2048, 4096}) b->Args({n, 128});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

void register_timings(bool sweep) {
  register_roofline_row();
  // Baselines first: the flash rows read their times.
  register_shapes(
      "BM_naive/dense", [](benchmark::State& s) { BM_naive(s, false); }, sweep);
  register_shapes(
      "BM_naive/causal", [](benchmark::State& s) { BM_naive(s, true); }, sweep);
  register_shapes("BM_gemm_roofline", BM_gemm_roofline, sweep);
  register_shapes(
      "BM_flash/dense", [](benchmark::State& s) { BM_flash(s, false); }, sweep);
  register_shapes(
      "BM_flash/causal", [](benchmark::State& s) { BM_flash(s, true); }, sweep);
  register_shapes(
      "BM_flash_bf16/dense", [](benchmark::State& s) { BM_flash_bf16(s, false); }, sweep);
  register_shapes(
      "BM_flash_bf16/causal", [](benchmark::State& s) { BM_flash_bf16(s, true); }, sweep);
  // Every ISA at the shapes of the performance targets (dense D = 64 N = 4096,
  // D = 128 N = 2048 and 4096; causal N = 4096).
  for (attn::Isa isa : attn::supported_isas())
    for (bool causal : {false, true}) {
      auto* b = benchmark::RegisterBenchmark(
          (std::string("BM_flash/") + (causal ? "causal" : "dense") + "/isa:" + attn::isa_name(isa))
              .c_str(),
          [isa, causal](benchmark::State& s) { BM_flash_isa(s, isa, causal); });
      b->ArgNames({"N", "D"});
      if (!causal) b->Args({4096, 64})->Args({2048, 128});
      b->Args({4096, 128})->UseRealTime()->Unit(benchmark::kMillisecond);
    }
}

// ------------------------------------------------------------- peak memory --

/// Peak RSS (MiB) of a child process that runs one dense forward at N, D = 64.
void BM_peak_rss(benchmark::State& state, const char* path) {
  const index_t n = state.range(0);
  double mib = 0;
  for (auto _ : state) mib = run_child(std::string(path) + " " + std::to_string(n));
  const double inputs =
      4.0 * kBatch * kHeads * static_cast<double>(n) * 64 * sizeof(float) / (1 << 20);
  state.counters["peak_MiB"] = mib;
  state.counters["qkvo_MiB"] = inputs;  // what the four tensors alone occupy
  state.counters["extra_MiB"] = mib - inputs;
}
void register_peak_rss() {
  for (const char* path : {"flash", "naive"})
    benchmark::RegisterBenchmark((std::string("BM_peak_rss/") + path).c_str(),
                                 [path](benchmark::State& s) { BM_peak_rss(s, path); })
        ->Arg(4096)
        ->Arg(16384)
        ->ArgName("N")
        ->Iterations(1)
        ->Unit(benchmark::kMillisecond);
}

/// Child mode: `--attn-child flash|naive N` runs once and prints the peak RSS in MiB.
int child_main(const std::string& path, index_t n) {
  Problem p(n, 64);
  if (path == "flash")
    run_flash(p, false);
  else
    run_naive(p, false, true);
  benchmark::DoNotOptimize(p.o.data());
  std::printf("%.1f\n", peak_rss_bytes() / (1 << 20));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "--attn-child") == 0)
    return child_main(argv[2], std::atol(argv[3]));
  const bool sweep = take_flag(argc, argv, "--sweep");
  register_timings(sweep);
  register_peak_rss();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
