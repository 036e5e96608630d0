"""ProcessorRun: one MLflow run per ``ttt-stream run``, with the stream's curves over time.

Every status report (``processor.status_interval_s``) logs the stream's figures as metrics of
this run at step = documents the stream has read in all (the restored checkpoint's count plus
this run's), so that the runs of one stream, one after another, draw one curve in MLflow's
chart view: adapted and base loss on the sampled documents, adapted loss on every document,
tokens/s, lag, delta ratios, dead letters, rollbacks, the live version. Each checkpoint stays a
registered version with a run of its own, nested under this one (MLflow's parent run tag), and
the version names this run in its ``ttt.processor_run`` tag.

Logging never holds the stream up: reports queue to a thread that sends them in batches; while
MLflow is down they wait in a bounded queue (the oldest dropped first, counted) and the run is
created when MLflow answers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from pipeline.config import AppConfig
from pipeline.stream_events import StatusTick, StreamEvents

log = logging.getLogger(__name__)

# status report field -> metric name
REPORTED = {
    "adapted_loss": "adapted_loss",
    "sampled_adapted_loss": "sampled_adapted_loss",
    "sampled_base_loss": "sampled_base_loss",
    "tokens_per_s": "tokens_per_s",
    "documents_per_s": "documents_per_s",
    "documents": "documents_this_run",
    "tokens": "tokens_this_run",
    "dead_letters": "dead_letters",
    "retries": "retries",
}


class ProcessorRun:
    def __init__(self, client: Any, experiment: str, stream: str, params: dict[str, Any], max_queued: int = 10_000):
        self.client, self.experiment, self.stream = client, experiment, stream
        self.params = {k: str(v)[:500] for k, v in params.items()}
        self.run_id: str | None = None
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send_forever, name="mlflow-processor-run", daemon=True)

    def start(self, wait_s: float = 10.0) -> str | None:
        """Create the run (waiting up to ``wait_s`` for MLflow; else the thread keeps trying)."""
        deadline = time.monotonic() + wait_s
        while self.run_id is None and time.monotonic() < deadline:
            self._create()
            if self.run_id is None:
                time.sleep(0.5)
        self._thread.start()
        return self.run_id

    def log(self, figures: dict[str, float | None], step: int) -> None:
        """Queue one point of each figure (None: not known yet, not logged)."""
        now = int(time.time() * 1000)
        points = [(k, float(v), now, step) for k, v in figures.items() if v is not None]
        while True:
            try:
                self._queue.put_nowait(points)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def subscribe_to(self, events: StreamEvents) -> None:
        """Log every status tick's figures (``pipeline.stream_events.StatusTick``)."""
        events.subscribe(StatusTick, lambda e: self.log(report_figures(e.message, e.figures), step=e.step))

    def close(self, status: str = "FINISHED", timeout_s: float = 30.0) -> None:
        """Send what is queued (up to ``timeout_s``) and end the run with ``status``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self.run_id is not None:
            try:
                if self.dropped:
                    self.client.set_tag(self.run_id, "ttt.dropped_reports", str(self.dropped))
                self.client.set_terminated(self.run_id, status=status)
            except Exception as err:  # noqa: BLE001 - MLflow down at the end: the run stays RUNNING
                log.warning("could not end MLflow run %s: %s", self.run_id, err)

    # -- the sending thread --------------------------------------------------------------------

    def _create(self) -> None:
        try:
            experiment = self.client.get_experiment_by_name(self.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(self.experiment))
            run = self.client.create_run(experiment_id, run_name=f"{self.stream}-processor",
                                         tags={"ttt.stream": self.stream, "ttt.kind": "processor"})
            self.run_id = run.info.run_id
        except Exception as err:  # noqa: BLE001 - MLflow down: try again later
            log.warning("MLflow run for the stream not created yet: %s", err)
            return
        try:
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in sorted(self.params.items())])
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow run %s: params not logged: %s", self.run_id, err)
        log.info("MLflow run %s for stream %s", self.run_id, self.stream)

    def _send_forever(self) -> None:
        from mlflow.entities import Metric

        pending: list[tuple[str, float, int, int]] = []
        delay = 1.0
        while True:
            stopping = self._stop.is_set()
            try:
                pending.extend(self._queue.get(timeout=0.5))
            except queue.Empty:
                pass
            while True:
                try:
                    pending.extend(self._queue.get_nowait())
                except queue.Empty:
                    break
            if pending and self.run_id is None:
                self._create()
            if pending and self.run_id is not None:
                try:
                    for start in range(0, len(pending), 1000):  # MLflow's batch limit
                        batch = pending[start : start + 1000]
                        self.client.log_batch(self.run_id, metrics=[Metric(*p) for p in batch])
                    pending, delay = [], 1.0
                except Exception as err:  # noqa: BLE001 - MLflow down: keep them, try again
                    log.warning("MLflow run %s: %d points not sent yet: %s", self.run_id, len(pending), err)
                    if stopping:
                        return
                    self._stop.wait(delay)
                    delay = min(2 * delay, 30.0)
            if stopping and self._queue.empty():
                return


def start_processor_run(config: AppConfig, base: dict[str, Any]) -> ProcessorRun:
    """The MLflow run of this ``ttt-stream run``, its params the settings that shape the curves."""
    from mlflow import MlflowClient

    p = config.processor
    params = {
        "stream": config.stream.name, "documents_topic": config.kafka.topics.documents,
        "group_id": config.kafka.group_id, "model": base.get("path", config.model.path),
        "readers": p.readers, "scope": p.scope, "max_document_tokens": p.max_document_tokens,
        "base_loss_sample_rate": p.base_loss_sample_rate, "batch_documents": p.documents_per_call,
        "slow_weights": config.model.slow.enabled, "context_parallel": p.context_parallel is not None,
    }
    run = ProcessorRun(MlflowClient(tracking_uri=config.mlflow.tracking_uri), config.mlflow.experiment,
                       config.stream.name, params)
    run.start()
    return run


def report_figures(status: dict[str, Any], extra: dict[str, float | None]) -> dict[str, float | None]:
    """The metrics of one status report: its run figures plus ``extra`` (lag, ratios, ...)."""
    figures = {metric: status.get(field) for field, metric in REPORTED.items()}
    return {**figures, **extra}
