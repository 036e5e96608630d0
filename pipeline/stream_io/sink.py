"""KafkaSinks: the results, metrics, alerts and dead-letter topics, through one producer.

Every record is built within ``kafka.max_output_bytes`` (``pipeline.stream_io.output_budget``).
Sends are asynchronous; ``flush`` waits for all of them. A send refused for the record's own sake
(too large for the broker, a value it does not take) is not an outage: a result so refused becomes
a dead letter of its document with the reason (its ``refused`` callback), a refused dead letter is
sent again as headers only, and a refused alert or status report is dropped and counted. Any other
failure is the broker's: ``flush`` raises DeliveryError, and the caller commits no offset past it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from kafka import KafkaProducer
from kafka import errors as kafka_errors

from pipeline.config import KafkaConfig
from pipeline.stream_io.output_budget import bounded_dead_letter, bounded_json

log = logging.getLogger(__name__)

# What a broker (or the client, before sending) says about one record, not about itself.
RECORD_ERRORS = (kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError,
                 kafka_errors.InvalidRecordError, kafka_errors.InvalidTimestampError, ValueError, TypeError)
# Rounds of flush: the first sends, the second its replacements (dead letters), the third theirs (headers only).
FLUSH_ROUNDS = 3

Refused = Callable[[str], None]  # what to write instead, given why the record was refused


class DeliveryError(RuntimeError):
    """The broker did not acknowledge a record; offsets must not be committed past it."""


class KafkaSinks:
    def __init__(self, config: KafkaConfig):
        self.topics = config.topics
        self.budget = config.max_output_bytes
        self.producer = KafkaProducer(
            bootstrap_servers=config.bootstrap_servers,
            **{"acks": "all", "linger_ms": 5, **config.producer_settings()},
        )
        self._pending: list[tuple[Any, str, Refused | None]] = []  # (future, kind, refused)
        self.counts = {"results": 0, "metrics": 0, "alerts": 0, "dead_letter": 0, "refused": 0}

    def _send(self, kind: str, topic: str, value: bytes, key: bytes | None, headers: list | None = None,
              refused: Refused | None = None) -> None:
        try:
            future = self.producer.send(topic, value=value, key=key, headers=headers or [])
        except RECORD_ERRORS as err:
            self._refused(kind, f"output refused: {type(err).__name__}: {err}", refused)
            return
        self._pending.append((future, kind, refused))
        self.counts[kind] += 1

    def _refused(self, kind: str, reason: str, refused: Refused | None) -> None:
        self.counts["refused"] += 1
        log.warning("%s record refused (%s)%s", kind, reason, "" if refused else ": dropped")
        if refused is not None:
            refused(reason)

    def result(self, message: dict[str, Any], refused: Refused | None = None) -> None:
        """A document's result; ``refused``: what to do if the broker will not take it."""
        self._send("results", self.topics.results, bounded_json(message, self.budget, cut_first=("meta",)),
                   message["id"].encode(), refused=refused)

    def metrics(self, message: dict[str, Any]) -> None:
        self._send("metrics", self.topics.metrics, bounded_json(message, self.budget), None)

    def alert(self, message: dict[str, Any]) -> None:
        self._send("alerts", self.topics.alerts, bounded_json(message, self.budget), None)

    def dead_letter(self, value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        value, key, headers = bounded_dead_letter(value, key, headers, self.budget)

        def headers_only(reason: str) -> None:
            self._send("dead_letter", self.topics.dead_letter, b"", None,
                       headers + [("ttt.error.output", reason.encode()[:1024])])

        self._send("dead_letter", self.topics.dead_letter, value, key, headers, refused=headers_only)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every send; a record refused for its own sake is replaced (its ``refused``),
        anything else raises DeliveryError."""
        for _ in range(FLUSH_ROUNDS):
            self.producer.flush(timeout=timeout_s)
            pending, self._pending = self._pending, []
            failed = []
            for future, kind, refused in pending:
                if future.is_done and not future.failed():
                    continue
                if future.is_done and isinstance(future.exception, RECORD_ERRORS):
                    self._refused(kind, f"output refused by the broker: {future.exception}", refused)
                else:
                    failed.append(future)
            if failed:
                first = failed[0].exception if failed[0].is_done else "not acknowledged in time"
                raise DeliveryError(f"{len(failed)} records not acknowledged by the broker: {first}")
            if not self._pending:
                return
        raise DeliveryError(f"{len(self._pending)} replacement records still unsent after {FLUSH_ROUNDS} rounds")

    def close(self) -> None:
        self.producer.close(timeout=10)
