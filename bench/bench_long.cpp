// Long sequences: sliding-window (W = 256 keys) and BigBird block-sparse
// attention against dense flash attention, B = 1, H = 8, D = 64, float.
//
//   bench_long                 N = 1024 ... 4096 (a short run)
//   bench_long --sweep          N = 256 ... 65536; dense rows over 2 TFLOP per call
//                              (N >= 32768) are skipped with a note
//   bench_long --memory [--sweep]
//                              peak resident memory per (path, N), each shape
//                              in a forked child, printed as a table; no timing
//   --threads=T                worker threads (default 0: all). On a shared
//                              machine T = 1 gives the steadiest scaling
//                              figures: its CPU time is the work alone.
//
// Other flags go to Google Benchmark (--benchmark_filter=..., --benchmark_repetitions=3).
// Counters: GFLOPs (a rate, GFLOP/s) over the computed tiles only (AttentionStats),
// GFLOP per call, tiles = computed tiles, roofline_frac against the row
// roofline/gemm (a 2048³ sgemm on the same threads), and on window and bigbird
// rows x_baseline = dense time / this row's time at the same N.
#include "bench_support.hpp"

#include <attn/attn.hpp>
#include <attn/sliding_window.hpp>
#include <attn/sparse.hpp>

#include <benchmark/benchmark.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

using attn::index_t;

constexpr index_t kHeads = 8, kDim = 64, kWindow = 256;
int g_threads = 0;  // --threads

enum class Path { window, bigbird, dense };

const char* path_name(Path p) {
  return p == Path::window ? "window" : p == Path::bigbird ? "bigbird" : "dense";
}

/// q, k, v, out of one [1, H, N, D] problem, filled with N(0, 1).
struct Problem {
  std::vector<float> q, k, v, out;
  explicit Problem(index_t n)
      : q(attn_bench::random_buffer(static_cast<std::size_t>(kHeads * n * kDim), 1)),
        k(attn_bench::random_buffer(q.size(), 2)), v(attn_bench::random_buffer(q.size(), 3)),
        out(q.size()) {}
  attn::Tensor4<const float> view(const std::vector<float>& t, index_t n) const {
    return attn::bhsd(t.data(), 1, kHeads, n, kDim);
  }
};

/// One call of the path; fills `stats`.
void run(Path path, Problem& p, index_t n, const attn::BlockSparseLayout* layout,
         attn::AttentionStats& stats) {
  attn::AttentionOptions opt;
  opt.stats = &stats;
  opt.num_threads = g_threads;
  const auto q = p.view(p.q, n), k = p.view(p.k, n), v = p.view(p.v, n);
  const auto out = attn::bhsd(p.out.data(), 1, kHeads, n, kDim);
  switch (path) {
    case Path::window:  // causal window of W keys: i - (W - 1) <= j <= i
      attn::sliding_window_attention(q, k, v, out, attn::window(kWindow - 1, 0), opt);
      break;
    case Path::bigbird:
      attn::sparse_attention(q, k, v, out, *layout, opt);
      break;
    case Path::dense:
      attn::scaled_dot_product_attention(q, k, v, out, opt);
      break;
  }
  benchmark::DoNotOptimize(p.out.data());
  benchmark::ClobberMemory();
}

/// 4·H·N²·D: the work of dense attention.
double dense_flops(index_t n) {
  return 4.0 * kHeads * static_cast<double>(n) * static_cast<double>(n) * kDim;
}

/// Ratio key of one shape (every path here runs at B = 1, H = 8, D = 64): "N:4096".
std::string key(index_t n) { return "N:" + std::to_string(n); }

