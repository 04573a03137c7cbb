// bench_decode — decoding and serving shapes, as fractions of the memory
// bandwidth measured in the same run.
//
//   bandwidth/stream      a streaming sum over a buffer 3× the L3 (at least
//                         512 MiB), 16 accumulators per thread, vectorised: the
//                         read ceiling (GB/s) every decode row is compared to
//   decode/per_head       baseline: the forward's per-head schedule (one task per
//                         query head walking all keys, each head re-reading its
//                         group's K/V), which is what masked_attention did for
//                         decode shapes before the split-KV schedule
//   decode/masked         masked_attention(q with Lq = 1, k, v, causal()): the
//                         engine picks split-KV with stacked GQA groups by itself
//   decode/cache_f32      cache_attention on a KVCache<float> (baseline of the next two)
//   decode/cache_int8     cache_attention on a KVCache<int8_t> (a quarter of the bytes)
//   decode/paged_f32      paged_attention on a PagedKVCache<float>, blocks of 16
//                         tokens (8 KiB per head of K), and paged_f32_b64 with blocks
//                         of 64 (32 KiB): how the block size sets the paged cost
//   decode/paged_f32_2seq two sequences of Lk / 2 tokens, blocks of 16 alternating
//                         in the pool, decoded in one call (the same bytes)
//   decode/paged_paired   the contiguous cache and a paged one (blocks of 16) holding
//                         the same tokens, timed call by call in one loop in
//                         alternating order; paged_speed is the median over
//                         iterations of contiguous time / paged time (above 1 the
//                         paged cache is faster). The rows above run one after
//                         another, and a VM's bandwidth drifts between them.
//   varlen/padded         prefill of 8 sequences (100 ... 4000 tokens) as one padded
//                         batch of the longest, causal + key_padding (baseline)
//   varlen/packed         the same tokens through varlen_attention
//
// Shape of the decode rows: Lq = 1, Hq = 32, Hkv = 8, D = 128, Lk = 16k and 64k.
// Counters: GBps = K+V bytes of the cache read per call / time; bw_frac = GBps /
// the stream row's GB/s; x_baseline against the row named above.
#include "bench_support.hpp"

#include <attn/engine/forward.hpp>

#include <unistd.h>

#include <cstdint>
#include <memory>
#include <numeric>

namespace {

using namespace attn_bench;
using attn::index_t;

constexpr index_t kHq = 32, kHkv = 8, kD = 128;

// --------------------------------------------------------------- bandwidth --

std::size_t stream_floats() {
  long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  const double bytes = std::max(512.0 * (1 << 20), 3.0 * static_cast<double>(l3 > 0 ? l3 : 0));
  return static_cast<std::size_t>(bytes / sizeof(float)) / 64 * 64;
}

/// Sum of `n` floats on `threads` threads, 16 independent lanes per thread
/// (the compiler turns the lane loop into vector adds).
float stream_sum(const float* x, std::size_t n, int threads) {
  float total = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : total)
  for (std::size_t blk = 0; blk < n / 1024; ++blk) {
    float acc[16] = {};
    const float* p = x + blk * 1024;
    for (int i = 0; i < 1024; i += 16)
      for (int l = 0; l < 16; ++l) acc[l] += p[i + l];
    float s = 0;
    for (float a : acc) s += a;
    total += s;
  }
  return total;
}

double& bandwidth_gbps() {
  static double bw = 0;
  return bw;
}

void measure_bandwidth() {
  static std::vector<float> buf(stream_floats(), 1.0f);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(stream_sum(buf.data(), buf.size(), max_threads()));
    const std::chrono::duration<double> t = std::chrono::steady_clock::now() - t0;
    best = std::max(best, static_cast<double>(buf.size() * sizeof(float)) / t.count() * 1e-9);
  }
  bandwidth_gbps() = best;
}

void BM_stream(benchmark::State& state) {
  static std::vector<float> buf(stream_floats(), 1.0f);
  const double t = timed_loop(
      state, [&] { benchmark::DoNotOptimize(stream_sum(buf.data(), buf.size(), max_threads())); });
  const double gbps = static_cast<double>(buf.size() * sizeof(float)) / t * 1e-9;
  state.counters["GBps"] = gbps;
  state.counters["bw_frac"] = gbps / bandwidth_gbps();
  state.counters["MiB"] = static_cast<double>(buf.size() * sizeof(float)) / (1 << 20);
}

