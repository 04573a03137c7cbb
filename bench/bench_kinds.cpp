// The attention kinds of issue 16 against their baselines, float, B = 1, D = 64:
//
//   topk/...       topk_attention (k_best = 64) over Lk = 65536 keys, Lq = 512, H = 2,
//                  against dense flash attention (x_baseline) and against the Q·Kᵀ half of
//                  flash alone (qk_half: the same tiles through Eigen's GEMM, K packed
//                  per tile, nothing else; the counter x_qk_half = qk_half time / this
//                  row's time), and against qk_engine: the same products as the engine
//                  runs them now (K packed once per call, attn's score kernel;
//                  x_qk_engine)
//   topk/paired    qk_half, qk_engine and top-k timed call by call in one loop (in
//                  alternating order); the counters topk_over_qk_half and
//                  topk_over_qk_engine are the medians of the per-iteration ratios
//                  (the row's time is the three together)
//   topk/..._backward  topk_attention_backward on the same shape, the forward (topk_k64) as
//                  the baseline (x_baseline = forward time / backward time, bwd_over_fwd
//                  its inverse): from the forward's saved indices, and recomputing the
//                  selection (_reselect); write_dkdv is the floor of the first: storing
//                  dK and dV (Lk rows each, zeros) alone, and x_write_floor = its time /
//                  the row's time
//   neighborhood/  7 × 7 neighbourhood attention on side × side grids, H = 1: dense flash
//                  attention over the same tokens is the baseline at side 128; ns_per_pixel
//                  shows the work is linear in the pixels; neighborhood/paired/128 times
//                  dense and 7 × 7 at side 128 call by call (dense_over_na: the median of
//                  the per-iteration ratios)
//   bias/          dense attention at N = 2048, H = 4 with no bias (the baseline), T5
//                  bias, 2-D relative bias (32 × 64 grid) and ALiBi: x_baseline is the
//                  bias's cost factor (1 = free); bias/paired times no bias, T5 and 2-D
//                  bias call by call (t5_over_none, rel2d_over_none: medians of the
//                  per-iteration ratios, 1 = free)
//
//   bench_kinds [--threads=T] [Google Benchmark flags]
#include "bench_support.hpp"

#include <attn/attn.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

using attn::index_t;
using attn_bench::median_ratio;
using attn_bench::paired_times;

constexpr index_t kDim = 64;
int g_threads = 0;

struct Buffers {
  std::vector<float> q, k, v, out;
  Buffers(index_t hq, index_t lq, index_t lk)
      : q(attn_bench::random_buffer(static_cast<std::size_t>(hq * lq * kDim), 1)),
        k(attn_bench::random_buffer(static_cast<std::size_t>(hq * lk * kDim), 2)),
        v(attn_bench::random_buffer(k.size(), 3)), out(q.size()) {}
};

attn::AttentionOptions options(attn::AttentionStats* stats = nullptr) {
  attn::AttentionOptions opt;
  opt.num_threads = g_threads;
  opt.stats = stats;
  return opt;
}

// -------------------------------------------------------------------- top-k --

constexpr index_t kTopkHeads = 2, kTopkLq = 512, kTopkLk = 65536, kBest = 64;
constexpr index_t kQkRows = 128, kQkCols = 256;  // the engine's default tiles

/// Rows [q0, q0 + kQkRows) of head h's queries times the scale 1/sqrt(kDim).
void scaled_query_tile(const Buffers& p, index_t h, index_t q0, attn::RowMatrix<float>& q) {
  q = Eigen::Map<const attn::RowMatrix<float>>(p.q.data() + (h * kTopkLq + q0) * kDim, kQkRows,
                                               kDim) *
      0.125f;
}

