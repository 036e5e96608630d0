"""StreamProcessor: documents topic -> worker actors -> results, metrics and dead-letter topics.

One processor (the driver of ``ttt-stream run``) reads every partition and hands each record to
the worker that owns its partition; a worker reads its documents one at a time, in offset
order. Malformed records and rejected documents go to the dead-letter topic with the reason;
nothing stops the stream. Offsets are committed only below the oldest unfinished record and
only after the broker acknowledged every output for what lies below.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from kafka.consumer.fetcher import ConsumerRecord

from actors.document_worker import DocumentOutcome
from pipeline.config import ProcessorConfig
from pipeline.messages import ParsedDocument, Rejected, dead_letter_headers, parse_document, result_message
from pipeline.checkpoint import LAST_GOOD, StreamCheckpointer
from pipeline.control import ControlSource
from pipeline.monitor import Breach, DegradationMonitor
from pipeline.offsets import OffsetTracker
from pipeline.sink import KafkaSinks
from pipeline.source import KafkaDocumentSource
from pipeline.worker_pool import ContextParallelFailure, DocumentFailed, WorkerDied, WorkerPool

log = logging.getLogger(__name__)


@dataclass
class PendingDocument:
    record: ConsumerRecord
    parsed: ParsedDocument
    worker: int
    attempts: int = 0


@dataclass
class RunSummary:
    """What one run did; the loss figures are token-weighted means."""

    documents: int = 0
    dead_letters: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    # From the first record read to the last document finished: the rates use this, so that an
    # idle wait at the end (--until-idle) does not dilute them.
    first_record_at: float | None = None
    last_finished_at: float | None = None
    worker_busy_s: float = 0.0
    loss_sum: float = 0.0
    loss_tokens: int = 0
    sampled_documents: int = 0
    sampled_adapted_sum: float = 0.0
    sampled_base_sum: float = 0.0
    sampled_tokens: int = 0
    retries: int = 0
    parallel_failures: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def active_s(self) -> float:
        if self.first_record_at is None or self.last_finished_at is None:
            return 0.0
        return self.last_finished_at - self.first_record_at

    def add(self, outcome: DocumentOutcome) -> None:
        self.last_finished_at = time.monotonic()
        self.documents += 1
        self.tokens += outcome.tokens
        self.worker_busy_s += outcome.latency_ms / 1000.0
        if outcome.loss is not None:
            self.loss_sum += outcome.loss * outcome.tokens
            self.loss_tokens += outcome.tokens
            if outcome.base_loss is not None:
                self.sampled_documents += 1
                self.sampled_adapted_sum += outcome.loss * outcome.tokens
                self.sampled_base_sum += outcome.base_loss * outcome.tokens
                self.sampled_tokens += outcome.tokens

    def checkpoint_metrics(self) -> dict[str, float]:
        d = self.as_dict()
        keys = ("documents", "dead_letters", "tokens", "adapted_loss", "sampled_adapted_loss", "sampled_base_loss")
        return {k: float(d[k]) for k in keys if d[k] is not None}

    def reject(self, reason: str) -> None:
        self.last_finished_at = time.monotonic()
        self.dead_letters += 1
        kind = reason.split(":", 1)[0]
        self.reasons[kind] = self.reasons.get(kind, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        return {
            "documents": self.documents,
            "dead_letters": self.dead_letters,
            "dead_letter_reasons": dict(self.reasons),
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 3),
            "active_s": round(self.active_s, 3),
            "documents_per_s": ratio(self.documents, self.active_s),
            "tokens_per_s": ratio(self.tokens, self.active_s),
            "worker_busy_s": round(self.worker_busy_s, 3),
            "adapted_loss": ratio(self.loss_sum, self.loss_tokens),
            "sampled_documents": self.sampled_documents,
            "sampled_adapted_loss": ratio(self.sampled_adapted_sum, self.sampled_tokens),
            "sampled_base_loss": ratio(self.sampled_base_sum, self.sampled_tokens),
            "retries": self.retries,
            "parallel_failures": self.parallel_failures,
        }


class StreamProcessor:
    def __init__(
        self,
        config: ProcessorConfig,
        source: KafkaDocumentSource,
        sinks: KafkaSinks,
        pool: WorkerPool,
        assignment: dict[int, int],
        stream: str = "default",
        status: Callable[[], dict[str, Any]] | None = None,
        checkpointer: StreamCheckpointer | None = None,
        start_offsets: dict[int, int] | None = None,
        monitor: DegradationMonitor | None = None,
        control: ControlSource | None = None,
    ):
        self.config = config
        self.source = source
        self.sinks = sinks
        self.stream = stream
        self.status = status
        self.pool = pool  # worker i owns the partitions assigned to i
        self.worker_names = pool.names
        self.worker_of = dict(assignment)
        self.queues: list[deque[PendingDocument]] = [deque() for _ in pool.names]
        self.in_flight: dict[Any, PendingDocument] = {}  # pool handle -> document
        self.offsets = OffsetTracker(start_offsets or {})
        self.checkpointer = checkpointer
        self.monitor = monitor  # needs the checkpointer: rollbacks go to checkpointed versions
        self.control = control
        self.rollbacks: list[dict[str, Any]] = []
        self._rolling_back = False
        self._breach_at_documents = 0
        self.summary = RunSummary()
        self.parallel_failures: dict[tuple[int, int], int] = {}
        self.stop_event = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, until_idle_s: float | None = None) -> RunSummary:
        """Process until ``stop()`` (or, with ``until_idle_s``, until nothing arrived or finished
        for that long); then finish what is in flight, flush and commit."""
        cfg = self.config
        started = last_activity = last_commit = last_status = time.monotonic()
        try:
            while not self.stop_event.is_set():
                records = self._poll()
                if records:
                    last_activity = time.monotonic()
                    if self.summary.first_record_at is None:
                        self.summary.first_record_at = last_activity
                for record in records:
                    self._accept(record)
                if self.control is not None:
                    self._handle_commands()
                self._dispatch()
                if self._collect(timeout_s=0.0 if records else cfg.poll_timeout_ms / 1000):
                    last_activity = time.monotonic()
                now = time.monotonic()
                if self.checkpointer is not None:
                    if self.checkpointer.due(now):
                        self._checkpoint("periodic")
                elif now - last_commit >= cfg.commit_interval_s:
                    self._commit()
                    last_commit = now
                if now - last_status >= cfg.status_interval_s:
                    self._publish_status(now - started)
                    last_status = now
                busy = self.in_flight or any(self.queues)
                if until_idle_s is not None and not busy and now - last_activity >= until_idle_s:
                    log.info("idle for %.1f s: stopping", now - last_activity)
                    break
            self._drain()
            if self.checkpointer is not None:
                self._final_checkpoint()
            else:
                self._commit()
        finally:
            self.summary.wall_s = time.monotonic() - started
        self._publish_status(self.summary.wall_s, final=True)
        self.sinks.flush()
        return self.summary

    # -- reading -------------------------------------------------------------------------------

    def _poll(self) -> list[ConsumerRecord]:
        # Backpressure by a budget of queued documents, not by pausing partitions: kafka-python
        # 3.0 can park a paused partition's fetched records and never fetch it again after
        # resume (seen here: the tail of a partition silently went unread).
        budget = 2 * self.config.max_in_flight_per_worker * len(self.queues) - sum(len(q) for q in self.queues)
        if budget <= 0 or (self.checkpointer is not None and self.checkpointer.backlog_full):
            return []
        return self.source.poll(timeout_ms=0 if self.in_flight else self.config.poll_timeout_ms, max_records=budget)

    def _accept(self, record: ConsumerRecord) -> None:
        parsed = parse_document(record.value, record.key, record.topic, record.partition, record.offset)
        self.offsets.started(record.partition, record.offset)
        if isinstance(parsed, Rejected):
            self._dead_letter(record, parsed.reason)
            self.offsets.finished(record.partition, record.offset)
            return
        self.queues[self.worker_of[record.partition]].append(PendingDocument(record, parsed, self.worker_of[record.partition]))

    # -- working -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        per_worker = [0] * len(self.queues)
        for pending in self.in_flight.values():
            per_worker[pending.worker] += 1
        for w, queue in enumerate(self.queues):
            while queue and per_worker[w] < self.config.max_in_flight_per_worker:
                pending = queue.popleft()
                pending.attempts += 1
                self.in_flight[self.pool.submit(w, pending.parsed.task)] = pending
                per_worker[w] += 1

    def _collect(self, timeout_s: float) -> int:
        if not self.in_flight:
            return 0
        # Return on the first finished document (a worker must not wait for the driver), then
        # take whatever else is ready too.
        ready = self.pool.wait(list(self.in_flight), timeout_s)
        for ref in ready:
            if ref not in self.in_flight:
                continue  # already handled with its worker's failure
            pending = self.in_flight.pop(ref)
            try:
                outcome = self.pool.result(ref)
            except WorkerDied:
                self._worker_failed(pending)
                continue
            except ContextParallelFailure as err:
                self._context_parallel_failed(pending, str(err))
                continue
            except DocumentFailed as err:
                self._finish_rejected(pending, f"processing error: {err.cause!r}")
                continue
            if outcome.ok:
                self.sinks.result(result_message(outcome, pending.parsed.meta, pending.record.partition, pending.record.offset))
                self.summary.add(outcome)
                self.offsets.finished(pending.record.partition, pending.record.offset)
                if self.checkpointer is not None:
                    self.checkpointer.document_done()
                if self.monitor is not None and not self._rolling_back:
                    breach = self.monitor.observe(outcome)
                    if breach is not None:
                        self._on_breach(breach)
            else:
                self._finish_rejected(pending, outcome.reason or "rejected")
        return len(ready)

    def _worker_failed(self, first: PendingDocument) -> None:
        if self.checkpointer is not None:
            self._recover_worker(first.worker)
        else:
            self._retry_on_restart(first)

    def _context_parallel_failed(self, pending: PendingDocument, reason: str) -> None:
        """A context-parallel member died while reading this document. The worker is alive but
        may have learned part of the document and has read on past it, so (with checkpoints) it
        goes back to the last checkpoint and its partitions are read again from there, the
        document included; the service forms a new group meanwhile. A document that fails
        ``max_attempts`` times goes to the dead-letter topic."""
        key = (pending.record.partition, pending.record.offset)
        self.parallel_failures[key] = self.parallel_failures.get(key, 0) + 1
        self.summary.parallel_failures += 1
        log.warning("context-parallel read of %s/%d failed (%d): %s", *key, self.parallel_failures[key], reason)
        if self.parallel_failures[key] >= self.config.max_attempts:
            self._finish_rejected(pending, f"context-parallel read failed {self.parallel_failures[key]} times: {reason}")
        elif self.checkpointer is not None:
            self._recover_worker(pending.worker, restarted=False)
        else:
            # Sent again after what is already on the worker: without checkpoints, best effort.
            self.summary.retries += 1
            self.queues[pending.worker].appendleft(pending)

    def _recover_worker(self, w: int, restarted: bool = True) -> None:
        """Exactly-once state: the (restarted) worker takes the states of the last checkpoint and
        its partitions are read again from that checkpoint's offsets. (Results of the documents
        read since then are sent again: results are at least once, states exactly once.)"""
        refs = [ref for ref, p in self.in_flight.items() if p.worker == w]
        self.pool.wait(refs, timeout_s=60, every=True)
        for ref in refs:
            del self.in_flight[ref]
        self.queues[w].clear()
        if restarted and not self.pool.wait_ready(w, self.config.restart_timeout_s):
            raise RuntimeError(f"worker {self.worker_names[w]} did not come back within {self.config.restart_timeout_s} s")
        version = self.checkpointer.version
        blobs = self.checkpointer.store.load(version).states.get(self.worker_names[w], []) if version else []
        self.pool.restore(w, blobs)
        partitions = {p: self.checkpointer.offsets.get(p, 0) for p, i in self.worker_of.items() if i == w}
        self.source.seek(partitions)
        for p, offset in partitions.items():
            self.offsets.rewind(p, offset)
        self.summary.retries += 1
        log.warning("worker %s %s: restored from checkpoint %s, partitions %s read again from %s",
                    self.worker_names[w], "died" if restarted else "failed a document",
                    version or "(none: fresh state)", sorted(partitions), partitions)

    def _retry_on_restart(self, first: PendingDocument) -> None:
        """Without checkpoints: every document in flight on the dead worker failed. Wait for all
        of them, then put them back at the head of its queue in offset order, for the restarted
        actor (whose state starts over)."""
        w = first.worker
        refs = [ref for ref, p in self.in_flight.items() if p.worker == w]
        done = set(self.pool.wait(refs, timeout_s=60, every=True))
        failed = [first]
        for ref in refs:
            try:
                if ref not in done:
                    raise WorkerDied("no answer within 60 s")
                self.pool.result(ref)
            except (WorkerDied, ContextParallelFailure, DocumentFailed):  # any failure of a dead worker's call is a retry
                failed.append(self.in_flight.pop(ref))
            # else: it finished before the crash and is collected normally
        failed.sort(key=lambda p: (p.record.partition, p.record.offset), reverse=True)
        back = self.pool.wait_ready(w, self.config.restart_timeout_s)
        for pending in failed:
            if not back or pending.attempts >= self.config.max_attempts:
                self._finish_rejected(pending, f"worker failed: {pending.attempts} attempts died with the worker")
            else:
                self.summary.retries += 1
                self.queues[w].appendleft(pending)
        log.warning("worker %d died; %d documents go back to its queue", w, len(failed))

    def _finish_rejected(self, pending: PendingDocument, reason: str) -> None:
        self._dead_letter(pending.record, reason)
        self.offsets.finished(pending.record.partition, pending.record.offset)

    def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        log.info("dead letter %s/%d/%d: %s", record.topic, record.partition, record.offset, reason)
        self.sinks.dead_letter(record.value, record.key, dead_letter_headers(reason, record.topic, record.partition, record.offset))
        self.summary.reject(reason)

    def _drain(self) -> None:
        while self.in_flight or any(self.queues):
            self._dispatch()
            self._collect(timeout_s=self.config.poll_timeout_ms / 1000)

    # -- committing and reporting ----------------------------------------------------------------

    def _checkpoint(self, reason: str) -> str | None:
        """A consistent cut: finish what the workers hold, snapshot their states, write the
        checkpoint, and only then commit the offsets it records."""
        while self.in_flight:
            self._collect(timeout_s=self.config.poll_timeout_ms / 1000)
        self.sinks.flush()
        offsets = self.offsets.committable()
        states = self.pool.snapshot()
        version = self.checkpointer.write(states, offsets, reason, self.summary.checkpoint_metrics())
        if version is None:
            return None
        self.source.commit(offsets)
        if self.monitor is not None and self.monitor.passes():
            store = self.checkpointer.store
            try:
                if self.monitor.reference_loss is not None:
                    store.record_reference_loss(version, self.monitor.reference_loss)
                store.set_alias(LAST_GOOD, version)
            except Exception as err:  # noqa: BLE001 - MLflow went away just now: last-good stays
                log.warning("could not move %s to v%s: %s", LAST_GOOD, version, err)
        return version

    # -- monitoring and rollback -----------------------------------------------------------------

    def _on_breach(self, breach: Breach) -> None:
        self._breach_at_documents = self.summary.documents
        live = self.checkpointer.version
        log.warning("degradation: rule %s on document %s: %s", breach.rule, breach.document, breach.values)
        self.sinks.alert({"type": "alert", "stream": self.stream, "rule": breach.rule, "values": breach.values,
                          "document": breach.document, "version": live, "time": time.time()})
        if self.config.monitor.auto_rollback:
            self.rollback(LAST_GOOD, cause=breach.rule)

    def _handle_commands(self) -> None:
        for command in self.control.poll():
            if isinstance(command, str):
                self.sinks.alert({"type": "control_error", "stream": self.stream, "error": command, "time": time.time()})
            elif self.checkpointer is None:
                self.sinks.alert({"type": "control_error", "stream": self.stream, "request_id": command.request_id,
                                  "error": "rollback needs processor.checkpoint.enabled", "time": time.time()})
            else:
                self.rollback(command.to, cause="manual", request_id=command.request_id)

    def rollback(self, target: str, cause: str, request_id: str | None = None) -> str | None:
        """Every worker back to the states of version ``target`` (number or alias), recorded as a
        new version (reason ``rollback``) that becomes ``live``. The stream reads on from where it
        is: the documents since ``target`` stay read, their learning is dropped."""
        started = time.monotonic()
        self._rolling_back = True
        try:
            while self.in_flight:  # documents already on the workers finish first
                self._collect(timeout_s=self.config.poll_timeout_ms / 1000)
        finally:
            self._rolling_back = False
        previous = self.checkpointer.version
        try:
            checkpoint = self.checkpointer.store.load(target)
        except Exception as err:  # noqa: BLE001 - CheckpointError or MLflow down: keep serving
            log.error("rollback to %s failed: %s", target, err)
            self.sinks.alert({"type": "rollback_failed", "stream": self.stream, "to": target, "error": str(err),
                              "request_id": request_id, "time": time.time()})
            return None
        for w, name in enumerate(self.worker_names):
            self.pool.restore(w, checkpoint.states.get(name, []))
        serving_s, served_at = time.monotonic() - started, time.time()
        after_breach = None if cause == "manual" else self.summary.documents - self._breach_at_documents
        self.sinks.flush()
        offsets = self.offsets.committable()
        version = self.checkpointer.write(
            checkpoint.states, offsets, "rollback", self.summary.checkpoint_metrics(),
            tags={"rollback_to": checkpoint.version, "rollback_from": str(previous), "rollback_cause": cause},
        )
        if version is not None:
            self.source.commit(offsets)
        if self.monitor is not None:
            self.monitor.reset()
        record = {
            "type": "rollback", "stream": self.stream, "cause": cause, "from": previous, "to": checkpoint.version,
            "version": version, "request_id": request_id, "serving_after_s": round(serving_s, 3),
            "documents_after_breach": after_breach, "served_at": served_at,
            "recorded_after_s": round(time.monotonic() - started, 3), "time": time.time(),
        }
        self.rollbacks.append(record)
        self.sinks.alert(record)
        self.sinks.flush()
        log.warning("rolled back to v%s (%s): workers serving it after %.2f s; recorded as v%s",
                    checkpoint.version, cause, serving_s, version)
        return version


    def _final_checkpoint(self) -> None:
        deadline = time.monotonic() + self.config.checkpoint.retry_max_s * 4
        while self.checkpointer.pending_documents and time.monotonic() < deadline:
            if self._checkpoint("shutdown") is not None:
                return
            time.sleep(self.config.checkpoint.retry_initial_s)
        if self.checkpointer.pending_documents:
            log.error("no checkpoint after shutdown: %d documents will be read again on restart",
                      self.checkpointer.pending_documents)

    def _commit(self) -> None:
        self.sinks.flush()  # raises DeliveryError, and then nothing is committed
        self.source.commit(self.offsets.committable())

    def _publish_status(self, elapsed_s: float, final: bool = False) -> None:
        message = {
            "type": "status",
            "stream": self.stream,
            "time": time.time(),
            "final": final,
            "in_flight": len(self.in_flight),
            "queued": sum(len(q) for q in self.queues),
            "committed": {str(p): o for p, o in self.offsets.committable().items()},
            "checkpoint": None if self.checkpointer is None else {
                "version": self.checkpointer.version, "pending_documents": self.checkpointer.pending_documents,
                "failures": self.checkpointer.failures, "reading_paused": self.checkpointer.backlog_full,
            },
            **self.summary.as_dict(),
        }
        message["wall_s"] = round(elapsed_s, 3)  # the run so far, not the summary's final figure
        if self.status is not None:
            try:
                report = self.status()
                message["workers"] = report["workers"]
                if "context_parallel" in report:
                    message["context_parallel"] = report["context_parallel"]
            except Exception as err:  # noqa: BLE001 - status is best effort; the stream goes on
                message["workers_error"] = repr(err)
        self.sinks.metrics(message)
