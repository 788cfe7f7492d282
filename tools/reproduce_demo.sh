#!/usr/bin/env bash
# The demo-scale reproduction of docs/reproduction.md: Tables 1a, 1b and 3 mapped onto the demo
# (deepforest tree crowns, MobileNetV2-FPN), one schedule for every row, 1 thread, one run at a
# time. Runs are resumable (tools/run_table.py skips finished ones), so rerunning this script
# only runs what is missing and then rewrites the tables.
#
#   bash tools/reproduce_demo.sh [OUTPUT_ROOT]      (default output/repro)
#
# Rows run in order of how much they tell (the script can be stopped at any point): FL, the best
# CE, CE at a small alpha, FL*, second seeds, then the remaining gammas/alphas. On 2 shared cores
# one 800-iteration run takes 6-15 min: docs/reproduction.md says which rows were reached.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-output/repro}
PY=${PY:-.venv/bin/python}
CONFIG=tools/configs/demo_reproduction.yaml  # the demo config pinned + the CPU-budget changes
run() {  # run <table> <seeds> <row substrings...>
  local table=$1 seeds=$2; shift 2
  OMP_NUM_THREADS=1 $PY tools/run_table.py --table "$table" --scale demo --demo-config "$CONFIG" \
    --seeds $seeds --threads 1 --output-root "$ROOT" --rows "$@"
}
run 3 0 fl_gamma2.0
run 3 0 ce_alpha0.75
run 1a 0 alpha0.10
run 3 0 flstar_gamma2.0 flstar_gamma4.0
run 3 1 fl_gamma2.0 ce_alpha0.75
run 1b 0 gamma0.5_ gamma1.0 gamma5.0
run 1a 0 alpha0.25 alpha0.50 alpha0.90 alpha0.99 alpha0.999
run 1b 0 gamma0.1_ gamma0.2_ gamma0.0_
for t in 1a 1b 3; do
  OMP_NUM_THREADS=1 $PY tools/run_table.py --table "$t" --scale demo --demo-config "$CONFIG" \
    --seeds 0 1 --output-root "$ROOT" --collect-only --markdown "$ROOT/table$t.md"
done
