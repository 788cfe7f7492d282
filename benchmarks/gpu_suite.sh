#!/usr/bin/env bash
# The performance comparisons of benchmarks/ at the paper's real scale, on ONE GPU, in < 5 min:
#
#   1. loss kernel (FL forward + backward) vs the memory-bandwidth bound, 2 and 8 images of
#      800x1333 (201,600 anchors each), K = 80, fp32 and bf16: ours vs fvcore vs torchvision
#   2. training iteration (forward + backward + SGD) and peak GPU memory, 800x1333, 2 images per
#      GPU, fp32 and AMP: ours (speed switches on) vs detectron2 vs torchvision; and 8 images
#      per GPU (ours vs detectron2; torchvision skipped to stay within the time budget)
#   3. inference ms/image at 600 and 800 px (batch 1), fp32 and AMP, next to the paper's
#      Table 1e R50 times (M40 GPU: 98 ms at 600, 153 ms at 800)
#
# Results: benchmarks/results/gpu_*.json and marked sections of docs/benchmarks.md.
#
# Usage:
#   bash benchmarks/gpu_suite.sh            # on a GPU machine (run from anywhere)
#   bash benchmarks/gpu_suite.sh --smoke    # tiny sizes, CPU if there is no GPU, writes only to
#                                           # $OUT_DIR (default: a temp dir); used by the tests
# Environment: PY (python, default .venv/bin/python), OUT_DIR, BUDGET_S (default 290).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
BUDGET_S=${BUDGET_S:-290}
START=$(date +%s)

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=cuda
else
  DEVICE=cpu
fi

if [ "$SMOKE" = 1 ]; then
  OUT_DIR=${OUT_DIR:-$(mktemp -d)}
  DOC=""
  JSON_DIR="$OUT_DIR"
  LOSS_ARGS=(--size 64x96 --batch 1 --num-classes 3 --dtypes float32 --warmup 0 --iters 1
             --threads 1)
  TRAIN_ARGS=(--train-size 64x96 --num-classes 3 --warmup 0 --iters 1 --rounds 1
              --variants ours_fast d2 --in-process --threads 1)
  INFER_SIZES=(64)
  BATCHES=(1)
  PRECISIONS=(fp32)
else
  if [ "$DEVICE" != cuda ]; then
    echo "gpu_suite.sh: no CUDA device here; use --smoke for the CPU fallback" >&2
    exit 2
  fi
  OUT_DIR=${OUT_DIR:-benchmarks/results}
  DOC=docs/benchmarks.md
  JSON_DIR="$OUT_DIR"
  LOSS_ARGS=(--size 800x1333 --batch 2 8 --num-classes 80 --dtypes float32 bfloat16
             --warmup 3 --iters 10)
  TRAIN_ARGS=(--train-size 800x1333 --num-classes 80 --warmup 3 --iters 8 --rounds 1
              --weights-cache "$OUT_DIR/.weights")
  INFER_SIZES=(600 800)
  BATCHES=(2 8)
  PRECISIONS=(fp32 amp)
fi
mkdir -p "$JSON_DIR"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
step() {  # step NAME CMD... : run with what is left of the budget, never past it
  local name=$1; shift
  local t; t=$(left)
  if [ "$t" -le 5 ]; then echo "gpu_suite.sh: out of time before $name" >&2; return 3; fi
  echo "== $name (device $DEVICE, ${t}s left)"
  timeout "$t" "$@"
}

if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader || true; fi

doc_args() {  # sets DOC_ARGS for the Markdown section named $1 (none in smoke mode)
  if [ -n "$DOC" ]; then DOC_ARGS=(--doc "$DOC" --doc-marker "$1"); else DOC_ARGS=(--doc ""); fi
}

# 1. loss kernel
doc_args gpu_loss_kernel
step loss_kernel "$PY" benchmarks/loss_kernel_bench.py --device "$DEVICE" "${LOSS_ARGS[@]}" \
  --json "$JSON_DIR/gpu_loss_kernel.json" "${DOC_ARGS[@]}"

# 2 + 3. train (and, at the first batch size, inference) per batch size and precision
for B in "${BATCHES[@]}"; do
  for P in "${PRECISIONS[@]}"; do
    AMP=(); [ "$P" = amp ] && AMP=(--amp)
    EXTRA=(--infer-sizes "${INFER_SIZES[@]}")
    if [ "$B" != "${BATCHES[0]}" ]; then
      EXTRA+=(--phases train --variants ours_fast d2)
    elif [ "$SMOKE" = 0 ]; then
      EXTRA+=(--variants ours_fast d2 torchvision)
    fi
    doc_args "gpu_model_b${B}_${P}"
    step "model b$B $P" "$PY" benchmarks/model_bench.py --device "$DEVICE" --batch "$B" \
      "${TRAIN_ARGS[@]}" "${AMP[@]}" "${EXTRA[@]}" --json "$JSON_DIR/gpu_model_b${B}_${P}.json" \
      --notes "Paper Table 1e (R50, Nvidia M40, inference): 98 ms/img at 600 px, 153 ms at 800." \
      "${DOC_ARGS[@]}"
  done
done
echo "gpu_suite.sh: done in $(( $(date +%s) - START )) s; results in $JSON_DIR"
