"""MLflow down mid-stream loses nothing: checkpoints retry with backoff, offsets stay
uncommitted, reading pauses after a bounded backlog, and everything resumes when it is back."""

from __future__ import annotations

import json
import threading
import time

import pytest
from kafka import KafkaConsumer, TopicPartition

from pipeline.state.checkpoint import HEAD, LIVE, CheckpointStore
from pipeline.processing.job import run_stream
from pipeline.local.local_stack import LocalStack, mlflow_answers
from pipeline.stream_io.topics import ensure_topics
from tests.pipeline.test_recovery import ResultCounter
from tests.pipeline.test_stream_e2e import produce, read_topic, short_documents, stream_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def committed(config) -> int | None:
    consumer = KafkaConsumer(bootstrap_servers=config.kafka.bootstrap_servers, group_id=config.kafka.group_id,
                             enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(config.kafka.topics.documents, 0))
    finally:
        consumer.close()


def test_mlflow_outage_pauses_and_resumes_without_loss(stack, ray_session, tmp_path):
    config = stream_config(stack, tmp_path, readers=1, base_loss_sample_rate=0.0)
    checkpoint = config.processor.checkpoint.model_copy(update={
        "every_documents": 5, "every_seconds": 3600.0, "max_pending_documents": 8,
        "retry_initial_s": 0.5, "retry_max_s": 2.0,
    })
    config = config.model_copy(update={"processor": config.processor.model_copy(update={"checkpoint": checkpoint})})
    docs = short_documents(40)
    ensure_topics(config.kafka)
    produce(config, [json.dumps(d).encode() for d in docs], partitions=[0] * len(docs))
    store = CheckpointStore(config.mlflow, config.stream.name)
    local = LocalStack(config.local_stack)
    counter = ResultCounter(config)
    counter.start()
    stop = threading.Event()
    runner = threading.Thread(target=run_stream, args=(config,), kwargs={"stop_event": stop})
    runner.start()
    try:
        deadline = time.monotonic() + 180
        while store.registry.resolve(LIVE) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert local.down(skip=("broker",)) == ["mlflow"]
        assert not mlflow_answers(config.mlflow.tracking_uri)
        before = committed(config)
        time.sleep(8.0)  # the stream reads on until the backlog is full, then waits
        during = counter.count
        assert committed(config) == before  # nothing committed without a checkpoint
        assert during < len(docs), "reading did not pause"
        assert during <= before + 8 + 2 * config.processor.max_in_flight_per_reader + 1
        time.sleep(3.0)
        assert counter.count == during  # paused
        local.up(skip=("broker",))
        deadline = time.monotonic() + 180
        while counter.count < len(docs) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert counter.count >= len(docs)
    finally:
        stop.set()
        runner.join(timeout=180)
        counter.stop.set()
        local.up(skip=("broker",))  # the session's other tests need it
    assert store.load(HEAD).offsets == {0: len(docs), 1: 0}  # the newest version, judged or not
    assert committed(config) == len(docs)
    ids = {json.loads(r.value)["id"] for r in read_topic(config, config.kafka.topics.results, expect=len(docs))}
    assert ids == {d["id"] for d in docs}
