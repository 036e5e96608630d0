"""ReaderDeadlines: a reader stuck on one document past ``processor.document_timeout_s`` is
restarted, and every reader's deaths are counted against ``processor.max_restarts``.

A restart for a deadline is counted when it is asked for; the ``ReaderDied`` its calls then fail
with is not counted again, nor is a death while reading a document read again after a death
(``max_attempts`` counts those), so that documents that kill their reader are dead-lettered,
not the run stopped.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from pipeline.config import ProcessorConfig
from pipeline.processing.ledger import PendingDocument, StreamLedger
from pipeline.processing.reader_pool import Learner, ReaderPool
from pipeline.stream_io.sink import KafkaSinks

log = logging.getLogger(__name__)


class RestartBudgetSpent(RuntimeError):
    """A reader died more often within the window than processor.max_restarts allows."""


class RestartBudget:
    """How often each reader may die within a sliding window (``processor.max_restarts`` in
    ``restart_window_s``), whatever killed it: a reader that keeps dying stops the run with an
    error instead of recovering forever, and a burst long past does not count against today."""

    def __init__(self, max_restarts: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_restarts, self.window_s, self.clock = max_restarts, window_s, clock
        self._deaths: dict[int, list[float]] = {}

    def died(self, reader: int, name: str) -> None:
        now = self.clock()
        deaths = [t for t in self._deaths.get(reader, []) if now - t < self.window_s] + [now]
        self._deaths[reader] = deaths
        if len(deaths) > self.max_restarts:
            raise RestartBudgetSpent(f"reader {name} died {len(deaths)} times in {self.window_s:g} s "
                                     f"(processor.max_restarts {self.max_restarts} in restart_window_s): stopping")


class ReaderDeadlines:
    def __init__(self, config: ProcessorConfig, stream: str, ledger: StreamLedger, pool: ReaderPool,
                 learner: Learner, sinks: KafkaSinks):
        self.timeout_s = config.document_timeout_s
        self.stream = stream
        self.ledger = ledger
        self.pool = pool
        self.learner = learner
        self.sinks = sinks
        self.budget = RestartBudget(config.max_restarts, config.restart_window_s)
        self.restarting: set[int] = set()  # readers restarted for a deadline, until their recovery

    def died(self, pending: PendingDocument) -> None:
        """``pending``'s reader died (RestartBudgetSpent when it died too often)."""
        if pending.reader not in self.restarting and not self.ledger.read_again(pending):
            self.budget.died(pending.reader, self.pool.names[pending.reader])

    def recovered(self, reader: int) -> None:
        self.restarting.discard(reader)

    def enforce(self, now: float) -> None:
        """Restart every reader that has read its document for longer than the deadline."""
        # The synchronous learner holds the stream's state: stopping it would lose what it
        # learned since the checkpoint, and the next run would meet the same document again.
        if self.timeout_s is None or getattr(self.learner, "synchronous", False):
            return
        for w, (pending, since) in self.ledger.reading_since().items():
            if now - since > self.timeout_s and w not in self.restarting:
                name = self.pool.names[w]
                log.warning("reader %s has read %s/%d for %.0f s (processor.document_timeout_s %g): restarting it",
                            name, *pending.position, now - since, self.timeout_s)
                self.sinks.alert({"type": "document_timeout", "stream": self.stream, "reader": name,
                                  "document": pending.parsed.task.id, "seconds": round(now - since, 1),
                                  "time": time.time()})
                self.restarting.add(w)  # its calls now fail with ReaderDied: recovery takes it from there
                self.budget.died(w, name)
                self.pool.restart(w)
