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
[[ -n "${DEMO_CORPUS:-}" || -f data/corpus/heldout.jsonl ]] || "${CLI[@]}" corpus --out data/corpus

"${CLI[@]}" up -c "$CONFIG"
# The embedded broker keeps topics in memory, MLflow keeps versions on disk: a stream name per
# demo run keeps an earlier run's checkpoint (and its offsets) from applying to this topic.
export TTT_STREAM__STREAM__NAME="demo-$(date +%Y%m%d-%H%M%S)"
export TTT_STREAM__KAFKA__GROUP_ID="$TTT_STREAM__STREAM__NAME"
# The held-out corpus goes through the broker to the learner, which reads and learns every document; the
# processor stops once the topic is drained and prints documents, tokens/s and the loss of the
# adapted model against the static model on the sampled documents.
# DEMO_CORPUS, DEMO_LIMIT and DEMO_IDLE_S change what is fed and how long an idle stream waits
# (bench/demo_*.py's smoke runs in CI feed the text shipped beside the model).
"${CLI[@]}" feed "${DEMO_CORPUS:-data/corpus/heldout.jsonl}" -c "$CONFIG" --limit "${DEMO_LIMIT:-40}"
"${CLI[@]}" run -c "$CONFIG" --until-idle "${DEMO_IDLE_S:-10}"
# Every checkpoint is a version of the registered model $TTT_STREAM__STREAM__NAME-ttt in MLflow.
"${CLI[@]}" versions -c "$CONFIG"
