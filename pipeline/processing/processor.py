"""StreamProcessor: documents topic -> reader actors -> results, metrics and dead-letter topics.

One processor (the driver of ``ttt-stream run``) reads every partition and hands each record to
the reader that owns its partition; a reader reads its documents one at a time, in offset
order. Malformed records and rejected documents go to the dead-letter topic with the reason;
nothing stops the stream. Offsets are committed only below the oldest unfinished record and
only after the broker acknowledged every output for what lies below.
"""

from __future__ import annotations

import logging
import threading
import time

from pipeline.stream_io.source import ConsumerRecord

from pipeline.config import ProcessorConfig
from pipeline.processing.document_intake import DocumentIntake
from pipeline.processing.learning_admission import decision_kind
from pipeline.processing.ledger import PendingDocument, StreamLedger
from pipeline.processing.reader_deadlines import ReaderDeadlines
from pipeline.processing.reader_pool import ContextParallelFailure, DocumentFailed, Learner, ReaderDied, ReaderPool
from pipeline.processing.recovery import RecoveryPolicy, StreamParts
from pipeline.processing.run_summary import RunSummary
from pipeline.processing.status_report import StatusReport
from pipeline.processing.stream_commands import CommandSource, StreamCommands
from pipeline.stream_events import DocumentRead, DocumentRejected, LearningDecided, StreamEvents
from pipeline.stream_io.messages import Rejected, dead_letter_headers, result_message
from pipeline.stream_io.sink import KafkaSinks
from pipeline.stream_io.source import KafkaDocumentSource

log = logging.getLogger(__name__)


