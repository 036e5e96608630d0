"""StreamProcessor: documents topic -> worker actors -> results, metrics and dead-letter topics.

One processor (the driver of ``ttt-stream run``) reads every partition and hands each record to
the worker that owns its partition; a worker reads its documents one at a time, in offset
order. Malformed records and rejected documents go to the dead-letter topic with the reason;
nothing stops the stream. Offsets are committed only below the oldest unfinished record and
only after the broker acknowledged every output for what lies below.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable

from kafka.consumer.fetcher import ConsumerRecord

from pipeline.config import ProcessorConfig
from pipeline.messages import Rejected, dead_letter_headers, parse_document, result_message
from pipeline.checkpoint import BASE, LAST_GOOD, StreamCheckpointer
from pipeline.control import ControlCommand, ControlSource, key_digest
from pipeline.ledger import PendingDocument, StreamLedger
from pipeline.metrics import StreamMetrics, partition_lag
from pipeline.monitor import Breach, DegradationMonitor
from pipeline.processor_run import ProcessorRun, report_figures
from pipeline.recovery import RecoveryPolicy
from pipeline.run_summary import RunSummary
from pipeline.sink import KafkaSinks
from pipeline.source import KafkaDocumentSource
from pipeline.reader_pool import ContextParallelFailure, DocumentFailed, Learner, WorkerDied, ReaderPool

log = logging.getLogger(__name__)


class StreamProcessor:
    def __init__(
        self,
        config: ProcessorConfig,
        source: KafkaDocumentSource,
        sinks: KafkaSinks,
        pool: ReaderPool,
        assignment: dict[int, int],
        stream: str = "default",
        status: Callable[[], dict[str, Any]] | None = None,
        checkpointer: StreamCheckpointer | None = None,
        start_offsets: dict[int, int] | None = None,
        monitor: DegradationMonitor | None = None,
        control: ControlSource | None = None,
        metrics: StreamMetrics | None = None,
        run_log: ProcessorRun | None = None,
        learner: Learner | None = None,
    ):
        self.config = config
        self.source = source
        self.sinks = sinks
        self.stream = stream
        self.status = status
        self.pool = pool  # worker i owns the partitions assigned to i
        self.worker_of = dict(assignment)
        self.ledger = StreamLedger(len(pool.names), start_offsets)
        self.checkpointer = checkpointer
        self.monitor = monitor  # needs the checkpointer: rollbacks go to checkpointed versions
        self.control = control
        self.metrics = metrics
        self.run_log = run_log  # the MLflow run of this processor run: curves over documents
        self.learner = learner  # trains the slow weights; the workers read with its versions
        self._start_documents = checkpointer.documents if checkpointer is not None else 0
        self._last_outcome = None
        self.rollbacks: list[dict[str, Any]] = []
        self.unread_partitions: list[int] = []  # partitions added to the topic while running
        self._rolling_back = False
        self._breach_at_documents = 0
        self._restarting: set[int] = set()  # workers restarted for a deadline, until their recovery
        self._last_commanded_rollback = -math.inf  # monotonic time of the last one the control topic asked for
        self.summary = RunSummary()
        self.recovery = RecoveryPolicy(config, self.ledger, pool, source, self.worker_of, checkpointer,
                                       self.summary, self._finish_rejected, learner)
        self.stop_event = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, until_idle_s: float | None = None) -> RunSummary:
        """Process until ``stop()`` (or, with ``until_idle_s``, until nothing arrived or finished
        for that long); then finish what is in flight, flush and commit."""
        cfg = self.config
        started = last_activity = last_commit = last_status = last_progress = time.monotonic()
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
                self._enforce_deadline(now)
                if self.checkpointer is not None:
                    if self.checkpointer.due(now):
                        self._checkpoint("periodic")
                elif now - last_commit >= cfg.commit_interval_s:
                    self._commit()
                    last_commit = now
                if now - last_status >= cfg.status_interval_s:
                    self._publish_status(now - started)
                    self._check_partitions()
                    last_status = now
                if self.metrics is not None and now - last_progress >= 1.0:
                    self._report_progress()
                    last_progress = now
                if until_idle_s is not None and not self.ledger.busy and now - last_activity >= until_idle_s:
                    log.info("idle for %.1f s: stopping", now - last_activity)
                    break
            self._drain()
            if self.checkpointer is not None:
                self._final_checkpoint()
            else:
                self._commit()
        finally:
            self.summary.wall_s = time.monotonic() - started
        if self.metrics is not None:
            self._report_progress()
        self._publish_status(self.summary.wall_s, final=True)
        self.sinks.flush()
        return self.summary

    # -- reading -------------------------------------------------------------------------------

    def _poll(self) -> list[ConsumerRecord]:
        # Backpressure by a budget of queued documents, not by pausing partitions: kafka-python
        # 3.0 can park a paused partition's fetched records and never fetch it again after
        # resume (seen here: the tail of a partition silently went unread).
        budget = 2 * self.config.max_in_flight_per_worker * len(self.pool.names) - self.ledger.queued
        if budget <= 0 or (self.checkpointer is not None and self.checkpointer.backlog_full):
            return []
        return self.source.poll(timeout_ms=0 if self.ledger.in_flight else self.config.poll_timeout_ms,
                                max_records=budget)

    def _accept(self, record: ConsumerRecord) -> None:
        if self.ledger.given_up(record):
            self.ledger.passed_over(record)
            return
        parsed = parse_document(record.value, record.key, record.topic, record.partition, record.offset,
                                self.config.max_document_bytes)
        if isinstance(parsed, Rejected):
            self._dead_letter(record, parsed.reason)
            self.ledger.passed_over(record)
        else:
            # The learner takes the documents in the ledger's order, which fixes each one's version.
            version = self.learner.submit(parsed.task) if self.learner is not None else None
            self.ledger.accept(record, parsed, self.worker_of[record.partition], version)

    # -- working -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        per_worker: dict[int, list[PendingDocument]] = {}
        for pending in self.ledger.to_send(self.config.max_in_flight_per_worker):
            per_worker.setdefault(pending.worker, []).append(pending)
        size = self.config.documents_per_call
        for w, documents in per_worker.items():
            batches: list[list[PendingDocument]] = []
            for pending in documents:  # one call reads with one version
                if batches and len(batches[-1]) < size and batches[-1][0].version is pending.version:
                    batches[-1].append(pending)
                else:
                    batches.append([pending])
            for batch in batches:
                handles = self.pool.submit(w, [p.parsed.task for p in batch], batch[0].version)
                for handle, pending in zip(handles, batch):
                    self.ledger.sent(handle, pending)

    def _collect(self, timeout_s: float) -> int:
        handles = self.ledger.handles()
        if not handles:
            return 0
        # Return on the first finished document (a worker must not wait for the driver), then
        # take whatever else is ready too.
        ready = self.pool.wait(handles, timeout_s)
        for handle in ready:
            pending = self.ledger.take(handle)
            if pending is None:
                continue  # already dealt with in its worker's recovery
            try:
                outcome = self.pool.result(handle)
            except WorkerDied:
                if self.learner is not None:
                    self.learner.check()  # a reader waiting on a dead learner's version: LearnerDied
                self.recovery.worker_died(pending)
                self._restarting.discard(pending.worker)
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
            self.sinks.result(result_message(outcome, pending.parsed.meta, *pending.position))
            self.summary.add(outcome)
            self._last_outcome = outcome
            if self.metrics is not None:
                self.metrics.document(outcome)
            self.ledger.finished(pending)
            if self.checkpointer is not None:
                self.checkpointer.document_done()
            if self.monitor is not None and not self._rolling_back:
                breach = self.monitor.observe(outcome)
                if breach is not None:
                    self._on_breach(breach)
        return len(ready)

    def _enforce_deadline(self, now: float) -> None:
        timeout = self.config.document_timeout_s
        if timeout is None:
            return
        for w, (pending, since) in self.ledger.reading_since().items():
            if now - since > timeout and w not in self._restarting:
                log.warning("worker %s has read %s/%d for %.0f s (processor.document_timeout_s %g): restarting it",
                            self.pool.names[w], *pending.position, now - since, timeout)
                self.sinks.alert({"type": "document_timeout", "stream": self.stream, "worker": self.pool.names[w],
                                  "document": pending.parsed.task.id, "seconds": round(now - since, 1),
                                  "time": time.time()})
                self._restarting.add(w)  # its calls now fail with WorkerDied: recovery takes it from there
                self.pool.restart(w)

    def _finish_rejected(self, pending: PendingDocument, reason: str) -> None:
        self._dead_letter(pending.record, reason)
        self.ledger.finished(pending)

    def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        log.info("dead letter %s/%d/%d: %s", record.topic, record.partition, record.offset, reason)
        self.sinks.dead_letter(record.value, record.key, dead_letter_headers(reason, record.topic, record.partition, record.offset))
        self.summary.reject(reason)
        if self.metrics is not None:
            self.metrics.dead_letter(reason)

    def _drain(self) -> None:
        while self.ledger.busy:
            self._dispatch()
            self._collect(timeout_s=self.config.poll_timeout_ms / 1000)

    # -- committing and reporting ----------------------------------------------------------------

    def _checkpoint(self, reason: str) -> str | None:
        """A consistent cut: finish what the workers hold, snapshot their states, write the
        checkpoint, and only then commit the offsets it records."""
        while self.ledger.in_flight:
            self._collect(timeout_s=self.config.poll_timeout_ms / 1000)
        self.sinks.flush()
        offsets = self.ledger.committable()
        states = self.pool.snapshot()
        if self.learner is not None:  # after every document accepted so far: the same cut
            states[self.learner.name] = self.learner.snapshot()
        version = self.checkpointer.write(states, offsets, reason, self.summary.checkpoint_metrics())
        if self.metrics is not None:
            self.metrics.checkpoint(version, reason)
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
        if self.metrics is not None:
            self.metrics.alert(breach.rule)
        self.sinks.alert({"type": "alert", "stream": self.stream, "rule": breach.rule, "values": breach.values,
                          "document": breach.document, "version": live, "time": time.time()})
        if self.config.monitor.auto_rollback:
            self.rollback(LAST_GOOD, cause=breach.rule)

    def _handle_commands(self) -> None:
        for record, command in self.control.poll():
            refusal = command if isinstance(command, str) else self._refusal(command)
            if refusal is not None:
                # Never executed: alerted, and the record kept in the dead-letter topic.
                log.warning("control record %s/%d/%d refused: %s", record.topic, record.partition, record.offset, refusal)
                self.sinks.alert({"type": "control_error", "stream": self.stream, "error": refusal,
                                  "request_id": None if isinstance(command, str) else command.request_id,
                                  "time": time.time()})
                self._dead_letter(record, refusal)
                continue
            if command.action == "forget":
                self.forget(command.key, request_id=command.request_id)
                continue
            self._last_commanded_rollback = time.monotonic()
            self.rollback(command.to, cause="manual", request_id=command.request_id)

    def _refusal(self, command: ControlCommand) -> str | None:
        """Why a signed command is still not carried out (None: it is)."""
        if self.checkpointer is None:
            return f"{command.action} needs processor.checkpoint.enabled"
        if command.action == "forget":
            return None if self.config.scope == "per_key" else (
                f"refused: forget erases a per_key state; this stream's scope is {self.config.scope!r}")
        if command.to not in (BASE, LAST_GOOD):
            try:
                known = self.checkpointer.store.resolve(command.to) is not None
            except Exception:  # noqa: BLE001 - MLflow out of reach: the rollback itself reports it
                known = True
            if not known:
                return f"refused: {self.checkpointer.store.name} has no version {command.to!r}"
        since = time.monotonic() - self._last_commanded_rollback
        interval = self.config.control.min_rollback_interval_s
        if since < interval:
            return (f"refused: a rollback was asked for {since:.0f} s ago "
                    f"(processor.control.min_rollback_interval_s {interval:g})")
        return None

    def forget(self, key: str, request_id: str | None = None) -> str | None:
        """Erase ``key``'s per-key state on every worker (in memory, spilled, its replay buffer
        with it) and write a version without it; returns that version. Documents of the key read
        after this start a new state; earlier versions in MLflow keep theirs until retention."""
        while self.ledger.in_flight:  # documents already on the workers finish first
            self._collect(timeout_s=self.config.poll_timeout_ms / 1000)
        held = sum(self.pool.forget(w, key) for w in range(len(self.pool.names)))
        version = self._checkpoint("forget")
        digest = key_digest(key)
        log.info("forgot key %s (held by %d workers): version %s", digest, held, version)
        self.sinks.alert({"type": "forget", "stream": self.stream, "key_sha256": digest, "held": held,
                          "version": version, "request_id": request_id, "time": time.time()})
        return version

    def rollback(self, target: str, cause: str, request_id: str | None = None) -> str | None:
        """Every worker back to the states of version ``target`` (number or alias), recorded as a
        new version (reason ``rollback``) that becomes ``live``. The stream reads on from where it
        is: the documents since ``target`` stay read, their learning is dropped."""
        started = time.monotonic()
        self._rolling_back = True
        try:
            while self.ledger.in_flight:  # documents already on the workers finish first
                self._collect(timeout_s=self.config.poll_timeout_ms / 1000)
        finally:
            self._rolling_back = False
        previous = self.checkpointer.version
        try:
            checkpoint = self.recovery.restore_all(target)
        except Exception as err:  # noqa: BLE001 - CheckpointError or MLflow down: keep serving
            log.error("rollback to %s failed: %s", target, err)
            self.sinks.alert({"type": "rollback_failed", "stream": self.stream, "to": target, "error": str(err),
                              "request_id": request_id, "time": time.time()})
            return None
        serving_s, served_at = time.monotonic() - started, time.time()
        after_breach = None if cause == "manual" else self.summary.documents - self._breach_at_documents
        self.sinks.flush()
        offsets = self.ledger.committable()
        version = self.checkpointer.write(
            checkpoint.states, offsets, "rollback", self.summary.checkpoint_metrics(),
            tags={"rollback_to": checkpoint.version, "rollback_from": str(previous), "rollback_cause": cause},
        )
        if version is not None:
            self.source.commit(offsets)
        if self.metrics is not None:
            self.metrics.checkpoint(version, "rollback")
            self.metrics.rollback(cause)
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
        self.source.commit(self.ledger.committable())

    def _check_partitions(self) -> None:
        """Partitions added to the documents topic while running are not read by this run (its
        partitions are assigned at start): say so and stop, so that nothing produced there goes
        unread in silence; the next start reads every partition (states follow, pipeline/rescale)."""
        added = self.source.unassigned_partitions()
        if not added or added == self.unread_partitions:
            return
        self.unread_partitions = added
        log.error("the documents topic now has partitions %s that this run does not read (it reads %s): "
                  "stopping; start again to read them all", added, sorted(self.worker_of))
        self.sinks.alert({"type": "partitions_changed", "stream": self.stream, "unread_partitions": added,
                          "read_partitions": sorted(self.worker_of), "time": time.time()})
        self.stop()

    def _report_progress(self) -> None:
        self.metrics.progress(self.ledger.committable(), self.source.highwaters(), self.ledger.in_flight,
                              self.ledger.queued)

    def _publish_status(self, elapsed_s: float, final: bool = False) -> None:
        message = {
            "type": "status",
            "stream": self.stream,
            "time": time.time(),
            "final": final,
            "in_flight": self.ledger.in_flight,
            "queued": self.ledger.queued,
            "committed": {str(p): o for p, o in self.ledger.committable().items()},
            "checkpoint": None if self.checkpointer is None else {
                "version": self.checkpointer.version, "pending_documents": self.checkpointer.pending_documents,
                "failures": self.checkpointer.failures, "reading_paused": self.checkpointer.backlog_full,
            },
            **self.summary.as_dict(),
        }
        message["wall_s"] = round(elapsed_s, 3)  # the run so far, not the summary's final figure
        if self.metrics is not None and self.metrics.url is not None:
            message["metrics_url"] = self.metrics.url
        if self.status is not None:
            try:
                report = self.status()
                message["workers"] = report["workers"]
                for part in ("context_parallel", "learner"):
                    if part in report:
                        message[part] = report[part]
            except Exception as err:  # noqa: BLE001 - status is best effort; the stream goes on
                message["workers_error"] = repr(err)
        self.sinks.metrics(message)
        if self.run_log is not None:
            self.run_log.log(report_figures(message, self._run_figures()), step=self._start_documents + self.summary.documents)

    def _run_figures(self) -> dict[str, float | None]:
        lags = partition_lag(self.ledger.committable(), self.source.highwaters())
        last = self._last_outcome
        return {
            "lag": float(sum(lags.values())) if lags else None,
            "delta_ratio": last.delta_ratio if last is not None and last.delta_ratio >= 0 else None,
            "slow_delta_ratio": last.slow_delta_ratio if last is not None and last.slow_delta_ratio > 0 else None,
            "rollbacks": float(len(self.rollbacks)),
            "checkpoint_version": float(self.checkpointer.version) if self.checkpointer and self.checkpointer.version else None,
            "checkpoint_failures": float(self.checkpointer.failures) if self.checkpointer is not None else None,
        }
