// tools/bert.hpp — a BERT-style sentence encoder (all-MiniLM-L6-v2 and
// kin) on attn's layers: WordPiece tokenizer, embeddings, post-LayerNorm
// encoder layers whose attention is an attn::MultiHeadAttention loaded
// straight from the PyTorch checkpoint (WeightLayout::out_in), mean pooling
// and L2 normalisation, as sentence-transformers runs these models.
//
// The tokenizer is BERT's uncased one: clean (drop control characters,
// whitespace to spaces), lowercase, strip the accents of Latin-1 letters
// (é -> e; other scripts pass through unchanged, CJK characters are not
// split apart), split on whitespace and punctuation, then greedy
// longest-match WordPiece with "##" continuations, [UNK] for a word it
// cannot cover; [CLS] ... [SEP] around each sentence.
#pragma once

#include "safetensors.hpp"

#include <attn/attn.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace attn_tools {

// --------------------------------------------------------------- tokenizer --

class WordPiece {
 public:
  /// Reads vocab.txt (one token per line, id = line number).
  explicit WordPiece(const std::string& vocab_path, std::size_t max_len = 256) : max_len_(max_len) {
    std::ifstream f(vocab_path);
    if (!f) throw std::runtime_error("wordpiece: cannot open " + vocab_path);
    std::string line;
    for (std::int64_t id = 0; std::getline(f, line); ++id) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      vocab_.emplace(line, id);
    }
    cls_ = id_of("[CLS]");
    sep_ = id_of("[SEP]");
    unk_ = id_of("[UNK]");
  }

  /// Token ids of one sentence, [CLS] first and [SEP] last, at most max_len.
  std::vector<std::int64_t> encode(const std::string& text) const {
    std::vector<std::int64_t> ids{cls_};
    for (const std::string& word : basic_split(text)) {
      word_pieces(word, ids);
      if (ids.size() >= max_len_ - 1) break;
    }
    if (ids.size() > max_len_ - 1) ids.resize(max_len_ - 1);
    ids.push_back(sep_);
    return ids;
  }

 private:
  std::int64_t id_of(const std::string& t) const {
    const auto it = vocab_.find(t);
    if (it == vocab_.end()) throw std::runtime_error("wordpiece: vocabulary lacks " + t);
    return it->second;
  }

  static bool is_punct(char32_t c) {
    if ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) ||
        (c >= 123 && c <= 126))
      return true;
    return (c >= 0x2000 && c <= 0x206F) || (c >= 0xA1 && c <= 0xBF) || c == 0xD7 || c == 0xF7;
  }

  /// Latin-1 letter without its accent, lowercased (0 if c is not one).
  static char32_t fold_latin1(char32_t c) {
    static const char* const map =
        "aaaaaaaceeeeiiiidnooooo*ouuuuyts"   // U+00C0 .. U+00DF
        "aaaaaaaceeeeiiiidnooooo/ouuuuyty";  // U+00E0 .. U+00FF
    if (c < 0xC0 || c > 0xFF) return 0;
    const char r = map[c - 0xC0];
    return (r == '*' || r == '/' || r == 't' || r == 's') ? 0 : static_cast<char32_t>(r);
  }

  /// UTF-8 to code points (invalid bytes become U+FFFD).
  static std::u32string decode(const std::string& s) {
    std::u32string out;
    for (std::size_t i = 0; i < s.size();) {
      const auto b = static_cast<unsigned char>(s[i]);
      int n = b < 0x80 ? 0 : (b >> 5) == 6 ? 1 : (b >> 4) == 14 ? 2 : (b >> 3) == 30 ? 3 : -1;
      if (n < 0 || i + static_cast<std::size_t>(n) >= s.size()) {
        out.push_back(0xFFFD);
        ++i;
        continue;
      }
      char32_t c = n == 0 ? b : (b & (0x3F >> n));
      for (int k = 1; k <= n; ++k) c = (c << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
      out.push_back(c);
      i += static_cast<std::size_t>(n) + 1;
    }
    return out;
  }
  static void encode_utf8(char32_t c, std::string& out) {
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
    } else if (c < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (c >> 6)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else if (c < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (c >> 12)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (c >> 18)));
      out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }

  /// Clean, lowercase, fold accents, split on whitespace and punctuation.
  static std::vector<std::string> basic_split(const std::string& text) {
    std::vector<std::string> words;
    std::string cur;
    auto flush = [&] {
      if (!cur.empty()) words.push_back(cur);
      cur.clear();
    };
    for (char32_t c : decode(text)) {
      if (c == 0 || c == 0xFFFD || (c < 32 && c != '\t' && c != '\n' && c != '\r')) continue;
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0xA0) {
        flush();
        continue;
      }
      if (c >= 'A' && c <= 'Z') c = c - 'A' + 'a';
      if (const char32_t f = fold_latin1(c)) c = f;
      if (c >= 0x300 && c <= 0x36F) continue;  // combining accents
      if (is_punct(c)) {
        flush();
        encode_utf8(c, cur);
        flush();
        continue;
      }
      encode_utf8(c, cur);
    }
    flush();
    return words;
  }

  /// Greedy longest-match pieces of one word; [UNK] if some part has none.
  void word_pieces(const std::string& word, std::vector<std::int64_t>& ids) const {
    if (word.size() > 100) {
      ids.push_back(unk_);
      return;
    }
    std::vector<std::int64_t> pieces;
    std::size_t start = 0;
    while (start < word.size()) {
      std::size_t end = word.size();
      std::int64_t found = -1;
      while (end > start) {
        const std::string sub = (start > 0 ? "##" : "") + word.substr(start, end - start);
        const auto it = vocab_.find(sub);
        if (it != vocab_.end()) {
          found = it->second;
          break;
        }
        --end;
        while (end > start && (static_cast<unsigned char>(word[end]) & 0xC0) == 0x80) --end;
      }
      if (found < 0) {
        ids.push_back(unk_);
        return;
      }
      pieces.push_back(found);
      start = end;
    }
    ids.insert(ids.end(), pieces.begin(), pieces.end());
  }

  std::unordered_map<std::string, std::int64_t> vocab_;
  std::int64_t cls_ = 0, sep_ = 0, unk_ = 0;
  std::size_t max_len_;
};

