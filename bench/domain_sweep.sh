#!/usr/bin/env bash
# Slow-weight settings side by side on one domain stream: one bench/domain_stream.py per
# setting, JOBS at a time with one torch thread each, results in OUT_DIR.
#   bash bench/domain_sweep.sh pandas runs/sweep "lr=1e-3" "lr=3e-3 l2_to_base=1.0" ...
# Each setting is a space-separated list of model.slow overrides; optional: JOBS (2), DOCS,
# HELDOUT_DOCS, SHIPPED_DOCS, SEED, SETTINGS (slow+fast), DEVICE (auto), THREADS (1), PYTHON.
set -euo pipefail
domain="$1"; out="$2"; shift 2
PYTHON="${PYTHON:-python3}"
mkdir -p "$out"
i=0
for setting in "$@"; do
    args=()
    for kv in $setting; do args+=(--slow "$kv"); done
    name="s${i}"
    echo "$name: $setting" >> "$out/settings.txt"
    OMP_NUM_THREADS=${THREADS:-1} PYTHONUNBUFFERED=1 "$PYTHON" bench/domain_stream.py --domain "$domain" --settings "${SETTINGS:-slow+fast}" --device "${DEVICE:-auto}" \
        --seed "${SEED:-0}" ${DOCS:+--documents "$DOCS"} ${HELDOUT_DOCS:+--heldout-documents "$HELDOUT_DOCS"} \
        ${SHIPPED_DOCS:+--shipped-documents "$SHIPPED_DOCS"} "${args[@]}" --out "$out/$name.json" > "$out/$name.log" 2>&1 &
    i=$((i + 1))
    while (( $(jobs -rp | wc -l) >= ${JOBS:-2} )); do wait -n; done
done
wait
for f in "$out"/s*.log; do echo "== $(basename "$f" .log): $(grep "^$(basename "$f" .log):" "$out/settings.txt" | cut -d: -f2-)"; grep -E "stream|heldout|quarter" "$f"; done
