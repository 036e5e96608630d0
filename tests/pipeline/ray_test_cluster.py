"""A `cluster_utils` Ray cluster in a process of its own, for tests that must not share this
process's Ray state (the test session's `ray.init` sets process-wide auth settings that a cluster
started from the same process inherits):

    python -m tests.pipeline.ray_test_cluster TEMP_DIR DASHBOARD_PORT

starts a head (dashboard, no worker resources) and two 2-CPU nodes, each with its own temp dir
and agent ports, prints the dashboard's address on one line, and shuts the cluster down on
SIGTERM or when its standard input closes."""

from __future__ import annotations

import signal
import socket
import sys
import threading


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def agent_ports() -> dict[str, int]:
    # Not the defaults (52365 for the dashboard agent, which takes the jobs): another Ray of this
    # machine, such as the test session's own, holds them.
    return {"dashboard_agent_listen_port": free_port(), "metrics_agent_port": free_port(),
            "runtime_env_agent_port": free_port()}


def main(temp: str, dashboard_port: int) -> None:
    from ray.cluster_utils import Cluster

    store = 80 * 1024 * 1024
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "object_store_memory": store, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port, "temp_dir": f"{temp}/head", **agent_ports(),
    })
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for i in range(2):
            cluster.add_node(num_cpus=2, object_store_memory=store, temp_dir=f"{temp}/node-{i}", **agent_ports())
        cluster.wait_for_nodes()
        print(f"http://{cluster.webui_url}", flush=True)
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        stop.wait()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