/// The Q·Kᵀ half of flash attention alone: per (head, query tile of 128),
/// S = (scale·Q)·Kᵀ over key tiles of 256 with the engine's tile product,
/// nothing else (no softmax, no P·V).
void qk_half(const Buffers& p) {
  constexpr index_t q_tiles = kTopkLq / kQkRows;
  const index_t br = kQkRows, bc = kQkCols;
  struct Scratch {
    attn::RowMatrix<float> q{kQkRows, kDim}, s{kQkRows, kQkCols};
    attn::detail::TileGemm<float> gemm{kQkRows, kQkCols, kDim};
    float sink = 0;
  };
  const index_t tasks = kTopkHeads * q_tiles;
  attn::detail::parallel_tasks(
      tasks, attn::detail::resolve_threads(g_threads, tasks),
      [] { return std::make_unique<Scratch>(); },
      [&](Scratch& sc, index_t t) {
        const index_t h = t % kTopkHeads, q0 = (t / kTopkHeads) * br;
        scaled_query_tile(p, h, q0, sc.q);
        for (index_t k0 = 0; k0 < kTopkLk; k0 += bc) {
          sc.s.setZero();
          sc.gemm.add_abt(br, bc, kDim, sc.q.data(), kDim, p.k.data() + (h * kTopkLk + k0) * kDim,
                          kDim, sc.s.data(), bc, 1.f);
          sc.sink += sc.s(0, 0);
        }
      },
      [](Scratch& sc) { benchmark::DoNotOptimize(sc.sink); });
}

/// The Q·Kᵀ half as the engine runs this shape since it has its own kernels: each
/// head's K packed once into the score kernel's panels (in parallel, 1024 keys
/// per task, into a buffer allocated per call, as the engine packs a call whose
/// query tiles share keys), then per (head, query tile of 128) S = (scale·Q)·Kᵀ
/// over key tiles of 256 with the engine's score kernel; nothing else (no
/// softmax, no P·V).
void qk_engine(const Buffers& p) {
  const attn::kernels::KernelSet<float>& ks = attn::kernels::kernel_set<float>(attn::active_isa());
  const index_t nr = ks.k_panel, lds = (kQkCols + nr - 1) / nr * nr;
  const index_t slice = attn::kernels::packed_k_size(kTopkLk, kDim, static_cast<int>(nr));
  attn::detail::PackStore<float> kpack;
  kpack.resize(static_cast<std::size_t>(kTopkHeads * slice));
  constexpr index_t chunk = 1024, chunks = kTopkLk / chunk;
  struct Row {
    std::vector<float> row = std::vector<float>(kDim);
  };
  attn::detail::parallel_tasks(
      kTopkHeads * chunks, attn::detail::resolve_threads(g_threads, kTopkHeads * chunks),
      [] { return std::make_unique<Row>(); },
      [&](Row& sc, index_t t) {
        const index_t h = t / chunks, k0 = t % chunks * chunk;
        attn::kernels::pack_k(ks, p.k.data() + (h * kTopkLk + k0) * kDim, kDim, index_t{1}, chunk,
                              kDim, sc.row.data(), kpack.data() + h * slice + k0 * kDim);
      },
      [](const Row&) {});

  constexpr index_t q_tiles = kTopkLq / kQkRows;
  const index_t br = kQkRows, bc = kQkCols;
  struct Scratch {
    attn::RowMatrix<float> q{kQkRows, kDim}, s;
    float sink = 0;
  };
  const index_t tasks = kTopkHeads * q_tiles;
  attn::detail::parallel_tasks(
      tasks, attn::detail::resolve_threads(g_threads, tasks),
      [&] {
        auto sc = std::make_unique<Scratch>();
        sc->s.resize(kQkRows, lds);
        return sc;
      },
      [&](Scratch& sc, index_t t) {
        const index_t h = t % kTopkHeads, q0 = (t / kTopkHeads) * br;
        scaled_query_tile(p, h, q0, sc.q);
        for (index_t k0 = 0; k0 < kTopkLk; k0 += bc) {
          ks.score(br, bc, kDim, sc.q.data(), kDim, kpack.data() + h * slice + k0 * kDim,
                   sc.s.data(), lds);
          sc.sink += sc.s(0, 0);
        }
      },
      [](Scratch& sc) { benchmark::DoNotOptimize(sc.sink); });
}

