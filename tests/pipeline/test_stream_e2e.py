"""End to end on the real stack: broker, Ray actors, the shipped model.

Documents go through the broker to two readers sharing the documents topic's partitions;
every id comes back exactly once, malformed messages land in the dead-letter topic with their
reason and original bytes, and a reader killed mid-stream is restarted without losing or
repeating a document.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from pipeline.config import AppConfig
from pipeline.processing.job import run_stream
from pipeline.state.checkpoint import CheckpointStore
from pipeline.state.tenant_keys import TenantKeys
from pipeline.stream_io.messages import REASON_HEADER
from tests.sample_text import SAMPLE_TEXT

pytestmark = [pytest.mark.stack, pytest.mark.slow]

MALFORMED = [
    b"",
    b"\xff\xfe\xfd not utf-8",
    b"{not json",
    b'{"id": "m-3", "text": ""}',
    b'{"id": "m-4"}',
    b'["a list"]',
    b'{"id": "m-6", "text": 12}',
    b'{"id": "m-7", "text": "  \\n "}',
    b'{"id": "m-8", "text": "x", "key": 5}',
    b'{"id": "m-9", "text": "x", "meta": "m"}',
] * 2


def stream_config(stack: AppConfig, tmp_path, **processor) -> AppConfig:
    """The stack's config with fresh topics and group (tests share one broker)."""
    run = uuid.uuid4().hex[:8]
    topics = stack.kafka.topics.model_copy(update={
        name: f"{getattr(stack.kafka.topics, name)}.{run}"
        for name in ("documents", "results", "metrics", "alerts", "dead_letter", "control")
    })
    kafka = stack.kafka.model_copy(update={"topics": topics, "group_id": f"test-{run}"})
    settings = {"readers": 2, "reader_num_cpus": 0.5, "spill_dir": tmp_path / "spill", "commit_interval_s": 1.0,
                "status_interval_s": 2.0, "poll_timeout_ms": 100, **processor}
    # Rehearsal every fourth slow step instead of every step: the stack tests check the pipeline,
    # not how much the model forgets, and CI has 2 cores.
    slow = stack.model.slow.model_copy(update={"rehearsal_every": 4})
    if settings.get("scope", stack.processor.scope) != "global":
        # The learner trains one slow state for the stream; other scopes learn on their readers.
        settings.setdefault("learner", stack.processor.learner.model_copy(update={"enabled": False}))
    # Readers beside the learner (the embedded default's synchronous learner has no readers):
    # what these tests check is the readers' pipeline; test_learner_stream runs the default's.
    settings.setdefault("learner", stack.processor.learner.model_copy(update={"synchronous": False, "num_cpus": 0.5}))
    return stack.model_copy(update={
        "kafka": kafka,
        "model": stack.model.model_copy(update={"slow": slow}),
        "processor": stack.processor.model_copy(update=settings),
        "stream": stack.stream.model_copy(update={"name": f"s{run}"}),
    })


def share_salt(*configs: AppConfig, salt: str | None = None) -> None:
    """One salt for these streams (``pipeline.state.tenant_keys``: state names, the held-out slice,
    the base shadow): runs that are compared document by document hold out the same positions.
    ``salt``: a fixed one (a test whose verdicts depend on the slice); None: a random one."""
    import secrets

    from mlflow import MlflowClient

    from pipeline.state.registered_model import model_name
    from pipeline.state.tenant_keys import SALT_TAG

    salt = salt or secrets.token_hex(32)
    for config in configs:
        client = MlflowClient(tracking_uri=config.mlflow.tracking_uri, registry_uri=config.mlflow.tracking_uri)
        client.create_registered_model(model_name(config.stream.name), tags={SALT_TAG: salt})


def short_documents(n: int, length: int = 200) -> list[dict]:
    """n snippets of the sample text, ``length`` to ``length`` + 400 characters, with unique ids
    (the same text here and in CI, which has no built corpus)."""
    texts = [SAMPLE_TEXT]
    out = []
    for i in range(n):
        text = texts[i % len(texts)]
        start = (i * 997) % max(1, len(text) - length - 400)
        out.append({"id": f"doc-{i:03d}", "text": text[start : start + length + (i * 37) % 400], "key": f"k{i % 3}"})
    return out


def produce(config: AppConfig, values: list[bytes], partitions: list[int] | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=config.kafka.bootstrap_servers, acks="all")
    futures = [
        producer.send(config.kafka.topics.documents, value=value, partition=None if partitions is None else partitions[i])
        for i, value in enumerate(values)
    ]
    producer.flush()
    offsets = [f.get(timeout=30) for f in futures]  # raises if the broker refused any
    producer.close()
    assert len({(m.partition, m.offset) for m in offsets}) == len(values)


