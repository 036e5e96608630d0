"""The stream read and answered through the Kafka clients users already run, on the embedded
broker: kafka-python, confluent-kafka (librdkafka) and aiokafka each produce keyed and key-less
documents (and one record to an explicit partition), one processor run reads them all, and each
client reads the results and the dead letters back.

The documents topic is not created beforehand: the first producer's metadata request makes the
broker create it with its own default partition count (4 for the embedded broker), not the
config's 2. The processor reads every partition the topic has, so nothing produced to the
partitions past the configured count is left unread."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from actors.state_store import NO_KEY
from pipeline.processing.job import run_stream
from pipeline.state.checkpoint import CheckpointStore
from pipeline.state.tenant_keys import TenantKeys
from pipeline.stream_io.topics import stream_topics
from tests.pipeline.test_stream_e2e import short_documents, stream_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]
CLIENTS = ("kafka-python", "confluent-kafka", "aiokafka")
PER_CLIENT = 6  # documents: even ones keyed, odd ones key-less, the last to an explicit partition


def documents_of(client: str, texts: list[dict]) -> list[tuple[bytes | None, bytes, int | None]]:
    """(key, value, partition) of a client's records."""
    out = []
    for i, doc in enumerate(texts):
        key = f"{client}-k{i % 4}".encode() if i % 2 == 0 else None
        value = json.dumps({"id": f"{client}-{i}", "text": doc["text"]}).encode()
        out.append((key, value, 1 if i == PER_CLIENT - 1 else None))
    return out


def produce_kafka_python(servers: str, topic: str, records) -> list[tuple[int, int]]:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=servers, acks="all")
    futures = [producer.send(topic, key=k, value=v, partition=p) for k, v, p in records]
    producer.flush()
    acks = [(m.partition, m.offset) for m in (f.get(timeout=30) for f in futures)]
    producer.close()
    return acks


def produce_confluent(servers: str, topic: str, records) -> list[tuple[int, int]]:
    from confluent_kafka import Producer

    acks, errors = [], []
    producer = Producer({"bootstrap.servers": servers, "acks": "all", "enable.idempotence": True})
    for k, v, p in records:
        kwargs = {} if p is None else {"partition": p}
        producer.produce(topic, value=v, key=k, **kwargs,
                         on_delivery=lambda err, msg: (errors if err else acks).append(err or (msg.partition(), msg.offset())))
    assert producer.flush(30) == 0
    assert not errors, errors
    return acks


def produce_aiokafka(servers: str, topic: str, records) -> list[tuple[int, int]]:
    from aiokafka import AIOKafkaProducer

    async def send():
        producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all")
        await producer.start()
        try:
            sent = [await producer.send_and_wait(topic, value=v, key=k, partition=p) for k, v, p in records]
        finally:
            await producer.stop()
        return [(m.partition, m.offset) for m in sent]

    return asyncio.run(send())


def read_kafka_python(servers: str, topic: str, expect: int) -> list[tuple[bytes | None, bytes, dict]]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=servers, auto_offset_reset="earliest", group_id=None,
                             enable_auto_commit=False, consumer_timeout_ms=2000)
    out, deadline = [], time.monotonic() + 30
    while len(out) < expect and time.monotonic() < deadline:
        out += [(r.key, r.value, dict(r.headers)) for r in consumer]
    consumer.close()
    return out


