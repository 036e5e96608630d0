#!/usr/bin/env bash
# The main job on the embedded default: local broker + MLflow + in-process Ray, the shipped
# model and corpus. Stops the local stack on exit or Ctrl-C.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
CONFIG="${CONFIG:-configs/local.yaml}"
CLI=(.venv/bin/ttt-stream)

stop_stack() { "${CLI[@]}" down -c "$CONFIG" || true; }
trap stop_stack EXIT
trap 'exit 130' INT TERM

# The shipped corpus: built once from Debian documentation packages (about 50 MB download).
[[ -f data/corpus/heldout.jsonl ]] || "${CLI[@]}" corpus --out data/corpus

"${CLI[@]}" up -c "$CONFIG"
"${CLI[@]}" demo -c "$CONFIG"
# The shipped model reads held-out documents: loss by position without TTT, with In-Place TTT,
# and with the gradient objective; the table and plot are logged to MLflow.
"${CLI[@]}" eval -c "$CONFIG" --model models/ttt-tiny-qwen3 --documents data/corpus/heldout.jsonl \
    --min-tokens 4096 --limit 6 --max-tokens 4096 --out runs/demo-eval
echo "plot: runs/demo-eval/loss_by_position.png"
