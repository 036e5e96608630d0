"""KafkaDocumentSource: the documents topic, read with explicit offsets and commits.

Partitions are assigned explicitly (``assign``, as Flink's Kafka source does) rather than by
group rebalancing: the supervisor decides which reader reads which partition, so that a state
always sees the same partitions in the same order, and a restart resumes each partition from
the offset committed under the stream's consumer group. Auto-commit is always off.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord  # the record the run loop handles: Kafka's types stay in stream_io
from kafka.structs import OffsetAndMetadata

from pipeline.config import KafkaConfig

log = logging.getLogger(__name__)


class OffsetOutOfRange(RuntimeError):
    """An offset to resume from that the broker has no record at or before."""


class KafkaDocumentSource:
    def __init__(self, config: KafkaConfig, metadata_timeout_s: float = 30.0):
        self.topic = config.topics.documents
        self.offset_reset = config.offset_reset
        self.consumer = KafkaConsumer(
            bootstrap_servers=config.bootstrap_servers,
            group_id=config.group_id,
            auto_offset_reset="earliest",
            # Metadata every 30 s (kafka-python's default is 5 min): partitions added to the topic
            # while the stream runs are seen soon (unassigned_partitions).
            **{"metadata_max_age_ms": 30_000, **config.consumer_settings()},
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

    def unassigned_partitions(self) -> list[int]:
        """Partitions the topic has now (as the last metadata said) that this source does not
        read: added since it started (a topic grown or recreated by a producer's request)."""
        now = self.consumer.partitions_for_topic(self.topic) or set()
        return sorted(set(now) - set(self.partitions))

    def poll(self, timeout_ms: int, max_records: int) -> list[ConsumerRecord]:
        batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        records = [r for batch in batches.values() for r in batch]
        records.sort(key=lambda r: (r.partition, r.offset))
        return records

    def topic_id(self) -> str | None:
        """The documents topic's id (Kafka's topic UUID, metadata v10+): a topic deleted and
        created again under the same name has a new one. None where the broker gives none."""
        cluster = self.consumer._client.cluster  # kafka-python keeps the ids of its metadata here
        topic_id = cluster.topic_id(self.topic)
        if topic_id is None:
            self.consumer.partitions_for_topic(self.topic)
            topic_id = cluster.topic_id(self.topic)
        return None if topic_id is None or topic_id.int == 0 else str(topic_id)

    def seek_to_start(self, where: str) -> dict[int, int]:
        """Every partition to its first record (``earliest``) or past its last (``latest``)."""
        first = self.consumer.beginning_offsets(self._tps)
        offsets = ({tp.partition: first[tp] for tp in self._tps} if where == "earliest"
                   else {tp.partition: hw for tp, hw in self._high_watermarks(self._tps).items()})
        for tp in self._tps:
            self.consumer.seek(tp, offsets[tp.partition])
        return offsets

    def seek(self, offsets: dict[int, int]) -> dict[int, int]:
        """Read on from ``offsets`` (partition -> next offset); returns the offsets taken, which
        differ only where an offset was out of range and ``kafka.offset_reset`` says where to go."""
        offsets = self.in_range(offsets)
        for tp in self._tps:
            if tp.partition in offsets:
                self.consumer.seek(tp, offsets[tp.partition])
        return offsets

    def in_range(self, offsets: dict[int, int]) -> dict[int, int]:
        """``offsets`` checked against the records the broker holds; one outside them raises
        OffsetOutOfRange (``offset_reset`` error) or is moved to the first / next record."""
        tps = [tp for tp in self._tps if tp.partition in offsets]
        if not tps:
            return {}
        first, end = self.consumer.beginning_offsets(tps), self.consumer.end_offsets(tps)
        beyond = [tp for tp in tps if offsets[tp.partition] > end[tp]]
        if beyond:  # make sure before acting on it: see _high_watermarks
            end.update({tp: max(end[tp], hw) for tp, hw in self._high_watermarks(beyond).items()})
        taken = {}
        for tp in tps:
            offset, lo, hi = offsets[tp.partition], first[tp], end[tp]
            if lo <= offset <= hi:
                taken[tp.partition] = offset
                continue
            where = "past the end" if offset > hi else "before the first record"
            problem = (f"{self.topic} partition {tp.partition}: offset {offset} to resume from is {where} "
                       f"(the broker holds offsets {lo} to {hi - 1}): the topic was recreated, the broker lost "
                       f"its records or retention deleted them")
            if self.offset_reset == "error":
                raise OffsetOutOfRange(f"{problem}; set kafka.offset_reset to earliest or latest to read on")
            taken[tp.partition] = lo if self.offset_reset == "earliest" else hi
            log.warning("%s; reading from offset %d (kafka.offset_reset: %s)", problem, taken[tp.partition],
                        self.offset_reset)
        return taken

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit ``partition -> next offset to read`` under the group (synchronously)."""
        if offsets:
            self.consumer.commit({
                TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()
            })

    def _high_watermarks(self, tps: list[TopicPartition], timeout_s: float = 5.0) -> dict[TopicPartition, int]:
        """The end of each partition's log as a fetch reports it. The embedded broker answers
        ListOffsets with one offset per record batch (3 records produced in one batch: end 1),
        while its fetch responses carry the right high watermark. Positions are put back."""
        before = {tp: self.consumer.position(tp) for tp in self._tps}
        self.consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while any(self.consumer.highwater(tp) is None for tp in tps) and time.monotonic() < deadline:
            self.consumer.poll(timeout_ms=200, max_records=1)
        for tp, offset in before.items():
            self.consumer.seek(tp, offset)
        return {tp: self.consumer.highwater(tp) or 0 for tp in tps}

    def positions(self) -> dict[int, int]:
        """The next offset each partition will be read from: the group's committed one (checked
        against the broker's records like a seek), else the first record."""
        positions = {tp.partition: self.consumer.position(tp) for tp in self._tps}
        taken = self.in_range(positions)
        if taken != positions:
            self.seek(taken)
        return taken

    def highwaters(self) -> dict[int, int | None]:
        """The end of each partition's log as the last fetch reported it (None before the first
        fetch of that partition); asks the broker nothing."""
        return {tp.partition: self.consumer.highwater(tp) for tp in self._tps}

    def committed(self) -> dict[int, int | None]:
        return {tp.partition: self.consumer.committed(tp) for tp in self._tps}

    def close(self) -> None:
        self.consumer.close(autocommit=False)
