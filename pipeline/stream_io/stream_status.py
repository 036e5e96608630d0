"""What ``ttt-stream status`` shows of a stream: the processor's last status report (from the
metrics topic), the consumer group's committed offsets and, where the broker gives honest
figures, the lag."""

from __future__ import annotations

import json
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from pipeline.config import KafkaConfig


def read_stream_status(config: KafkaConfig, timeout_s: float = 3.0) -> dict[str, Any]:
    consumer = KafkaConsumer(
        bootstrap_servers=config.bootstrap_servers, group_id=config.group_id, enable_auto_commit=False,
        auto_offset_reset="earliest", consumer_timeout_ms=int(timeout_s * 1000), **config.consumer_settings(),
    )
    try:
        return {"last_report": _last_report(consumer, config.topics.metrics), "partitions": _offsets(consumer, config)}
    finally:
        consumer.close(autocommit=False)


def _last_report(consumer: KafkaConsumer, topic: str) -> dict[str, Any] | None:
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        return None
    # Read the whole topic: reports are small and few, and the embedded broker's end offsets
    # cannot be trusted to seek near the end.
    consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
    last = None
    for record in consumer:
        try:
            message = json.loads(record.value)
        except (TypeError, ValueError):
            continue
        if isinstance(message, dict) and message.get("type") == "status":
            last = message
    return last


def _offsets(consumer: KafkaConsumer, config: KafkaConfig) -> list[dict[str, Any]]:
    topic = config.topics.documents
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    if not tps:
        return []
    ends = consumer.end_offsets(tps)
    rows = []
    for tp in tps:
        committed, end = consumer.committed(tp), ends.get(tp)
        # A broker whose end offset is below what the group already consumed reports wrong ends
        # (the embedded tansu does after batched produce): say so rather than print a lag.
        honest = committed is None or (end is not None and end >= committed)
        rows.append({
            "partition": tp.partition, "committed": committed, "end": end,
            "lag": (end - (committed or 0)) if honest and end is not None else None,
        })
    return rows
