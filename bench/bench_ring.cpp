// Ring and all-to-all attention across MPI ranks, against the cost model of
// docs/distributed.md. Run under mpirun (rank 0 reports):
//
//   mpirun -np 2 build/main/bench/bench_ring [--len=L] [--threads=T] [--iters=I]
//
// Every row has a fixed iteration count (ranks must run the same loops) and
// reports the slowest rank's time per call. Rows:
//
//   roofline/gemm                 the 2048³ sgemm probe on T threads (each rank)
//   pingpong/bytes:...            one ring exchange of a K/V slice (Sendrecv right/left):
//                                 the link's bandwidth GBps, for the model
//   local/N:L/...                 one ring step without the ring: the slice's queries
//                                 against one slice of keys in one process, dense (the
//                                 baseline; ring rows time it again between their calls)
//   ring/<layout>/<mask>/N:...    ring_attention over N = p·L; per rank the call is split
//                                 into compute (attention and merges) and exposed
//                                 communication (waiting after the compute was done)
//   ulysses/dense/N:...           ulysses_attention on the same problem (Hq = Hkv = 2p)
//   ring_bwd/<layout>/<mask>/N:...  ring_attention_backward, each call after a timed
//                                 ring_attention forward of the same problem
//
// Counters of ring rows: compute_frac = compute / (compute + exposed communication)
// over the ring steps, worst rank (1 when the transfers hide behind the compute);
// call_frac = compute / the whole call (setup, checks agreed by collectives, output
// copy included); comm_frac = exposed communication / call, exposed_ms per call;
// balance = the least-loaded rank's compute time / the most-loaded's, balance_cpu the
// same in CPU seconds; step_ms = wall / ring steps; model_ms = the cost model's step
// time max(w·C / F, S / bandwidth) with C = 4·L²·D·H, w the busiest rank's share of a
// dense step (zigzag causal 1/2), F (F_GFLOPs) timed in the same loop as the ring (one
// dense step between ring calls, so both see the same load) and the bandwidth from the
// pingpong row; model_ratio = step_ms / model_ms; model_ratio_cpu the same in CPU
// seconds; x_baseline = p · w · (dense step time) / wall.
//
// Counters of ring_bwd rows: compute_frac, call_frac, comm_frac, exposed_ms, balance and
// balance_cpu of the backward calls as above; balance_fwd, balance_fwd_cpu the same of
// the forward calls timed in the same loop; fwd_ms, bwd_ms the slowest rank's call;
// bwd_fwd = bwd_ms / fwd_ms (the FLOP ratio is 2.5); bytes_ratio = bytes the backward
// sends / bytes the forward sends (K, V plus the fp32 dK, dV accumulators: 2, plus the
// accumulators' trip home).
#include "bench_support.hpp"

#include <attn/dist/ring.hpp>
#include <attn/dist/ring_backward.hpp>
#include <attn/dist/ulysses.hpp>

#include <benchmark/benchmark.h>

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

namespace {

using attn::index_t;
using attn::dist::SeqLayout;

constexpr index_t kDim = 64, kHeads = 1;
index_t g_len = 4096;    // --len: rows per rank
int g_threads = 1;       // --threads: per rank
int g_iters = 3;         // --iters: calls per ring row
double g_bandwidth = 0;  // bytes/s of one ring exchange, from the pingpong row

int rank() { return attn::dist::detail::comm_rank(MPI_COMM_WORLD); }
int ranks() { return attn::dist::detail::comm_size(MPI_COMM_WORLD); }

double max_over_ranks(double x) {
  MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return x;
}
double min_over_ranks(double x) {
  MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
  return x;
}

/// One rank's slices of a [1, H, L, D] problem.
struct Slices {
  std::vector<float> q, k, v, out;
  index_t hq, hkv, len;
  Slices(index_t hq_, index_t hkv_, index_t len_)
      : q(attn_bench::random_buffer(static_cast<std::size_t>(hq_ * len_ * kDim), 1 + rank())),
        k(attn_bench::random_buffer(static_cast<std::size_t>(hkv_ * len_ * kDim), 7 + rank())),
        v(attn_bench::random_buffer(k.size(), 13 + rank())), out(q.size()), hq(hq_), hkv(hkv_),
        len(len_) {}
  attn::Tensor4<const float> qv() const { return attn::bhsd(q.data(), 1, hq, len, kDim); }
  attn::Tensor4<const float> kv() const { return attn::bhsd(k.data(), 1, hkv, len, kDim); }
  attn::Tensor4<const float> vv() const { return attn::bhsd(v.data(), 1, hkv, len, kDim); }
  attn::Tensor4<float> ov() { return attn::bhsd(out.data(), 1, hq, len, kDim); }
};

double slice_bytes(index_t len, index_t hkv) {
  return 2.0 * static_cast<double>(len * kDim * hkv) * sizeof(float);
}

// ---------------------------------------------------------------- pingpong --

void bench_pingpong(benchmark::State& state) {
  std::vector<char> send(static_cast<std::size_t>(slice_bytes(g_len, kHeads))), recv(send.size());
  const int p = ranks(), me = rank();
  double total = 0;
  for (auto _ : state) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    MPI_Sendrecv(send.data(), static_cast<int>(send.size()), MPI_BYTE, (me + 1) % p, 0, recv.data(),
                 static_cast<int>(recv.size()), MPI_BYTE, (me - 1 + p) % p, 0, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE);
    const double t = max_over_ranks(MPI_Wtime() - t0);
    state.SetIterationTime(t);
    total += t;
  }
  g_bandwidth = static_cast<double>(send.size()) * static_cast<double>(state.iterations()) / total;
  state.counters["GBps"] = g_bandwidth * 1e-9;
}

