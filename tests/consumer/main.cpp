// Uses attn through its installed or embedded CMake target and checks one
// result against the reference.
#include <attn/attn.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const attn::index_t B = 1, H = 2, L = 70, D = 16;
  std::vector<float> q(B * H * L * D), k(q.size()), v(q.size()), fast(q.size()), ref(q.size());
  for (std::size_t i = 0; i < q.size(); ++i) {
    q[i] = std::sin(0.1f * static_cast<float>(i));
    k[i] = std::cos(0.07f * static_cast<float>(i));
    v[i] = std::sin(0.03f * static_cast<float>(i) + 1.f);
  }
  auto view = [&](std::vector<float>& x) { return attn::bhsd(x.data(), B, H, L, D); };
  attn::masked_attention(view(q), view(k), view(v), view(fast), attn::causal());
  attn::reference::attention(view(q), view(k), view(v), view(ref), attn::causal());
  double err = 0;
  for (std::size_t i = 0; i < q.size(); ++i) err = std::fmax(err, std::fabs(fast[i] - ref[i]));
  std::printf("attn %s consumer: max |fast - reference| = %.3g\n", ATTN_VERSION_STRING, err);
  return err < 1e-5 ? 0 : 1;
}
