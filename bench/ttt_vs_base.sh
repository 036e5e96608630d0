#!/usr/bin/env bash
# Issue 3's comparison: the same tiny Qwen3 recipe and token budget, trained from scratch with
# In-Place TTT and without, two seeds each, all four in parallel on one GPU; then held-out loss
# by position for each (static, in-place, gradient objective). Results land in $RESULTS.
#   bash bench/ttt_vs_base.sh data/prepared runs/compare 800
set -euo pipefail
DATA=${1:-data/prepared}; RUNS=${2:-runs/compare}; STEPS=${3:-800}; RESULTS=${RESULTS:-$RUNS/results}
PY=${PYTHON:-python3}
COMMON=(--data "$DATA" --from-scratch --chunk-size 512 --seq-len 8192 --batch-size 8 --max-steps "$STEPS"
        --warmup-steps 100 --lr 2e-3 --log-every 25 --checkpoint-every 200)
mkdir -p "$RUNS" "$RESULTS"
for seed in 0 1; do
  $PY -m ttt_model.train fit "${COMMON[@]}" --out "$RUNS/ttt$seed" --ttt --ttt-layers 1 3 5 --seed $seed > "$RUNS/ttt$seed.log" 2>&1 &
  $PY -m ttt_model.train fit "${COMMON[@]}" --out "$RUNS/base$seed" --no-ttt --seed $seed > "$RUNS/base$seed.log" 2>&1 &
done
wait
EVAL=(--data "$DATA" --max-tokens 16384 --gradient-layers 1 3 5 --gradient-chunk 512 --max-delta-ratio 0.05)
evaluate() {  # run, out name, extra args
  $PY -m ttt_model.evaluate "${EVAL[@]}" --model "$RUNS/$1/final" --out "$RESULTS/$2" "${@:3}" \
      > "$RESULTS/$2.txt" 2>"$RUNS/eval_$2.log"
}
# Two waves: six 16k-token evaluations at once do not fit in 80 GB.
for run in ttt0 ttt1 base0; do evaluate $run $run --gradient-lr "${GRAD_LR:-0.1}" & done
wait
evaluate base1 base1 --gradient-lr "${GRAD_LR:-0.1}" &
for lr in ${GRAD_LR_SWEEP:-}; do evaluate base0 "base0_lr$lr" --modes static gradient --gradient-lr "$lr" & done
wait
for run in ttt0 ttt1 base0 base1; do cp "$RUNS/$run/metrics.jsonl" "$RESULTS/$run.metrics.jsonl"; done
head -n 50 "$RESULTS"/*.txt
