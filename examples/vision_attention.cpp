// vision_attention — neighbourhood attention with a 2-D relative position
// bias over the patches of a generated image, and the attention map of a few
// pixels written as an image.
//
// The image (48 × 48 patches) holds a bright disk, a grey square and a ring on
// a dark background. Each patch's query and key encode its brightness, so a
// patch attends to patches that look like it; a Swin-style relative bias table
// (decaying with distance, as a trained one often does) adds "nearby is more
// related"; attn::neighborhood limits each patch to the 15 × 15 patches around
// it, the window shifted inward at the borders (NATTEN), so corner patches
// still see 225 patches.
//
// Writes vision_attention.pgm: the image, then the attention maps of three
// patches (one inside the disk, one on the square's edge, one in a corner),
// each scaled to its own maximum, the query patch marked. Prints the share of
// each map that falls on the query's own shape, and the time of
// neighborhood_attention against dense attention with the same bias.
// Usage: vision_attention [OUTPUT_DIR]   (default: the current directory)
#include <attn/attn.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

using attn::index_t;

constexpr index_t kSide = 48, kTokens = kSide * kSide, kDim = 16, kKernel = 15, kScale = 4;

/// Shape label and brightness of patch (y, x): 1 disk, 2 square, 3 ring, 0 background.
int shape_of(index_t y, index_t x) {
  const double dy = static_cast<double>(y) - 14, dx = static_cast<double>(x) - 14;
  if (dy * dy + dx * dx <= 81) return 1;                // disk, radius 9, centre (14, 14)
  if (y >= 26 && y < 42 && x >= 6 && x < 22) return 2;  // square
  const double ry = static_cast<double>(y) - 30, rx = static_cast<double>(x) - 34;
  const double r = std::sqrt(ry * ry + rx * rx);
  if (r >= 7 && r <= 10) return 3;  // ring around (30, 34)
  return 0;
}
double brightness(int shape) {
  return shape == 1 ? 1.0 : shape == 2 ? 0.55 : shape == 3 ? 0.8 : 0.1;
}

void write_pgm(const std::filesystem::path& path, index_t w, index_t h,
               const std::vector<unsigned char>& px) {
  std::ofstream f(path, std::ios::binary);
  f << "P5\n" << w << ' ' << h << "\n255\n";
  f.write(reinterpret_cast<const char*>(px.data()), static_cast<std::streamsize>(px.size()));
}

}  // namespace

