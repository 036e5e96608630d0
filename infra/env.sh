# Sourced by the infra scripts: the repository root, the installed .venv, and the environment
# every entry point runs under (offline Hugging Face, no Ray usage reporting).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash infra/install.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The install compiles nothing up front (infra/install.sh): Python writes each module's bytecode
# on its first import, which a shell with PYTHONDONTWRITEBYTECODE would forbid, and every process
# (each reader, each CLI call) would compile torch again.
unset PYTHONDONTWRITEBYTECODE
# Commands on the control topic are signed with this key (processor.control.key_env): one per
# checkout, made on first use and kept in data/ (readable by its owner only).
if [[ -z "${TTT_STREAM_CONTROL_KEY:-}" ]]; then
  mkdir -p data
  [[ -s data/control.key ]] || (umask 077 && .venv/bin/python -c "import secrets; print(secrets.token_hex(32))" >data/control.key)
  TTT_STREAM_CONTROL_KEY="$(cat data/control.key)"
  export TTT_STREAM_CONTROL_KEY
fi