def read_topic(config: AppConfig, topic: str, expect: int, timeout_s: float = 30.0) -> list:
    """Every record of ``topic`` once it holds at least ``expect`` (or at the timeout): read to the
    high watermark the fetches report, so that a record that should not be there is read too, with
    no idle wait to decide that nothing more is coming. Not to ListOffsets' end: the embedded
    broker answers it with the last batch's first offset (``KafkaDocumentSource._high_watermarks``),
    and a reader that stopped there missed the rest of that batch."""
    consumer = KafkaConsumer(bootstrap_servers=config.kafka.bootstrap_servers, enable_auto_commit=False, group_id=None)
    records, deadline = [], time.monotonic() + timeout_s
    try:
        partitions: list[TopicPartition] = []
        while True:
            found = consumer.partitions_for_topic(topic) or set()
            if len(found) > len(partitions):  # the topic may not exist yet
                partitions = [TopicPartition(topic, p) for p in sorted(found)]
                consumer.assign(partitions)
                consumer.seek_to_beginning()
                records = []
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            caught_up = bool(partitions) and all(
                consumer.highwater(tp) is not None and consumer.position(tp) >= consumer.highwater(tp) for tp in partitions)
            if (caught_up and len(records) >= expect) or time.monotonic() >= deadline:
                return records
            if not partitions:
                time.sleep(0.2)
    finally:
        consumer.close()


def test_documents_in_results_out_exactly_once_and_malformed_to_dead_letter(stack, ray_session, tmp_path):
    config = stream_config(stack, tmp_path, scope="per_key", base_loss_sample_rate=0.2)
    docs = short_documents(200)
    values = [json.dumps(d).encode() for d in docs]
    # Malformed messages interleaved with the good ones.
    for i, bad in enumerate(MALFORMED):
        values.insert(7 + 10 * i, bad)
    from pipeline.stream_io.topics import ensure_topics

    ensure_topics(config.kafka)
    produce(config, values)

    summary = run_stream(config, until_idle_s=3.0)

    assert summary.documents == 200 and summary.dead_letters == 20
    results = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.results, expect=200)]
    ids = [r["id"] for r in results]
    assert sorted(ids) == sorted(d["id"] for d in docs)  # all present, none twice
    assert {r["reader"] for r in results} == {f"{config.stream.name}-reader-0", f"{config.stream.name}-reader-1"}
    assert {r["partition"] for r in results} == {0, 1}  # two readers share the topic's partitions
    assert all(r["tokens"] > 0 and r["loss"] > 0 and r["fast_weight_norm"] >= 0 for r in results)
    keys = TenantKeys(CheckpointStore(config.mlflow, config.stream.name).registry.key_salt())
    assert {r["state_key"] for r in results} == {keys.state_key(k) for k in ("k0", "k1", "k2")}  # names, not keys
    assert any(r["base_loss"] is not None for r in results)

    dead = read_topic(config, config.kafka.topics.dead_letter, expect=20)
    assert len(dead) == 20
    assert sorted(r.value for r in dead) == sorted(MALFORMED)  # the original bytes
    reasons = [dict(r.headers)[REASON_HEADER].decode() for r in dead]
    assert all(reasons), reasons
    assert sum(r.startswith("invalid UTF-8") for r in reasons) == 2

    status = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.metrics, expect=1)]
    final = [s for s in status if s.get("final")]
    assert final and final[-1]["documents"] == 200 and final[-1]["dead_letters"] == 20
    assert len(final[-1]["readers"]) == 2 and all(w["alive"] for w in final[-1]["readers"])

    # What `ttt-stream status` shows: the last report, and every record committed.
    from pipeline.stream_io.stream_status import read_stream_status

    shown = read_stream_status(config.kafka)
    assert shown["last_report"]["final"] and shown["last_report"]["documents"] == 200
    assert sum(row["committed"] for row in shown["partitions"]) == len(values)


def test_a_killed_reader_is_restarted_from_the_checkpoint_and_no_document_is_lost(stack, ray_session, tmp_path):
    import ray

    config = stream_config(stack, tmp_path, scope="per_document")
    docs = short_documents(40, length=3000)  # long enough that the kill lands mid-stream
    from pipeline.stream_io.topics import ensure_topics

    ensure_topics(config.kafka)
    produce(config, [json.dumps(d).encode() for d in docs])
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=run_stream(config, until_idle_s=3.0)))
    runner.start()
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        try:
            victim = ray.get_actor(f"{config.stream.name}-reader-0")
        except ValueError:
            time.sleep(0.2)
    ray.get(victim.ready.remote(), timeout=120)
    time.sleep(1.5)  # reading its first documents
    ray.kill(victim, no_restart=False)
    runner.join(timeout=300)
    assert not runner.is_alive()
    summary = outcome["summary"]
    assert summary.dead_letters == 0 and summary.retries >= 1
    results = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.results, expect=40)]
    # The dead reader's documents since the last checkpoint are read again: every id is there,
    # some twice (results are at least once; states exactly once, see test_recovery).
    assert {r["id"] for r in results} == {d["id"] for d in docs}
    status = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.metrics, expect=1)]
    restarted = [w for s in status if s.get("final") for w in s["readers"] if w.get("restarted")]
    assert [w["reader"] for w in restarted] == [f"{config.stream.name}-reader-0"]
    assert all(len(w["node_id"]) > 8 and w["node_ip"] for s in status for w in s["readers"] if w.get("alive"))