int main(int argc, char** argv) {
  const std::filesystem::path dir = argc > 1 ? argv[1] : ".";
  std::filesystem::create_directories(dir);

  // Features: brightness as soft one-hot over 8 levels (D = 16, twice), times 2 so
  // that similar patches score high. q = k (self-similarity), v = the brightness.
  std::vector<float> q(kTokens * kDim), v(kTokens * kDim, 0.f), out(kTokens * kDim);
  std::vector<int> shape(kTokens);
  for (index_t t = 0; t < kTokens; ++t) {
    shape[static_cast<std::size_t>(t)] = shape_of(t / kSide, t % kSide);
    const double b = brightness(shape[static_cast<std::size_t>(t)]);
    for (index_t c = 0; c < kDim; ++c) {
      const double centre = static_cast<double>(c % 8) / 7.0;
      q[static_cast<std::size_t>(t * kDim + c)] =
          static_cast<float>(2.0 * std::exp(-(b - centre) * (b - centre) / 0.02));
    }
    v[static_cast<std::size_t>(t * kDim)] = static_cast<float>(b);
  }
  const auto Q = attn::bhsd(q.data(), 1, 1, kTokens, kDim);
  const auto V = attn::bhsd(v.data(), 1, 1, kTokens, kDim);
  const auto O = attn::bhsd(out.data(), 1, 1, kTokens, kDim);

  // Relative bias table [(2·48 - 1)², 1 head]: -0.25 per patch of distance.
  const index_t span = 2 * kSide - 1;
  std::vector<double> table(static_cast<std::size_t>(span * span));
  for (index_t dy = 0; dy < span; ++dy)
    for (index_t dx = 0; dx < span; ++dx)
      table[static_cast<std::size_t>(dy * span + dx)] =
          -0.25 *
          std::hypot(static_cast<double>(dy - kSide + 1), static_cast<double>(dx - kSide + 1));
  const auto bias = attn::relative_bias_2d(table, kSide, kSide);
  const auto nb = attn::neighborhood({kSide, kSide}, kKernel);

  auto best_of_3 = [](auto&& f) {  // seconds; the first call also starts the threads
    double best = 1e300;
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      f();
      best = std::min(best,
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  const double t_dense =
      best_of_3([&] { attn::masked_attention(Q, Q, V, O, attn::no_mask(), bias); });
  const double t_nb =
      best_of_3([&] { attn::neighborhood_attention(Q, Q, V, O, nb, attn::no_mask(), bias); });

  // The attention maps (the full [N, N] weights: a diagnostic, O(N²)).
  std::vector<float> w(static_cast<std::size_t>(kTokens * kTokens));
  attn::attention_weights(Q, Q, attn::TensorView<float, 4>(w.data(), {1, 1, kTokens, kTokens}), nb,
                          bias);

  const index_t probes[3] = {14 * kSide + 16, 26 * kSide + 13, 1 * kSide + 46};
  const char* names[3] = {"inside the disk", "on the square's top edge", "near a corner"};
  const index_t cell = kSide * kScale, gap = 8, width = 4 * cell + 3 * gap;
  std::vector<unsigned char> px(static_cast<std::size_t>(width * cell), 255);
  auto put = [&](index_t panel, index_t y, index_t x, double value) {
    for (index_t a = 0; a < kScale; ++a)
      for (index_t b = 0; b < kScale; ++b)
        px[static_cast<std::size_t>((y * kScale + a) * width + panel * (cell + gap) + x * kScale +
                                    b)] =
            static_cast<unsigned char>(std::clamp(value, 0.0, 1.0) * 255.0 + 0.5);
  };
  for (index_t t = 0; t < kTokens; ++t)
    put(0, t / kSide, t % kSide, brightness(shape[static_cast<std::size_t>(t)]));
  std::printf("%ld × %ld patches, neighbourhood %ld × %ld, 2-D relative bias\n",
              static_cast<long>(kSide), static_cast<long>(kSide), static_cast<long>(kKernel),
              static_cast<long>(kKernel));
  for (int p = 0; p < 3; ++p) {
    const float* row = &w[static_cast<std::size_t>(probes[p] * kTokens)];
    const float mx = *std::max_element(row, row + kTokens);
    double same = 0;
    index_t seen = 0;
    for (index_t t = 0; t < kTokens; ++t) {
      put(p + 1, t / kSide, t % kSide, row[t] / mx);
      if (shape[static_cast<std::size_t>(t)] == shape[static_cast<std::size_t>(probes[p])])
        same += row[t];
      seen += row[t] > 0 ? 1 : 0;
    }
    put(p + 1, probes[p] / kSide, probes[p] % kSide, 0.5);  // mark the query patch grey
    std::printf(
        "patch (%2ld, %2ld) %-26s sees %ld patches; %.0f%% of its attention on its own shape\n",
        static_cast<long>(probes[p] / kSide), static_cast<long>(probes[p] % kSide), names[p],
        static_cast<long>(seen), 100.0 * same);
  }
  const auto file = dir / "vision_attention.pgm";
  write_pgm(file, width, cell, px);
  std::printf("time: neighborhood_attention %.2f ms, dense attention with the same bias %.2f ms\n",
              t_nb * 1e3, t_dense * 1e3);
  std::printf("wrote %s (image, then the maps of the three patches)\n", file.string().c_str());
  return 0;
}
