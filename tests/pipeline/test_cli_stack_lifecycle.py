"""`ttt-stream up` then `ttt-stream down`: real servers start, then nothing of ours is left."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from pipeline.local.local_stack import mlflow_answers, port_is_open, process_group_alive
from pipeline.stream_io.topics import broker_answers
from tests.conftest import ROOT
from tests.conftest import stack_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _cli(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
        env={k: v for k, v in os.environ.items() if not k.startswith("TTT_STREAM__")},
    )


def test_up_then_down_leaves_no_process_and_no_port(tmp_path):
    cfg = stack_config(tmp_path / "stack")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    broker, mlflow = cfg.local_stack.broker, cfg.local_stack.mlflow

    up = _cli("up", "-c", str(config_file))
    try:
        assert up.returncode == 0, up.stderr
        assert broker_answers(cfg.kafka.bootstrap_servers)
        assert mlflow_answers(cfg.mlflow.tracking_uri)
        pids = {
            name: json.loads((tmp_path / "stack" / "run" / f"{name}.pid").read_text())["pid"]
            for name in ("broker", "mlflow")
        }
        assert all(process_group_alive(pid) for pid in pids.values())
        # The stream's topics exist with the configured partitions before any client produces:
        # a producer's first request would otherwise create them with the broker's default (4).
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(bootstrap_servers=cfg.kafka.bootstrap_servers)
        try:
            assert consumer.partitions_for_topic(cfg.kafka.topics.documents) == set(range(cfg.kafka.topics.partitions))
            assert consumer.partitions_for_topic(cfg.kafka.topics.results) == {0}
        finally:
            consumer.close()
        again = _cli("up", "-c", str(config_file))
        assert again.returncode == 0, again.stderr
        assert json.loads((tmp_path / "stack" / "run" / "mlflow.pid").read_text())["pid"] == pids["mlflow"]
    finally:
        down = _cli("down", "-c", str(config_file))
    assert down.returncode == 0, down.stderr
    assert "broker" in down.stdout and "mlflow" in down.stdout
    assert not port_is_open(broker.host, broker.port)
    assert not port_is_open(mlflow.host, mlflow.port)
    assert not any(process_group_alive(pid) for pid in pids.values())
    assert not list((tmp_path / "stack" / "run").glob("*.pid"))


def test_up_fails_clearly_when_port_is_taken(tmp_path):
    import socket

    cfg = stack_config(tmp_path / "stack")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", cfg.local_stack.broker.port))
        squatter.listen()
        config_file = tmp_path / "config.yaml"
        config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        up = _cli("up", "-c", str(config_file), timeout=60)
    assert up.returncode == 3
    assert "broker" in up.stderr and "already in use" in up.stderr
    assert not port_is_open(cfg.local_stack.mlflow.host, cfg.local_stack.mlflow.port)