void bench_topk(benchmark::State& state, int path) {
  Buffers p(kTopkHeads, kTopkLq, kTopkLk);
  const auto q = attn::bhsd(p.q.data(), 1, kTopkHeads, kTopkLq, kDim);
  const auto k = attn::bhsd(p.k.data(), 1, kTopkHeads, kTopkLk, kDim);
  const auto v = attn::bhsd(p.v.data(), 1, kTopkHeads, kTopkLk, kDim);
  const auto out = attn::bhsd(p.out.data(), 1, kTopkHeads, kTopkLq, kDim);
  // Backward rows: the forward's output and selection first, then dO -> dq, dk, dv.
  std::vector<std::int64_t> idx;
  std::vector<float> dout, dq, dk, dv;
  attn::TopkOptions bwd(options());
  if (path == 5) {
    dk.resize(p.k.size());
    dv.resize(p.v.size());
  }
  if (path == 3 || path == 4) {
    idx.resize(static_cast<std::size_t>(kTopkHeads * kTopkLq * kBest));
    bwd.indices = attn::TensorView<std::int64_t, 4>(idx.data(), {1, kTopkHeads, kTopkLq, kBest});
    attn::topk_attention(q, k, v, out, kBest, bwd);
    if (path == 4) bwd.indices = {};
    dout = attn_bench::random_buffer(p.out.size(), 7);
    dq.resize(p.q.size());
    dk.resize(p.k.size());
    dv.resize(p.v.size());
  }
  const double t = attn_bench::timed_loop(state, [&] {
    if (path == 0)
      qk_half(p);
    else if (path == 6)
      qk_engine(p);
    else if (path == 1)
      attn::scaled_dot_product_attention(q, k, v, out, options());
    else if (path == 2)
      attn::topk_attention(q, k, v, out, kBest, attn::TopkOptions(options()));
    else if (path == 5) {
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);
    } else
      attn::topk_attention_backward(
          q, k, v, out, attn::bhsd(dout.data(), 1, kTopkHeads, kTopkLq, kDim),
          attn::bhsd(dq.data(), 1, kTopkHeads, kTopkLq, kDim),
          attn::bhsd(dk.data(), 1, kTopkHeads, kTopkLk, kDim),
          attn::bhsd(dv.data(), 1, kTopkHeads, kTopkLk, kDim), kBest, bwd);
    benchmark::ClobberMemory();
  });
  const double qk_flops = 2.0 * kTopkHeads * kTopkLq * kTopkLk * kDim;
  if (path == 0) attn_bench::record_time(state, "qk_half", t);
  if (path == 6) attn_bench::record_time(state, "qk_engine", t);
  if (path == 1) attn_bench::record_time(state, "flash", t);
  if (path == 2) {
    attn_bench::set_ratio(state, "flash", t);
    attn_bench::record_time(state, "topk_fwd", t);
    const double qk = attn_bench::baseline_seconds("qk_half");
    if (qk > 0 && t > 0) state.counters["x_qk_half"] = qk / t;
    const double qe = attn_bench::baseline_seconds("qk_engine");
    if (qe > 0 && t > 0) state.counters["x_qk_engine"] = qe / t;
  }
  if (path == 5) {
    attn_bench::record_time(state, "dkdv_write", t);
    state.counters["GB_per_s"] = 4.0 * static_cast<double>(dk.size() + dv.size()) / t * 1e-9;
    return;
  }
  if (path == 3 || path == 4) {
    attn_bench::set_ratio(state, "topk_fwd", t);
    const double fwd = attn_bench::baseline_seconds("topk_fwd");
    if (fwd > 0 && t > 0) state.counters["bwd_over_fwd"] = t / fwd;
    const double floor = attn_bench::baseline_seconds("dkdv_write");
    if (floor > 0 && t > 0) state.counters["x_write_floor"] = floor / t;
    // from saved indices: 4 products of k_best·D per row and head (score, dP, dq, dk) + dv
    if (path == 3) {
      attn_bench::set_gflops(state, 10.0 * kTopkHeads * kTopkLq * kBest * kDim, t, g_threads);
      return;
    }
  }
  attn_bench::set_gflops(state, path == 1 ? 2 * qk_flops : qk_flops, t, g_threads);
}

