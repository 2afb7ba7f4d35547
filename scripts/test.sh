#!/usr/bin/env bash
# Every test, in stages (RELIABILITY.md Z1/Z2); exit code non-zero on any failure.
#   1-2  Release, -march=native: everything (tests, examples as smoke tests, benchmarks built), ctest.
#   3-4  Release without -march (the portable SSE2 kernels): the tests only, ctest.
#   5-6  ASan + UBSan (+ float-cast-overflow, _GLIBCXX_ASSERTIONS, assert() on), -march=native, -O1 -g1: the
#        kernels that ship on this host; the tests only (the examples' smoke runs stay in stage 2), ctest.
#   Stages 3-6 leave out the fuzz corpus replays: stage 2 replays them natively, stage 9 under ASan + UBSan.
#   7-8  TSan (clang, LLVM's libomp): the concurrency tests only (ctest -L concurrency).
#   9    scripts/fuzz.sh 60: the libFuzzer targets of tests/fuzz (clang, ASan + UBSan), 60 s each, one per core.
# Build trees go to ${MOE_BUILD_PREFIX}<stage> (default build/release, build/portable, build/sanitize,
# build/tsan). Each stage prints its time, and a summary closes the run.
set -euo pipefail
cd "$(dirname "$0")/.."
# LLVM's OpenMP runtime for the TSan stage (install_deps.sh brings clang and its sanitizer runtimes).
moe_extra_packages=(libomp-14-dev)
source scripts/install_deps.sh
jobs=$(nproc)
prefix=${MOE_BUILD_PREFIX:-build/}
start=$SECONDS
# ctest runs $jobs test processes at once, each with an OpenMP team: threads that spin while they wait would
# take the cores from each other (10-50x slower small layers on a busy host). Results do not depend on it.
export OMP_WAIT_POLICY=passive
# Tests that do not depend on the compile flags: the Release stage runs them, the others skip them.
flag_independent='^(package_|compile_fail_|layering_|readme_snippet_in_sync$)'

stages=("configure + build (Release, -march=native)"
        "ctest (Release)"
        "configure + build (portable Release: no -march, tests only)"
        "ctest (portable)"
        "configure + build (ASan + UBSan, -march=native, tests only)"
        "ctest (ASan + UBSan)"
        "configure + build (TSan, clang + libomp: concurrency tests only)"
        "ctest -L concurrency (TSan)"
        "fuzz (libFuzzer, ASan + UBSan, 60 s per target)")
summary=()
current=0
stage() {  # stage <command...>: runs the next entry of `stages`, timed
  current=$((current + 1))
  local name=${stages[current - 1]} t0=$SECONDS
  echo "== [$current/${#stages[@]}] $name"
  "$@"
  summary+=("== [$current/${#stages[@]}] $name ... ($((SECONDS - t0)) s)")
  echo "${summary[-1]}"
}
finish() {
  local status=$? line
  echo "== summary"
  for line in "${summary[@]}"; do echo "$line"; done
  if ((status == 0)); then
    echo "== all tests passed in $((SECONDS - start)) s"
  elif ((current > 0)); then
    echo "== [$current/${#stages[@]}] ${stages[current - 1]} ... FAILED after $((SECONDS - start)) s in all"
  fi
}
trap finish EXIT

release=${prefix}release portable=${prefix}portable sanitize=${prefix}sanitize tsan=${prefix}tsan
build_release() {
  cmake -S . -B "$release" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$release" -j"$jobs"
}
build_portable() {
  cmake -S . -B "$portable" -DCMAKE_BUILD_TYPE=Release -DMOE_NATIVE=OFF -DMOE_BUILD_BENCH=OFF \
    -DMOE_BUILD_EXAMPLES=OFF -DMOE_BUILD_FUZZ_REPLAYS=OFF >/dev/null
  cmake --build "$portable" -j"$jobs"
}
# -O1 -g1 (line tables): the sanitizers' usual setting; compiles in about 0.6 of the time of -O2 -g, which
# was the longest stage. No NDEBUG: the kernels' assert()s run too.
build_sanitize() {
  cmake -S . -B "$sanitize" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" -DMOE_SANITIZE=ON \
    -DMOE_BUILD_BENCH=OFF -DMOE_BUILD_EXAMPLES=OFF -DMOE_BUILD_FUZZ_REPLAYS=OFF >/dev/null
  cmake --build "$sanitize" -j"$jobs"
}
# TSan does not see inside GCC's libgomp (uninstrumented, futex-based barriers): its reports there are noise.
# LLVM's libomp ships the Archer tool (libarcher.so, loaded automatically by a TSan-built program), which
# tells TSan about the runtime's barriers, locks and tasks; ignore_noninstrumented_modules=1 hides the
# runtime's own internals, as Archer asks. So the OpenMP teams inside the layer run under TSan too.
build_tsan() {
  CC=clang CXX=clang++ cmake -S . -B "$tsan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_SANITIZE_THREAD=ON \
    -DMOE_BUILD_BENCH=OFF -DMOE_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$tsan" -j"$jobs" --target concurrency_test
}

stage build_release
stage ctest --test-dir "$release" --output-on-failure -j"$jobs"
stage build_portable
stage ctest --test-dir "$portable" --output-on-failure -j"$jobs" -E "$flag_independent"
stage build_sanitize
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  stage ctest --test-dir "$sanitize" --output-on-failure -j"$jobs" -E "$flag_independent"
stage build_tsan
TSAN_OPTIONS=ignore_noninstrumented_modules=1 stage ctest --test-dir "$tsan" --output-on-failure -j"$jobs" -L concurrency
MOE_FUZZ_BUILD_DIR="$PWD/${prefix}fuzz" stage bash scripts/fuzz.sh 60
