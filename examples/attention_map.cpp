// attention_map — what four attention heads look at, drawn as heat maps.
//
// The sentence "the trophy did not fit in the suitcase because it was too big"
// gets a hand-built embedding (position, word class, two role features), and
// each head gets hand-chosen q/k projections, so that the heads visibly differ:
//
//   previous   query i looks at token i-1
//   class      a token looks at the tokens of its word class (verbs at verbs, ...)
//   it→trophy  "it" looks at the subject noun "trophy"; the other tokens at themselves
//   sink       every token looks at the first token (an "attention sink")
//
// The softmax weights of each head are written as an SVG heat map (rows:
// queries, columns: keys) and printed as shaded characters.
// Usage: attention_map [OUTPUT_DIR]   (default: the current directory; created if missing)
#include <attn/attn.hpp>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

using attn::index_t;

// ------------------------------------------------------------- the sentence --

enum WordClass : int { kDet, kNoun, kVerb, kAdv, kPrep, kConj, kPron, kAdj, kNumClasses };

struct Token {
  const char* word;
  WordClass cls;
};

const std::array<Token, 13> kSentence = {{{"the", kDet},
                                          {"trophy", kNoun},
                                          {"did", kVerb},
                                          {"not", kAdv},
                                          {"fit", kVerb},
                                          {"in", kPrep},
                                          {"the", kDet},
                                          {"suitcase", kNoun},
                                          {"because", kConj},
                                          {"it", kPron},
                                          {"was", kVerb},
                                          {"too", kAdv},
                                          {"big", kAdj}}};

constexpr index_t kL = static_cast<index_t>(kSentence.size());  // tokens
constexpr index_t kHeads = 4;
// Embedding features: one-hot position, one-hot word class, "is the subject", "is a pronoun".
constexpr index_t kPos = 0, kClass = kPos + kL, kSubject = kClass + kNumClasses,
                  kPronoun = kSubject + 1, kE = kPronoun + 1;
constexpr index_t kD = kE;  // head dim: the projections are square

const std::array<const char*, kHeads> kHeadNames = {"previous token", "same word class",
                                                    "it → trophy", "attention sink"};

/// x[t] = [onehot(t) | onehot(class) | subject | pronoun], [L, E].
attn::RowMatrix<double> embed() {
  attn::RowMatrix<double> x = attn::RowMatrix<double>::Zero(kL, kE);
  for (index_t t = 0; t < kL; ++t) {
    x(t, kPos + t) = 1;
    x(t, kClass + kSentence[static_cast<std::size_t>(t)].cls) = 1;
  }
  x(1, kSubject) = 1;  // "trophy" is the subject of the sentence
  x(9, kPronoun) = 1;  // "it"
  return x;
}

/// Hand-chosen projections Wq, Wk [E, D] of head h; score(i, j) = (x_i Wq)·(x_j Wk) with
/// scale 1, so each weight below is a logit difference.
void projections(index_t h, attn::RowMatrix<double>& wq, attn::RowMatrix<double>& wk) {
  wq = attn::RowMatrix<double>::Zero(kE, kD);
  wk = attn::RowMatrix<double>::Zero(kE, kD);
  for (index_t t = 0; t < kL; ++t) wk(kPos + t, kPos + t) = 1;  // keys: their position
  switch (h) {
    case 0:  // previous token: score 4.5·[j == i - 1] (token 0 looks at itself)
      for (index_t t = 0; t < kL; ++t) wq(kPos + t, kPos + std::max<index_t>(t - 1, 0)) = 4.5;
      break;
    case 1:  // same word class: score 6.25·[class(i) == class(j)]
      for (index_t c = 0; c < kNumClasses; ++c) {
        wq(kClass + c, kClass + c) = 2.5;
        wk(kClass + c, kClass + c) = 2.5;
      }
      break;
    case 2:  // score 5·[j == i], and for "it" 4·[j is a noun] + 4·[j is the subject]
      for (index_t t = 0; t < kL; ++t) wq(kPos + t, kPos + t) = 5;
      wq(kPronoun, kClass + kNoun) = 4;
      wq(kPronoun, kSubject) = 4;
      wk(kClass + kNoun, kClass + kNoun) = 1;
      wk(kSubject, kSubject) = 1;
      break;
    default:  // sink: every class feature maps to position 0, score 3·[j == 0]
      for (index_t c = 0; c < kNumClasses; ++c) wq(kClass + c, kPos) = 3;
      break;
  }
}