void set_bandwidth(benchmark::State& state, double bytes, double seconds) {
  if (seconds <= 0) return;
  const double gbps = bytes / seconds * 1e-9;
  state.counters["GBps"] = gbps;
  state.counters["bw_frac"] = gbps / bandwidth_gbps();
}

// ------------------------------------------------------------------ decode --

struct Decode {
  index_t lk;
  std::vector<float> q, k, v, o;
  explicit Decode(index_t n)
      : lk(n), q(random_buffer(static_cast<std::size_t>(kHq * kD), 1)),
        k(random_buffer(static_cast<std::size_t>(kHkv * n * kD), 2)), v(random_buffer(k.size(), 3)),
        o(q.size()) {}
  double bytes() const { return 2.0 * static_cast<double>(k.size()) * sizeof(float); }
};

std::string key(const char* what, index_t lk) {
  return std::string(what) + "/Lk:" + std::to_string(lk);
}

/// The forward's per-head schedule (one task per query head over all keys).
void per_head(Decode& p) {
  using namespace attn::detail;
  const auto q = attn::bhsd<const float>(p.q.data(), 1, kHq, 1, kD);
  const auto out = attn::bhsd(p.o.data(), 1, kHq, 1, kD);
  const StridedKV<float, float> kv{attn::bhsd<const float>(p.k.data(), 1, kHkv, p.lk, kD),
                                   attn::bhsd<const float>(p.v.data(), 1, kHkv, p.lk, kD)};
  attn::AttentionShape shape;
  shape.batch = 1;
  shape.q_heads = kHq;
  shape.kv_heads = kHkv;
  shape.lq = 1;
  shape.lk = p.lk;
  shape.d = shape.dv = kD;
  const attn::Causal mask = attn::causal().bind(shape);
  const attn::NoScoreMod mod;
  const index_t bc = TileTraits::block_k;
  const auto& ks = attn::kernels::kernel_set<float>(attn::active_isa());
  using Packed = PackedKV<float, StridedKV<float, float>>;
  const Packed pkv(kv, ks, false, kD, kD, bc, false, kHkv);  // tiles packed where they are used
  const float scale = 1.0f / std::sqrt(static_cast<float>(kD));
  const Walk<float, Packed, attn::Causal, attn::NoScoreMod> walk{pkv, mask, mod,   bc,     kD,
                                                                 kD,  0,    scale, nullptr};
  parallel_tasks(
      kHq, resolve_threads(0, kHq),
      [&] { return std::make_unique<ForwardScratch<float>>(1, bc, pkv); },
      [&](ForwardScratch<float>& sc, index_t h) {
        sc.q.row(0) = attn::matrix(q, 0, h).row(0) * scale;
        sc.part.reset(1);
        walk.run(sc.walk, sc.part, 0, h, shape.kv_head(h), 0, sc.q.data(), 0, p.lk);
        sc.part.write_row(0, attn::matrix(out, 0, h).row(0));
      },
      [](const ForwardScratch<float>&) {});
}

void BM_per_head(benchmark::State& state) {
  Decode p(state.range(0));
  const double t = timed_loop(state, [&] { per_head(p); });
  record_time(state, key("decode", p.lk), t);
  set_bandwidth(state, p.bytes(), t);
}

void BM_masked(benchmark::State& state) {
  Decode p(state.range(0));
  const auto q = attn::bhsd<const float>(p.q.data(), 1, kHq, 1, kD);
  const auto k = attn::bhsd<const float>(p.k.data(), 1, kHkv, p.lk, kD);
  const auto v = attn::bhsd<const float>(p.v.data(), 1, kHkv, p.lk, kD);
  const auto o = attn::bhsd(p.o.data(), 1, kHq, 1, kD);
  const double t = timed_loop(state, [&] { attn::masked_attention(q, k, v, o, attn::causal()); });
  set_ratio(state, key("decode", p.lk), t);
  set_bandwidth(state, p.bytes(), t);
}

