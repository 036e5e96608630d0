"""`ttt-stream eval` logs its table and plot to the real MLflow server."""

import inspect
import json
import os
import subprocess
import sys

import pytest
import yaml
from tests.conftest import ROOT

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_eval_logs_bucket_metrics_and_artifacts_to_mlflow(stack, tmp_path):
    import argparse

    from mlflow import MlflowClient

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "argparse", "text": inspect.getsource(argparse)}) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(stack.model_dump(mode="json") | {"mlflow": {"tracking_uri": stack.mlflow.tracking_uri, "experiment": "cli-eval-test"}}))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "eval", "-c", str(config), "--model", "models/ttt-tiny-qwen3",
         "--documents", str(docs), "--max-tokens", "1024", "--modes", "static", "in_place", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("TTT_STREAM__")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "512-2048" in proc.stdout
    client = MlflowClient(stack.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("cli-eval-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["loss_in_place_512-2048"] < run.data.metrics["loss_static_512-2048"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "loss_by_position.png"} <= artifacts
