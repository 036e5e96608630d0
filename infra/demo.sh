#!/usr/bin/env bash
# The main job on the embedded default: local broker + MLflow + in-process Ray, the shipped
# model and corpus. Stops the local stack on exit or Ctrl-C.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash infra/install.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
CONFIG="${CONFIG:-configs/local.yaml}"
CLI=(.venv/bin/ttt-stream)

stop_stack() { "${CLI[@]}" down -c "$CONFIG" || true; }
trap stop_stack EXIT
trap 'exit 130' INT TERM

"${CLI[@]}" up -c "$CONFIG"
"${CLI[@]}" demo -c "$CONFIG"
