#!/usr/bin/env bash
# Issue 3's comparison: the same tiny Qwen3 recipe and token budget, trained with In-Place TTT and
# without, two seeds each, all four in parallel on one GPU; then held-out loss by position for each
# (static and in-place for the TTT models, static and the gradient objective for the others).
#   bash bench/ttt_vs_base.sh data/prepared runs/compare 800              # from scratch
#   FROM=runs/base/final bash bench/ttt_vs_base.sh data/prepared runs/cont 300   # continual training
# Training windows are document-aligned (the trainer's default): the fast weights restart at every
# document, as they do at inference. Results land in $RESULTS; summarise with
# `python bench/summarize_compare.py $RESULTS`. Settable: SEEDS, ETA, LR, WARMUP, SEQ_LEN, BATCH,
# GRAD_LR, GRAD_LR_SWEEP. The continual sweep with other targets and safeguards: continual_sweep.sh.
set -euo pipefail
DATA=${1:-data/prepared}; RUNS=${2:-runs/compare}; STEPS=${3:-800}; RESULTS=${RESULTS:-$RUNS/results}
PY=${PYTHON:-python3}
if [[ -n "${FROM:-}" ]]; then ORIGIN=(--from "$FROM"); LR=${LR:-1e-3}; else ORIGIN=(--from-scratch); LR=${LR:-2e-3}; fi
COMMON=(--data "$DATA" "${ORIGIN[@]}" --chunk-size 512 --seq-len "${SEQ_LEN:-8192}" --batch-size "${BATCH:-8}" --max-steps "$STEPS"
        --warmup-steps "${WARMUP:-100}" --lr "$LR" --log-every 25 --checkpoint-every 200 --eta "${ETA:-3.0}")
mkdir -p "$RUNS" "$RESULTS"
for seed in ${SEEDS:-0 1}; do
  $PY -m ttt_model.training.train fit "${COMMON[@]}" --out "$RUNS/ttt$seed" --ttt --ttt-layers 1 3 5 --seed $seed > "$RUNS/ttt$seed.log" 2>&1 &
  $PY -m ttt_model.training.train fit "${COMMON[@]}" --out "$RUNS/base$seed" --no-ttt --seed $seed > "$RUNS/base$seed.log" 2>&1 &
done
wait
EVAL=(--data "$DATA" --max-tokens 16384 --gradient-layers 1 3 5 --gradient-chunk 512 --max-delta-ratio 0.05)
evaluate() {  # run, out name, extra args
  $PY -m ttt_model.training.evaluate "${EVAL[@]}" --model "$RUNS/$1/final" --out "$RESULTS/$2" "${@:3}" \
      > "$RESULTS/$2.txt" 2>"$RUNS/eval_$2.log"
}
# Two waves: all evaluations at once do not fit in 80 GB.
for seed in ${SEEDS:-0 1}; do
  evaluate ttt$seed ttt$seed --modes static in_place &
  evaluate base$seed base$seed --modes static gradient --gradient-lr "${GRAD_LR:-0.3}" &
done
wait
for lr in ${GRAD_LR_SWEEP:-}; do
  for seed in ${SEEDS:-0 1}; do evaluate base$seed "base${seed}_lr$lr" --modes static gradient --gradient-lr "$lr" & done
done
wait
for seed in ${SEEDS:-0 1}; do
  for run in ttt$seed base$seed; do cp "$RUNS/$run/metrics.jsonl" "$RESULTS/$run.metrics.jsonl"; done
done
head -n 50 "$RESULTS"/*.txt