def read_confluent(servers: str, topic: str, expect: int) -> list[tuple[bytes | None, bytes, dict]]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    # Every partition assigned from the start, as the other clients read (no group: a subscribe's
    # join and leave cost librdkafka 45 s on the embedded broker, the test's time, not the reading).
    consumer = Consumer({"bootstrap.servers": servers, "group.id": f"read-{time.monotonic_ns()}",
                         "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    out, deadline = [], time.monotonic() + 30
    try:
        while len(out) < expect and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            out.append((message.key(), message.value(), dict(message.headers() or [])))
    finally:
        consumer.close()
    return out


def read_aiokafka(servers: str, topic: str, expect: int) -> list[tuple[bytes | None, bytes, dict]]:
    from aiokafka import AIOKafkaConsumer

    async def read():
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=servers, auto_offset_reset="earliest", group_id=None,
                                    enable_auto_commit=False)
        await consumer.start()
        out, deadline = [], time.monotonic() + 30
        try:
            while len(out) < expect and time.monotonic() < deadline:
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    out += [(m.key, m.value, dict(m.headers)) for m in messages]
        finally:
            await consumer.stop()
        return out

    return asyncio.run(read())


PRODUCE = {"kafka-python": produce_kafka_python, "confluent-kafka": produce_confluent, "aiokafka": produce_aiokafka}
READ = {"kafka-python": read_kafka_python, "confluent-kafka": read_confluent, "aiokafka": read_aiokafka}


@pytest.fixture(scope="module")
def stream(stack, ray_session, tmp_path_factory):
    """One processor run over what the three clients produced (the topic created by the first)."""
    config = stream_config(stack, tmp_path_factory.mktemp("clients"), scope="per_key", base_loss_sample_rate=0.0)
    servers, topic = config.kafka.bootstrap_servers, config.kafka.topics.documents
    docs = iter(short_documents(len(CLIENTS) * PER_CLIENT, length=150))
    produced, acks = {}, {}
    for client in CLIENTS:  # confluent-kafka first: its metadata request creates the topic
        produced[client] = documents_of(client, [next(docs) for _ in range(PER_CLIENT)])
    for client in ("confluent-kafka", "kafka-python", "aiokafka"):
        acks[client] = PRODUCE[client](servers, topic, produced[client])
    produce_kafka_python(servers, topic, [(None, b"{not json", None)])  # one dead letter
    summary = run_stream(config, until_idle_s=3.0)
    return config, produced, acks, summary


def test_the_topic_created_by_a_producer_is_read_on_every_partition(stream):
    config, produced, acks, summary = stream
    partitions = {p for client in CLIENTS for p, _ in acks[client]}
    assert max(partitions) >= config.kafka.topics.partitions  # the broker's own default, not the config's
    assert summary.documents == len(CLIENTS) * PER_CLIENT and summary.dead_letters == 1
    assert all(len(set(acks[c])) == PER_CLIENT for c in CLIENTS)  # every record acknowledged once


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_s_documents_are_answered_and_read_back_by_it(stream, client):
    config, produced, acks, _ = stream
    results = READ[client](config.kafka.bootstrap_servers, config.kafka.topics.results, len(CLIENTS) * PER_CLIENT)
    answers = {json.loads(v)["id"]: (k, json.loads(v)) for k, v, _ in results}
    assert set(answers) == {f"{c}-{i}" for c in CLIENTS for i in range(PER_CLIENT)}  # all, each once
    assert len(results) == len(answers)
    names = TenantKeys(CheckpointStore(config.mlflow, config.stream.name).registry.key_salt())
    for i, (key, _, _) in enumerate(produced[client]):
        result_key, result = answers[f"{client}-{i}"]
        assert result_key == f"{client}-{i}".encode()  # results are keyed by document id
        # per_key: a state named by the key's keyed digest; key-less records share one state of their own
        assert result["state_key"] == (names.state_key(key.decode()) if key is not None else NO_KEY)
        assert result["tokens"] > 0 and result["loss"] > 0
    assert answers[f"{client}-{PER_CLIENT - 1}"][1]["partition"] == 1  # produced to an explicit partition
    dead = READ[client](config.kafka.bootstrap_servers, config.kafka.topics.dead_letter, 1)
    assert [v for _, v, _ in dead] == [b"{not json"]
    assert dead[0][2]["ttt.error.reason"].startswith(b"bad JSON")
    assert set(stream_topics(config.kafka)) <= set(topics_of(config.kafka.bootstrap_servers))


def topics_of(servers: str) -> list[str]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=servers)
    try:
        return sorted(consumer.topics())
    finally:
        consumer.close()
