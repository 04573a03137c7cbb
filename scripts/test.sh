#!/usr/bin/env bash
# Builds attn's tests and runs them with ctest.
# Usage: bash scripts/test.sh [build-dir] [extra cmake args...]
#
# The tests are compiled with -Og: every test is a header-only instantiation
# of the engine, and g++ -O3 made the suite a 25-minute build on 2 cores
# (-Og: 7 minutes, and the tests run in 90 s instead of 45). The -O3 code is
# what scripts/main.sh builds (benchmarks, examples) and what CI builds again
# for the kernel and dense tests with g++ -O3 -march=native and clang++ -O3.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --if-missing
build=${1:-build/test}
shift || true
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-Og -DNDEBUG" \
  -DATTN_BUILD_BENCHMARKS=OFF -DATTN_BUILD_EXAMPLES=OFF "$@" >/dev/null
cmake --build "$build" -j"$(nproc)"
ctest --test-dir "$build" --output-on-failure -j"$(nproc)"
