"""Logging training and evaluation runs to MLflow (params, metrics, artifacts)."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.state.base_model import masked_uri
from pipeline.config import MlflowConfig

log = logging.getLogger(__name__)


@contextmanager
def mlflow_run(config: MlflowConfig, run_name: str, params: dict) -> Iterator[object]:
    """An active MLflow run on the configured tracking server, ended (FINISHED/FAILED) on exit."""
    import mlflow

    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_experiment(config.experiment)
    with mlflow.start_run(run_name=run_name) as run:
        log_params(params)
        log.info("MLflow run %s (%s/#/experiments/%s/runs/%s)", run.info.run_id, masked_uri(config.tracking_uri),
                 run.info.experiment_id, run.info.run_id)
        yield run


def log_metrics(step: int, metrics: dict[str, float]) -> None:
    """``metrics`` at ``step`` on the active run."""
    import mlflow

    mlflow.log_metrics(metrics, step=step)


def log_params(params: dict[str, object]) -> None:
    """``params`` (as text, 500 characters at most) on the active run."""
    import mlflow

    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})


def log_eval_result(result: dict, out_dir: Path) -> None:
    """Per-bucket losses as metrics, and the JSON and plot as artifacts, on the active run."""
    import mlflow

    for bucket, row in result["buckets"].items():
        for mode in result["modes"]:
            mlflow.log_metric(f"loss_{mode}_{bucket.replace('+', 'plus')}", row[mode])
    mlflow.log_artifact(str(out_dir / "eval.json"))
    mlflow.log_artifact(str(out_dir / "loss_by_position.png"))
    mlflow.log_text(json.dumps(result["buckets"], indent=2), "buckets.json")