template <class T>
struct CacheDecode {
  index_t lk;
  std::vector<float> q, o;
  attn::KVCache<T> cache;
  explicit CacheDecode(index_t n)
      : lk(n), q(random_buffer(static_cast<std::size_t>(kHq * kD), 1)), o(q.size()),
        cache(1, kHkv, n, kD) {
    fill([&](const auto& k, const auto& v) { cache.append(0, k, v); }, n);
  }
  template <class Append>
  static void fill(Append&& append, index_t n) {
    const index_t chunk = 4096;
    for (index_t t = 0; t < n; t += chunk) {
      const index_t c = std::min(chunk, n - t);
      const std::vector<float> k = random_buffer(static_cast<std::size_t>(kHkv * c * kD), 2 + t),
                               v = random_buffer(k.size(), 3 + t);
      append(attn::bhsd<const float>(k.data(), 1, kHkv, c, kD),
             attn::bhsd<const float>(v.data(), 1, kHkv, c, kD));
    }
  }
  double bytes() const {  // K, V and scales read by one step
    return static_cast<double>(cache.bytes());
  }
};

template <class T>
void BM_cache(benchmark::State& state) {
  CacheDecode<T> p(state.range(0));
  const auto q = attn::bhsd<const float>(p.q.data(), 1, kHq, 1, kD);
  const auto o = attn::bhsd(p.o.data(), 1, kHq, 1, kD);
  const double t = timed_loop(state, [&] { attn::cache_attention(q, p.cache, o, attn::causal()); });
  if (std::is_same<T, float>::value)
    record_time(state, key("cache", p.lk), t);
  else
    set_ratio(state, key("cache", p.lk), t);
  set_bandwidth(state, p.bytes(), t);
  state.counters["cache_MiB"] = p.bytes() / (1 << 20);
}

void BM_paged(benchmark::State& state) {
  const index_t n = state.range(0), bs = state.range(1);
  attn::PagedKVCache<float> cache((n + bs - 1) / bs, bs, kHkv, kD);
  const index_t seq = cache.add_sequence();
  CacheDecode<float>::fill([&](const auto& k, const auto& v) { cache.append(seq, k, v); }, n);
  const std::vector<float> qb = random_buffer(static_cast<std::size_t>(kHq * kD), 1);
  std::vector<float> ob(qb.size());
  const auto q = attn::bhsd<const float>(qb.data(), 1, kHq, 1, kD);
  const auto o = attn::bhsd(ob.data(), 1, kHq, 1, kD);
  const double t =
      timed_loop(state, [&] { attn::paged_attention(q, cache, {seq}, o, attn::causal()); });
  set_ratio(state, key("cache", n), t);
  set_bandwidth(state, static_cast<double>(cache.bytes()), t);
}

/// Two sequences of n / 2 tokens whose blocks alternate in the pool (appended
/// block by block in turn, as a server interleaves its sequences), decoded in
/// one call: the same bytes as one contiguous sequence of n tokens.
void BM_paged_interleaved(benchmark::State& state) {
  const index_t n = state.range(0), bs = state.range(1), half = n / 2;
  attn::PagedKVCache<float> cache(2 * ((half + bs - 1) / bs), bs, kHkv, kD);
  const index_t s0 = cache.add_sequence(), s1 = cache.add_sequence();
  const std::vector<float> kb = random_buffer(static_cast<std::size_t>(kHkv * bs * kD), 2),
                           vb = random_buffer(kb.size(), 3);
  for (index_t t = 0; t < half; t += bs)
    for (const index_t seq : {s0, s1}) {
      const index_t c = std::min(bs, half - t);
      cache.append(seq, attn::bhsd<const float>(kb.data(), 1, kHkv, c, kD),
                   attn::bhsd<const float>(vb.data(), 1, kHkv, c, kD));
    }
  const std::vector<float> qb = random_buffer(static_cast<std::size_t>(2 * kHq * kD), 1);
  std::vector<float> ob(qb.size());
  const auto q = attn::bhsd<const float>(qb.data(), 2, kHq, 1, kD);
  const auto o = attn::bhsd(ob.data(), 2, kHq, 1, kD);
  const double t = timed_loop(state, [&] {
    attn::paged_attention(q, cache, {s0, s1}, o, attn::causal());
  });
  set_ratio(state, key("cache", n), t);
  set_bandwidth(state, static_cast<double>(cache.bytes()), t);
}

