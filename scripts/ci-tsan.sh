#!/usr/bin/env bash
# Builds the test suite with ThreadSanitizer in its own build directory and
# runs it. See docs/reliability.md for why the OpenMP runtime matters:
#
#   - clang++ with LLVM's libomp and the Archer OMPT tool (libarcher.so):
#     TSan sees OpenMP's barriers and task hand-off, so the engine's OpenMP
#     regions are checked too. This is the default when libarcher.so exists.
#   - otherwise (g++ and libgomp, which is not TSan-instrumented, so its
#     barriers are invisible and every parallel region reports false races):
#     OpenMP is disabled for this build, the engine runs its serial path, and
#     tests/test_concurrency.cpp's std::threads are what TSan checks.
#
#   scripts/ci-tsan.sh [cmake args...]   (TSAN_OPENMP=off forces the second mode)
#
# TSAN_TARGETS="test_a test_b ..." builds and runs only those test binaries
# (CI passes the ones whose code runs on several threads); default: all.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build-tsan}
cxx=${TSAN_CXX:-clang++}
archer=${ARCHER:-$(ls /usr/lib/llvm-*/lib/libarcher.so 2>/dev/null | sort -V | tail -1 || true)}

cmake_args=(-DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DATTN_SANITIZE=thread
            -DATTN_BUILD_BENCHMARKS=OFF -DATTN_BUILD_EXAMPLES=OFF)
if [[ "${TSAN_OPENMP:-on}" == off || -z "$archer" || "$cxx" != clang* ]]; then
  echo "ci-tsan: OpenMP disabled (no Archer-capable OpenMP runtime); std::thread tests only"
  cmake_args+=(-DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON)
  archer=""
else
  echo "ci-tsan: OpenMP via libomp, TSan annotations from $archer"
fi

names=()
[[ -n "${TSAN_TARGETS:-}" ]] && read -r -a names <<<"$TSAN_TARGETS"
# Only the named tests are defined (ATTN_TESTS), so one build compiles them in parallel.
[[ ${#names[@]} -gt 0 ]] && cmake_args+=(-DATTN_TESTS="$(IFS=';'; echo "${names[*]}")")
cmake -S "$root" -B "$build" "${cmake_args[@]}" "$@"
cmake --build "$build" -j"${JOBS:-2}"

export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1 second_deadlock_stack=1}${archer:+ ignore_noninstrumented_modules=1}"
if [[ -n "$archer" ]]; then
  export OMP_TOOL_LIBRARIES="$archer"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
fi
if [[ ${#names[@]} -eq 0 ]]; then
  ctest --test-dir "$build" --output-on-failure -j"${JOBS:-2}"
else
  for name in "${names[@]}"; do
    echo "ci-tsan: $name"
    "$build/tests/$name" --gtest_brief=1
  done
fi
