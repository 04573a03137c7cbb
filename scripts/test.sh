#!/usr/bin/env bash
# Builds attn's tests (Release) and runs them with ctest.
# Usage: bash scripts/test.sh [build-dir] [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --if-missing
build=${1:-build/test}
shift || true
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DATTN_BUILD_BENCHMARKS=OFF -DATTN_BUILD_EXAMPLES=OFF "$@" >/dev/null
cmake --build "$build" -j"$(nproc)"
ctest --test-dir "$build" --output-on-failure -j"$(nproc)"
