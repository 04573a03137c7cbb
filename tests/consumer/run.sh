#!/usr/bin/env bash
# Builds and runs tests/consumer both ways: against an installed attn
# (find_package) and with attn as a subdirectory. Usage: run.sh [work-dir]
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
work=$(realpath -m "${1:-build/consumer}")
rm -rf "$work" && mkdir -p "$work"
cmake -S "$src" -B "$work/attn" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$work/prefix" \
  -DATTN_BUILD_TESTS=OFF -DATTN_BUILD_BENCHMARKS=OFF -DATTN_BUILD_EXAMPLES=OFF >/dev/null
cmake --install "$work/attn" >/dev/null
test -f "$work/prefix/share/pkgconfig/attn.pc"
cmake -S "$src/tests/consumer" -B "$work/package" -DATTN_CONSUME=package -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/package" >/dev/null
"$work/package/consumer"
cmake -S "$src/tests/consumer" -B "$work/subdir" -DATTN_CONSUME=subdirectory -DATTN_SOURCE_DIR="$src" >/dev/null
cmake --build "$work/subdir" >/dev/null
"$work/subdir/consumer"
