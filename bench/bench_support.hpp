// bench/bench_support.hpp — helpers shared by the attn benchmarks.
//
// Besides buffers and peak memory, four things every binary reports the same way:
//
//   peak       the machine's ceiling, measured in the same run: fp32_peak_gflops(isa)
//              is a register-only loop of 16 independent FMA chains per thread
//              (vfmadd of the ISA's widest vector) on the benchmark's threads, and
//              bf16_peak_gflops(isa) the same loop of vdpbf16ps (avx512_bf16)
//              or of tdpbf16ps on AMX tiles (amx_bf16).
//              register_peak_rows() adds them as rows `peak/fp32/<isa>` and
//              `peak/bf16/<isa>`; set_gflops() gives every GFLOP/s row
//              peak_frac = row GFLOP/s / the fp32 peak of attn::active_isa()
//              (or of the bf16 peak, for rows that say Peak::bf16).
//
//   roofline   roofline_gflops() measures once per process what a 2048³ Eigen sgemm
//              reaches with the benchmark's thread count; register_roofline_row()
//              adds it as the row `roofline/gemm`, and set_gflops() /
//              set_roofline_frac() give every GFLOP/s row the counter
//              roofline_frac = row GFLOP/s / probe GFLOP/s.
//   ratios     a baseline row records its time per call under a shape key
//              (record_time); an efficient row at the same key then reports
//              x_baseline = baseline time / its own time (set_ratio). Register the
//              baselines first: only times measured earlier in the run count.
//   limits     skip_over_limits() turns a sweep row whose N² buffers or work per
//              call would pass kMaxBytes / kMaxFlops into a note, not a crash.
//
// Usage in a benchmark function (key e.g. "dense/N:1024/D:64"):
//   baseline:   const double t = timed_loop(state, [&] { naive(p); });
//               record_time(state, key, t);
//               set_gflops(state, naive_flops, t);
//   efficient:  const double t = timed_loop(state, [&] { flash(p); });
//               set_ratio(state, key, t);
//               set_gflops(state, stats.flops(d, dv), t);
//   own GFLOP/s counter:  set_roofline_frac(state, flops / t * 1e-9);
#pragma once

#include <attn/attn.hpp>
#include <attn/kernels/dispatch.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

// The x86 probes exactly where attn has x86 kernels: they share the kernels'
// AMX configuration (kernels/bf16_amx.hpp).
#if ATTN_KERNELS_X86
#include <immintrin.h>
#define ATTN_BENCH_X86 1
#else
#define ATTN_BENCH_X86 0
#endif

namespace attn_bench {

using attn::index_t;

/// Threads an OpenMP parallel region of this process gets (1 without OpenMP).
inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// Seeded N(0,1) buffer.
inline std::vector<float> random_buffer(std::size_t n, std::uint32_t seed) {
  std::vector<float> v(n);
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (auto& x : v) x = dist(gen);
  return v;
}

/// Peak resident set of this process in bytes (VmHWM), 0 if unknown.
inline double peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) * 1024.0;
  return 0;
}

/// FLOP/s counter: `flops` per iteration, reported as a rate.
inline benchmark::Counter flops_rate(double flops) {
  return benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate,
                            benchmark::Counter::kIs1000);
}

/// Runs `self --attn-child ARGS` and returns the number it prints (a child
/// process gives a clean peak-RSS figure per shape).
inline double run_child(const std::string& args) {
  char exe[4096] = {};
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0) return 0;
  const std::string cmd = std::string(exe) + " --attn-child " + args;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return 0;
  double value = 0;
  if (std::fscanf(p, "%lf", &value) != 1) value = 0;
  pclose(p);
  return value;
}

/// Runs `for (auto _ : state) body();` and returns the wall-clock seconds per
/// iteration of that loop (0 when it did not run, e.g. after SkipWithError).
template <class F>
double timed_loop(benchmark::State& state, F&& body) {
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) body();
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  return state.iterations() > 0 ? elapsed.count() / static_cast<double>(state.iterations()) : 0.0;
}

