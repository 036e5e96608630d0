"""Other people's records on the real stack (broker, MLflow, Ray): hostile documents produced by
confluent-kafka (librdkafka) between good ones, and hostile control records while the processor
runs, a flood of them included. The run ends on its own, every good document is read once (one
whose echo would outgrow Kafka's limit too), every hostile record is in the dead-letter topic with
a reason, nothing written passes the output budget, and a second run reads none of them again."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid

import pytest

from pipeline.state.checkpoint import CheckpointStore
from pipeline.processing.job import run_stream
from pipeline.stream_io.messages import MAX_ID_CHARS, MAX_KEY_CHARS, REASON_HEADER
from pipeline.stream_io.topics import ensure_topics
from tests.pipeline.test_kafka_clients import produce_confluent
from tests.pipeline.test_stream_e2e import read_topic, short_documents, stream_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]
MAX_BYTES = 600 * 1024  # above the output budget: a dead letter of a record this large is cut
BUDGET = 64 * 1024  # kafka.max_output_bytes of the test: well below any record limit
# Unsigned control records, each with an action of its own (12,000 through the metrics alone:
# tests/pipeline/test_metrics.py); a flood 47 times the records read per loop turn.
FLOOD = 3_000

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
    # A large record whose bytes are not text: its dead letter is a prefix of it, and its digest.
    (None, b"\xff" * (BUDGET * 3), "invalid UTF-8"),
    (b"\x00" * 900_000, b"a record key of 900 KB", "record key too long"),
    (None, b'{"id": "h-dup", "text": "x", "text": "y"}', "duplicate field 'text'"),
    (None, b'"a JSON string, not an object"', "JSON message must be an object"),
    (None, b'{"id": "h\\u0000ctl", "text": "x"}', "control character in field 'id'"),
    (b"tenant-a", b'{"id": "h-key", "text": "x", "key": "tenant-b"}', "key contradicts the record key"),
]
# Good documents whose results would outgrow Kafka's 1 MB if their meta were echoed whole: 90,000
# emoji, 360 KB in the record, 1.08 MB as JSON escapes.
ECHO = [json.dumps({"id": "g-emoji", "text": "A good document.", "meta": {"e": "\U0001F600" * 90_000}},
                   ensure_ascii=False).encode()]
# Records on the control topic while the processor runs: none may be carried out.
CONTROL = [
    (b'{"action": "rollback", "to": ' + b"[" * 3000 + b"]" * 3000 + b"}", "too large"),
    (b'{"action": "rollback", "to": ' + b"[" * 500 + b"]" * 500 + b"}", "JSON nested deeper than"),
    (b'{"action": "rollback", "to": "base", "request_id": "unsigned"}', "refused: unsigned command"),
]


def test_hostile_records_are_dead_lettered_and_the_stream_reads_on(stack, ray_session, tmp_path):
    config = stream_config(stack, tmp_path, readers=1, base_loss_sample_rate=0.0, max_document_bytes=MAX_BYTES)
    config = config.model_copy(update={
        "kafka": config.kafka.model_copy(update={"max_output_bytes": BUDGET}),
        "processor": config.processor.model_copy(update={
            "checkpoint": config.processor.checkpoint.model_copy(update={"every_documents": 4, "every_seconds": 3600.0}),
        })})
    ensure_topics(config.kafka)
    good = short_documents(8, length=300)
    records = []
    for i, doc in enumerate(good):  # hostile records between good ones, all on one partition
        records.append((None, json.dumps(doc).encode(), 0))
        records += [(k, v, 0) for k, v, _ in HOSTILE[i * 2 : i * 2 + 2]]
    records += [(None, v, 0) for v in ECHO]
    produce_confluent(config.kafka.bootstrap_servers, config.kafka.topics.documents, records)
    good_ids = [d["id"] for d in good] + ["g-emoji"]

    summaries = []
    runner = threading.Thread(target=lambda: summaries.append(run_stream(config, until_idle_s=12.0)))
    runner.start()
    deadline = time.monotonic() + 240
    while not read_topic(config, config.kafka.topics.results, expect=1, timeout_s=2.0) and time.monotonic() < deadline:
        pass
    time.sleep(2.0)  # the control source reads from where the topic was when it started
    flood = [(None, json.dumps({"action": f"{i}-{uuid.uuid4().hex}"}).encode(), None) for i in range(FLOOD)]
    produce_confluent(config.kafka.bootstrap_servers, config.kafka.topics.control,
                      [(None, v, None) for v, _ in CONTROL] + flood)
    runner.join(timeout=400)
    assert not runner.is_alive() and summaries, "the run did not end on its own"

    summary = summaries[0]
    verdicts = len(HOSTILE) + len(CONTROL) + FLOOD
    assert summary.documents == len(good_ids) and summary.dead_letters == verdicts
    # The reasons stay a closed set: 3,000 distinct actions are one kind.
    assert summary.reasons["unknown action"] == FLOOD and len(summary.reasons) <= len(HOSTILE) + len(CONTROL) + 1
    results = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.results, expect=len(good_ids))]
    assert sorted(r["id"] for r in results) == sorted(good_ids)  # each good one, once
    (emoji,) = [r for r in results if r["id"] == "g-emoji"]
    assert emoji["cut"] == ["meta"] and emoji["meta"]["cut"] and emoji["tokens"] > 0
    dead = read_topic(config, config.kafka.topics.dead_letter, expect=verdicts)
    assert len(dead) == verdicts
    reasons = {}
    for r in dead:
        h = dict(r.headers)
        reasons.setdefault(h["ttt.source.sha256"].decode(), []).append(h[REASON_HEADER].decode())
        assert len(r.value) + len(r.key or b"") <= BUDGET  # every dead letter within the budget
        assert r.value == b"" or hashlib.sha256(r.value).hexdigest() == h["ttt.source.sha256"].decode() \
            or "value" in h["ttt.source.cut"].decode()
    for value, reason in [(v, r) for _, v, r in HOSTILE] + CONTROL:
        (got,) = reasons[hashlib.sha256(value).hexdigest()]
        assert got.startswith(reason), (value[:60], got)
    alerts = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.alerts, expect=1)]
    # Unsigned records are counted, not echoed one alert each.
    counted = [a["counts"] for a in alerts if a["type"] == "control_refused"]
    assert sum(sum(c.values()) for c in counted) == len(CONTROL) + FLOOD and len(counted) < 50
    assert not [a for a in alerts if a["type"] in ("control_error", "rollback")]  # nothing was carried out
    for topic in (config.kafka.topics.metrics, config.kafka.topics.alerts, config.kafka.topics.results):
        assert all(len(r.value) <= BUDGET for r in read_topic(config, topic, expect=1))

    # A second run starts past every record: it reads nothing again.
    again = run_stream(config, until_idle_s=3.0)
    assert again.documents == 0 and again.dead_letters == 0
    versions = CheckpointStore(config.mlflow, config.stream.name).registry.versions()
    assert versions and all("rollback_to" not in v["tags"] for v in versions)


def test_a_result_the_broker_refuses_becomes_a_dead_letter_of_its_record(stack, tmp_path):
    """A producer whose request limit is below the output budget (as a broker's message.max.bytes
    below it would be): the refused result turns into a dead letter with the reason, the stream's
    other outputs go through, and flush raises nothing (it is not an outage)."""
    from pipeline.stream_io.sink import KafkaSinks

    config = stream_config(stack, tmp_path)
    config = config.model_copy(update={"kafka": config.kafka.model_copy(update={
        "max_output_bytes": 20_000, "producer": {"max_request_size": 20_000}})})
    ensure_topics(config.kafka)
    sinks = KafkaSinks(config.kafka)
    sinks.budget = 100_000  # past the producer's limit: what the config validator keeps users from
    refused = []

    def dead_letter(reason):
        refused.append(reason)
        sinks.dead_letter(b'{"id": "d1", "text": "..."}', None, [(REASON_HEADER, reason.encode())])

    sinks.result({"id": "d1", "tokens": 3, "meta": {"m": "x" * 50_000}}, refused=dead_letter)
    sinks.result({"id": "d2", "tokens": 3, "meta": {}}, refused=dead_letter)
    sinks.flush()
    sinks.close()
    assert len(refused) == 1 and refused[0].startswith("output refused: MessageSizeTooLargeError")
    results = read_topic(config, config.kafka.topics.results, expect=1)
    assert [json.loads(r.value)["id"] for r in results] == ["d2"]
    (dead,) = read_topic(config, config.kafka.topics.dead_letter, expect=1)
    assert dict(dead.headers)[REASON_HEADER].decode() == refused[0]
