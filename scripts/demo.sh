#!/usr/bin/env bash
# Builds the quickstart example and runs it: a Mixtral-style layer, one forward pass, the routing it chose,
# its speed, and a check against the double-precision reference.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install_deps.sh
echo "== building the quickstart (Release)"
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/release -j"$(nproc)" --target quickstart
echo "== running build/release/examples/quickstart $*"
build/release/examples/quickstart "$@"
