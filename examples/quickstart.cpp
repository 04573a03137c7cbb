// quickstart — the smallest useful attn program.
//
// A model usually stores activations as [batch, seq, heads, dim]. attn reads
// such buffers in place through attn::bshd views, runs dense and causal
// attention, and writes the output in the same layout.
#include <attn/attn.hpp>

#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const attn::index_t B = 2, L = 1024, H = 8, D = 64;  // batch, sequence, heads, head dim

  // [B, L, H, D] buffers, filled with N(0, 1).
  std::vector<float> q(B * L * H * D), k(q.size()), v(q.size()), out(q.size());
  std::mt19937 gen(42);
  std::normal_distribution<float> normal;
  for (auto* buf : {&q, &k, &v})
    for (float& x : *buf) x = normal(gen);

  // Views: the kernel sees logical [B, H, L, D]; the bytes stay where they are.
  auto qv = attn::bshd(q.data(), B, L, H, D);
  auto kv = attn::bshd(k.data(), B, L, H, D);
  auto vv = attn::bshd(v.data(), B, L, H, D);
  auto ov = attn::bshd(out.data(), B, L, H, D);

  auto timed = [&](const char* name, auto&& fn) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    double checksum = 0;
    for (float x : out) checksum += x;
    std::printf("%-7s B=%td L=%td H=%td D=%td  %8.2f ms  checksum %+.6f\n", name, B, L, H, D, ms,
                checksum);
  };

  // softmax(q·kᵀ / sqrt(D)) · v
  timed("dense", [&] { attn::scaled_dot_product_attention(qv, kv, vv, ov); });
  // the same with query i seeing keys j <= i (bottom-right aligned); about half the work
  timed("causal", [&] { attn::masked_attention(qv, kv, vv, ov, attn::causal()); });
  return 0;
}
