// long_context — four ways to attend over one long causal sequence, side by
// side: time and peak memory of dense (flash), sliding-window, block-sparse
// (BigBird) and linear attention.
//
// Each path runs in its own child process, so its peak resident memory
// (VmHWM: inputs plus whatever the path allocates) is its own.
//   long_context [N]     (default N = 16384; B = 1, H = 8, D = 64)
#include <attn/attn.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace {

using attn::index_t;

constexpr index_t kHeads = 8, kDim = 64;

/// Peak resident set of this process in MiB.
double peak_rss_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

struct Result {
  double ms = 0, peak_mib = 0;
};

/// Runs one path on fresh [1, N, H, D] inputs in a child process.
Result run_in_child(index_t n,
                    const std::function<void(attn::Tensor4<float>, attn::Tensor4<float>,
                                             attn::Tensor4<float>, attn::Tensor4<float>)>& path) {
  int fds[2];
  if (pipe(fds) != 0) return {};
  const pid_t pid = fork();
  if (pid == 0) {  // child: inputs, one call, report
    close(fds[0]);
    std::vector<float> q(static_cast<std::size_t>(n * kHeads * kDim)), k(q.size()), v(q.size()),
        o(q.size());
    std::mt19937 gen(1);
    std::normal_distribution<float> normal;
    for (auto* buf : {&q, &k, &v})
      for (float& x : *buf) x = normal(gen);
    auto view = [&](std::vector<float>& b) { return attn::bshd(b.data(), 1, n, kHeads, kDim); };
    const auto t0 = std::chrono::steady_clock::now();
    path(view(q), view(k), view(v), view(o));
    Result r;
    r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    r.peak_mib = peak_rss_mib();
    if (write(fds[1], &r, sizeof r) != static_cast<ssize_t>(sizeof r)) _exit(1);
    _exit(0);
  }
  close(fds[1]);
  Result r;
  if (read(fds[0], &r, sizeof r) != static_cast<ssize_t>(sizeof r)) r = {};
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const index_t n = argc > 1 ? std::atol(argv[1]) : 16384;
  if (n < 128) {
    std::fprintf(stderr,
                 "long_context: N must be at least 128 (BigBird needs a few 64-token blocks)\n");
    return 2;
  }
  const double inputs_mib =
      4.0 * static_cast<double>(n * kHeads * kDim) * sizeof(float) / (1 << 20);
  std::printf(
      "causal attention over N = %td tokens, %td heads of %td; q, k, v, out take %.0f MiB\n\n", n,
      kHeads, kDim, inputs_mib);
  std::printf("%-34s %10s %12s %10s\n", "path", "time", "peak memory", "vs dense");

  using V4 = attn::Tensor4<float>;
  struct Path {
    const char* name;
    std::function<void(V4, V4, V4, V4)> run;
  };
  const attn::BlockSparseLayout bigbird = attn::bigbird(n);
  const Path paths[] = {
      {"dense flash, causal",
       [](V4 q, V4 k, V4 v, V4 o) { attn::masked_attention(q, k, v, o, attn::causal()); }},
      {"sliding window, 256 keys",
       [](V4 q, V4 k, V4 v, V4 o) {
         attn::sliding_window_attention(q, k, v, o, attn::window(255, 0));
       }},
      {"block-sparse BigBird, causal",
       [&](V4 q, V4 k, V4 v, V4 o) {
         attn::sparse_attention(q, k, v, o, bigbird, attn::causal());
       }},
      {"linear (elu+1), causal", [](V4 q, V4 k, V4 v, V4 o) {
         attn::LinearAttentionOptions opt;
         opt.causal = true;
         attn::linear_attention(q, k, v, o, attn::elu_plus_one(), opt);
       }}};
  double dense_ms = 0;
  for (const Path& p : paths) {
    const Result r = run_in_child(n, p.run);
    if (r.ms <= 0) {
      std::printf("%-34s failed\n", p.name);
      return 1;
    }
    if (dense_ms == 0) dense_ms = r.ms;
    std::printf("%-34s %8.1f ms %8.0f MiB %9.1fx\n", p.name, r.ms, r.peak_mib, dense_ms / r.ms);
  }
  std::printf(
      "\npeak memory includes the %.0f MiB of inputs; a materialised N x N score matrix\n"
      "would add %.0f MiB per head.\n",
      inputs_mib, static_cast<double>(n) * static_cast<double>(n) * sizeof(float) / (1 << 20));
  return 0;
}
