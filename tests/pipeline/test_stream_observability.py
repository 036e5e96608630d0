"""What a running stream shows to the tools users already run, on the real stack: its Prometheus
endpoint (pipeline/observability/metrics.py) scraped over HTTP during the run, the counters moving while
documents are read and ending at what was read; and its MLflow run (pipeline/observability/processor_run.py),
whose metric history is the stream's curve, with the checkpoints nested under it."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.processing.job import run_stream
from pipeline.stream_io.topics import ensure_topics
from tests.conftest import free_port
from tests.pipeline.test_stream_e2e import produce, short_documents, stream_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]
N = 24  # documents


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """name and sorted labels -> value, from the endpoint's text format."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_prometheus_and_mlflow_follow_the_stream_while_it_runs(
        stack, ray_session, tmp_path):
    port = free_port()
    config = stream_config(stack, tmp_path, readers=1, reader_num_cpus=1.0, base_loss_sample_rate=0.5,
                           status_interval_s=1.0)
    processor = config.processor.model_copy(update={
        "metrics": config.processor.metrics.model_copy(update={"port": port}),
        "checkpoint": config.processor.checkpoint.model_copy(update={"every_documents": 10, "every_seconds": 3600.0}),
    })
    config = config.model_copy(update={"processor": processor})
    stream = config.stream.name
    docs = short_documents(N, length=2500)  # past one TTT chunk: the fast weights move
    ensure_topics(config.kafka)
    produce(config, [json.dumps(d).encode() for d in docs] + [b"{not json"])

    started = time.time()
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=run_stream(config, until_idle_s=4.0)))
    runner.start()
    url, seen = f"http://127.0.0.1:{port}/metrics", []
    try:
        while runner.is_alive():
            try:
                seen.append(scrape(url))
            except OSError:
                pass  # not serving yet (readers starting) or no longer (the run ended)
            time.sleep(0.3)
    finally:
        runner.join(timeout=300)
    assert outcome["summary"].documents == N

    counts = [value(s, "ttt_stream_documents_total", stream=stream) or 0.0 for s in seen]
    assert counts == sorted(counts), "a counter went down"
    assert 0 < len({c for c in counts if 0 < c < N}), "no scrape saw the stream part-way"
    last = seen[-1]  # during the idle wait at the end: everything read
    assert value(last, "ttt_stream_documents_total", stream=stream) == N
    assert value(last, "ttt_stream_tokens_total", stream=stream) == outcome["summary"].tokens
    assert value(last, "ttt_stream_dead_letters_total", stream=stream, reason="bad JSON") == 1
    assert value(last, "ttt_stream_document_loss_count", stream=stream) == N
    mean_loss = value(last, "ttt_stream_document_loss_sum", stream=stream) / N
    assert 0.5 < mean_loss < 10
    sampled = value(last, "ttt_stream_sampled_base_loss_count", stream=stream)
    assert sampled == value(last, "ttt_stream_sampled_adapted_loss_count", stream=stream) and sampled > 0
    assert value(last, "ttt_stream_delta_ratio", stream=stream) > 0
    assert value(last, "ttt_stream_slow_delta_ratio", stream=stream) > 0  # local.yaml: slow weights on
    assert value(last, "ttt_stream_checkpoints_total", stream=stream, reason="periodic") >= 2
    assert value(last, "ttt_stream_checkpoint_version", stream=stream) >= 2
    assert value(last, "ttt_stream_last_checkpoint_timestamp_seconds", stream=stream) > started
    assert value(last, "ttt_stream_checkpoint_failures_total", stream=stream) == 0
    lags = [value(s, "ttt_stream_partition_lag", stream=stream, partition=str(p)) for s in seen for p in (0, 1)]
    assert any(lag for lag in lags if lag is not None), "the lag never showed unread records"
    assert all(value(last, "ttt_stream_partition_lag", stream=stream, partition=str(p)) == 0 for p in (0, 1))
    assert value(last, "ttt_stream_in_flight", stream=stream) == 0

    # The MLflow run of this processor run: the curves, at step = documents read.
    from mlflow import MlflowClient

    from pipeline.state.registered_model import model_name

    client = MlflowClient(config.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`ttt.stream` = '{stream}' and tags.`ttt.kind` = 'processor'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert runs[0].data.params["scope"] == config.processor.scope and runs[0].data.params["readers"] == "1"
    documents = client.get_metric_history(run_id, "documents_this_run")
    steps = [m.step for m in sorted(documents, key=lambda m: m.timestamp)]
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] == N  # one point per status report
    assert [m.value for m in documents if m.step == N][-1] == N
    for name in ("sampled_base_loss", "sampled_adapted_loss", "adapted_loss", "tokens_per_s", "delta_ratio", "lag"):
        history = client.get_metric_history(run_id, name)
        assert len(history) >= 2, name
    assert client.get_metric_history(run_id, "lag")[-1].value == 0
    versions = client.search_model_versions(f"name = '{model_name(stream)}'")
    assert versions and all(v.tags.get("ttt.processor_run") == run_id for v in versions)
    nested = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert {r.info.run_id for r in nested} == {v.run_id for v in versions}