/// The paired rows: each iteration calls call(0), ..., call(N - 1), timed one by
/// one, in alternating order (forward, then backward, so no call always runs
/// first), and the result holds every iteration's times. On a shared machine
/// the speed drifts between rows run one after another; the calls of one
/// iteration share the drift.
template <int N, class F>
std::vector<std::array<double, N>> paired_times(benchmark::State& state, F&& call) {
  std::vector<std::array<double, N>> times;
  bool forward = true;
  for (auto _ : state) {
    std::array<double, N> t{};
    for (int i = 0; i < N; ++i) {
      const int which = forward ? i : N - 1 - i;
      const auto t0 = std::chrono::steady_clock::now();
      call(which);
      benchmark::ClobberMemory();
      t[static_cast<std::size_t>(which)] =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    forward = !forward;
    times.push_back(t);
  }
  return times;
}

/// The median over iterations of times[num] / times[den].
template <std::size_t N>
double median_ratio(const std::vector<std::array<double, N>>& times, std::size_t num,
                    std::size_t den) {
  std::vector<double> r;
  for (const auto& t : times) r.push_back(t[num] / t[den]);
  if (r.empty()) return 0.0;
  std::nth_element(r.begin(), r.begin() + static_cast<std::ptrdiff_t>(r.size() / 2), r.end());
  return r[r.size() / 2];
}

// -------------------------------------------------------------------- peak --

/// Which ceiling a row is compared with.
enum class Peak { fp32, bf16 };

namespace detail {

/// Keeps 16 accumulators in registers and the loop from being folded away.
#define ATTN_BENCH_KEEP(a)                                                                       \
  __asm__ volatile(""                                                                            \
                   : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]), "+x"(a[4]), "+x"(a[5]),     \
                     "+x"(a[6]), "+x"(a[7]));                                                    \
  __asm__ volatile(""                                                                            \
                   : "+x"(a[8]), "+x"(a[9]), "+x"(a[10]), "+x"(a[11]), "+x"(a[12]), "+x"(a[13]), \
                     "+x"(a[14]), "+x"(a[15]))

#if ATTN_BENCH_X86
/// FLOP of `iters` rounds of 16 independent FMAs on one thread, per ISA.
__attribute__((target("avx512f"))) inline double fma_loop_avx512(long iters) {
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ps(1.0f + 1e-3f * static_cast<float>(i));
  const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
    for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
    ATTN_BENCH_KEEP(a);
  }
  return 16.0 * 16 * 2 * static_cast<double>(iters);
}
__attribute__((target("avx2,fma"))) inline double fma_loop_avx2(long iters) {
  __m256 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm256_set1_ps(1.0f + 1e-3f * static_cast<float>(i));
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
    for (int i = 0; i < 16; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
    ATTN_BENCH_KEEP(a);
  }
  return 16.0 * 8 * 2 * static_cast<double>(iters);
}
/// vdpbf16ps: 16 lanes × 2 products × 2 FLOP per instruction.
__attribute__((target("avx512f,avx512bf16"))) inline double dpbf16_loop(long iters) {
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3f80), c = (__m512bh)_mm512_set1_epi16(0x3380);
  for (long it = 0; it < iters; ++it) {
    for (int i = 0; i < 16; ++i) a[i] = _mm512_dpbf16_ps(a[i], b, c);
    ATTN_BENCH_KEEP(a);
  }
  return 16.0 * 16 * 2 * 2 * static_cast<double>(iters);
}
/// tdpbf16ps: six independent 16 × 16 fp32 tiles, each += a 16 × 32 by 32 × 16
/// bf16 product (16384 FLOP per instruction); no loads in the loop.
__attribute__((target("amx-tile,amx-bf16"))) inline double amx_bf16_loop(long iters) {
  attn::kernels::amx_bf16::configure();  // the kernels' tiles: 16 rows × 64 bytes each
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  iters /= 8;  // 16 times the work of a vector instruction, at a lower rate
  for (long it = 0; it < iters; ++it) {
    _tile_dpbf16ps(0, 6, 7);
    _tile_dpbf16ps(1, 6, 7);
    _tile_dpbf16ps(2, 6, 7);
    _tile_dpbf16ps(3, 6, 7);
    _tile_dpbf16ps(4, 6, 7);
    _tile_dpbf16ps(5, 6, 7);
  }
  _tile_release();
  return 6.0 * 16 * 16 * 32 * 2 * static_cast<double>(iters);
}
#endif

/// The portable kernels' ceiling: 16 accumulators of the baseline's 4-float vector.
inline double fma_loop_portable(long iters) {
  typedef float v4 __attribute__((vector_size(16)));
  v4 a[16];
  for (int i = 0; i < 16; ++i) a[i] = v4{} + (1.0f + 1e-3f * static_cast<float>(i));
  const v4 b = v4{} + 0.999999f, c = v4{} + 1e-7f;
  for (long it = 0; it < iters; ++it) {
    for (int i = 0; i < 16; ++i) a[i] = a[i] * b + c;
    ATTN_BENCH_KEEP(a);
  }
  return 16.0 * 4 * 2 * static_cast<double>(iters);
}
#undef ATTN_BENCH_KEEP

