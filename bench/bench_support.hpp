// bench/bench_support.hpp — helpers shared by the attn benchmarks.
#pragma once

#include <attn/attn.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

namespace attn_bench {

using attn::index_t;

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

}  // namespace attn_bench
