#!/usr/bin/env bash
# Create .venv and install the pinned set (requirements.lock) plus this project, editable.
# Idempotent: a stamp of the lock file and pyproject.toml skips the install when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

stamp="$(cat "$ROOT/requirements.lock" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$VENV/.installed" && "$(cat "$VENV/.installed")" == "$stamp" ]]; then
    exit 0
fi

echo "[install] creating $VENV and installing pinned dependencies (first run: a few minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
# torch is pinned to the CPU build (2.13.0+cpu): pip takes it from the local wheel directory
# (/opt/wheels) that this machine's pip configuration names, never a multi-GB CUDA build.
# --no-compile: Python compiles what is imported, on first import; compiling every file of torch,
# ray and mlflow up front took half of the install.
"$VENV/bin/python" -m pip install --quiet --no-compile --disable-pip-version-check -r "$ROOT/requirements.lock"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$ROOT"
"$VENV/bin/python" -m pip check
echo "$stamp" > "$VENV/.installed"
