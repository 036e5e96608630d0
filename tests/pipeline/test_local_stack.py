"""The embedded stack itself: a real broker, a real MLflow server, real Ray actors."""

import json
import uuid

import pytest

pytestmark = pytest.mark.stack


def test_broker_consumer_group_commit_and_resume(stack):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    servers = stack.kafka.bootstrap_servers
    topic = f"stack-test-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=servers)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    admin.close()

    producer = KafkaProducer(bootstrap_servers=servers)
    for i in range(6):
        producer.send(topic, json.dumps({"id": str(i)}).encode())
    producer.flush()
    producer.close()

    def consumer():
        c = KafkaConsumer(
            bootstrap_servers=servers,
            group_id=f"{topic}-group",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **stack.kafka.consumer,
        )
        c.subscribe([topic])
        return c

    first = consumer()
    got = []
    while len(got) < 3:
        for records in first.poll(timeout_ms=1000, max_records=3 - len(got)).values():
            got.extend(json.loads(r.value)["id"] for r in records)
    assert got == ["0", "1", "2"]
    first.commit()
    assert first.committed(TopicPartition(topic, 0)) == 3
    first.close()

    second = consumer()
    rest = []
    for _ in range(30):
        for records in second.poll(timeout_ms=1000).values():
            rest.extend(json.loads(r.value)["id"] for r in records)
        if len(rest) >= 3:
            break
    second.close()
    assert rest == ["3", "4", "5"]


def test_mlflow_run_logged_and_read_back(stack):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow.tracking_uri)
    experiment_id = client.create_experiment(f"stack-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "chunk_size", "512")
    client.log_metric(run.info.run_id, "loss", 2.5, step=1)
    client.set_terminated(run.info.run_id)

    back = client.get_run(run.info.run_id)
    assert back.data.params == {"chunk_size": "512"}
    assert back.data.metrics["loss"] == 2.5
    assert back.info.status == "FINISHED"
