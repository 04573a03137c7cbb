#!/usr/bin/env bash
# Builds fuzz/fuzz_attention.cpp and fuzz/fuzz_layers.cpp with libFuzzer, ASan
# and UBSan, and runs each for a bounded time on a copy of its seed corpus
# (fuzz_layers: at most 60 s, FUZZ_LAYERS_SECONDS to change). Exits non-zero on a
# mismatch, a crash or a sanitizer report (the reproducer is left in
# $OUT_DIR as crash-*).
#
#   scripts/ci-fuzz.sh [seconds]      (default 60; FUZZ_JOBS workers, default 1)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
out_dir=${OUT_DIR:-$root/build-fuzz}
cxx=${FUZZ_CXX:-clang++}
eigen=${EIGEN_INCLUDE:-/usr/include/eigen3}
layers_seconds=${FUZZ_LAYERS_SECONDS:-$((seconds < 60 ? seconds : 60))}
mkdir -p "$out_dir/corpus" "$out_dir/corpus_layers"

# OpenMP only when the compiler finds it (clang's libomp), so the threaded
# path is fuzzed too; the target still checks 1 vs 2 threads without it.
omp=()
if echo 'int main(){}' | "$cxx" -x c++ -fopenmp - -o /dev/null 2>/dev/null; then omp=(-fopenmp); fi

"$cxx" -std=c++17 -g -O1 -fno-omit-frame-pointer \
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -Wall -Wextra -Wpedantic "${omp[@]}" \
  -I"$root/include" -I"$eigen" \
  "$root/fuzz/fuzz_attention.cpp" -o "$out_dir/fuzz_attention"
"$cxx" -std=c++17 -g -O1 -fno-omit-frame-pointer \
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -Wall -Wextra -Wpedantic "${omp[@]}" \
  -I"$root/include" -I"$eigen" \
  "$root/fuzz/fuzz_layers.cpp" -o "$out_dir/fuzz_layers"

# New inputs go to a scratch copy; the seeds in the repository stay as they are.
cp "$root"/fuzz/corpus/* "$out_dir/corpus/"
cp "$root"/fuzz/corpus_layers/* "$out_dir/corpus_layers/"
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
cd "$out_dir"
./fuzz_attention -max_total_time="$seconds" -max_len=512 -timeout=20 -rss_limit_mb=2048 \
  -print_final_stats=1 ${FUZZ_JOBS:+-jobs=$FUZZ_JOBS -workers=$FUZZ_JOBS} corpus
./fuzz_layers -max_total_time="$layers_seconds" -max_len=256 -timeout=20 -rss_limit_mb=2048 \
  -print_final_stats=1 ${FUZZ_JOBS:+-jobs=$FUZZ_JOBS -workers=$FUZZ_JOBS} corpus_layers
