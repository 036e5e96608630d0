"""Other people's records on the real stack (broker, MLflow, Ray): hostile documents produced by
confluent-kafka (librdkafka) between good ones, and hostile control records while the processor
runs. The run ends on its own, every good document is read once, every hostile record is in the
dead-letter topic with a reason, and a second run reads none of them again."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipeline.state.checkpoint import CheckpointStore
from pipeline.processing.job import run_stream
from pipeline.stream_io.messages import MAX_ID_CHARS, MAX_KEY_CHARS, REASON_HEADER
from pipeline.stream_io.topics import ensure_topics
from tests.pipeline.test_kafka_clients import produce_confluent
from tests.pipeline.test_stream_e2e import read_topic, short_documents, stream_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]
MAX_BYTES = 16 * 1024

# (record key, value, the start of the dead letter's reason)
HOSTILE = [
    (None, b'{"id": "h-deep", "text": "x", "meta": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}",
     "JSON nested deeper than"),
    (None, b'{"id": "h-nan", "text": "x", "meta": {"score": NaN}}', "bad JSON: NaN is not JSON"),
    (None, b'{"id": "h-inf", "text": "x", "meta": {"score": -Infinity}}', "bad JSON: -Infinity is not JSON"),
    (None, b'{"id": "h-big", "text": "x", "meta": {"n": ' + b"7" * 5000 + b"}}", "bad JSON"),
    (None, b'{"id": "h-surrogate-key", "text": "x", "key": "\\ud800"}', "invalid UTF-8: lone surrogate"),
    (None, b'{"id": "h-surrogate-text", "text": "a \\udfff b"}', "invalid UTF-8: lone surrogate"),
    (None, json.dumps({"id": "i" * (MAX_ID_CHARS + 1), "text": "x"}).encode(), "id too long"),
    (b"k" * (4 * MAX_KEY_CHARS + 1), b"plain text with a record key too long", "record key too long"),
    (None, json.dumps({"id": "h-large", "text": "y" * MAX_BYTES}).encode(), "too large"),
    (None, b"\xc3\x28 not UTF-8", "invalid UTF-8"),
]
# Records on the control topic while the processor runs: none may be carried out.
CONTROL = [
    (b'{"action": "rollback", "to": ' + b"[" * 3000 + b"]" * 3000 + b"}", "too large"),
    (b'{"action": "rollback", "to": ' + b"[" * 500 + b"]" * 500 + b"}", "JSON nested deeper than"),
    (b'{"action": "rollback", "to": "base", "request_id": "unsigned"}', "refused: unsigned command"),
]


def test_hostile_records_are_dead_lettered_and_the_stream_reads_on(stack, ray_session, tmp_path):
    config = stream_config(stack, tmp_path, workers=1, base_loss_sample_rate=0.0, max_document_bytes=MAX_BYTES)
    config = config.model_copy(update={"processor": config.processor.model_copy(update={
        "checkpoint": config.processor.checkpoint.model_copy(update={"every_documents": 4, "every_seconds": 3600.0}),
    })})
    ensure_topics(config.kafka)
    good = short_documents(8, length=300)
    records = []
    for i, doc in enumerate(good):  # hostile records between good ones, all on one partition
        records.append((None, json.dumps(doc).encode(), 0))
        records += [(k, v, 0) for k, v, _ in HOSTILE[i * 2 : i * 2 + 2]]
    produce_confluent(config.kafka.bootstrap_servers, config.kafka.topics.documents, records)

    summaries = []
    runner = threading.Thread(target=lambda: summaries.append(run_stream(config, until_idle_s=12.0)))
    runner.start()
    deadline = time.monotonic() + 240
    while not read_topic(config, config.kafka.topics.results, expect=1, timeout_s=2.0) and time.monotonic() < deadline:
        pass
    time.sleep(2.0)  # the control source reads from where the topic was when it started
    produce_confluent(config.kafka.bootstrap_servers, config.kafka.topics.control, [(None, v, None) for v, _ in CONTROL])
    runner.join(timeout=300)
    assert not runner.is_alive() and summaries, "the run did not end on its own"

    summary = summaries[0]
    assert summary.documents == len(good) and summary.dead_letters == len(HOSTILE) + len(CONTROL)
    results = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.results, expect=len(good))]
    assert sorted(r["id"] for r in results) == sorted(d["id"] for d in good)  # each good one, once
    dead = read_topic(config, config.kafka.topics.dead_letter, expect=len(HOSTILE) + len(CONTROL))
    by_value = {r.value: dict(r.headers)[REASON_HEADER].decode() for r in dead}
    assert len(dead) == len(by_value) == len(HOSTILE) + len(CONTROL)
    for value, reason in [(v, r) for _, v, r in HOSTILE] + CONTROL:
        assert by_value[value].startswith(reason), (value[:60], by_value[value])
    alerts = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.alerts, expect=len(CONTROL))]
    assert len([a for a in alerts if a["type"] == "control_error"]) == len(CONTROL)
    assert not [a for a in alerts if a["type"] == "rollback"]  # nothing was carried out

    # A second run starts past every record: it reads nothing again.
    again = run_stream(config, until_idle_s=3.0)
    assert again.documents == 0 and again.dead_letters == 0
    versions = CheckpointStore(config.mlflow, config.stream.name).versions()
    assert versions and all("rollback_to" not in v["tags"] for v in versions)
