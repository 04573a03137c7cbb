// bf16_error — attn's bf16 attention on inputs from a file, for the error
// table of scripts/compare_peers.py --errors (docs/reliability.md).
//
//   bf16_error PREFIX N D CAUSAL
//
// reads PREFIX.q, PREFIX.k, PREFIX.v (float32, [1, 8, N, D], values already
// representable in bf16), runs scaled_dot_product_attention (or causal
// masked_attention) with bf16 q, k, v and out on every instruction set this
// CPU runs that has AVX-512 or AVX2, and writes each output as float32 to
// PREFIX.out.<isa>. Prints the instruction sets it wrote, one per line.
#include <attn/attn.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

constexpr attn::index_t kHeads = 8;

std::vector<float> read_floats(const std::string& path, std::size_t n) {
  std::vector<float> v(n);
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(float), n, f) != n) {
    std::fprintf(stderr, "bf16_error: cannot read %zu floats from %s\n", n, path.c_str());
    std::exit(1);
  }
  std::fclose(f);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: bf16_error PREFIX N D CAUSAL(0|1)\n");
    return 2;
  }
  const std::string prefix = argv[1];
  const attn::index_t n = std::atol(argv[2]), d = std::atol(argv[3]);
  const bool causal = std::atoi(argv[4]) != 0;
  const auto size = static_cast<std::size_t>(kHeads * n * d);
  std::vector<Eigen::bfloat16> q(size), k(size), v(size), o(size);
  for (auto [name, dst] : {std::pair<const char*, std::vector<Eigen::bfloat16>*>{"q", &q},
                           {"k", &k},
                           {"v", &v}}) {
    const std::vector<float> f = read_floats(prefix + "." + name, size);
    for (std::size_t i = 0; i < size; ++i) (*dst)[i] = Eigen::bfloat16(f[i]);
  }
  const auto Q = attn::bhsd<const Eigen::bfloat16>(q.data(), 1, kHeads, n, d);
  const auto K = attn::bhsd<const Eigen::bfloat16>(k.data(), 1, kHeads, n, d);
  const auto V = attn::bhsd<const Eigen::bfloat16>(v.data(), 1, kHeads, n, d);
  const auto O = attn::bhsd(o.data(), 1, kHeads, n, d);
  for (attn::Isa isa : attn::supported_isas()) {
    if (isa == attn::Isa::portable) continue;
    attn::set_isa(isa);
    if (causal)
      attn::masked_attention(Q, K, V, O, attn::causal());
    else
      attn::scaled_dot_product_attention(Q, K, V, O);
    std::vector<float> f(o.begin(), o.end());
    const std::string path = prefix + ".out." + attn::isa_name(isa);
    std::FILE* out = std::fopen(path.c_str(), "wb");
    if (!out || std::fwrite(f.data(), sizeof(float), size, out) != size) {
      std::fprintf(stderr, "bf16_error: cannot write %s\n", path.c_str());
      return 1;
    }
    std::fclose(out);
    std::printf("%s\n", attn::isa_name(isa));
  }
}
