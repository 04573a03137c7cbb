#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine and runs the main job:
# installs the packages, builds (Release, -march=native), runs the benchmark
# suite (JSON results under build/main/results/) and the quickstart example.
# Usage: bash scripts/main.sh [--full] [--reps=R]
#   default: each binary's short run, 1 repetition (a few minutes on 2 cores)
#   --full:  every binary with --sweep (N = 256 ... 65536 where the path can run;
#            rows over the limits of bench/bench_support.hpp are skipped with a
#            note) and 3 repetitions (medians in the JSON); about 30 minutes
#   --reps=R: R repetitions instead (--full --reps=1: the sweep in about 10)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --if-missing
build=build/main
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DATTN_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" -j"$(nproc)"
mkdir -p "$build/results"
reps=1
sweep=()
reps_arg=
for arg in "$@"; do
  case "$arg" in
    --full) reps=3; sweep=(--sweep) ;;
    --reps=*) reps_arg=${arg#--reps=} ;;
    *) echo "main.sh: unknown argument $arg (use --full, --reps=R)" >&2; exit 2 ;;
  esac
done
[[ -n "$reps_arg" ]] && reps=$reps_arg
for exe in "$build"/bench/bench_*; do
  name=$(basename "$exe")
  echo "== $name"
  launch=()
  if [[ $name == bench_ring ]]; then  # MPI: two ranks of one thread, unbound (a shared machine)
    launch=(env OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
            mpirun -np 2 --oversubscribe --bind-to none)
  fi
  "${launch[@]}" "$exe" "${sweep[@]}" --benchmark_repetitions=$reps \
         --benchmark_out="$build/results/$name.json" --benchmark_out_format=json
done
echo "== plots and summary table"
/usr/bin/python3 scripts/plot_bench.py "$build"/results/*.json --out-dir "$build/results" \
  --table "$build/results/summary.md"
echo "== examples/quickstart"
"$build"/examples/quickstart
if [[ -x "$build"/examples/ring_attention ]]; then
  echo "== examples/ring_attention (4 MPI ranks)"
  OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    mpirun -np 4 --oversubscribe "$build"/examples/ring_attention
fi
echo "results: $build/results/"
