"""A multi-node Ray cluster on this machine started as on real machines: one `ray start --block`
process per node, each with its own temp dir and ports, token authentication on (Ray 2.60 turns it
on for a cluster started here, and a job's driver and nodes must agree).

Ray's in-process test cluster (`ray.cluster_utils.Cluster`) is not used for jobs: its nodes share
one session directory, and a job's working directory unpacked by one node was removed under
another. Stopping goes by process (each node's process group and every descendant), never by
`ray stop`, which would stop every Ray of this machine, the test session's own included."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port

STORE_BYTES = 80 * 1024 * 1024


def node_ports() -> list[str]:
    # Free ports, not Ray's defaults: the test session's own Ray holds those (52365 for the
    # dashboard agent, which takes the jobs).
    return [f"--{name}={free_port()}" for name in (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port")]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class RayStartCluster:
    """A head with the dashboard and no worker resources, plus ``nodes`` worker nodes."""

    nodes: int = 2
    node_cpus: int = 2
    temp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")))  # short: socket paths
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TTT_STREAM__", "RAY_ADDRESS"))}
        # The venv's python for every node and job driver.
        return {**env, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> "RayStartCluster":
        self._start("head", "--head", f"--port={self.gcs_port}", "--num-cpus=0", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                    f"--ray-client-server-port={free_port()}")
        self._wait_for(alive=1)
        for i in range(self.nodes):
            self._start(f"node-{i}", f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={self.node_cpus}")
        self._wait_for(alive=1 + self.nodes)
        return self

    def _start(self, name: str, *args: str) -> None:
        log = open(self.temp / f"{name}.log", "wb")
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
             f"--temp-dir={self.temp / name}", f"--object-store-memory={STORE_BYTES}", *node_ports(), *args],
            env=self.environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_for(self, alive: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a ray start process exited ({process.returncode}): {self.logs()}")
            done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status",
                                   f"--address=127.0.0.1:{self.gcs_port}"],
                                  env=self.environment, capture_output=True, text=True, timeout=60)
            active = done.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in done.stdout else ""
            if done.returncode == 0 and active.count("node_") >= alive:
                return
            time.sleep(1)
        raise TimeoutError(f"{alive} Ray nodes not alive in {timeout_s:.0f} s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(self.temp.glob("*.log")))

    def stop(self) -> None:
        """Each node's `ray start` first (it stops its node's processes), then whatever is left."""
        left = [pid for process in self.processes for pid in descendants(process.pid)]
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes:
            process.wait()
        shutil.rmtree(self.temp, ignore_errors=True)
