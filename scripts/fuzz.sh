#!/usr/bin/env bash
# Fuzzes every target of tests/fuzz (RELIABILITY F2-F4) for <seconds> each (default 60) under libFuzzer with
# AddressSanitizer + UndefinedBehaviorSanitizer, and fails on any crash, oracle failure, timeout (> 1 s per
# input) or out-of-memory (> 2048 MB).
#
#   scripts/fuzz.sh [seconds]
#
# Needs clang with libFuzzer (Debian: clang, libclang-rt-14-dev; scripts/install_deps.sh lists them); installs
# nothing itself. Steps: configure build/fuzz from tests/fuzz alone (CC=clang CXX=clang++ -DMOE_FUZZ=ON: the
# library and the fuzz targets, no other test, benchmark or example), build, replay the committed corpus
# (ctest), then run the targets side by side, each with one in-process worker, at most one per core
# (MOE_FUZZ_PARALLEL), each on a fresh corpus directory in the build tree; the committed seeds in
# tests/fuzz/corpus/<target> are read, never written. A crashing input is saved as
# build/fuzz/artifacts/<target>/crash-<sha1> (replay it: build/fuzz/<target> <file>).
# Environment: MOE_FUZZ_BUILD_DIR (default build/fuzz), MOE_FUZZ_JOBS (build jobs, default 2),
# MOE_FUZZ_PARALLEL (targets run at once, default nproc).
set -euo pipefail

seconds=${1:-60}
[[ $seconds =~ ^[0-9]+$ ]] || { echo "usage: $0 [seconds]" >&2; exit 2; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${MOE_FUZZ_BUILD_DIR:-$root/build/fuzz}
jobs=${MOE_FUZZ_JOBS:-2}
targets=(fuzz_router fuzz_dispatch fuzz_simd_diff fuzz_safetensors)

for tool in clang clang++ cmake; do
  command -v "$tool" >/dev/null || { echo "fuzz.sh: $tool not found (scripts/install_deps.sh installs it)" >&2; exit 1; }
done

start=$SECONDS
echo "== configure $build (clang, MOE_FUZZ=ON)"
CC=clang CXX=clang++ cmake -S "$root/tests/fuzz" -B "$build" -DMOE_FUZZ=ON >/dev/null
echo "== build"
cmake --build "$build" -j "$jobs" --target "${targets[@]}"
echo "== replay the committed corpus"
OMP_NUM_THREADS=1 ctest --test-dir "$build" --output-on-failure -R '^fuzz_'
echo "== built and replayed in $((SECONDS - start)) s"

# The targets run side by side, one in-process worker each, at most $parallel at once (default: one per core),
# so 4 targets on 2 cores take 2 × <seconds>.
parallel=${MOE_FUZZ_PARALLEL:-$(nproc)}
fuzz_one() {  # fuzz_one <target>: exit status of the run; output in $build/<target>.log
  local t=$1
  mkdir -p "$build/corpus/$t" "$build/artifacts/$t"
  OMP_NUM_THREADS=1 "$build/$t" "$build/corpus/$t" "$root/tests/fuzz/corpus/$t" \
    -max_total_time="$seconds" -timeout=1 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$build/artifacts/$t/" >"$build/$t.log" 2>&1
}
echo "== ${#targets[@]} targets, ${seconds} s each, $parallel at once"
declare -A pid
for t in "${targets[@]}"; do
  while (($(jobs -rp | wc -l) >= parallel)); do wait -n || true; done
  fuzz_one "$t" &
  pid[$t]=$!
done
failed=()
for t in "${targets[@]}"; do
  status=0
  wait "${pid[$t]}" || status=$?
  log=$build/$t.log
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  [[ -n $executions ]] || executions=$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE.*/\1/p' "$log" | tail -n 1)
  printf '%-16s executions: %s (corpus %s files)\n' "$t" "${executions:-?}" "$(ls "$build/corpus/$t" | wc -l)"
  if ((status != 0)); then
    failed+=("$t")
    echo "!! $t failed (exit $status); the end of $log:"
    tail -n 40 "$log"
  fi
done

echo "== fuzz.sh $seconds: $((SECONDS - start)) s in all"
if ((${#failed[@]})); then
  echo "!! fuzz targets failed: ${failed[*]} (inputs in $build/artifacts/)" >&2
  exit 1
fi
