"""Rollbacks asked for from outside the processor: through the control topic, or offline."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from kafka import KafkaConsumer, KafkaProducer

from pipeline.checkpoint import BASE, LIVE, Checkpoint, CheckpointError, CheckpointRequest, CheckpointStore
from pipeline.config import AppConfig


def request_rollback(config: AppConfig, to: str, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """Send ``{"action": "rollback", "to": ...}`` and wait for the processor's record of it (from
    the alerts topic); None if none came. Adds the times measured from the request."""
    kafka = config.kafka
    request_id = uuid.uuid4().hex
    consumer = KafkaConsumer(
        kafka.topics.alerts, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest",
        enable_auto_commit=False, consumer_timeout_ms=200, **kafka.client,
    )
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, **kafka.client)
    sent_at = time.time()
    producer.send(kafka.topics.control, json.dumps({"action": "rollback", "to": to, "request_id": request_id}).encode())
    producer.flush()
    producer.close()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for record in consumer:
                message = json.loads(record.value)
                if message.get("request_id") == request_id and message.get("type") in ("rollback", "rollback_failed"):
                    if message["type"] == "rollback":
                        message["serving_after_request_s"] = message["served_at"] - sent_at
                        message["recorded_after_request_s"] = message["time"] - sent_at
                    return message
    finally:
        consumer.close()
    return None


def rollback_offline(config: AppConfig, to: str) -> str:
    """A new version holding the states of ``to`` and the offsets of ``live``: the next run
    starts from that state where the stream left off."""
    store = CheckpointStore(config.mlflow, config.stream.name)
    if store.resolve(LIVE) is None:
        raise CheckpointError(f"{store.name}: no live version to roll back from")
    live = store.load(LIVE)
    target = Checkpoint.base(list(live.states)) if to == BASE else store.load(to)
    return store.save(CheckpointRequest(
        states=target.states, topic=live.manifest["offsets"]["topic"], offsets=live.offsets,
        config_digest=live.manifest["config_digest"], base_model=live.manifest["base_model"],
        documents=int(live.manifest["documents"]), reason="rollback", parent_version=live.version,
        metrics={}, tags={"rollback_to": target.version, "rollback_from": live.version, "rollback_cause": "manual"},
    ))