// ------------------------------------------------------ attention weights --

/// Softmax weights p[i·L + j] of head h. The one place that asks attn for
/// attention probabilities: swap this body for a weights API when there is one.
std::vector<double> head_weights(const attn::TensorView<const double, 4>& q,
                                 const attn::TensorView<const double, 4>& k, index_t h) {
  // The softmax weights of head h alone: [1, 1, L, L], scale 1 (the
  // embeddings above are built with the scale folded in).
  const attn::TensorView<const double, 4> qh(q.data() + h * q.stride(1), {1, 1, kL, kD},
                                             q.strides());
  const attn::TensorView<const double, 4> kh(k.data() + h * k.stride(1), {1, 1, kL, kD},
                                             k.strides());
  std::vector<float> w(static_cast<std::size_t>(kL * kL));
  attn::AttentionOptions opt;
  opt.scale = 1.0;
  attn::attention_weights(qh, kh, attn::TensorView<float, 4>(w.data(), {1, 1, kL, kL}),
                          attn::no_mask(), attn::no_score_mod(), opt);
  return std::vector<double>(w.begin(), w.end());
}

// --------------------------------------------------------------- drawing --

/// White (p = 0) to dark blue (p = 1), as "#rrggbb".
std::string colour(double p) {
  const double lo[3] = {255, 255, 255}, hi[3] = {8, 48, 107};
  char buf[8];
  int c[3];
  for (int i = 0; i < 3; ++i) c[i] = static_cast<int>(lo[i] + (hi[i] - lo[i]) * p + 0.5);
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", c[0], c[1], c[2]);
  return buf;
}

constexpr int kCell = 30, kLabel = 70;  // pixels: one cell, the label margins

/// One head's heat map as SVG elements, with its top-left corner at (x0, y0).
void svg_head(std::ofstream& f, const std::vector<double>& p, const char* title, int x0, int y0) {
  const int gx = x0 + kLabel, gy = y0 + kLabel + 20;  // top-left of the grid
  f << "<text x='" << gx << "' y='" << y0 + 14 << "' font-weight='bold'>" << title << "</text>\n";
  for (index_t t = 0; t < kL; ++t) {
    const char* w = kSentence[static_cast<std::size_t>(t)].word;
    const int c = static_cast<int>(t) * kCell + kCell / 2;
    // keys along the top (rotated), queries down the left
    f << "<text x='" << gx + c << "' y='" << gy - 6 << "' transform='rotate(-55 " << gx + c << ' '
      << gy - 6 << ")'>" << w << "</text>\n";
    f << "<text x='" << gx - 6 << "' y='" << gy + c + 4 << "' text-anchor='end'>" << w
      << "</text>\n";
  }
  for (index_t i = 0; i < kL; ++i)
    for (index_t j = 0; j < kL; ++j) {
      const double w = p[static_cast<std::size_t>(i * kL + j)];
      const int x = gx + static_cast<int>(j) * kCell, y = gy + static_cast<int>(i) * kCell;
      f << "<rect x='" << x << "' y='" << y << "' width='" << kCell << "' height='" << kCell
        << "' fill='" << colour(w) << "' stroke='#dddddd'><title>"
        << kSentence[static_cast<std::size_t>(i)].word << " → "
        << kSentence[static_cast<std::size_t>(j)].word << ": " << w << "</title></rect>\n";
      if (w >= 0.05) {
        char num[8];
        std::snprintf(num, sizeof num, "%.2f", w);
        f << "<text x='" << x + kCell / 2 << "' y='" << y + kCell / 2 + 3
          << "' text-anchor='middle' font-size='8' fill='" << (w > 0.5 ? "white" : "black") << "'>"
          << num + (w < 1 ? 1 : 0) << "</text>\n";  // ".94", "1.00"
      }
    }
}

constexpr int kPanel = kLabel + 20 + static_cast<int>(kL) * kCell + 20;  // one head's width