/// Top-k against the two Q·Kᵀ rows call by call (paired_times): qk_half,
/// qk_engine and topk_k64; the counters are the medians of top-k's time over each.
void bench_topk_paired(benchmark::State& state) {
  Buffers p(kTopkHeads, kTopkLq, kTopkLk);
  const auto q = attn::bhsd(p.q.data(), 1, kTopkHeads, kTopkLq, kDim);
  const auto k = attn::bhsd(p.k.data(), 1, kTopkHeads, kTopkLk, kDim);
  const auto v = attn::bhsd(p.v.data(), 1, kTopkHeads, kTopkLk, kDim);
  const auto out = attn::bhsd(p.out.data(), 1, kTopkHeads, kTopkLq, kDim);
  const auto times = paired_times<3>(state, [&](int which) {
    if (which == 0)
      qk_half(p);
    else if (which == 1)
      qk_engine(p);
    else
      attn::topk_attention(q, k, v, out, kBest, attn::TopkOptions(options()));
  });
  state.counters["topk_over_qk_half"] = median_ratio(times, 2, 0);
  state.counters["topk_over_qk_engine"] = median_ratio(times, 2, 1);
}

// ------------------------------------------------------------- neighbourhood --

/// One head over a side × side grid of tokens and its 7 × 7 neighbourhood.
struct Grid {
  index_t n;
  Buffers p;
  attn::TensorView<float, 4> q, k, v, out;
  attn::Neighborhood nb;
  explicit Grid(index_t side)
      : n(side * side), p(1, n, n), q(attn::bhsd(p.q.data(), 1, 1, n, kDim)),
        k(attn::bhsd(p.k.data(), 1, 1, n, kDim)), v(attn::bhsd(p.v.data(), 1, 1, n, kDim)),
        out(attn::bhsd(p.out.data(), 1, 1, n, kDim)), nb(attn::neighborhood({side, side}, 7)) {}
};

void bench_neighborhood(benchmark::State& state, bool dense) {
  const index_t side = state.range(0);
  Grid g(side);
  const index_t n = g.n;
  const auto &q = g.q, &k = g.k, &v = g.v, &out = g.out;
  const attn::Neighborhood& nb = g.nb;
  attn::AttentionStats stats;
  const double t = attn_bench::timed_loop(state, [&] {
    if (dense)
      attn::scaled_dot_product_attention(q, k, v, out, options(&stats));
    else
      attn::neighborhood_attention(q, k, v, out, nb, options(&stats));
    benchmark::ClobberMemory();
  });
  const std::string key = "grid:" + std::to_string(side);
  if (dense)
    attn_bench::record_time(state, key, t);
  else
    attn_bench::set_ratio(state, key, t);
  attn_bench::set_gflops(state, stats.flops(kDim, kDim), t, g_threads);
  state.counters["ns_per_pixel"] = t * 1e9 / static_cast<double>(n);
}

/// Neighbourhood attention against dense over the same tokens call by call
/// (paired_times), side 128: dense_over_na is the median of dense time /
/// neighbourhood time.
void bench_neighborhood_paired(benchmark::State& state) {
  Grid g(128);
  const auto times = paired_times<2>(state, [&](int which) {
    if (which == 0)
      attn::scaled_dot_product_attention(g.q, g.k, g.v, g.out, options());
    else
      attn::neighborhood_attention(g.q, g.k, g.v, g.out, g.nb, options());
  });
  state.counters["dense_over_na"] = median_ratio(times, 0, 1);
}

// --------------------------------------------------------------------- bias --

constexpr index_t kBiasHeads = 4, kGridH = 32, kGridW = 64, kBiasN = kGridH * kGridW;

