#!/usr/bin/env bash
# Checks that attn builds clean as C++20: configures the tests, benchmarks
# and examples with -std=c++20 and -Werror, for g++ and for clang++, builds
# them and runs the tests. attn itself requires only C++17; this guards the
# users who compile it in a C++20 project.
# Usage: bash scripts/check-cxx20.sh [BUILD_ROOT]   (default build/cxx20)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-build/cxx20}
jobs=$(nproc)
for cxx in g++ clang++; do
  if ! command -v "$cxx" >/dev/null; then
    echo "check-cxx20: $cxx not found, skipped" >&2
    continue
  fi
  dir=$root/$cxx
  echo "check-cxx20: $cxx -std=c++20 -Werror in $dir"
  CXX=$cxx cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_STANDARD=20 \
    -DCMAKE_CXX_STANDARD_REQUIRED=ON -DCMAKE_CXX_EXTENSIONS=OFF -DATTN_WERROR=ON >/dev/null
  cmake --build "$dir" -j"$jobs"
  ctest --test-dir "$dir" -j"$jobs" --output-on-failure
done
echo "check-cxx20: C++20 builds clean"