/// Writes the heads given in `heads` into one SVG file, two per row; false if it failed.
bool write_svg(const std::string& path, const std::vector<std::vector<double>>& weights,
               const std::vector<index_t>& heads) {
  std::ofstream f(path);
  const int n_heads = static_cast<int>(heads.size());
  const int cols = std::min(n_heads, 2), rows = (n_heads + 1) / 2;
  const int width = kPanel * cols, height = kPanel * rows + 30;
  f << "<?xml version='1.0' encoding='UTF-8'?>\n"
    << "<svg xmlns='http://www.w3.org/2000/svg' width='" << width << "' height='" << height
    << "' viewBox='0 0 " << width << ' ' << height << "' font-family='sans-serif' font-size='11'>\n"
    << "<rect width='100%' height='100%' fill='white'/>\n";
  for (std::size_t n = 0; n < heads.size(); ++n) {
    const index_t h = heads[n];
    svg_head(f, weights[static_cast<std::size_t>(h)], kHeadNames[static_cast<std::size_t>(h)],
             kPanel * (static_cast<int>(n) % 2), kPanel * (static_cast<int>(n) / 2));
  }
  f << "<text x='" << kLabel << "' y='" << height - 8
    << "' fill='#555555'>rows: queries, columns: keys; each row sums to 1</text>\n</svg>\n";
  f.close();
  if (!f) std::fprintf(stderr, "attention_map: could not write %s\n", path.c_str());
  return static_cast<bool>(f);
}

/// The map as shaded characters, two per cell; keys written vertically on top.
void print_head(const std::vector<double>& p, const char* title) {
  const char* shades[] = {"  ", "░░", "▒▒", "▓▓", "██"};
  std::printf("\nhead: %s\n", title);
  std::size_t tall = 0;
  for (const Token& t : kSentence) tall = std::max(tall, std::string(t.word).size());
  for (std::size_t r = 0; r < tall; ++r) {
    std::printf("%10s ", "");
    for (const Token& t : kSentence) {
      const std::string w = t.word;
      std::printf("%c ", r < w.size() ? w[r] : ' ');
    }
    std::printf("\n");
  }
  for (index_t i = 0; i < kL; ++i) {
    std::printf("%10s ", kSentence[static_cast<std::size_t>(i)].word);
    for (index_t j = 0; j < kL; ++j) {
      // 0: p < 0.05, then quarters up to 1
      const double w = p[static_cast<std::size_t>(i * kL + j)];
      const int level = w < 0.05 ? 0 : std::min(4, 1 + static_cast<int>(w * 4));
      std::printf("%s", shades[level]);
    }
    std::printf("\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : ".";
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);  // an existing directory is fine

  // q and k of every head, [1, H, L, D]: q_h = x·Wq_h, k_h = x·Wk_h.
  const attn::RowMatrix<double> x = embed();
  std::vector<double> qbuf(static_cast<std::size_t>(kHeads * kL * kD));
  std::vector<double> kbuf(qbuf.size());
  attn::TensorView<double, 4> q = attn::bhsd(qbuf.data(), 1, kHeads, kL, kD);
  attn::TensorView<double, 4> k = attn::bhsd(kbuf.data(), 1, kHeads, kL, kD);
  attn::RowMatrix<double> wq, wk;
  for (index_t h = 0; h < kHeads; ++h) {
    projections(h, wq, wk);
    attn::matrix(q, 0, h) = x * wq;  // (L, D)
    attn::matrix(k, 0, h) = x * wk;  // (L, D)
  }

  std::vector<std::vector<double>> weights;
  for (index_t h = 0; h < kHeads; ++h) weights.push_back(head_weights(q, k, h));

  const char* files[] = {"attention_map_previous.svg", "attention_map_class.svg",
                         "attention_map_coreference.svg", "attention_map_sink.svg"};
  bool ok = true;
  for (index_t h = 0; h < kHeads; ++h) {
    print_head(weights[static_cast<std::size_t>(h)], kHeadNames[static_cast<std::size_t>(h)]);
    ok &= write_svg(dir + "/" + files[h], weights, {h});
  }
  ok &= write_svg(dir + "/attention_map.svg", weights, {0, 1, 2, 3});
  if (!ok) return 1;
  std::printf("\nshades: '  ' < 0.05 <= ░ < 0.25 <= ▒ < 0.5 <= ▓ < 0.75 <= █\nwrote:\n");
  for (const char* f : files) std::printf("  %s/%s\n", dir.c_str(), f);
  std::printf("  %s/attention_map.svg (all heads)\n", dir.c_str());
  return 0;
}
