#!/usr/bin/env bash
# The demo-scale reproduction of docs/reproduction.md: Tables 1a, 1b, 1c, 1d, 3 and the depth-50
# rows of 1e mapped onto the demo (deepforest tree crowns, MobileNetV2-FPN P2-P6), one base config
# (tools/configs/demo_reproduction.yaml) and one schedule (ITERS) for every row, 1 thread per run.
# Runs are resumable (tools/run_table.py skips finished ones, and reuses a finished run of another
# table with the same merged config), so rerunning this script only runs what is missing, then
# rewrites the tables, the claims and our Figure 2.
#
#   bash tools/reproduce_demo.sh [OUTPUT_ROOT]      (default output/repro)
#   JOBS=2 bash tools/reproduce_demo.sh             (two queues at once, 1 thread each)
#
# Seeds: 3 on the rows that decide the paper's claims (CE alpha .10 / .25 / .75; FL gamma 1 / 2 / 5;
# FL*; the best OHEM), 1 elsewhere; FL gamma 0 once, as the check that it is CE alpha .75 bit for
# bit (its seeds are then CE alpha .75's). Each queue runs its claim rows first.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-output/repro}
PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-1}
ITERS=${ITERS:-800}  # chosen on the holdout split: docs/reproduction.md "Schedule"
CONFIG=tools/configs/demo_reproduction.yaml
run() {  # run <table> <seeds> <row substrings...>
  local table=$1 seeds=$2; shift 2
  # Timing jobs (flock -x /tmp/focal_bench.lock) go first; the runs hold the lock shared.
  while pgrep -f "flock -x /tmp/focal_bench.lock" > /dev/null; do sleep 10; done
  OMP_NUM_THREADS=1 flock -s /tmp/focal_bench.lock $PY tools/run_table.py --table "$table" --scale demo --demo-config "$CONFIG" \
    --iters "$ITERS" --seeds $seeds --threads 1 --output-root "$ROOT" --rows "$@"
}
queue_a() {
  run 3 "0 1 2" fl_gamma2.0          # FL gamma 2 = 1b gamma 2 = 1d FL = 1c 3 scales x 3 ratios
  run 1a "0 1 2" alpha0.25
  run 1b "0 1 2" gamma1.0
  run 3 "0 1 2" flstar_gamma2.0
  run 1a "0 1 2" alpha0.10            # the paper's collapse: 3 seeds to resolve it
  run 1a 0 alpha0.50 alpha0.90
  run 1d 0 ohem_b128_nms0.7 ohem_b256_nms0.7 ohem_b512_nms0.7 ohem13_b128 ohem13_b256
  run 1c 0 1sc_1ar 1sc_3ar 2sc_1ar
  run 1e 0 R_50_FPN_400 R_50_FPN_500
}
queue_b() {
  run 3 "0 1 2" ce_alpha0.75         # CE alpha .75 = 1a alpha .75
  run 1b "0 1 2" gamma5.0
  run 3 "0 1 2" flstar_gamma4.0
  run 1b 0 gamma0.0_                 # FL at gamma 0 is CE alpha .75 by the same code: a check
  run 1b 0 gamma0.1_ gamma0.2_ gamma0.5_
  run 1a 0 alpha0.99 alpha0.999
  run 1d 0 ohem_b128_nms0.5 ohem_b256_nms0.5 ohem_b512_nms0.5 ohem13_b512
  run 1c 0 2sc_3ar 3sc_1ar 4sc_3ar
  run 1e 0 R_50_FPN_700 R_50_FPN_800
}
collect() {
  for t in 1a 1b 1c 1d 1e 3; do
    OMP_NUM_THREADS=1 $PY tools/run_table.py --table "$t" --scale demo --demo-config "$CONFIG" \
      --iters "$ITERS" --seeds 0 1 2 --output-root "$ROOT" --collect-only \
      --markdown "$ROOT/table$t.md"
  done
}
# Build (or reuse) the dataset once, before the queues: train_net.py checks that a dataset's
# files exist before it would build them.
$PY -m focal_det.demo --dataset-only
if [ "$JOBS" -ge 2 ]; then
  mkdir -p "$ROOT"
  queue_a > "$ROOT.queue_a.log" 2>&1 &
  queue_b > "$ROOT.queue_b.log" 2>&1 &
  wait
else
  queue_a
  queue_b
fi
collect
# The best OHEM row (highest seed-0 AP) gets seeds 1 and 2 too.
BEST_OHEM=$($PY -c "
import json, sys
rows = json.load(open('$ROOT/demo/table1d.json'))['rows']
ohem = [r for r in rows if r['setting'].get('method', '').startswith('OHEM') and r['ours_mean']['AP'] is not None]
best = max(ohem, key=lambda r: r['ours_mean']['AP'])
print(best['config'].rsplit('/', 1)[1][len('retinanet_R_101_FPN_600_'):-len('.yaml')])
")
run 1d "0 1 2" "$BEST_OHEM"
collect
$PY tools/paper_claims.py --root "$ROOT/demo" --markdown "$ROOT/claims.md"
# Our Figure 2: inference time of the Table 1e models (each at its own input size) vs their AP.
flock /tmp/focal_bench.lock $PY benchmarks/speed_accuracy.py \
  --from-table "$ROOT/demo/table1e.json" --threads 1 --rounds 5 \
  --series "ours: MobileNetV2-FPN P2-P6 demo, CPU 1 thread"