/// GFLOP/s of `loop` run on `threads` threads at once (0: all): best of 7
/// rounds of 10 million iterations (about 20 ms for 512-bit FMAs at 4 GHz,
/// 40 ms for 256-bit ones). Other processes and the hypervisor only ever slow
/// a round down; rounds of 4 ms (as before) let one busy 30 ms stretch halve
/// the ceiling a whole run was compared with.
template <class Loop>
double measure_peak(Loop loop, int threads) {
  const int n = threads > 0 ? threads : max_threads();
  const long iters = 10'000'000;
  double best = 0;
  for (int rep = 0; rep < 7; ++rep) {
    double flops = 0;
    const auto start = std::chrono::steady_clock::now();
#ifdef _OPENMP
#pragma omp parallel num_threads(n) reduction(+ : flops)
#endif
    flops += loop(iters);
    const std::chrono::duration<double> t = std::chrono::steady_clock::now() - start;
    best = std::max(best, flops / t.count() * 1e-9);
  }
  return best;
}

inline double measure_fp32_peak(attn::Isa isa, int threads) {
#if ATTN_BENCH_X86
  if (isa == attn::Isa::avx512 || isa == attn::Isa::avx512_bf16 || isa == attn::Isa::amx_bf16)
    return measure_peak(fma_loop_avx512, threads);
  if (isa == attn::Isa::avx2) return measure_peak(fma_loop_avx2, threads);
#endif
  (void)isa;
  return measure_peak(fma_loop_portable, threads);
}

}  // namespace detail

/// fp32 FMA peak (GFLOP/s) of `isa`'s vectors on `threads` threads (0: all),
/// measured on the first call for each (isa, threads), then cached.
inline double fp32_peak_gflops(attn::Isa isa, int threads = 0) {
  static std::map<std::pair<int, int>, double> cache;
  const auto key = std::make_pair(static_cast<int>(isa), threads);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, detail::measure_fp32_peak(isa, threads)).first;
  return it->second;
}

/// bf16 product peak (GFLOP/s) of `isa`: vdpbf16ps for avx512_bf16, tdpbf16ps
/// for amx_bf16; 0 for other sets or when this CPU lacks them.
inline double bf16_peak_gflops(attn::Isa isa, int threads = 0) {
  static std::map<std::pair<int, int>, double> cache;
  const auto key = std::make_pair(static_cast<int>(isa), threads);
  auto it = cache.find(key);
  if (it == cache.end()) {
    double g = 0;
#if ATTN_BENCH_X86
    if (isa == attn::Isa::avx512_bf16 && attn::isa_supported(isa))
      g = detail::measure_peak(detail::dpbf16_loop, threads);
    if (isa == attn::Isa::amx_bf16 && attn::isa_supported(isa))
      g = detail::measure_peak(detail::amx_bf16_loop, threads);
#endif
    it = cache.emplace(key, g).first;
  }
  return it->second;
}

/// Sets peak_frac = gflops / the ceiling of `peak` for the active ISA (the
/// bf16 products it runs for Peak::bf16, where it has them).
inline void set_peak_frac(benchmark::State& state, double gflops, Peak peak = Peak::fp32,
                          int threads = 0) {
  const attn::Isa isa = attn::active_isa();
  const double ceiling = peak == Peak::bf16 && bf16_peak_gflops(isa, threads) > 0
                             ? bf16_peak_gflops(isa, threads)
                             : fp32_peak_gflops(isa, threads);
  state.counters["peak_frac"] = gflops / ceiling;
}

/// Registers `peak/fp32/<isa>` for every ISA this CPU runs and
/// `peak/bf16/avx512_bf16` where it has BF16: each row's GFLOPs is the probe's.
inline void register_peak_rows(int threads = 0) {
  for (attn::Isa isa : attn::supported_isas()) {
    if (isa == attn::Isa::avx512_bf16 || isa == attn::Isa::amx_bf16)
      continue;  // the same fp32 FMAs as avx512
    benchmark::RegisterBenchmark((std::string("peak/fp32/") + attn::isa_name(isa)).c_str(),
                                 [isa, threads](benchmark::State& state) {
                                   double g = 0;
                                   for (auto _ : state) g = fp32_peak_gflops(isa, threads);
                                   state.counters["GFLOPs"] = g;
                                 })
        ->Iterations(1);
  }
  for (attn::Isa isa : {attn::Isa::avx512_bf16, attn::Isa::amx_bf16})
    if (attn::isa_supported(isa))
      benchmark::RegisterBenchmark((std::string("peak/bf16/") + attn::isa_name(isa)).c_str(),
                                   [isa, threads](benchmark::State& state) {
                                     double g = 0;
                                     for (auto _ : state) g = bf16_peak_gflops(isa, threads);
                                     state.counters["GFLOPs"] = g;
                                   })
          ->Iterations(1);
}

