#!/usr/bin/env bash
# The demo-scale reproduction of docs/reproduction.md: Tables 1a, 1b, 1c, 1d, 3 and the depth-50
# rows of 1e mapped onto the demo (deepforest tree crowns, MobileNetV2-FPN P2-P6), one base config
# (tools/configs/demo_reproduction.yaml) and one schedule (ITERS) for every row, 1 thread per run.
#
#   bash tools/reproduce_demo.sh [OUTPUT_ROOT]      (default output/repro)
#   JOBS=2 bash tools/reproduce_demo.sh             (two workers at once, 1 thread each)
#   bash tools/reproduce_demo.sh --collect [ROOT]   (only rewrite the tables, claims and Fig 2)
#
# The runs form one queue in priority order (below): first seed 0 of every row that decides one
# of the paper's claims, then their seeds 1 and 2, then the rest of each table, so that a budget cut
# short still gives the claims with their seed spread. Each worker takes the next run from the
# queue. Everything is resumable: tools/run_table.py skips finished runs (and reuses a finished run
# of another table with the same merged config), so rerunning this script only runs what is
# missing. "@best <table> <substring>" runs the best row (highest mean AP so far) among that
# table's rows whose name contains the substring: the best OHEM, the best FL* and the best CE get
# 3 seeds (asked again after each table's one-seed rows, in case one of them became the best).
# FL gamma 2 and FL* gamma 4 / beta 0, whose 3-seed ranges overlapped, get seeds 3 and 4.
set -euo pipefail
cd "$(dirname "$0")/.."
COLLECT_ONLY=0
if [ "${1:-}" = "--collect" ]; then COLLECT_ONLY=1; shift; fi
ROOT=${1:-output/repro}
PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-1}
ITERS=${ITERS:-800}  # chosen on the holdout split: docs/reproduction.md "Schedule"
CONFIG=tools/configs/demo_reproduction.yaml
# Seeds the tables collect: 0-2 on the claim rows, 3-4 where FL and FL* (gamma 4) overlapped.
SEEDS=${SEEDS:-0 1 2 3 4}
QUEUE="
3 0 fl_gamma2.0
3 0 ce_alpha0.75
1a 0 alpha0.25
1a 0 alpha0.10
3 0 flstar_gamma4.0
1d 0 ohem_b128_nms0.7
1d 0 ohem13_b128
3 0 flstar_gamma2.0
3 1 fl_gamma2.0
3 1 ce_alpha0.75
1a 1 alpha0.25
3 2 fl_gamma2.0
3 2 ce_alpha0.75
1a 2 alpha0.25
1c 0 1sc_1ar
1c 0 2sc_3ar
1c 0 1sc_3ar
1c 0 3sc_1ar
1c 0 2sc_1ar
1c 0 4sc_3ar
1d 0 ohem_b512_nms0.7
1d 0 ohem_b128_nms0.5
1d 0 ohem13_b512
1d 0 ohem_b256_nms0.7
1b 0 gamma1.0
1b 0 gamma5.0
@best 1d ohem 1
@best 1d ohem 2
@best 3 flstar 1
@best 3 flstar 2
1b 1 gamma1.0
1b 1 gamma5.0
1b 2 gamma1.0
1b 2 gamma5.0
1e 0 R_50_FPN_500
1e 0 R_50_FPN_400
1a 0 alpha0.50
1b 0 gamma0.5_
1a 0 alpha0.90
1a 0 alpha0.99
1a 0 alpha0.999
@best 1a alpha 1
@best 1a alpha 2
1d 0 ohem_b256_nms0.5
1d 0 ohem_b512_nms0.5
1d 0 ohem13_b256
@best 1d ohem 1
@best 1d ohem 2
3 3 fl_gamma2.0
3 3 flstar_gamma4.0
3 4 fl_gamma2.0
3 4 flstar_gamma4.0
1b 0 gamma0.1_
1b 0 gamma0.2_
1b 0 gamma0.0_
1e 0 R_50_FPN_700
1e 0 R_50_FPN_800
1a 1 alpha0.10
1a 2 alpha0.10
"
table_args() {  # the arguments every run_table.py call of this reproduction shares
  echo --table "$1" --scale demo --demo-config "$CONFIG" --iters "$ITERS" --output-root "$ROOT"
}
collect_table() {
  OMP_NUM_THREADS=1 $PY tools/run_table.py $(table_args "$1") --seeds $SEEDS --collect-only \
    --markdown "$ROOT/table$1.md" > /dev/null
}
best_row() {  # best_row <table> <substring>: the config stem of the best finished row
  collect_table "$1"
  $PY - "$ROOT/demo/table$1.json" "$2" <<'PY'
import json, os, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"]
        if sys.argv[2] in os.path.basename(r["config"]) and r["ours_mean"]["AP"] is not None]
