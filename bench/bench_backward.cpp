// bench_backward — the backward pass (attn::attention_backward) against the
// forward on the same shapes, in one binary. B = 1, H = 8, D = 128, float.
//
//   forward/<mask>/N:n    masked_attention writing lse (the baseline of each shape)
//   backward/<mask>/N:n   attention_backward from that out and lse
//
//   masks: dense, causal, window (window(255, 0): 256 keys per query) and
//          bigbird (sparse_attention_backward, bigbird(n) with its defaults)
//
// Counters: GFLOPs of the backward count 2.5× the forward's computed FLOPs
// (AttentionStats of the forward: the five tile products against two);
// roofline_frac against the row roofline/gemm; x_forward = backward time /
// forward time of the same shape (target ≤ 2.5); on causal backward rows
// x_baseline = dense backward time / causal backward time (target ≥ 1.8);
// us_per_key = backward time / N in µs, flat in N for window and bigbird.
//
//   bench_backward            N = 1024, 2048 (window and bigbird also 4096, 8192)
//   bench_backward --sweep    N = 256 ... 16384
//   bench_backward --peak-memory=N   no benchmarks: the peak resident memory of one
//                             causal attention_backward at N against the size of its
//                             tensors (q, k, v, out, dout, dq, dk, dv, lse), from
//                             /proc/self/status VmHWM, reset before the call
#include "bench_support.hpp"

#include <attn/attn.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

using namespace attn_bench;
using attn::index_t;

constexpr index_t kHeads = 8, kDim = 128;

enum class Kind { dense, causal, window, bigbird };
const char* name(Kind k) {
  switch (k) {
    case Kind::dense:
      return "dense";
    case Kind::causal:
      return "causal";
    case Kind::window:
      return "window";
    case Kind::bigbird:
      return "bigbird";
  }
  return "";
}

struct Problem {
  index_t n;
  std::vector<float> q, k, v, out, dout, dq, dk, dv, lse;
  attn::BlockSparseLayout layout;
  explicit Problem(index_t len)
      : n(len), q(random_buffer(static_cast<std::size_t>(kHeads * len * kDim), 1)),
        k(random_buffer(q.size(), 2)), v(random_buffer(q.size(), 3)), out(q.size()),
        dout(random_buffer(q.size(), 4)), dq(q.size()), dk(q.size()), dv(q.size()),
        lse(static_cast<std::size_t>(kHeads * len)), layout(attn::bigbird(len)) {}
  attn::Tensor4<float> view(std::vector<float>& b) {
    return attn::bhsd(b.data(), 1, kHeads, n, kDim);
  }
  attn::TensorView<float, 3> lse_view() { return {lse.data(), {1, kHeads, n}}; }
};

/// Forward of `kind`, with lse; returns the computed FLOPs.
double forward(Problem& p, Kind kind, attn::AttentionOptions opt) {
  attn::AttentionStats stats;
  opt.lse = p.lse_view();
  opt.stats = &stats;
  auto q = p.view(p.q), k = p.view(p.k), v = p.view(p.v), o = p.view(p.out);
  switch (kind) {
    case Kind::dense:
      attn::masked_attention(q, k, v, o, attn::no_mask(), opt);
      break;
    case Kind::causal:
      attn::masked_attention(q, k, v, o, attn::causal(), opt);
      break;
    case Kind::window:
      attn::sliding_window_attention(q, k, v, o, attn::window(255, 0), opt);
      break;
    case Kind::bigbird:
      attn::sparse_attention(q, k, v, o, p.layout, opt);
      break;
  }
  return stats.flops(kDim, kDim);
}

void backward(Problem& p, Kind kind, const attn::AttentionOptions& opt) {
  auto q = p.view(p.q), k = p.view(p.k), v = p.view(p.v), o = p.view(p.out), d = p.view(p.dout);
  auto dq = p.view(p.dq), dk = p.view(p.dk), dv = p.view(p.dv);
  const attn::TensorView<const float, 3> lse = p.lse_view();
  switch (kind) {
    case Kind::dense:
      attn::attention_backward(q, k, v, o, lse, d, dq, dk, dv, opt);
      break;
    case Kind::causal:
      attn::attention_backward(q, k, v, o, lse, d, dq, dk, dv, attn::causal(), opt);
      break;
    case Kind::window:
      attn::sliding_window_attention_backward(q, k, v, o, lse, d, dq, dk, dv, attn::window(255, 0),
                                              attn::no_mask(), attn::no_score_mod(), opt);
      break;
    case Kind::bigbird:
      attn::sparse_attention_backward(q, k, v, o, lse, d, dq, dk, dv, p.layout, attn::no_mask(),
                                      attn::no_score_mod(), opt);
      break;
  }
}