/// One path at one N; dense is the baseline (registered first), the others
/// report x_baseline against it.
void bench(benchmark::State& state, Path path) {
  const index_t n = state.range(0);
  if (path == Path::dense && attn_bench::skip_over_limits(state, "dense", 0, dense_flops(n)))
    return;
  Problem p(n);
  const attn::BlockSparseLayout layout =
      path == Path::bigbird ? attn::bigbird(n) : attn::BlockSparseLayout();
  attn::AttentionStats stats;
  const double t = attn_bench::timed_loop(state, [&] { run(path, p, n, &layout, stats); });
  if (path == Path::dense)
    attn_bench::record_time(state, key(n), t);
  else
    attn_bench::set_ratio(state, key(n), t);
  attn_bench::set_gflops(state, stats.flops(kDim, kDim), t, g_threads);
  state.counters["tiles"] = static_cast<double>(stats.full_tiles + stats.partial_tiles);
  state.counters["GFLOP"] = stats.flops(kDim, kDim) * 1e-9;
}

// ------------------------------------------------------------------ memory --

/// A field of /proc/self/status in KiB (VmRSS, VmHWM).
long status_kib(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::size_t len = std::strlen(field);
  while (std::getline(in, line))
    if (line.compare(0, len, field) == 0 && line[len] == ':')
      return std::stol(line.substr(len + 1));
  return -1;
}

/// Runs one shape in a forked child and returns {inputs MiB, call's extra MiB,
/// peak MiB}: resident memory that the inputs (and layout) added, what the
/// call added on top at its peak, and the child's peak over its start.
std::vector<double> child_memory(Path path, index_t n) {
  int fds[2];
  if (pipe(fds) != 0) return {};
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    const long start = status_kib("VmRSS");
    Problem p(n);
    std::fill(p.out.begin(), p.out.end(), 0.f);
    const attn::BlockSparseLayout layout =
        path == Path::bigbird ? attn::bigbird(n) : attn::BlockSparseLayout();
    const long inputs = status_kib("VmRSS");
    attn::AttentionStats stats;
    run(path, p, n, &layout, stats);
    const long peak = status_kib("VmHWM");
    const double mib[3] = {(inputs - start) / 1024.0, (peak - inputs) / 1024.0,
                           (peak - start) / 1024.0};
    const ssize_t wrote = write(fds[1], mib, sizeof mib);
    _exit(wrote == static_cast<ssize_t>(sizeof mib) ? 0 : 1);
  }
  close(fds[1]);
  double mib[3] = {0, 0, 0};
  const ssize_t got = read(fds[0], mib, sizeof mib);
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (got != static_cast<ssize_t>(sizeof mib)) return {};
  return {mib[0], mib[1], mib[2]};
}

void memory_table(const std::vector<index_t>& sizes) {
  std::printf("%-8s %7s %12s %12s %12s\n", "path", "N", "inputs_MiB", "extra_MiB", "peak_MiB");
  for (Path path : {Path::window, Path::bigbird, Path::dense})
    for (index_t n : sizes) {
      if (path == Path::dense && dense_flops(n) > attn_bench::kMaxFlops) continue;
      const std::vector<double> m = child_memory(path, n);
      if (m.empty()) {
        std::printf("%-8s %7ld  (child failed)\n", path_name(path), static_cast<long>(n));
        continue;
      }
      std::printf("%-8s %7ld %12.1f %12.1f %12.1f\n", path_name(path), static_cast<long>(n), m[0],
                  m[1], m[2]);
      std::fflush(stdout);
    }
}

}  // namespace

int main(int argc, char** argv) {
  bool sweep = false, memory = false;
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--sweep") == 0) {
      sweep = true;
    } else if (std::strcmp(argv[i], "--memory") == 0) {
      memory = true;
    } else if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      g_threads = std::atoi(argv[i] + 10);
    } else {
      rest.push_back(argv[i]);
    }
  }
  const std::vector<index_t> sizes = attn_bench::lengths(sweep, {1024, 2048, 4096});

  if (memory) {  // before anything starts OpenMP threads in this process, so children may
    memory_table(sizes);
    return 0;
  }
  attn_bench::register_roofline_row(g_threads);
  for (Path path : {Path::dense, Path::window, Path::bigbird})  // the baseline first
    for (index_t n : sizes) {
      benchmark::RegisterBenchmark((std::string("BM_") + path_name(path)).c_str(),
                                   [path](benchmark::State& s) { bench(s, path); })
          ->Arg(n)
          ->ArgName("N")
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
  int rest_argc = static_cast<int>(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rest_argc, rest.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
