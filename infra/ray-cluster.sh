#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, started with Ray's own `ray start` (for trying
# `ray job submit` and node placement here; on real machines run the same `ray start` lines,
# one per node):
#
#   bash infra/ray-cluster.sh up      # head without worker resources + 2 worker nodes of 2 CPUs
#   bash infra/ray-cluster.sh down    # `ray stop`: every Ray process of this machine, no other
#
# The dashboard, which takes job submissions, listens on 127.0.0.1:${RAY_DASHBOARD_PORT:-8265}.
# Ray 2.60 turns token authentication on for a cluster started here: every `ray` command and
# node needs RAY_AUTH_MODE=token (the token is ~/.ray/auth_token, made by the head).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export PATH="$ROOT/.venv/bin:$PATH" RAY_AUTH_MODE=token  # drivers of jobs run the venv's python
PORT="${RAY_PORT:-6379}" DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
NODES="${RAY_NODES:-2}" NODE_CPUS="${RAY_NODE_CPUS:-2}" STORE_BYTES="${RAY_STORE_BYTES:-200000000}"
# A temp dir per node, as on separate machines: nodes sharing one would share (and garbage-collect)
# each other's runtime-env files, such as a job's working directory.
TMP="${RAY_LOCAL_TMP:-/tmp/ray-local}"

case "${1:-}" in
    up)
        ray start --head --port="$PORT" --num-cpus=0 --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
            --object-store-memory="$STORE_BYTES" --disable-usage-stats --temp-dir="$TMP/head" >/dev/null
        for i in $(seq "$NODES"); do
            ray start --address="127.0.0.1:$PORT" --num-cpus="$NODE_CPUS" --object-store-memory="$STORE_BYTES" \
                --disable-usage-stats --temp-dir="$TMP/node-$i" >/dev/null
        done
        sleep 2
        ray status --address "127.0.0.1:$PORT" | sed -n '/Active:/,/Pending:/p'
        echo "jobs: RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:$DASHBOARD_PORT ..."
        ;;
    down)
        ray stop --force
        ;;
    *)
        echo "usage: $0 up|down" >&2
        exit 2
        ;;
esac
