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
# The held-out corpus goes through the broker to two worker actors that read and adapt; the
# processor stops once the topic is drained and prints documents, tokens/s and the loss of the
# adapted model against the static model on the sampled documents.
"${CLI[@]}" feed data/corpus/heldout.jsonl -c "$CONFIG" --limit "${DEMO_LIMIT:-40}"
"${CLI[@]}" run -c "$CONFIG" --until-idle 10