if not rows:
    sys.exit("no finished row of this table contains %r" % sys.argv[2])
print(os.path.splitext(os.path.basename(max(rows, key=lambda r: r["ours_mean"]["AP"])["config"]))[0])
PY
}
run() {  # run <table> <seed> <row substring>
  # Timing jobs (flock -x /tmp/focal_bench.lock) go first; the runs hold the lock shared.
  while pgrep -f "flock -x /tmp/focal_bench.lock" > /dev/null; do sleep 10; done
  OMP_NUM_THREADS=1 flock -s /tmp/focal_bench.lock $PY tools/run_table.py $(table_args "$1") \
    --seeds "$2" --threads 1 --rows "$3"
}
worker() {  # take the next run off the queue until it is empty
  local item table seed row
  while true; do
    item=$(flock "$ROOT.queue.lock" bash -c 'head -n 1 "$0"; sed -i 1d "$0"' "$ROOT.queue")
    [ -n "$item" ] || break
    echo "[reproduce_demo] $(date -u +%FT%TZ) $item"
    if [[ $item == @best* ]]; then
      read -r _ table row seed <<< "$item"
      row=$(flock 9; best_row "$table" "$row") 9> "$ROOT.best.lock" || continue
    else
      read -r table seed row <<< "$item"
    fi
    run "$table" "$seed" "$row" || echo "[reproduce_demo] failed: $item"
  done
}
collect() {
  for t in 1a 1b 1c 1d 1e 3; do collect_table "$t"; done
  $PY tools/paper_claims.py --root "$ROOT/demo" --markdown "$ROOT/claims.md"
}
mkdir -p "$ROOT"
if [ "$COLLECT_ONLY" = 0 ]; then
  # Build (or reuse) the dataset once, before the workers: train_net.py checks that a dataset's
  # files exist before it would build them.
  $PY -m focal_det.demo --dataset-only
  echo "$QUEUE" | sed '/^$/d' > "$ROOT.queue"
  for j in $(seq 1 "$JOBS"); do worker > "$ROOT.worker$j.log" 2>&1 & done
  wait
fi
collect
# Our Figure 2: inference time of the Table 1e models (each at its own input size) vs their AP.
# One point is not a curve: it needs at least two finished 1e rows.
if [ -f "$ROOT/demo/table1e.json" ] && [ "$($PY -c 'import json, sys
print(sum(r["ours_mean"]["AP"] is not None for r in json.load(open(sys.argv[1]))["rows"]))' \
    "$ROOT/demo/table1e.json")" -ge 2 ]; then
  flock /tmp/focal_bench.lock $PY benchmarks/speed_accuracy.py \
    --from-table "$ROOT/demo/table1e.json" --threads 1 --rounds 5 \
    --series "ours: MobileNetV2-FPN P2-P6 demo, CPU 1 thread" || echo "Figure 2: failed"
else
  echo "Figure 2: fewer than two finished Table 1e rows, not drawn"
fi
