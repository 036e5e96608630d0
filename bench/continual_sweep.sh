#!/usr/bin/env bash
# Issue 3, continual setting: one no-TTT model pretrained once, then the same continual recipe
# without TTT and with In-Place TTT switched on in several variants (seed 0); the variant with the
# lowest held-out loss past 2k is then trained again, and the no-TTT arm too, with seed 1.
#   bash bench/continual_sweep.sh data/prepared runs/sweep
#   VARIANTS="0.5:1 3:10" TTT_TARGET=input_embeddings bash bench/continual_sweep.sh data/prepared runs/sweep
# A variant is eta:ttt_lr_scale[:decay[:max_delta_ratio]] ("-" for none); the safeguards are on
# while training and stay in the model's config. The continual windows (16k) cover the evaluated
# length (16k), so no bucket measures fast weights past the longest sequence they were trained on.
# BASE_RESULTS=DIR reuses base0/ and base1/ evaluations of the same pretrained model and recipe
# (the no-TTT arm is deterministic) instead of training them again. SEED0_ONLY=1 stops after seed 0.
# Summary: $RESULTS/summary.txt.
set -euo pipefail
DATA=${1:-data/prepared}; RUNS=${2:-runs/sweep}; RESULTS=${RESULTS:-$RUNS/results}
PY=${PYTHON:-python3}
VARIANTS=${VARIANTS:-0.5:1 0.05:1 0.005:1}; STEPS=${STEPS:-300}; PRETRAIN=${PRETRAIN:-$RUNS/pretrain/final}
mkdir -p "$RUNS" "$RESULTS"
if [[ ! -f "$PRETRAIN/config.json" ]]; then
  $PY -m ttt_model.training.train fit --data "$DATA" --from-scratch --no-ttt --seed 0 --max-steps "${PRETRAIN_STEPS:-1000}" \
      --warmup-steps 100 --lr 2e-3 --chunk-size 512 --out "$RUNS/pretrain" > "$RUNS/pretrain.log" 2>&1
  PRETRAIN=$RUNS/pretrain/final
fi
COMMON=(--data "$DATA" --from "$PRETRAIN" --chunk-size 512 --seq-len "${SEQ_LEN:-16384}" --batch-size "${BATCH:-4}"
        --max-steps "$STEPS" --warmup-steps "${WARMUP:-30}" --lr "${LR:-1e-3}" --log-every 25 --checkpoint-every 100000)
train() {  # name, extra args
  $PY -m ttt_model.training.train fit "${COMMON[@]}" --out "$RUNS/$1" "${@:2}" > "$RUNS/$1.log" 2>&1
}
evaluate() {  # name, modes
  $PY -m ttt_model.training.evaluate --data "$DATA" --max-tokens 16384 --model "$RUNS/$1/final" --out "$RESULTS/$1" \
      --modes "${@:2}" --gradient-chunk 512 --max-delta-ratio 0.05 ${EVAL_ARGS:-} > "$RESULTS/$1.txt" 2> "$RUNS/eval_$1.log"
}
field() { local f; IFS=: read -ra f <<< "$1"; local v=${f[$2]:--}; echo "$v"; }  # variant, index
name_of() {  # variant -> run name (without seed)
  local n="ttt_eta$(field "$1" 0)_lrs$(field "$1" 1)"
  [[ $(field "$1" 2) != - ]] && n+="_decay$(field "$1" 2)"
  [[ $(field "$1" 3) != - ]] && n+="_cap$(field "$1" 3)"
  echo "$n"
}
ttt_args() {  # variant
  echo --ttt --ttt-layers ${TTT_LAYERS:-1 3 5} --ttt-target "${TTT_TARGET:-hidden_states}" --eta "$(field "$1" 0)" \
       --ttt-lr-scale "$(field "$1" 1)"
  [[ $(field "$1" 2) != - ]] && echo --ttt-decay "$(field "$1" 2)"
  [[ $(field "$1" 3) != - ]] && echo --ttt-max-delta-ratio "$(field "$1" 3)"
  return 0
}
base_arm() {  # seed: train and evaluate the no-TTT arm, or take it from BASE_RESULTS
  if [[ -n "${BASE_RESULTS:-}" ]]; then
    cp -r "$BASE_RESULTS/base$1" "$RESULTS/base$1"; cp "$BASE_RESULTS/base$1.txt" "$RESULTS/"
  else
    train "base$1" --no-ttt --seed "$1" && evaluate "base$1" static
  fi
}

base_arm 0 &
for v in $VARIANTS; do (train "$(name_of "$v")_0" $(ttt_args "$v") --seed 0 && evaluate "$(name_of "$v")_0" static in_place) & done
wait
best=$($PY - "$RESULTS" $(for v in $VARIANTS; do name_of "$v"; done) <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
from summarize_compare import pooled
results, names = Path(sys.argv[1]), sys.argv[2:]
loss = {n: pooled(json.loads((results / f"{n}_0" / "eval.json").read_text()), "in_place") for n in names}
print(min(loss, key=loss.get))
EOF
)
echo "best variant on seed 0: $best"
if [[ -n "${SEED0_ONLY:-}" ]]; then cat "$RESULTS"/*.txt; exit 0; fi
for v in $VARIANTS; do [[ "$(name_of "$v")" == "$best" ]] && best_variant=$v; done
base_arm 1 &
(train "${best}_1" $(ttt_args "$best_variant") --seed 1 && evaluate "${best}_1" static in_place) &
wait
# summarize_compare pairs ttt<seed> with base<seed>.
mkdir -p "$RESULTS/best"
for s in 0 1; do
  ln -sfn "../base$s" "$RESULTS/best/base$s"
  ln -sfn "../${best}_$s" "$RESULTS/best/ttt$s"
done
{
  echo "seed 0 (in_place vs the model's own static weights in the last column):"
  for name in base0 $(for v in $VARIANTS; do echo "$(name_of "$v")_0"; done); do echo "== $name"; cat "$RESULTS/$name.txt"; done
  echo; echo "best: $best, two seeds, TTT in-place vs no-TTT static:"
  $PY bench/summarize_compare.py "$RESULTS/best"
} | tee "$RESULTS/summary.txt"