// ----------------------------------------------------------------- encoder --

/// A BERT encoder from a Hugging Face checkpoint (BertModel tensor names,
/// with or without a "bert." prefix).
class BertEncoder {
 public:
  BertEncoder(const std::string& safetensors_path, int heads, float ln_eps = 1e-12f)
      : ln_eps_(ln_eps) {
    const SafeTensors st(safetensors_path);
    const std::string pre = st.contains("bert.embeddings.word_embeddings.weight") ? "bert." : "";
    auto get = [&](const std::string& n) { return st.get(pre + n); };
    word_ = get("embeddings.word_embeddings.weight");
    pos_ = get("embeddings.position_embeddings.weight");
    type_ = get("embeddings.token_type_embeddings.weight");
    emb_ln_w_ = get("embeddings.LayerNorm.weight");
    emb_ln_b_ = get("embeddings.LayerNorm.bias");
    d_ = word_.dim(1);
    attn::MultiHeadConfig cfg;
    cfg.d_model = d_;
    cfg.q_heads = heads;
    for (int l = 0;
         st.contains(pre + "encoder.layer." + std::to_string(l) + ".attention.self.query.weight");
         ++l) {
      const std::string p = "encoder.layer." + std::to_string(l) + ".";
      Layer layer(cfg);
      // The attention block in a few lines: PyTorch nn.Linear weights are [out, in].
      const auto out_in = attn::WeightLayout::out_in;
      const Tensor wq = get(p + "attention.self.query.weight"),
                   wk = get(p + "attention.self.key.weight"),
                   wv = get(p + "attention.self.value.weight"),
                   wo = get(p + "attention.output.dense.weight");
      layer.attn.set_wq(wq.data.data(), wq.dim(0), wq.dim(1), out_in);
      layer.attn.set_wk(wk.data.data(), wk.dim(0), wk.dim(1), out_in);
      layer.attn.set_wv(wv.data.data(), wv.dim(0), wv.dim(1), out_in);
      layer.attn.set_wo(wo.data.data(), wo.dim(0), wo.dim(1), out_in);
      layer.attn.set_bq(get(p + "attention.self.query.bias").data.data(), d_);
      layer.attn.set_bk(get(p + "attention.self.key.bias").data.data(), d_);
      layer.attn.set_bv(get(p + "attention.self.value.bias").data.data(), d_);
      layer.attn.set_bo(get(p + "attention.output.dense.bias").data.data(), d_);
      layer.ln1_w = get(p + "attention.output.LayerNorm.weight");
      layer.ln1_b = get(p + "attention.output.LayerNorm.bias");
      layer.ffn1_w = get(p + "intermediate.dense.weight");  // [ff, d]
      layer.ffn1_b = get(p + "intermediate.dense.bias");
      layer.ffn2_w = get(p + "output.dense.weight");  // [d, ff]
      layer.ffn2_b = get(p + "output.dense.bias");
      layer.ln2_w = get(p + "output.LayerNorm.weight");
      layer.ln2_b = get(p + "output.LayerNorm.bias");
      layers_.push_back(std::move(layer));  // layers are nothrow-movable
    }
    if (layers_.empty()) throw std::runtime_error("bert: no encoder layers in " + safetensors_path);
  }

