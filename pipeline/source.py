"""KafkaDocumentSource: the documents topic, read with explicit offsets and commits.

Partitions are assigned explicitly (``assign``, as Flink's Kafka source does) rather than by
group rebalancing: the supervisor decides which worker reads which partition, so that a state
always sees the same partitions in the same order, and a restart resumes each partition from
the offset committed under the stream's consumer group. Auto-commit is always off.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from pipeline.config import KafkaConfig

log = logging.getLogger(__name__)


class KafkaDocumentSource:
    def __init__(self, config: KafkaConfig, metadata_timeout_s: float = 30.0):
        self.topic = config.topics.documents
        self.consumer = KafkaConsumer(
            bootstrap_servers=config.bootstrap_servers,
            group_id=config.group_id,
            auto_offset_reset="earliest",
            **config.client,
            **config.consumer,
            enable_auto_commit=False,
        )
        self._tps = [TopicPartition(self.topic, p) for p in self._wait_for_partitions(metadata_timeout_s)]
        self.consumer.assign(self._tps)

    def _wait_for_partitions(self, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            partitions = self.consumer.partitions_for_topic(self.topic)
            if partitions:
                return sorted(partitions)
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {self.topic!r} has no partitions after {timeout_s:.0f} s")
            time.sleep(0.5)

    @property
    def partitions(self) -> list[int]:
        return [tp.partition for tp in self._tps]

    def poll(self, timeout_ms: int, max_records: int) -> list[ConsumerRecord]:
        batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        records = [r for batch in batches.values() for r in batch]
        records.sort(key=lambda r: (r.partition, r.offset))
        return records

    def seek(self, offsets: dict[int, int]) -> None:
        for tp in self._tps:
            if tp.partition in offsets:
                self.consumer.seek(tp, offsets[tp.partition])

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit ``partition -> next offset to read`` under the group (synchronously)."""
        if offsets:
            self.consumer.commit({
                TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()
            })

    def positions(self) -> dict[int, int]:
        """The next offset each partition will be read from (committed, else the reset policy)."""
        return {tp.partition: self.consumer.position(tp) for tp in self._tps}

    def committed(self) -> dict[int, int | None]:
        return {tp.partition: self.consumer.committed(tp) for tp in self._tps}

    def close(self) -> None:
        self.consumer.close(autocommit=False)
