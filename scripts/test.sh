#!/usr/bin/env bash
# Builds everything in Release and runs every test with ctest, then builds the tests again under
# AddressSanitizer + UndefinedBehaviorSanitizer (without -march=native: the portable SSE2 path) and runs
# them again. Exit code non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install_deps.sh
jobs=$(nproc)
start=$SECONDS
# ctest runs $jobs test processes at once, each with an OpenMP team: threads that spin while they wait would
# take the cores from each other (10-50x slower small layers on a busy host). Results do not depend on it.
export OMP_WAIT_POLICY=passive

echo "== [1/4] configure + build (Release, -march=native)"
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/release -j"$jobs"
echo "== [2/4] ctest (Release)"
ctest --test-dir build/release --output-on-failure -j"$jobs"

echo "== [3/4] configure + build (ASan + UBSan, portable flags)"
cmake -S . -B build/sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_SANITIZE=ON -DMOE_NATIVE=OFF \
  -DMOE_BUILD_BENCH=OFF >/dev/null
cmake --build build/sanitize -j"$jobs"
echo "== [4/4] ctest (ASan + UBSan)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build/sanitize --output-on-failure -j"$jobs"

echo "== all tests passed in $((SECONDS - start)) s"