class StreamProcessor:
    """The run loop: poll -> accept -> dispatch -> collect -> drain. Everything it works with is
    given, nothing is optional: how progress is made durable and failures recovered is the
    ``recovery`` policy; who watches (metrics, the MLflow run, the monitor, the alert topic)
    subscribes to the ``events`` it publishes (``pipeline.processing.job.build_processor`` wires
    them up). Beside
    the loop, between two of its turns: the control records (``StreamCommands``), the readers'
    deadlines (``ReaderDeadlines``) and the status report (``StatusReport``)."""

    def __init__(self, config: ProcessorConfig, source: KafkaDocumentSource, sinks: KafkaSinks, pool: ReaderPool,
                 intake: DocumentIntake, learner: Learner, recovery: RecoveryPolicy, control: CommandSource):
        self.config = config
        self.source = source
        self.sinks = sinks
        self.pool = pool  # reader i owns the partitions the intake assigns to i
        self.intake = intake
        self.stream = stream = intake.stream
        self.ledger = StreamLedger(len(pool.names), source.positions())  # read on from where the source stands
        self.events = events = StreamEvents()  # what happens to the stream, for whoever watches it
        self.learner = learner  # trains the slow weights; the readers read with its versions
        self.summary = RunSummary()
        self.recovery = recovery
        recovery.attach(StreamParts(config, stream, self.ledger, pool, source, sinks, intake.reader_of, self.summary,
                                    learner, events, self._finish_rejected, self._settle))
        self.commands = StreamCommands(config, stream, control, recovery, sinks, intake.keys, intake.admission,
                                       self._settle, self._dead_letter)
        self.deadlines = ReaderDeadlines(config, stream, self.ledger, pool, learner, sinks)
        self.report = StatusReport(stream, self.ledger, source, self.summary, recovery, learner, pool.status, events,
                                   sinks)
        self.unread_partitions: list[int] = []  # partitions added to the topic while running
        self.stop_event = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, until_idle_s: float | None = None) -> RunSummary:
        """Process until ``stop()`` (or, with ``until_idle_s``, until nothing arrived or finished
        for that long); then finish what is in flight, flush and commit."""
        cfg = self.config
        started = last_activity = last_status = last_progress = time.monotonic()
        try:
            while not self.stop_event.is_set():
                records = self._poll()
                if records:
                    last_activity = time.monotonic()
                    if self.summary.first_record_at is None:
                        self.summary.first_record_at = last_activity
                for record in records:
                    self._accept(record)
                if self.commands.handle():
                    last_activity = time.monotonic()  # a flood of control records is not idleness
                self._dispatch()
                if self._collect(timeout_s=0.0 if records else cfg.poll_timeout_ms / 1000):
                    last_activity = time.monotonic()
                now = time.monotonic()
                self.deadlines.enforce(now)
                self.recovery.tick(now)
                if time.monotonic() - now > cfg.poll_timeout_ms / 1000:
                    # A checkpoint's time (finishing what was taken in, judging, writing) is work,
                    # not idleness: the topic is polled again before the stream may stop as idle.
                    last_activity = time.monotonic()
                if now - last_status >= cfg.status_interval_s:
                    self.commands.alert_refusals()
                    self.report.publish(now - started)
                    self._check_partitions()
                    last_status = now
                if now - last_progress >= 1.0:
                    self.report.progress()
                    last_progress = now
                if until_idle_s is not None and not self.ledger.busy and now - last_activity >= until_idle_s:
                    log.info("idle for %.1f s: stopping", now - last_activity)
                    break
            self._drain()
            self.recovery.finish()
        finally:
            self.summary.wall_s = time.monotonic() - started
        self.report.progress()
        self.commands.alert_refusals()
        self.report.publish(self.summary.wall_s, final=True)
        self.sinks.flush()
        return self.summary

    # -- reading -------------------------------------------------------------------------------

    def _poll(self) -> list[ConsumerRecord]:
        # Backpressure by a budget of queued documents, not by pausing partitions: kafka-python
        # 3.0 can park a paused partition's fetched records and never fetch it again after
        # resume (seen here: the tail of a partition silently went unread).
        budget = 2 * self.config.max_in_flight_per_reader * len(self.pool.names) - self.ledger.queued
        limit = self.recovery.accept_limit()  # the promotion gate's next judging point
        budget = budget if limit is None else min(budget, limit)
        if budget <= 0 or self.recovery.reading_paused:
            return []
        return self.source.poll(timeout_ms=0 if self.ledger.in_flight else self.config.poll_timeout_ms,
                                max_records=budget)

    def _accept(self, record: ConsumerRecord) -> None:
        if self.ledger.given_up(record):
            self.ledger.passed_over(record)
            return
        parsed = self.intake.take(record)
        if isinstance(parsed, Rejected):
            self._dead_letter(record, parsed.reason)
            self.ledger.passed_over(record)
            return
        # The learner takes the documents in the ledger's order, which fixes each one's slow version.
        if self.intake.learns:
            self.events.publish(LearningDecided(decision_kind(parsed.task.kept_out, parsed.task.held_out)))
        slow_version = self.learner.submit(parsed.task)
        self.ledger.accept(record, parsed, self.intake.reader_of[record.partition], slow_version)

    # -- working -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        per_reader: dict[int, list[PendingDocument]] = {}
        for pending in self.ledger.to_send(self.config.max_in_flight_per_reader):
            per_reader.setdefault(pending.reader, []).append(pending)
        size = self.config.documents_per_call
        for w, documents in per_reader.items():
            batches: list[list[PendingDocument]] = []
            for pending in documents:  # one call reads with one slow version
                if batches and len(batches[-1]) < size and batches[-1][0].slow_version is pending.slow_version:
                    batches[-1].append(pending)
                else:
                    batches.append([pending])
            for batch in batches:
                handles = self.pool.submit(w, [p.parsed.task for p in batch], batch[0].slow_version)
                for handle, pending in zip(handles, batch):
                    self.ledger.sent(handle, pending)

    def _collect(self, timeout_s: float) -> int:
        handles = self.ledger.handles()
        if not handles:
            return 0
        # Return on the first finished document (a reader must not wait for the driver), then
        # take whatever else is ready too.
        ready = self.pool.wait(handles, timeout_s)
        for handle in ready:
            pending = self.ledger.take(handle)
            handed = self.pool.hand_off(handle)  # taken on every path: a failed read's is dropped
            if pending is None:
                continue  # already dealt with in its reader's recovery
            try:
                outcome = self.pool.result(handle)
            except ReaderDied:
                self.learner.check()  # a reader waiting on a dead learner's version: LearnerDied
                self.deadlines.died(pending)  # charged once per cause
                self.recovery.reader_died(pending)
                self.deadlines.recovered(pending.reader)
                continue
            except ContextParallelFailure as err:
                self.recovery.context_parallel_failed(pending, str(err))
                continue
            except DocumentFailed as err:
                self._finish_rejected(pending, f"processing error: {err.cause!r}")
                continue
            if not outcome.ok:
                self._finish_rejected(pending, outcome.reason or "rejected")
                continue
            task = pending.parsed.task
            learning = decision_kind(task.kept_out, task.held_out) if self.learner.name is not None else None
            self.sinks.result(result_message(outcome, pending.parsed.meta, *pending.position, pending.record.topic,
                                             learning=task.kept_out or learning),
                              refused=lambda reason, record=pending.record: self._dead_letter(record, reason))
            self.summary.add(outcome)
            self.learner.hand_off(task, handed)
            self.ledger.finished(pending)
            self.recovery.document_done()
            self.events.publish(DocumentRead(outcome))
        return len(ready)

    def _settle(self) -> None:
        """Finish every document taken in (in flight and queued): a cut where the learner has
        learned exactly what the committed offsets cover."""
        while self.ledger.busy:
            self._dispatch()
            self._collect(timeout_s=self.config.poll_timeout_ms / 1000)
            self.deadlines.enforce(time.monotonic())  # a document that never finishes must not hold the cut

    def _finish_rejected(self, pending: PendingDocument, reason: str) -> None:
        self._dead_letter(pending.record, reason)
        self.learner.hand_off(pending.parsed.task, None)  # the learner reads it alone
        self.ledger.finished(pending)

    def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        log.info("dead letter %s/%d/%d: %s", record.topic, record.partition, record.offset, reason)
        self.sinks.dead_letter(record.value, record.key, dead_letter_headers(reason, record.topic, record.partition, record.offset))
        self.summary.reject(reason)
        self.events.publish(DocumentRejected(reason))

    def _drain(self) -> None:
        self._settle()

    # -- reporting -----------------------------------------------------------------------------

    def _check_partitions(self) -> None:
        """Partitions added to the documents topic while running are not read by this run (its
        partitions are assigned at start): say so and stop, so that nothing produced there goes
        unread in silence; the next start reads every partition (states follow, pipeline/state/rescale)."""
        added = self.source.unassigned_partitions()
        if not added or added == self.unread_partitions:
            return
        self.unread_partitions = added
        log.error("the documents topic now has partitions %s that this run does not read (it reads %s): "
                  "stopping; start again to read them all", added, sorted(self.intake.reader_of))
        self.sinks.alert({"type": "partitions_changed", "stream": self.stream, "unread_partitions": added,
                          "read_partitions": sorted(self.intake.reader_of), "time": time.time()})
        self.stop()
