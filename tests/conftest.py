"""One local stack (broker, MLflow, Ray) per test session, on free ports in a temporary folder."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import AppConfig, parse_config
from pipeline.local.local_stack import LocalStack


# The control topic's signing key (processor.control): the processors these tests start and the
# `ttt-stream rollback` they call share it through the environment.
os.environ.setdefault("TTT_STREAM_CONTROL_KEY", secrets.token_hex(32))

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "models" / "ttt-tiny-qwen3"  # the embedded default's model


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``ttt-stream ARGS`` as a user runs it: from the root, no TTT_STREAM__ overrides, a wide terminal."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], input=stdin, capture_output=True, text=True, cwd=ROOT,
        timeout=300, env={k: v for k, v in os.environ.items() if not k.startswith("TTT_STREAM__")} | {"COLUMNS": "250"},
    )


def through_triton_interpreter(code: str, timeout_s: float = 600) -> list:
    """What ``code`` prints last as JSON, run with TRITON_INTERPRET=1 (read when a kernel is
    defined, hence a process of its own): the repository's Triton kernels on CPU tensors."""
    pytest.importorskip("triton")  # in the lock: this runs in CI
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def static_loss(model, tokenizer, texts: str | list[str]) -> float:
    """The model's mean next-token loss over the texts' tokens (float64 cross-entropy), read whole."""
    total = tokens = 0.0
    with torch.no_grad():
        for text in [texts] if isinstance(texts, str) else texts:
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])[None]
            logits = model(input_ids=ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    return total / tokens


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
