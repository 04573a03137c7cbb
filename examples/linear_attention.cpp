// Linear attention over a whole sequence, then the same sequence decoded one
// token at a time with the recurrent state (the snippet of docs/linear.md).
#include <attn/linear.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const attn::index_t B = 1, H = 8, L = 1000, D = 64;
  std::vector<float> q(B * H * L * D), k(q.size()), v(q.size());
  for (std::size_t i = 0; i < q.size(); ++i) {
    q[i] = std::sin(0.37f * i);
    k[i] = std::cos(0.11f * i);
    v[i] = std::sin(0.05f * i);
  }
  std::vector<float> whole(q.size()), decoded(q.size());
  const auto view = [&](std::vector<float>& buf) { return attn::bhsd(buf.data(), B, H, L, D); };

  attn::LinearAttentionOptions opt;
  opt.causal = true;
  attn::linear_attention(view(q), view(k), view(v), view(whole), attn::elu_plus_one(), opt);

  // The same sequence one token at a time, carrying the state (F = D for elu + 1).
  attn::LinearStateBuffer<float> state(B, H, D, D);
  const auto token = [&](std::vector<float>& buf, attn::index_t t) {
    return attn::Tensor4<float>(buf.data() + t * D, {B, H, 1, D}, {H * L * D, L * D, D, 1});
  };
  for (attn::index_t t = 0; t < L; ++t)
    attn::linear_attention(token(q, t), token(k, t), token(v, t), token(decoded, t),
                           attn::elu_plus_one(), state.state(), opt);

  float diff = 0;
  for (std::size_t i = 0; i < whole.size(); ++i)
    diff = std::max(diff, std::abs(whole[i] - decoded[i]));
  std::printf("max |one call - token by token| = %g\n", diff);
}
