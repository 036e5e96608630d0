"""KafkaSinks: the results, metrics, alerts and dead-letter topics, through one producer.

Sends are asynchronous; ``flush`` waits for all of them and raises if any failed, so the
caller commits source offsets only for what the broker has acknowledged.
"""

from __future__ import annotations

import json
from typing import Any

from kafka import KafkaProducer
from kafka.producer.future import FutureRecordMetadata

from pipeline.config import KafkaConfig


class DeliveryError(RuntimeError):
    """The broker did not acknowledge a record; offsets must not be committed past it."""


class KafkaSinks:
    def __init__(self, config: KafkaConfig):
        self.topics = config.topics
        self.producer = KafkaProducer(
            bootstrap_servers=config.bootstrap_servers,
            **{"acks": "all", "linger_ms": 5, **config.producer_settings()},
        )
        self._pending: list[FutureRecordMetadata] = []
        self.counts = {"results": 0, "metrics": 0, "alerts": 0, "dead_letter": 0}

    def _send(self, kind: str, topic: str, value: bytes, key: bytes | None, headers=None) -> None:
        self._pending.append(self.producer.send(topic, value=value, key=key, headers=headers or []))
        self.counts[kind] += 1

    def result(self, message: dict[str, Any]) -> None:
        self._send("results", self.topics.results, encode_json(message), message["id"].encode())

    def metrics(self, message: dict[str, Any]) -> None:
        self._send("metrics", self.topics.metrics, encode_json(message), None)

    def alert(self, message: dict[str, Any]) -> None:
        self._send("alerts", self.topics.alerts, encode_json(message), None)

    def dead_letter(self, value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        self._send("dead_letter", self.topics.dead_letter, value if value is not None else b"", key, headers)

    def flush(self, timeout_s: float = 30.0) -> None:
        self.producer.flush(timeout=timeout_s)
        pending, self._pending = self._pending, []
        failed = [f for f in pending if not f.is_done or f.failed()]
        if failed:
            first = failed[0].exception if failed[0].is_done else "not acknowledged in time"
            raise DeliveryError(f"{len(failed)} records not acknowledged by the broker: {first}")

    def close(self) -> None:
        self.producer.close(timeout=10)


def encode_json(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