std::string key(Kind kind, index_t n) {
  return std::string(name(kind)) + "/N:" + std::to_string(n);
}

void register_shape(Kind kind, index_t n) {
  const std::string k = key(kind, n);
  benchmark::RegisterBenchmark(("forward/" + k).c_str(),
                               [kind, n, k](benchmark::State& state) {
                                 Problem p(n);
                                 const double flops = forward(p, kind, {});
                                 const double t = timed_loop(state, [&] { forward(p, kind, {}); });
                                 record_time(state, "fwd/" + k, t);
                                 set_gflops(state, flops, t);
                               })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  benchmark::RegisterBenchmark(("backward/" + k).c_str(),
                               [kind, n, k](benchmark::State& state) {
                                 Problem p(n);
                                 const double flops = 2.5 * forward(p, kind, {});
                                 const double t = timed_loop(state, [&] {
                                   backward(p, kind, {});
                                   benchmark::DoNotOptimize(p.dq.data());
                                 });
                                 record_time(state, "bwd/" + std::to_string(n),
                                             kind == Kind::dense ? t : 0);
                                 if (kind == Kind::causal)
                                   set_ratio(state, "bwd/" + std::to_string(n), t);
                                 const double fwd = baseline_seconds("fwd/" + k);
                                 if (fwd > 0 && t > 0) state.counters["x_forward"] = t / fwd;
                                 state.counters["us_per_key"] = t / static_cast<double>(n) * 1e6;
                                 set_gflops(state, flops, t);
                               })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

/// A field of /proc/self/status in MiB (0 where there is none).
double status_mib(const char* field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::size_t n = std::strlen(field);
  while (std::getline(f, line))
    if (line.compare(0, n, field) == 0) return std::atof(line.c_str() + n + 1) / 1024.0;
  return 0;
}

/// Resets VmHWM to the current resident size (Linux: "5" into clear_refs).
bool reset_peak() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
  return static_cast<bool>(f);
}

/// The peak resident memory of one causal backward at N (see the top of this file).
int peak_memory(index_t n) {
  Problem p(n);
  const double tensors =
      static_cast<double>(8 * p.q.size() + p.lse.size()) * sizeof(float) / (1024.0 * 1024.0);
  std::fill(p.dq.begin(), p.dq.end(), 0.f);  // touch every output page
  std::fill(p.dk.begin(), p.dk.end(), 0.f);
  std::fill(p.dv.begin(), p.dv.end(), 0.f);
  forward(p, Kind::causal, {});
  const double before = status_mib("VmRSS:");
  if (!reset_peak()) std::printf("(could not reset VmHWM: the peak includes the forward)\n");
  backward(p, Kind::causal, {});
  const double peak = status_mib("VmHWM:");
  std::printf(
      "causal backward, B = 1, H = %d, D = %d, N = %lld, fp32\n"
      "  tensors (q, k, v, out, dout, dq, dk, dv, lse): %.1f MiB\n"
      "  resident before the backward: %.1f MiB (tensors + program)\n"
      "  peak during the backward:     %.1f MiB, %.1f MiB above the tensors + program\n",
      static_cast<int>(kHeads), static_cast<int>(kDim), static_cast<long long>(n), tensors, before,
      peak, peak - before);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool sweep = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--sweep") == 0 || std::strcmp(argv[i], "--full") == 0)
      sweep = true;
    else if (std::strncmp(argv[i], "--peak-memory=", 14) == 0)
      return peak_memory(std::atoll(argv[i] + 14));
    else
      args.push_back(argv[i]);
  }
  int n_args = static_cast<int>(args.size());
  benchmark::Initialize(&n_args, args.data());
  register_roofline_row();
  const std::vector<index_t> quadratic =
      sweep ? std::vector<index_t>{256, 512, 1024, 2048, 4096} : std::vector<index_t>{1024, 2048};
  const std::vector<index_t> linear = sweep ? std::vector<index_t>{1024, 2048, 4096, 8192, 16384}
                                            : std::vector<index_t>{2048, 4096, 8192};
  for (index_t n : quadratic) register_shape(Kind::dense, n);
  for (index_t n : quadratic) register_shape(Kind::causal, n);
  for (index_t n : linear) register_shape(Kind::window, n);
  for (index_t n : linear) register_shape(Kind::bigbird, n);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
