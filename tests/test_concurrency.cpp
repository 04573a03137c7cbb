// Entry points called from several std::threads at once give, bit for bit,
// what they give when called one after another. (Also run under
// ThreadSanitizer by scripts/ci-tsan.sh.)
#include "support.hpp"

#include <cstring>
#include <thread>
#include <vector>

namespace {

using namespace attn_test;

constexpr int kThreads = 4;

/// One call: an entry point, its mask/modifier and its own inputs.
struct Job {
  int kind =
      0;  // 0 dense float, 1 causal+ALiBi float, 2 padded half, 3 reference double, 4 bias bf16 K/V
  Problem p;
  std::uint32_t seed = 0;
};

/// Bytes of a tensor's storage.
template <class T>
std::vector<unsigned char> bytes_of(const Tensor<T>& t) {
  std::vector<unsigned char> b(t.buf.size() * sizeof(T));
  std::memcpy(b.data(), t.buf.data(), b.size());
  return b;
}

/// Runs one job with `omp_threads` OpenMP workers inside the call and returns
/// the bytes of its output followed by its lse.
std::vector<unsigned char> run(const Job& job, int omp_threads) {
  const Problem& p = job.p;
  attn::AttentionOptions opt;
  opt.num_threads = omp_threads;
  opt.block_q = 32;
  opt.block_k = 48;
  attn::AttentionStats stats;
  opt.stats = &stats;
  std::vector<float> lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
  opt.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
  std::vector<unsigned char> result;
  switch (job.kind) {
    case 0: {
      const Inputs<float> in(p, job.seed);
      Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
      attn::scaled_dot_product_attention(in.q.view, in.k.view, in.v.view, out.view, opt);
      result = bytes_of(out);
      break;
    }
    case 1: {
      const Inputs<float> in(p, job.seed);
      Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
      attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(),
                             attn::alibi(attn::alibi_slopes(p.Hq)), opt);
      result = bytes_of(out);
      break;
    }
    case 2: {
      const Inputs<Eigen::half> in(p, job.seed);
      Tensor<Eigen::half> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
      std::vector<index_t> lengths;
      for (index_t b = 0; b < p.B; ++b) lengths.push_back(p.Lk - 7 * b);
      attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::key_padding(lengths),
                             attn::softcap(4.0), opt);
      result = bytes_of(out);
      break;
    }
    case 3: {
      const Inputs<double> in(p, job.seed);
      Tensor<double> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
      attn::reference::attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(),
                                 attn::no_score_mod(), opt);
      result = bytes_of(out);
      break;
    }
    default: {
      const Tensor<float> q = random_tensor<float>(p.B, p.Hq, p.Lq, p.D, job.seed, p.layout);
      const Tensor<Eigen::bfloat16> k =
          random_tensor<Eigen::bfloat16>(p.B, p.Hkv, p.Lk, p.D, job.seed + 1, p.layout);
      const Tensor<Eigen::bfloat16> v =
          random_tensor<Eigen::bfloat16>(p.B, p.Hkv, p.Lk, p.Dv, job.seed + 2, p.layout);
      const Tensor<float> bias = random_tensor<float>(1, p.Hq, p.Lq, p.Lk, job.seed + 3);
      Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
      attn::masked_attention(q.cview(), k.cview(), v.cview(), out.view, attn::no_mask(),
                             attn::additive_bias(bias.cview()), opt);
      result = bytes_of(out);
      break;
    }
  }
  const auto* l = reinterpret_cast<const unsigned char*>(lse.data());
  result.insert(result.end(), l, l + lse.size() * sizeof(float));
  return result;
}

/// Two jobs of each kind with different shapes and seeds.
std::vector<Job> jobs() {
  std::vector<Job> js;
  for (int kind = 0; kind < 5; ++kind)
    for (int r = 0; r < 2; ++r) {
      Job j;
      j.kind = kind;
      j.seed = static_cast<std::uint32_t>(100 + 10 * kind + r);
      j.p.B = 1 + r;
      j.p.Hq = 4;
      j.p.Hkv = r == 0 ? 4 : 2;
      j.p.Lq = 70 + 13 * kind + r;
      j.p.Lk = 90 + 11 * kind + 5 * r;
      j.p.D = 16 + 8 * r;
      j.p.Dv = 24 - 8 * r;
      j.p.layout = r == 0 ? Layout::bhsd : Layout::bshd;
      js.push_back(j);
    }
  return js;
}

/// Serial results, then the same jobs spread over kThreads std::threads
/// (each thread runs its share `rounds` times); every result must be the serial one.
void expect_concurrent_equals_serial(int omp_threads, int rounds) {
  const std::vector<Job> js = jobs();
  std::vector<std::vector<unsigned char>> serial;
  for (const Job& j : js) serial.push_back(run(j, omp_threads));

  std::vector<std::vector<std::vector<unsigned char>>> got(js.size());
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t)
    pool.emplace_back([&, t] {
      for (int round = 0; round < rounds; ++round)
        for (std::size_t i = static_cast<std::size_t>(t); i < js.size(); i += kThreads)
          got[i].push_back(run(js[i], omp_threads));
    });
  for (auto& th : pool) th.join();

  for (std::size_t i = 0; i < js.size(); ++i) {
    SCOPED_TRACE("job " + std::to_string(i) + " kind " + std::to_string(js[i].kind) + " " +
                 js[i].p.str());
    ASSERT_EQ(got[i].size(), static_cast<std::size_t>(rounds));
    for (const auto& r : got[i]) EXPECT_TRUE(r == serial[i]);
  }
}

TEST(Concurrency, FourThreadsOfSingleThreadedCallsEqualSerial) {
  expect_concurrent_equals_serial(1, 3);
}

// Each std::thread's call runs its own OpenMP team of two.
TEST(Concurrency, FourThreadsOfMultiThreadedCallsEqualSerial) {
  expect_concurrent_equals_serial(2, 2);
}

// The same read-only inputs shared by every thread, each writing its own output.
TEST(Concurrency, SharedInputsSeparateOutputs) {
  Problem p;
  p.B = 2;
  p.Hq = 4;
  p.Hkv = 2;
  p.Lq = 150;
  p.Lk = 170;
  p.D = p.Dv = 32;
  const Inputs<float> in(p, 7);
  Tensor<float> expected(p.B, p.Hq, p.Lq, p.Dv);
  attn::masked_attention(in.q.view, in.k.view, in.v.view, expected.view, attn::causal());
  std::vector<Tensor<float>> outs(kThreads, Tensor<float>(p.B, p.Hq, p.Lq, p.Dv));
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t)
    pool.emplace_back([&, t] {
      attn::masked_attention(in.q.cview(), in.k.cview(), in.v.cview(),
                             outs[static_cast<std::size_t>(t)].view, attn::causal());
    });
  for (auto& th : pool) th.join();
  for (const auto& o : outs) EXPECT_TRUE(o.buf == expected.buf);
}

}  // namespace
