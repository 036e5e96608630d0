"""One local stack (broker, MLflow, Ray) per test session, on free ports in a temporary folder."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import pytest
import yaml

from pipeline.config import AppConfig, parse_config
from pipeline.local.local_stack import LocalStack


# The control topic's signing key (processor.control): the processors these tests start and the
# `ttt-stream rollback` they call share it through the environment.
os.environ.setdefault("TTT_STREAM_CONTROL_KEY", secrets.token_hex(32))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stack_config(data_dir: Path) -> AppConfig:
    """A config like configs/local.yaml but on free ports, with data under ``data_dir``."""
    broker_port, mlflow_port = free_port(), free_port()
    raw = yaml.safe_load(Path(__file__).parent.parent.joinpath("configs/local.yaml").read_text())
    raw["kafka"]["bootstrap_servers"] = f"127.0.0.1:{broker_port}"
    raw["mlflow"]["tracking_uri"] = f"http://127.0.0.1:{mlflow_port}"
    raw["local_stack"]["data_dir"] = str(data_dir)
    raw["local_stack"]["broker"]["port"] = broker_port
    raw["local_stack"]["mlflow"]["port"] = mlflow_port
    raw["processor"]["metrics"] = {"port": 0}  # a free port for each run's Prometheus endpoint
    return parse_config(raw, environ={})


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """The running local broker and MLflow server; yields their AppConfig, stops them after."""
    config = stack_config(tmp_path_factory.mktemp("local-stack"))
    local = LocalStack(config.local_stack)
    try:
        local.up()
        yield config
    finally:
        local.down()


@pytest.fixture(scope="session")
def ray_session():
    """Ray started in this process with small explicit resources, shut down after the session."""
    import ray

    from actors.runtime import init_ray

    init_ray(address=None, num_cpus=2, object_store_memory_mb=128, namespace="ttt-stream-tests")
    yield ray
    ray.shutdown()