// ------------------------------------------------------------------- local --

void bench_local(benchmark::State& state) {
  Slices s(kHeads, kHeads, g_len);
  attn::AttentionOptions opt;
  opt.num_threads = g_threads;
  double total = 0, cpu = 0;
  for (auto _ : state) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    const std::clock_t c0 = std::clock();
    attn::scaled_dot_product_attention(s.qv(), s.kv(), s.vv(), s.ov(), opt);
    cpu += static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
    const double t = max_over_ranks(MPI_Wtime() - t0);
    state.SetIterationTime(t);
    total += t;
  }
  const double flops =
      4.0 * static_cast<double>(g_len) * static_cast<double>(g_len) * kDim * kHeads;
  state.counters["GFLOPs_cpu"] =
      flops * static_cast<double>(state.iterations()) / max_over_ranks(cpu) * 1e-9;
  attn_bench::set_gflops(state, flops, total / static_cast<double>(state.iterations()), g_threads);
}

// -------------------------------------------------------------------- ring --

enum class Kind { dense, causal };

void bench_ring(benchmark::State& state, SeqLayout layout, Kind kind, bool ulysses) {
  const int p = ranks();
  const index_t heads = ulysses ? 2 * p : kHeads;
  Slices s(heads, heads, g_len);
  attn::dist::RingTimings tm;
  attn::dist::DistOptions opt;
  opt.layout = layout;
  opt.num_threads = g_threads;
  opt.timings = &tm;
  auto call = [&] {
    if (ulysses)
      attn::dist::ulysses_attention(MPI_COMM_WORLD, s.qv(), s.kv(), s.vv(), s.ov(), attn::no_mask(),
                                    attn::no_score_mod(), opt);
    else if (kind == Kind::causal)
      attn::dist::ring_attention(MPI_COMM_WORLD, s.qv(), s.kv(), s.vv(), s.ov(), attn::causal(),
                                 attn::no_score_mod(), opt);
    else
      attn::dist::ring_attention(MPI_COMM_WORLD, s.qv(), s.kv(), s.vv(), s.ov(), attn::no_mask(),
                                 attn::no_score_mod(), opt);
  };
  // The model's compute term, measured in the same loop as the ring (so both see the same
  // load on a shared machine): one dense step, this rank's queries against its own keys.
  Slices step(heads, heads, g_len);
  attn::AttentionOptions step_opt;
  step_opt.num_threads = g_threads;
  call();  // warm-up: first touch of the buffers
  double compute = 0, compute_cpu = 0, exposed = 0, wall = 0, slowest = 0, local = 0, local_cpu = 0;
  for (auto _ : state) {
    if (!ulysses) {
      MPI_Barrier(MPI_COMM_WORLD);
      const double t0 = MPI_Wtime();
      const std::clock_t c0 = std::clock();
      attn::scaled_dot_product_attention(step.qv(), step.kv(), step.vv(), step.ov(), step_opt);
      local_cpu += static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
      local += max_over_ranks(MPI_Wtime() - t0);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    call();
    const double t = max_over_ranks(tm.total);
    state.SetIterationTime(t);
    compute += tm.compute;
    compute_cpu += tm.compute_cpu;
    exposed += tm.exposed_comm;
    wall += tm.total;
    slowest += t;
  }
  const double iters = static_cast<double>(state.iterations());
  const double n = static_cast<double>(g_len) * p;
  const double work = kind == Kind::causal ? 0.5 : 1.0;  // fraction of the dense FLOPs
  const double flops = 4.0 * n * n * kDim * static_cast<double>(heads) * work;
  state.counters["compute_frac"] = min_over_ranks(compute / (compute + exposed));
  state.counters["call_frac"] = min_over_ranks(compute / wall);
  state.counters["comm_frac"] = max_over_ranks(exposed / wall);
  state.counters["exposed_ms"] = max_over_ranks(exposed / iters) * 1e3;
  state.counters["balance"] = min_over_ranks(compute) / max_over_ranks(compute);
  const double cpu_max = max_over_ranks(compute_cpu);
  state.counters["balance_cpu"] = min_over_ranks(compute_cpu) / cpu_max;
  // GFLOPs: the whole job's rate; roofline_frac: per rank, against the probe each rank ran.
  state.counters["GFLOPs"] = attn_bench::flops_rate(flops * 1e-9);
  attn_bench::set_roofline_frac(state, flops / (slowest / iters) * 1e-9 / p, g_threads);
  if (!ulysses) {
    // Work of the busiest rank per step, as a fraction of a dense step: causal zigzag 1/2;
    // causal contiguous: the last rank computes p − 1 full steps and one half.
    const double busiest = kind == Kind::dense           ? 1.0
                           : layout == SeqLayout::zigzag ? 0.5
                                                         : (p - 0.5) / p;
    const double step_flops = 4.0 * static_cast<double>(g_len) * static_cast<double>(g_len) * kDim *
                              static_cast<double>(heads);
    const double rate = step_flops * iters / local;  // F, this row's own measurement
    const double rate_cpu = step_flops * iters / max_over_ranks(local_cpu);
    const double step_time = slowest / iters / tm.steps;
    const double model =
        std::max(busiest * step_flops / rate, slice_bytes(g_len, heads) / g_bandwidth);
    state.counters["F_GFLOPs"] = rate * 1e-9;
    state.counters["step_ms"] = step_time * 1e3;
    state.counters["model_ms"] = model * 1e3;
    state.counters["model_ratio"] = step_time / model;
    // The same in CPU seconds: the busiest rank's compute per step against the model's.
    state.counters["model_ratio_cpu"] =
        cpu_max / iters / tm.steps / (busiest * step_flops / rate_cpu);
    state.counters["x_baseline"] = p * work * (step_flops / rate) / (slowest / iters);
  }
}

void bench_ring_backward(benchmark::State& state, SeqLayout layout, Kind kind) {
  Slices s(kHeads, kHeads, g_len);
  std::vector<float> lse(static_cast<std::size_t>(kHeads * g_len));
  std::vector<float> dout(attn_bench::random_buffer(s.out.size(), 17 + rank()));
  std::vector<float> dq(s.q.size()), dk(s.k.size()), dv(s.v.size());
  attn::dist::RingTimings fwd, bwd;
  attn::dist::DistOptions fopt, bopt;
  fopt.layout = bopt.layout = layout;
  fopt.num_threads = bopt.num_threads = g_threads;
  fopt.lse = attn::TensorView<float, 3>(lse.data(), {1, kHeads, g_len});
  fopt.timings = &fwd;
  bopt.timings = &bwd;
  const auto lse_v = attn::TensorView<const float, 3>(lse.data(), {1, kHeads, g_len});
  const auto dout_v = attn::bhsd(static_cast<const float*>(dout.data()), 1, kHeads, g_len, kDim);
  const auto dq_v = attn::bhsd(dq.data(), 1, kHeads, g_len, kDim);
  const auto dk_v = attn::bhsd(dk.data(), 1, kHeads, g_len, kDim);
  const auto dv_v = attn::bhsd(dv.data(), 1, kHeads, g_len, kDim);
  auto call = [&](auto mask) {
    attn::dist::ring_attention(MPI_COMM_WORLD, s.qv(), s.kv(), s.vv(), s.ov(), mask,
                               attn::no_score_mod(), fopt);
    MPI_Barrier(MPI_COMM_WORLD);
    attn::dist::ring_attention_backward(MPI_COMM_WORLD, s.qv(), s.kv(), s.vv(),
                                        attn::Tensor4<const float>(s.ov()), lse_v, dout_v, dq_v,
                                        dk_v, dv_v, mask, attn::no_score_mod(), bopt);
  };
  auto run = [&] {
    if (kind == Kind::causal)
      call(attn::causal());
    else
      call(attn::no_mask());
  };
  run();  // warm-up: first touch of the buffers
  double compute = 0, compute_cpu = 0, exposed = 0, wall = 0, slowest = 0;
  double f_compute = 0, f_cpu = 0, f_slowest = 0;
  for (auto _ : state) {
    MPI_Barrier(MPI_COMM_WORLD);
    run();
    const double t = max_over_ranks(bwd.total);
    state.SetIterationTime(t);
    compute += bwd.compute;
    compute_cpu += bwd.compute_cpu;
    exposed += bwd.exposed_comm;
    wall += bwd.total;
    slowest += t;
    f_compute += fwd.compute;
    f_cpu += fwd.compute_cpu;
    f_slowest += max_over_ranks(fwd.total);
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["compute_frac"] = min_over_ranks(compute / (compute + exposed));
  state.counters["call_frac"] = min_over_ranks(compute / wall);
  state.counters["comm_frac"] = max_over_ranks(exposed / wall);
  state.counters["exposed_ms"] = max_over_ranks(exposed / iters) * 1e3;
  state.counters["balance"] = min_over_ranks(compute) / max_over_ranks(compute);
  state.counters["balance_cpu"] = min_over_ranks(compute_cpu) / max_over_ranks(compute_cpu);
  state.counters["balance_fwd"] = min_over_ranks(f_compute) / max_over_ranks(f_compute);
  state.counters["balance_fwd_cpu"] = min_over_ranks(f_cpu) / max_over_ranks(f_cpu);
  state.counters["fwd_ms"] = f_slowest / iters * 1e3;
  state.counters["bwd_ms"] = slowest / iters * 1e3;
  state.counters["bwd_fwd"] = slowest / f_slowest;
  state.counters["bytes_ratio"] = static_cast<double>(bwd.bytes_sent) /
                                  static_cast<double>(std::max<std::int64_t>(fwd.bytes_sent, 1));
}

/// Reports nothing: ranks other than 0 run the same rows silently.
class NullReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--len=", 6) == 0)
      g_len = std::atol(argv[i] + 6);
    else if (std::strncmp(argv[i], "--iters=", 8) == 0)
      g_iters = std::max(1, std::atoi(argv[i] + 8));
    else if (std::strncmp(argv[i], "--threads=", 10) == 0)
      g_threads = std::atoi(argv[i] + 10);
    else if (std::strcmp(argv[i], "--sweep") == 0)
      continue;  // one size: the ring's point is the per-rank slice, --len sets it
    else if (rank() != 0 && std::strncmp(argv[i], "--benchmark_out", 15) == 0)
      continue;  // rank 0 writes the file
    else
      rest.push_back(argv[i]);
  }
  const std::string shape = "/N:" + std::to_string(g_len * ranks()) +
                            "/ranks:" + std::to_string(ranks()) + "/D:" + std::to_string(kDim);
  attn_bench::register_roofline_row(g_threads);
  benchmark::RegisterBenchmark(
      ("pingpong/bytes:" + std::to_string(static_cast<long>(slice_bytes(g_len, kHeads)))).c_str(),
      bench_pingpong)
      ->Iterations(20)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark(("local/N:" + std::to_string(g_len) + "/D:64").c_str(), bench_local)
      ->Iterations(3)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  struct Row {
    const char* name;
    SeqLayout layout;
    Kind kind;
    bool ulysses;
  };
  for (const Row& r : {Row{"ring/contiguous/dense", SeqLayout::contiguous, Kind::dense, false},
                       Row{"ring/zigzag/causal", SeqLayout::zigzag, Kind::causal, false},
                       Row{"ring/contiguous/causal", SeqLayout::contiguous, Kind::causal, false},
                       Row{"ulysses/dense", SeqLayout::contiguous, Kind::dense, true}})
    benchmark::RegisterBenchmark(
        (r.name + shape).c_str(),
        [r](benchmark::State& st) { bench_ring(st, r.layout, r.kind, r.ulysses); })
        ->Iterations(g_iters)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  for (const Row& r :
       {Row{"ring_bwd/contiguous/dense", SeqLayout::contiguous, Kind::dense, false},
        Row{"ring_bwd/zigzag/causal", SeqLayout::zigzag, Kind::causal, false},
        Row{"ring_bwd/contiguous/causal", SeqLayout::contiguous, Kind::causal, false}})
    benchmark::RegisterBenchmark(
        (r.name + shape).c_str(),
        [r](benchmark::State& st) { bench_ring_backward(st, r.layout, r.kind); })
        ->Iterations(g_iters)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  int rest_argc = static_cast<int>(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());
  if (rank() == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    NullReporter null;
    benchmark::RunSpecifiedBenchmarks(&null);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}