// ---------------------------------------------------------------- roofline --

namespace detail {
/// GFLOP/s of C = A·B, 2048³ floats, on `threads` threads (0: Eigen's default,
/// all that OpenMP offers): the best of 5 timed products after one warm-up (the best, as other
/// processes on a shared machine only ever slow a product down).
inline double measure_gemm_gflops(int threads) {
  constexpr index_t n = 2048;
  const std::vector<float> a_buf = random_buffer(static_cast<std::size_t>(n * n), 11),
                           b_buf = random_buffer(a_buf.size(), 12);
  const Eigen::Map<const attn::RowMatrix<float>> a(a_buf.data(), n, n), b(b_buf.data(), n, n);
  attn::RowMatrix<float> c(n, n);
  const int saved = Eigen::nbThreads();
  if (threads > 0) Eigen::setNbThreads(threads);
  c.noalias() = a * b;  // warm-up: page faults, packing buffers
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    c.noalias() = a * b;  // (n, n), 2·n³ FLOP
    benchmark::DoNotOptimize(c.data());
    const std::chrono::duration<double> t = std::chrono::steady_clock::now() - start;
    best = std::max(best, 2.0 * n * n * n / t.count() * 1e-9);
  }
  Eigen::setNbThreads(saved);
  return best;
}
}  // namespace detail

/// What a large Eigen sgemm (2048³) reaches on this machine with `threads`
/// threads (0: all), in GFLOP/s. Measured on the first call for each thread
/// count (about a second), then cached for the rest of the process.
inline double roofline_gflops(int threads = 0) {
  static std::map<int, double> cache;
  auto it = cache.find(threads);
  if (it == cache.end()) it = cache.emplace(threads, detail::measure_gemm_gflops(threads)).first;
  return it->second;
}

/// Sets the counter roofline_frac = gflops / roofline_gflops(threads), for a
/// row that reached `gflops` GFLOP/s. Use it next to a GFLOP/s counter of
/// one's own; set_gflops() sets both.
inline void set_roofline_frac(benchmark::State& state, double gflops, int threads = 0) {
  state.counters["roofline_frac"] = gflops / roofline_gflops(threads);
  set_peak_frac(state, gflops, Peak::fp32, threads);
}

/// Sets the rate counter `GFLOPs` (GFLOP/s of `flops_per_iter` FLOP per
/// iteration, counting only computed work) and roofline_frac, for a row whose
/// loop took `seconds_per_iter` (timed_loop's result).
inline void set_gflops(benchmark::State& state, double flops_per_iter, double seconds_per_iter,
                       int threads = 0, Peak peak = Peak::fp32) {
  state.counters["GFLOPs"] = flops_rate(flops_per_iter * 1e-9);
  if (seconds_per_iter > 0) {
    set_roofline_frac(state, flops_per_iter * 1e-9 / seconds_per_iter, threads);
    if (peak != Peak::fp32)
      set_peak_frac(state, flops_per_iter * 1e-9 / seconds_per_iter, peak, threads);
  }
}

