#!/usr/bin/env bash
# Installs the Debian 12 packages attn needs to build, test and benchmark.
# Usage: bash scripts/install-deps.sh [--if-missing]
set -euo pipefail
packages=(g++ clang libomp-dev libclang-rt-14-dev clang-format cmake make libeigen3-dev libgtest-dev googletest libbenchmark-dev
          python3 python3-matplotlib libopenmpi-dev openmpi-bin)
if [[ "${1:-}" == "--if-missing" ]] && dpkg -s "${packages[@]}" >/dev/null 2>&1; then
  exit 0
fi
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "attn: Debian packages installed"
