#!/usr/bin/env bash
# Builds every fuzz/fuzz_*.cpp with libFuzzer, ASan and UBSan, and runs each
# for a bounded time on a copy of its seed corpus (fuzz/corpus/ for
# fuzz_attention, fuzz/corpus_<name>/ for fuzz_<name>). Exits non-zero on a
# mismatch, a crash or a sanitizer report (the reproducer is left in
# $OUT_DIR as crash-*). Prints one summary line per target at the end.
#
#   scripts/ci-fuzz.sh [seconds] [target...]   (default 60 s each, every target;
#                                               FUZZ_JOBS workers, default 1;
#                                               FUZZ_WERROR=1: warnings are errors)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
shift || true
out_dir=${OUT_DIR:-$root/build-fuzz}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)  # absolute: the fuzzer runs from inside it
cxx=${FUZZ_CXX:-clang++}
eigen=${EIGEN_INCLUDE:-/usr/include/eigen3}

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  for src in "$root"/fuzz/fuzz_*.cpp; do targets+=("$(basename "$src" .cpp)"); done
  if ! command -v mpicxx >/dev/null; then
    echo "ci-fuzz: no MPI (mpicxx), fuzz_dist skipped"
    targets=("${targets[@]/fuzz_dist/}")
    read -ra targets <<<"${targets[*]}"
  fi
fi

# OpenMP only when the compiler finds it (clang's libomp), so the threaded
# path is fuzzed too; the targets still check 1 vs 2 threads without it.
omp=()
if echo 'int main(){}' | "$cxx" -x c++ -fopenmp - -o /dev/null 2>/dev/null; then omp=(-fopenmp); fi

export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
# Build every target first, FUZZ_BUILD_JOBS at a time (default: one per core),
# since compiling (about a minute each) costs more than a short run.
build_jobs=${FUZZ_BUILD_JOBS:-$(nproc)}
# fuzz_dist links MPI (a one-rank world); OpenMPI's allocations at startup are
# not leaks of attn, so its leak check is off.
mpi_compile=() mpi_link=()
if command -v mpicxx >/dev/null; then
  read -ra mpi_compile <<<"$(mpicxx --showme:compile)"
  read -ra mpi_link <<<"$(mpicxx --showme:link)"
fi
build() {
  local extra=()
  if [[ $1 == fuzz_dist ]]; then extra=("${mpi_compile[@]}" "${mpi_link[@]}"); fi
  "$cxx" -std=c++17 -g1 -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -Wall -Wextra -Wpedantic ${FUZZ_WERROR:+-Werror} "${omp[@]}" \
    -I"$root/include" -I"$eigen" \
    "$root/fuzz/$1.cpp" "${extra[@]}" -o "$out_dir/$1" 2>"$out_dir/$1.build.log" ||
    { cat "$out_dir/$1.build.log"; return 1; }
}
pids=()
for name in "${targets[@]}"; do
  while (($(jobs -rp | wc -l) >= build_jobs)); do wait -n; done
  build "$name" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

summary=()
for name in "${targets[@]}"; do
  # New inputs go to a scratch copy; the seeds in the repository stay as they are.
  seeds="$root/fuzz/corpus_${name#fuzz_}"
  [[ $name == fuzz_attention ]] && seeds="$root/fuzz/corpus"
  corpus="$out_dir/corpus_$name"
  mkdir -p "$corpus"
  if [[ -d $seeds ]]; then cp "$seeds"/* "$corpus/" 2>/dev/null || true; fi
  log="$out_dir/$name.log"
  leaks=${ASAN_OPTIONS}
  [[ $name == fuzz_dist ]] && leaks=detect_leaks=0
  (cd "$out_dir" && ASAN_OPTIONS=$leaks "./$name" -max_total_time="$seconds" -max_len=512 -timeout=20 \
    -rss_limit_mb=2048 -print_final_stats=1 ${FUZZ_JOBS:+-jobs=$FUZZ_JOBS -workers=$FUZZ_JOBS} \
    "$corpus") >"$log" 2>&1 || { tail -40 "$log"; exit 1; }
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
  summary+=("$name: $runs runs in ${seconds} s ($rate exec/s), $cov edges, corpus $(ls "$corpus" | wc -l)")
done
printf '%s\n' "${summary[@]}"