/// The contiguous and the paged cache (blocks of 16) on the same tokens, call by call.
void BM_paged_paired(benchmark::State& state) {
  const index_t n = state.range(0), bs = 16;
  CacheDecode<float> p(n);
  attn::PagedKVCache<float> paged((n + bs - 1) / bs, bs, kHkv, kD);
  const index_t seq = paged.add_sequence();
  CacheDecode<float>::fill([&](const auto& k, const auto& v) { paged.append(seq, k, v); }, n);
  const auto q = attn::bhsd<const float>(p.q.data(), 1, kHq, 1, kD);
  const auto o = attn::bhsd(p.o.data(), 1, kHq, 1, kD);
  const auto times = paired_times<2>(state, [&](int which) {
    if (which == 0)
      attn::cache_attention(q, p.cache, o, attn::causal());
    else
      attn::paged_attention(q, paged, {seq}, o, attn::causal());
  });
  state.counters["paged_speed"] = median_ratio(times, 0, 1);
}

// ------------------------------------------------------------------ varlen --

constexpr index_t kVarHq = 8, kVarHkv = 2, kVarD = 64;
const std::vector<index_t> kVarLens = {100, 4000, 730, 2200, 1500, 350, 3100, 900};

void BM_varlen_padded(benchmark::State& state) {
  const index_t B = static_cast<index_t>(kVarLens.size());
  const index_t L = *std::max_element(kVarLens.begin(), kVarLens.end());
  const std::vector<float> q = random_buffer(static_cast<std::size_t>(B * L * kVarHq * kVarD), 1),
                           k = random_buffer(static_cast<std::size_t>(B * L * kVarHkv * kVarD), 2),
                           v = random_buffer(k.size(), 3);
  std::vector<float> o(q.size());
  const double t = timed_loop(state, [&] {
    attn::masked_attention(
        attn::bshd(q.data(), B, L, kVarHq, kVarD), attn::bshd(k.data(), B, L, kVarHkv, kVarD),
        attn::bshd(v.data(), B, L, kVarHkv, kVarD), attn::bshd(o.data(), B, L, kVarHq, kVarD),
        attn::causal_top_left() & attn::key_padding(kVarLens));
  });
  record_time(state, "varlen", t);
}

void BM_varlen_packed(benchmark::State& state) {
  std::vector<index_t> cu = {0};
  for (index_t l : kVarLens) cu.push_back(cu.back() + l);
  const index_t T = cu.back();
  const std::vector<float> q = random_buffer(static_cast<std::size_t>(T * kVarHq * kVarD), 1),
                           k = random_buffer(static_cast<std::size_t>(T * kVarHkv * kVarD), 2),
                           v = random_buffer(k.size(), 3);
  std::vector<float> o(q.size());
  const double t = timed_loop(state, [&] {
    attn::varlen_attention(attn::bshd(q.data(), 1, T, kVarHq, kVarD),
                           attn::bshd(k.data(), 1, T, kVarHkv, kVarD),
                           attn::bshd(v.data(), 1, T, kVarHkv, kVarD),
                           attn::bshd(o.data(), 1, T, kVarHq, kVarD), cu, cu, attn::causal());
  });
  set_ratio(state, "varlen", t);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  measure_bandwidth();
  auto reg = [](const char* name, auto fn) {
    return benchmark::RegisterBenchmark(name, fn)->Unit(benchmark::kMillisecond)->UseRealTime();
  };
  reg("bandwidth/stream", BM_stream);
  for (index_t lk : {16384, 65536}) {
    const std::string s = "/Lk:" + std::to_string(lk);
    reg(("decode/per_head" + s).c_str(), BM_per_head)->Arg(lk);
    reg(("decode/masked" + s).c_str(), BM_masked)->Arg(lk);
    reg(("decode/cache_f32" + s).c_str(), BM_cache<float>)->Arg(lk);
    reg(("decode/cache_int8" + s).c_str(), BM_cache<std::int8_t>)->Arg(lk);
    reg(("decode/paged_f32" + s).c_str(), BM_paged)->Args({lk, 16});
    reg(("decode/paged_f32_b64" + s).c_str(), BM_paged)->Args({lk, 64});
    reg(("decode/paged_f32_2seq" + s).c_str(), BM_paged_interleaved)->Args({lk, 16});
    reg(("decode/paged_paired" + s).c_str(), BM_paged_paired)->Arg(lk);
  }
  reg("varlen/padded", BM_varlen_padded);
  reg("varlen/packed", BM_varlen_packed);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
