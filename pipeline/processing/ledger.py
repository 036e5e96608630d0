"""StreamLedger: every record the processor took from the topic and has not finished.

The one owner of what the processor knows about its input: which documents wait in which
reader's queue, which are in flight under which pool handle, how often each was tried, and so
which offsets may be committed (below the oldest unfinished record of each partition). The run
loop and the recovery policy change it only through these methods.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Hashable, Iterator

from pipeline.stream_io.source import ConsumerRecord

from pipeline.stream_io.messages import ParsedDocument
from pipeline.stream_io.offsets import OffsetTracker


@dataclass
class PendingDocument:
    record: ConsumerRecord
    parsed: ParsedDocument
    reader: int
    attempts: int = 0  # times sent to a reader
    slow_version: Any = None  # the learner's slow weights it reads with (fixed by its place in the ledger)
    sent_at: float = 0.0  # time.monotonic() when it was last sent to its reader

    @property
    def position(self) -> tuple[int, int]:
        return self.record.partition, self.record.offset


class StreamLedger:
    def __init__(self, readers: int, start_offsets: dict[int, int] | None = None):
        self._queues: list[deque[PendingDocument]] = [deque() for _ in range(readers)]
        self._in_flight: dict[Hashable, PendingDocument] = {}
        self._offsets = OffsetTracker(start_offsets or {})
        self._parallel_failures: dict[tuple[int, int], int] = {}
        self._given_up: set[tuple[int, int]] = set()  # dead-lettered after a failed recovery
        # Reader deaths with the document in flight, kept across rewinds; and the documents in
        # flight at a death, read again one at a time until each was read once (so that a
        # document that kills its reader is the only one in flight when it does it again).
        self._deaths: dict[tuple[int, int], int] = {}
        self._suspects: set[tuple[int, int]] = set()
        self._done_at: dict[int, float] = {}  # reader -> when a document of it last came back

    # -- taking records in ---------------------------------------------------------------------

    def accept(self, record: ConsumerRecord, parsed: ParsedDocument, reader: int, slow_version: Any = None) -> None:
        """A document for ``reader``'s queue (to read with the learner's ``slow_version``)."""
        self._offsets.started(record.partition, record.offset)
        self._queues[reader].append(PendingDocument(record, parsed, reader, slow_version=slow_version))

    def given_up(self, record: ConsumerRecord) -> bool:
        """Whether this record went to the dead-letter topic before the partition was rewound:
        read again, it is passed over, not sent again."""
        return (record.partition, record.offset) in self._given_up

    def passed_over(self, record: ConsumerRecord) -> None:
        """A record finished as soon as it was read (a dead letter): its offset may be committed."""
        self._offsets.started(record.partition, record.offset)
        self._offsets.finished(record.partition, record.offset)

    # -- sending and collecting ------------------------------------------------------------------

    def to_send(self, max_in_flight_per_reader: int) -> Iterator[PendingDocument]:
        """Queued documents, reader by reader in queue order, while their reader has room; each
        one yielded counts as an attempt and must be passed to ``sent``."""
        per_reader = [0] * len(self._queues)
        alone = [False] * len(self._queues)
        for pending in self._in_flight.values():
            per_reader[pending.reader] += 1
            alone[pending.reader] |= pending.position in self._suspects
        for w, queue in enumerate(self._queues):
            while queue and per_reader[w] < max_in_flight_per_reader and not alone[w]:
                if queue[0].position in self._suspects:
                    if per_reader[w]:
                        break
                    alone[w] = True
                pending = queue.popleft()
                pending.attempts += 1
                per_reader[w] += 1
                yield pending

    def read_again(self, pending: PendingDocument) -> bool:
        """Whether ``pending`` is read again after a failure (sent before, or in flight at a death)."""
        return pending.attempts > 1 or pending.position in self._suspects

    def sent(self, handle: Hashable, pending: PendingDocument) -> None:
        pending.sent_at = time.monotonic()
        self._in_flight[handle] = pending

    def reading_since(self) -> dict[int, tuple[PendingDocument, float]]:
        """Per reader with documents in flight: the one it reads now (its oldest, as it reads
        them in order) and since when (sent, or its predecessor done, whichever was later)."""
        out: dict[int, tuple[PendingDocument, float]] = {}
        for pending in self._in_flight.values():
            if pending.reader not in out:
                out[pending.reader] = (pending, max(pending.sent_at, self._done_at.get(pending.reader, 0.0)))
        return out

    def handles(self, reader: int | None = None) -> list[Hashable]:
        """The handles in flight (on ``reader``, when given)."""
        return [h for h, p in self._in_flight.items() if reader is None or p.reader == reader]

    def take(self, handle: Hashable) -> PendingDocument | None:
        """The document of a done handle, no longer in flight (None: already dealt with)."""
        pending = self._in_flight.pop(handle, None)
        if pending is not None:
            self._done_at[pending.reader] = time.monotonic()
        return pending

    def finished(self, pending: PendingDocument) -> None:
        """Its output (result or dead letter) is on its way: its offset may be committed."""
        self._offsets.finished(*pending.position)
        self._suspects.discard(pending.position)

    def in_flight_on(self, reader: int) -> list[PendingDocument]:
        return [p for p in self._in_flight.values() if p.reader == reader]

    # -- recovery --------------------------------------------------------------------------------

    def retry_first(self, pending: PendingDocument) -> None:
        """Back to the head of its reader's queue."""
        self._queues[pending.reader].appendleft(pending)

    def rewind(self, reader: int, positions: dict[int, int]) -> None:
        """``reader``'s partitions will be read again from ``positions``: forget its queue and
        everything open past them (its in-flight handles must have been taken already)."""
        if self.handles(reader):
            raise RuntimeError(f"reader {reader} still has documents in flight")
        self._queues[reader].clear()
        for partition, offset in positions.items():
            self._offsets.rewind(partition, offset)

    def give_up(self, pending: PendingDocument) -> None:
        """The document (finished: it went to the dead-letter topic) is passed over if read again."""
        self._given_up.add(pending.position)

    def reader_died(self, documents: list[PendingDocument]) -> dict[tuple[int, int], int]:
        """Count a death for each document in flight on a reader that died; they are read again
        one at a time. Returns each one's deaths so far (kept across rewinds)."""
        for pending in documents:
            self._deaths[pending.position] = self._deaths.get(pending.position, 0) + 1
            self._suspects.add(pending.position)
        return {p.position: self._deaths[p.position] for p in documents}

    def parallel_failure(self, pending: PendingDocument) -> int:
        """Count one failed context-parallel read of this document; returns the count so far
        (kept across rewinds: the document is read again after one)."""
        n = self._parallel_failures.get(pending.position, 0) + 1
        self._parallel_failures[pending.position] = n
        return n

    # -- what it amounts to ----------------------------------------------------------------------

    def committable(self) -> dict[int, int]:
        """Partition -> the next offset to read after a restart that loses nothing."""
        return self._offsets.committable()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues)

    @property
    def busy(self) -> bool:
        return bool(self._in_flight) or self.queued > 0