  std::int64_t width() const { return d_; }
  std::size_t num_layers() const { return layers_.size(); }

  /// Mean-pooled, L2-normalised embeddings [sentences][d] of token id lists.
  /// The sentences are packed back to back (no padding rows): attention runs
  /// per sentence through forward_varlen, the feed-forward blocks over all
  /// packed rows at once.
  std::vector<std::vector<float>> embed(const std::vector<std::vector<std::int64_t>>& ids,
                                        int num_threads = 0) {
    std::vector<attn::index_t> cu{0};
    for (const auto& s : ids) {
      const auto n = static_cast<attn::index_t>(s.size());
      if (n > pos_.dim(0))
        throw std::runtime_error("bert: a sentence is longer than the positions");
      cu.push_back(cu.back() + n);
    }
    const attn::index_t d = d_, rows = cu.back();
    std::vector<float> x(static_cast<std::size_t>(rows * d), 0.f), a(x.size()),
        h(static_cast<std::size_t>(rows * layers_[0].ffn1_w.dim(0)));
    for (std::size_t s = 0; s < ids.size(); ++s)
      for (std::size_t t = 0; t < ids[s].size(); ++t) {
        const std::int64_t id = ids[s][t];
        if (id < 0 || id >= word_.dim(0)) throw std::runtime_error("bert: token id out of range");
        float* xr = &x[static_cast<std::size_t>((cu[s] + static_cast<attn::index_t>(t)) * d)];
        for (attn::index_t c = 0; c < d; ++c)
          xr[c] = word_.data[static_cast<std::size_t>(id * d + c)] +
                  pos_.data[static_cast<std::size_t>(static_cast<attn::index_t>(t) * d + c)] +
                  type_.data[static_cast<std::size_t>(c)];
      }
    layer_norm(x.data(), rows, emb_ln_w_, emb_ln_b_);
    attn::AttentionOptions opt;
    opt.num_threads = num_threads;
    const auto view2 = [&](std::vector<float>& v) {
      return attn::TensorView<float, 2>(v.data(), {rows, d});
    };
    const auto view3 = [&](std::vector<float>& v, attn::index_t width) {
      return attn::TensorView<float, 3>(v.data(), {1, rows, width});
    };
    for (Layer& layer : layers_) {
      layer.attn.forward_varlen(view2(x), cu, view2(a), attn::no_mask(), opt);  // a = MHA(x)
      add_norm(x, a, rows, layer.ln1_w, layer.ln1_b);
      const attn::index_t ff = layer.ffn1_w.dim(0);
      linear(view3(x, d), layer.ffn1_w, layer.ffn1_b, view3(h, ff), num_threads);    // [rows, ff]
      for (float& v : h) v = 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));  // GELU (erf)
      linear(view3(h, ff), layer.ffn2_w, layer.ffn2_b, view3(a, d), num_threads);
      add_norm(x, a, rows, layer.ln2_w, layer.ln2_b);
    }
    std::vector<std::vector<float>> out(ids.size(),
                                        std::vector<float>(static_cast<std::size_t>(d)));
    for (std::size_t s = 0; s < ids.size(); ++s) {
      std::vector<double> acc(static_cast<std::size_t>(d), 0.0);
      for (attn::index_t r = cu[s]; r < cu[s + 1]; ++r)
        for (attn::index_t c = 0; c < d; ++c)
          acc[static_cast<std::size_t>(c)] += x[static_cast<std::size_t>(r * d + c)];
      const double n = std::max<double>(1.0, double(cu[s + 1] - cu[s]));
      double norm = 0;
      for (double& v : acc) {
        v /= n;
        norm += v * v;
      }
      norm = std::max(std::sqrt(norm), 1e-12);
      for (attn::index_t c = 0; c < d; ++c)
        out[s][static_cast<std::size_t>(c)] =
            static_cast<float>(acc[static_cast<std::size_t>(c)] / norm);
    }
    return out;
  }

 private:
  struct Layer {
    explicit Layer(const attn::MultiHeadConfig& c) : attn(c) {}
    attn::MultiHeadAttention<float> attn;
    Tensor ln1_w, ln1_b, ffn1_w, ffn1_b, ffn2_w, ffn2_b, ln2_w, ln2_b;
  };

  static void linear(attn::TensorView<float, 3> x, const Tensor& w, const Tensor& b,
                     attn::TensorView<float, 3> y, int num_threads) {
    attn::linear<float>(x, attn::TensorView<const float, 2>(w.data.data(), {w.dim(0), w.dim(1)}),
                        attn::WeightLayout::out_in,
                        attn::TensorView<const float, 1>(b.data.data(), {b.dim(0)}), y,
                        num_threads);
  }
  void layer_norm(float* x, attn::index_t rows, const Tensor& w, const Tensor& b) const {
    for (attn::index_t r = 0; r < rows; ++r) {
      float* xr = x + r * d_;
      double mean = 0, var = 0;
      for (attn::index_t c = 0; c < d_; ++c) mean += xr[c];
      mean /= double(d_);
      for (attn::index_t c = 0; c < d_; ++c) var += (xr[c] - mean) * (xr[c] - mean);
      const double inv = 1.0 / std::sqrt(var / double(d_) + ln_eps_);
      for (attn::index_t c = 0; c < d_; ++c)
        xr[c] = static_cast<float>((xr[c] - mean) * inv) * w.data[c] + b.data[c];
    }
  }
  /// x = LayerNorm(x + a)
  void add_norm(std::vector<float>& x, const std::vector<float>& a, attn::index_t rows,
                const Tensor& w, const Tensor& b) const {
    for (std::size_t i = 0; i < static_cast<std::size_t>(rows * d_); ++i) x[i] += a[i];
    layer_norm(x.data(), rows, w, b);
  }

  Tensor word_, pos_, type_, emb_ln_w_, emb_ln_b_;
  std::vector<Layer> layers_;
  std::int64_t d_ = 0;
  float ln_eps_;
};

/// Cosine similarity of two embeddings.
inline double cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    ab += double(a[i]) * b[i];
    aa += double(a[i]) * a[i];
    bb += double(b[i]) * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

}  // namespace attn_tools