/// Registers the peak rows (register_peak_rows), then the row `roofline/gemm`:
/// the probe's 2048³ sgemm timed as a benchmark, with GFLOPs, roofline_frac
/// (about 1) and probe_GFLOPs (the denominator of every roofline_frac in this
/// run). Register it first.
inline void register_roofline_row(int threads = 0) {
  register_peak_rows(threads);
  benchmark::RegisterBenchmark(
      "roofline/gemm",
      [threads](benchmark::State& state) {
        constexpr index_t n = 2048;
        const std::vector<float> a_buf = random_buffer(static_cast<std::size_t>(n * n), 11),
                                 b_buf = random_buffer(a_buf.size(), 12);
        const Eigen::Map<const attn::RowMatrix<float>> a(a_buf.data(), n, n), b(b_buf.data(), n, n);
        attn::RowMatrix<float> c(n, n);
        const double probe = roofline_gflops(threads);  // measured before the timed loop
        const int saved = Eigen::nbThreads();
        if (threads > 0) Eigen::setNbThreads(threads);
        const double t = timed_loop(state, [&] {
          c.noalias() = a * b;  // (n, n)
          benchmark::DoNotOptimize(c.data());
        });
        Eigen::setNbThreads(saved);
        set_gflops(state, 2.0 * n * n * n, t, threads);
        state.counters["probe_GFLOPs"] = probe;
      })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

// ----------------------------------------------------------- baseline ratios --

namespace detail {
/// (iterations, seconds per iteration) of each recorded run of a baseline.
using Samples = std::vector<std::pair<std::int64_t, double>>;
inline std::map<std::string, Samples>& baseline_times() {
  static std::map<std::string, Samples> times;
  return times;
}
}  // namespace detail

/// Records the time per call of a baseline row under `key` (the variant and
/// shape, e.g. "causal/N:1024/D:64"). Call it after the loop of every run of the
/// baseline; Google Benchmark's reported runs are those with the most
/// iterations (the shorter ones only size the loop), and their median is used.
inline void record_time(const benchmark::State& state, const std::string& key,
                        double seconds_per_iter) {
  if (state.error_occurred() || seconds_per_iter <= 0) return;
  detail::baseline_times()[key].emplace_back(static_cast<std::int64_t>(state.iterations()),
                                             seconds_per_iter);
}

/// The baseline time recorded under `key` (median of its reported runs), 0 if none.
inline double baseline_seconds(const std::string& key) {
  const auto it = detail::baseline_times().find(key);
  if (it == detail::baseline_times().end() || it->second.empty()) return 0;
  std::int64_t most = 0;
  for (const auto& s : it->second) most = std::max(most, s.first);
  std::vector<double> t;
  for (const auto& s : it->second)
    if (s.first == most) t.push_back(s.second);
  std::sort(t.begin(), t.end());
  return t.size() % 2 ? t[t.size() / 2] : 0.5 * (t[t.size() / 2 - 1] + t[t.size() / 2]);
}

/// Sets the counter `x_baseline` = (baseline time at `key`) / seconds_per_iter,
/// this row's time per call (timed_loop's result): above 1 this row is faster.
/// No counter when no baseline ran at `key` earlier in this process (filtered
/// out, skipped over a limit, or registered after this row).
inline void set_ratio(benchmark::State& state, const std::string& key, double seconds_per_iter) {
  const double base = baseline_seconds(key);
  if (base > 0 && seconds_per_iter > 0 && !state.error_occurred())
    state.counters["x_baseline"] = base / seconds_per_iter;
}

// ------------------------------------------------------------ sweep limits --

/// Largest N²-sized buffers (scores, masks, biases) a row may allocate.
inline constexpr double kMaxBytes = 4.0 * (1 << 30);
/// Most work a row may do per call: 2 TFLOP, about 20 s at the ~100 GFLOP/s
/// of this 2-core machine. A fixed count, so a sweep runs the same rows on
/// every run.
inline constexpr double kMaxFlops = 2e12;

/// Skips the row with a note (Google Benchmark 1.7 has only SkipWithError, so
/// the JSON marks it error_occurred with the note as its message) when its
/// `bytes` of N²-sized buffers pass kMaxBytes or its `flops` per call pass
/// kMaxFlops. `what` names the path. Returns true when the row was skipped;
/// call it before allocating anything.
inline bool skip_over_limits(benchmark::State& state, const std::string& what, double bytes,
                             double flops) {
  char note[200];
  if (bytes > kMaxBytes)
    std::snprintf(note, sizeof note, "%s: N² buffers need %.1f GiB, over the %.0f GiB limit",
                  what.c_str(), bytes / (1 << 30), kMaxBytes / (1 << 30));
  else if (flops > kMaxFlops)
    std::snprintf(note, sizeof note, "%s: %.2g TFLOP per call, over the %.0f TFLOP limit",
                  what.c_str(), flops * 1e-12, kMaxFlops * 1e-12);
  else
    return false;
  state.SkipWithError(note);
  return true;
}

/// N = 256, 512, ..., 65536 (the sweep), or `short_run` without --sweep.
inline std::vector<index_t> lengths(bool sweep, std::vector<index_t> short_run) {
  if (!sweep) return short_run;
  std::vector<index_t> n;
  for (index_t len = 256; len <= 65536; len *= 2) n.push_back(len);
  return n;
}

/// Removes `flag` from argv (before benchmark::Initialize sees it); true if it was there.
inline bool take_flag(int& argc, char** argv, const char* flag) {
  bool found = false;
  int out = 0;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strcmp(argv[i], flag) == 0)
      found = true;
    else
      argv[out++] = argv[i];
  }
  argc = out;
  return found;
}

}  // namespace attn_bench
