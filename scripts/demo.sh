#!/usr/bin/env bash
# Builds the quickstart example and runs it (a Mixtral-style layer, one forward pass, the routing it chose, its
# speed, and a check against the double-precision reference), then one paper experiment in quick mode: D.1,
# global-batch vs micro-batch balance loss and the domain specialisation it allows, plotted to PNG.
set -euo pipefail
cd "$(dirname "$0")/.."
moe_extra_packages=(python3-matplotlib)
source scripts/install_deps.sh
echo "== building the quickstart and the D.1 experiment (Release)"
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/release -j"$(nproc)" --target quickstart global_batch_balance
echo "== running build/release/examples/quickstart $*"
build/release/examples/quickstart "$@"
out=build/demo/global_batch_balance
echo "== running build/release/examples/global_batch_balance --quick --out $out (docs/experiments.md, D.1)"
build/release/examples/global_batch_balance --quick --out "$out"
/usr/bin/python3 scripts/plot.py "$out"
echo "== plots in $out: global_batch_balance_expert_load_global.png against ..._micro.png shows the experts"
echo "   each domain uses under each loss; full runs and all experiments: docs/experiments.md"