/// Calls f(run), where run(which) is dense attention at N = 2048 with no bias
/// (0), T5 bias (1), 2-D bias (2) or ALiBi (3).
template <class F>
void with_bias_inputs(F&& f) {
  Buffers p(kBiasHeads, kBiasN, kBiasN);
  const auto q = attn::bhsd(p.q.data(), 1, kBiasHeads, kBiasN, kDim);
  const auto k = attn::bhsd(p.k.data(), 1, kBiasHeads, kBiasN, kDim);
  const auto v = attn::bhsd(p.v.data(), 1, kBiasHeads, kBiasN, kDim);
  const auto out = attn::bhsd(p.out.data(), 1, kBiasHeads, kBiasN, kDim);
  const std::vector<float> t5_table = attn_bench::random_buffer(32 * kBiasHeads, 4);
  const std::vector<float> table_2d =
      attn_bench::random_buffer((2 * kGridH - 1) * (2 * kGridW - 1) * kBiasHeads, 5);
  const auto t5 = attn::t5_bias(t5_table, 32, 128, true);
  const auto rel = attn::relative_bias_2d(table_2d, kGridH, kGridW);
  const auto alibi = attn::alibi(attn::alibi_slopes(kBiasHeads));
  f([&](int which) {
    switch (which) {
      case 0:
        attn::masked_attention(q, k, v, out, attn::no_mask(), options());
        break;
      case 1:
        attn::masked_attention(q, k, v, out, attn::no_mask(), t5, options());
        break;
      case 2:
        attn::masked_attention(q, k, v, out, attn::no_mask(), rel, options());
        break;
      default:
        attn::masked_attention(q, k, v, out, attn::no_mask(), alibi, options());
    }
  });
}

void bench_bias(benchmark::State& state, int which) {
  with_bias_inputs([&](const auto& run) {
    const double t = attn_bench::timed_loop(state, [&] {
      run(which);
      benchmark::ClobberMemory();
    });
    if (which == 0)
      attn_bench::record_time(state, "bias", t);
    else
      attn_bench::set_ratio(state, "bias", t);
    attn_bench::set_gflops(state, 4.0 * kBiasHeads * kBiasN * kBiasN * kDim, t, g_threads);
  });
}

/// The biases against no bias call by call (paired_times): no bias, T5 and 2-D
/// bias; the counters are the medians of bias time / no-bias time (1 = free).
void bench_bias_paired(benchmark::State& state) {
  with_bias_inputs([&](const auto& run) {
    const auto times = paired_times<3>(state, run);
    state.counters["t5_over_none"] = median_ratio(times, 1, 0);
    state.counters["rel2d_over_none"] = median_ratio(times, 2, 0);
  });
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0)
      g_threads = std::atoi(argv[i] + 10);
    else
      rest.push_back(argv[i]);
  }
  attn_bench::register_roofline_row(g_threads);
  const char* topk_names[] = {"topk/qk_half/Lk:65536",
                              "topk/flash/Lk:65536",
                              "topk/topk_k64/Lk:65536",
                              "topk/topk_k64_backward/Lk:65536",
                              "topk/topk_k64_backward_reselect/Lk:65536",
                              "topk/write_dkdv/Lk:65536",
                              "topk/qk_engine/Lk:65536"};
  for (int path : {0, 6, 1, 2, 5, 3, 4})  // the baselines before the rows that use them
    benchmark::RegisterBenchmark(topk_names[path], bench_topk, path)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  benchmark::RegisterBenchmark("topk/paired/Lk:65536", bench_topk_paired)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->MinTime(2.0);
  benchmark::RegisterBenchmark("neighborhood/paired/128", bench_neighborhood_paired)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->MinTime(3.0);
  benchmark::RegisterBenchmark("neighborhood/dense", bench_neighborhood, true)
      ->Arg(128)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  benchmark::RegisterBenchmark("neighborhood/na7x7", bench_neighborhood, false)
      ->Arg(64)
      ->Arg(128)
      ->Arg(256)
      ->Arg(512)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  const char* bias_names[] = {"bias/none/N:2048", "bias/t5/N:2048", "bias/rel2d/N:2048",
                              "bias/alibi/N:2048"};
  for (int which = 0; which < 4; ++which)
    benchmark::RegisterBenchmark(bias_names[which], bench_bias, which)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  benchmark::RegisterBenchmark("bias/paired/N:2048", bench_bias_paired)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->MinTime(2.0);
  int n = static_cast<int>(rest.size());
  benchmark::Initialize(&n, rest.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
