#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine and runs the main job:
# installs the packages, builds (Release, -march=native), runs the benchmark
# suite (JSON results under build/main/results/) and the quickstart example.
# Usage: bash scripts/main.sh [--full]   (--full: more repetitions, longer sweeps)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --if-missing
build=build/main
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DATTN_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" -j"$(nproc)"
mkdir -p "$build/results"
reps=1
[[ "${1:-}" == "--full" ]] && reps=3
for exe in "$build"/bench/bench_*; do
  name=$(basename "$exe")
  echo "== $name"
  "$exe" --benchmark_repetitions=$reps --benchmark_out="$build/results/$name.json" \
         --benchmark_out_format=json
done
echo "== plots and summary table"
/usr/bin/python3 scripts/plot_bench.py "$build"/results/*.json --out-dir "$build/results" \
  --table "$build/results/summary.md"
echo "== examples/quickstart"
"$build"/examples/quickstart
echo "results: $build/results/"
