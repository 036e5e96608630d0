"""StreamProcessor: documents topic -> reader actors -> results, metrics and dead-letter topics.

One processor (the driver of ``ttt-stream run``) reads every partition and hands each record to
the reader that owns its partition; a reader reads its documents one at a time, in offset
order. Malformed records and rejected documents go to the dead-letter topic with the reason;
nothing stops the stream. Offsets are committed only below the oldest unfinished record and
only after the broker acknowledged every output for what lies below.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Protocol

from kafka.consumer.fetcher import ConsumerRecord

from pipeline.config import ProcessorConfig
from pipeline.stream_io.control import ControlCommand
from pipeline.processing.ledger import PendingDocument, StreamLedger
from pipeline.stream_io.messages import Rejected, dead_letter_headers, parse_document, reason_kind, result_message
from pipeline.observability.metrics import partition_lag
from pipeline.processing.reader_pool import ContextParallelFailure, DocumentFailed, Learner, ReaderPool, ReaderDied
from pipeline.processing.recovery import CommandFailed, RecoveryPolicy, RestartBudget, StreamParts
from pipeline.processing.run_summary import RunSummary
from pipeline.state.tenant_keys import TenantKeys
from pipeline.stream_io.sink import KafkaSinks
from pipeline.stream_io.source import KafkaDocumentSource
from pipeline.processing.learning_admission import LearningAdmission, decision_kind
from pipeline.processing.learner_pace import LearnerPace, learner_pace
from pipeline.processing.stream_events import (DocumentRead, DocumentRejected, LearningDecided, Progress, RolledBack,
                                               StatusTick, StreamEvents)

log = logging.getLogger(__name__)


class CommandSource(Protocol):
    """Where signed control commands come from (``pipeline.stream_io.control.ControlSource``):
    each record with its verified command, or why it was refused."""

    def poll(self) -> list[tuple[ConsumerRecord, ControlCommand | str]]: ...


class StreamProcessor:
    """The run loop. Everything it works with is given, nothing is optional: how progress is made
    durable and failures recovered is the ``recovery`` policy; who watches (metrics, the MLflow
    run, the monitor, the alert topic) subscribes to ``events`` (``pipeline.processing.job.build_processor``
    wires one up)."""

    def __init__(
        self,
        config: ProcessorConfig,
        source: KafkaDocumentSource,
        sinks: KafkaSinks,
        pool: ReaderPool,
        assignment: dict[int, int],
        stream: str,
        status: Callable[[], dict[str, Any]],
        recovery: RecoveryPolicy,
        events: StreamEvents,
        control: CommandSource,
        learner: Learner,
        keys: TenantKeys,
        start_offsets: dict[int, int] | None = None,
        admission: LearningAdmission | None = None,
    ):
        self.config = config
        self.source = source
        self.sinks = sinks
        self.stream = stream
        self.status = status
        self._learner_behind = False
        self.pool = pool  # reader i owns the partitions assigned to i
        self.reader_of = dict(assignment)
        self.ledger = StreamLedger(len(pool.names), start_offsets)
        self.events = events
        self.control = control
        self.learner = learner  # trains the slow weights; the readers read with its versions
        self.keys = keys  # names of per-key states
        self.admission = admission  # which documents the learner may learn from (None: all but the held-out)
        self.summary = RunSummary()
        self.recovery = recovery
        recovery.attach(StreamParts(config, stream, self.ledger, pool, source, sinks, self.reader_of, self.summary,
                                    learner, events, self._finish_rejected, self._settle))
        self._last_outcome = None
        self.rollbacks: list[dict[str, Any]] = []
        events.subscribe(RolledBack, lambda e: self.rollbacks.append(e.record))
        self.unread_partitions: list[int] = []  # partitions added to the topic while running
        self._restarting: set[int] = set()  # readers restarted for a deadline, until their recovery
        self.restarts = RestartBudget(config.max_restarts, config.restart_window_s)
        self._last_command: dict[str, float] = {}  # action -> monotonic time the control topic last had it done
        self._control_refused: dict[str, int] = {}  # refused control records by reason kind, since the last alert
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
                if self._handle_commands():
                    last_activity = time.monotonic()  # a flood of control records is not idleness
                self._dispatch()
                if self._collect(timeout_s=0.0 if records else cfg.poll_timeout_ms / 1000):
                    last_activity = time.monotonic()
                now = time.monotonic()
                self._enforce_deadline(now)
                self.recovery.tick(now)
                if time.monotonic() - now > cfg.poll_timeout_ms / 1000:
                    # A checkpoint's time (finishing what was taken in, judging, writing) is work,
                    # not idleness: the topic is polled again before the stream may stop as idle.
                    last_activity = time.monotonic()
                if now - last_status >= cfg.status_interval_s:
                    self._alert_control_refusals()
                    self._publish_status(now - started)
                    self._check_partitions()
                    last_status = now
                if now - last_progress >= 1.0:
                    self._report_progress()
                    last_progress = now
                if until_idle_s is not None and not self.ledger.busy and now - last_activity >= until_idle_s:
                    log.info("idle for %.1f s: stopping", now - last_activity)
                    break
            self._drain()
            self.recovery.finish()
        finally:
            self.summary.wall_s = time.monotonic() - started
        self._report_progress()
        self._alert_control_refusals()
        self._publish_status(self.summary.wall_s, final=True)
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
        parsed = parse_document(record.value, record.key, record.topic, record.partition, record.offset,
                                self.config.max_document_bytes)
        if isinstance(parsed, Rejected):
            self._dead_letter(record, parsed.reason)
            self.ledger.passed_over(record)
        else:
            # From here on a tenant is its state's name, never its key (pipeline.state.tenant_keys).
            key = self.keys.state_key(parsed.task.key)
            # Samples by a keyed hash of the position: fixed on a replay, and out of a producer's reach.
            position = (record.partition, record.offset)
            shadow = self.keys.draw("shadow", *position) < self.config.base_loss_sample_rate
            held_out, kept_out, worth = False, None, None
            if self.learner.name is not None:
                gate, admission = self.config.learner.gate, self.admission
                held_out = gate.enabled and self.keys.draw("held out", *position) < gate.holdout_fraction
                if admission is not None:
                    kept_out = admission.decide(parsed.task.text, key, held_out)
                    held_out = held_out and kept_out is None  # no copy or junk in the held-out slice
                    worth = admission.novelty
                    if admission.newly_quarantined is not None:
                        log.warning("the key of state %s is quarantined: %d of its documents in a row were kept from "
                                    "learning", key, self.config.learner.admission.quarantine_after)
                        self.sinks.alert({"type": "quarantined", "stream": self.stream, "state_key": key,
                                          "last_reason": kept_out, "release": "ttt-stream release KEY",
                                          "time": time.time()})
                self.events.publish(LearningDecided(decision_kind(kept_out, held_out)))
            parsed = replace(parsed, task=replace(parsed.task, key=key, shadow=shadow, held_out=held_out,
                                                  kept_out=kept_out, worth=worth))
            # The learner takes the documents in the ledger's order, which fixes each one's version.
            version = self.learner.submit(parsed.task)
            self.ledger.accept(record, parsed, self.reader_of[record.partition], version)

    # -- working -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        per_reader: dict[int, list[PendingDocument]] = {}
        for pending in self.ledger.to_send(self.config.max_in_flight_per_reader):
            per_reader.setdefault(pending.reader, []).append(pending)
        size = self.config.documents_per_call
        for w, documents in per_reader.items():
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
                # Charged once per cause: not for a deadline restart (counted when asked), nor for a
                # document read again after a death (max_attempts counts those), so that documents
                # that kill their reader are dead-lettered, not the run stopped.
                if pending.reader not in self._restarting and not self.ledger.read_again(pending):
                    self.restarts.died(pending.reader, self.pool.names[pending.reader])
                self.recovery.reader_died(pending)
                self._restarting.discard(pending.reader)
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
            self._last_outcome = outcome
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
            self._enforce_deadline(time.monotonic())  # a document that never finishes must not hold the cut

    def _enforce_deadline(self, now: float) -> None:
        timeout = self.config.document_timeout_s
        # The synchronous learner holds the stream's state: stopping it would lose what it
        # learned since the checkpoint, and the next run would meet the same document again.
        if timeout is None or getattr(self.learner, "synchronous", False):
            return
        for w, (pending, since) in self.ledger.reading_since().items():
            if now - since > timeout and w not in self._restarting:
                log.warning("reader %s has read %s/%d for %.0f s (processor.document_timeout_s %g): restarting it",
                            self.pool.names[w], *pending.position, now - since, timeout)
                self.sinks.alert({"type": "document_timeout", "stream": self.stream, "reader": self.pool.names[w],
                                  "document": pending.parsed.task.id, "seconds": round(now - since, 1),
                                  "time": time.time()})
                self._restarting.add(w)  # its calls now fail with ReaderDied: recovery takes it from there
                self.restarts.died(w, self.pool.names[w])
                self.pool.restart(w)

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

    # -- monitoring and commands -----------------------------------------------------------------

    def _handle_commands(self) -> int:
        """Carry out (or refuse) the control records of this turn; how many there were."""
        records = self.control.poll()
        for record, command in records:
            refusal = command if isinstance(command, str) else self._refusal(command)
            if refusal is not None:
                # Never executed: kept in the dead-letter topic. A signed command's sender waits
                # for its answer (its request_id); any other refused record is only counted, and
                # the counts go out once a status interval (_alert_control_refusals).
                log.debug("control record %s/%d/%d refused: %s", record.topic, record.partition, record.offset, refusal)
                if isinstance(command, ControlCommand):
                    self.sinks.alert({"type": "control_error", "stream": self.stream, "error": refusal,
                                      "request_id": command.request_id, "time": time.time()})
                else:
                    kind = reason_kind(refusal)
                    self._control_refused[kind] = self._control_refused.get(kind, 0) + 1
                self._dead_letter(record, refusal)
                continue
            self._last_command[command.action] = time.monotonic()
            try:
                if command.action == "forget":
                    self.forget(command.key, request_id=command.request_id)
                elif command.action == "release":
                    self.release(command.key, request_id=command.request_id)
                else:
                    self.rollback(command.to, cause="manual", request_id=command.request_id)
            except CommandFailed as err:  # MLflow out of reach: the sender hears, the stream goes on
                log.error("%s %s failed: %s", command.action, command.request_id, err)
                self.sinks.alert({"type": "control_error", "stream": self.stream, "request_id": command.request_id,
                                  "error": f"refused: {command.action} failed, nothing changed: {err}",
                                  "time": time.time()})
        return len(records)

    def _refusal(self, command: ControlCommand) -> str | None:
        """Why a signed command is still not carried out (None: it is)."""
        if command.action == "release":
            refusal = None if self.admission is not None else (
                "refused: release needs the learner's admission checks (processor.learner.enabled, "
                "learner.admission.enabled): this stream quarantines no key")
        else:
            refusal = self.recovery.refusal(command.action, command.to)
        if refusal is not None:
            return refusal
        since = time.monotonic() - self._last_command.get(command.action, -math.inf)
        setting = f"min_{command.action}_interval_s"
        interval = getattr(self.config.control, setting)
        if since < interval:
            return (f"refused: rate limit: a {command.action} was done {since:.0f} s ago "
                    f"(processor.control.{setting} {interval:g})")
        return None

    def _alert_control_refusals(self) -> None:
        if self._control_refused:
            log.warning("control records refused since the last report: %s", self._control_refused)
            self.sinks.alert({"type": "control_refused", "stream": self.stream, "counts": self._control_refused,
                              "time": time.time()})
            self._control_refused = {}

    def forget(self, key: str, request_id: str | None = None) -> str | None:
        """Erase ``key``'s per-key state on every reader (in memory, spilled, its replay buffer
        with it), leave its tombstone, write a version without it and erase its state files from
        every earlier version (``recovery.forget``); returns the new version. Documents of the key
        read after this start a new state."""
        self._settle()  # documents already on the readers finish first
        state_key = self.keys.state_key_of(key)
        held, version = self.recovery.forget(state_key)
        log.info("forgot the key of state %s (held by %d readers): version %s", state_key, held, version)
        self.sinks.alert({"type": "forget", "stream": self.stream, "state_key": state_key, "held": held,
                          "version": version, "request_id": request_id, "time": time.time()})
        return version

    def release(self, key: str, request_id: str | None = None) -> bool:
        """Let the documents of a quarantined ``key`` be learned again (from the next one taken in;
        the next checkpoint records it); whether it was quarantined."""
        state_key = self.keys.state_key_of(key)
        released = self.admission.release(state_key)
        if released:
            self.recovery.release_recorded()
        log.info("release of the key of state %s: %s", state_key, "released" if released else "was not quarantined")
        self.sinks.alert({"type": "release", "stream": self.stream, "state_key": state_key, "released": released,
                          "request_id": request_id, "time": time.time()})
        return released

    def rollback(self, target: str, cause: str, request_id: str | None = None) -> str | None:
        """Every reader back to the states of version ``target`` (``pipeline.processing.recovery``)."""
        return self.recovery.rollback(target, cause, request_id)

    # -- reporting -----------------------------------------------------------------------------

    def _check_partitions(self) -> None:
        """Partitions added to the documents topic while running are not read by this run (its
        partitions are assigned at start): say so and stop, so that nothing produced there goes
        unread in silence; the next start reads every partition (states follow, pipeline/rescale)."""
        added = self.source.unassigned_partitions()
        if not added or added == self.unread_partitions:
            return
        self.unread_partitions = added
        log.error("the documents topic now has partitions %s that this run does not read (it reads %s): "
                  "stopping; start again to read them all", added, sorted(self.reader_of))
        self.sinks.alert({"type": "partitions_changed", "stream": self.stream, "unread_partitions": added,
                          "read_partitions": sorted(self.reader_of), "time": time.time()})
        self.stop()

    def _report_progress(self) -> None:
        self.events.publish(Progress(self.ledger.committable(), self.source.highwaters(), self.ledger.in_flight,
                                     self.ledger.queued))

    def _publish_status(self, elapsed_s: float, final: bool = False) -> None:
        message = {
            "type": "status",
            "stream": self.stream,
            "time": time.time(),
            "final": final,
            "in_flight": self.ledger.in_flight,
            "queued": self.ledger.queued,
            "committed": {str(p): o for p, o in self.ledger.committable().items()},
            "checkpoint": self.recovery.status(),
            **self.summary.as_dict(),
        }
        message["wall_s"] = round(elapsed_s, 3)  # the run so far, not the summary's final figure
        try:
            report = self.status()
            message["readers"] = report["readers"]
            for part in ("context_parallel", "learner"):
                if part in report:
                    message[part] = report[part]
            # A synchronous learner is its own reader: it cannot fall behind itself.
            reads = "learner" in report and not getattr(self.learner, "synchronous", False)
            pace = learner_pace(report["readers"], report["learner"]) if reads else None
            if pace is not None:
                message["learner_pace"] = pace.as_dict()
                self._say_if_behind(pace)
        except Exception as err:  # noqa: BLE001 - status is best effort; the stream goes on
            message["readers_error"] = repr(err)
        self.events.publish(StatusTick(message, self._run_figures(), self.recovery.documents_before + self.summary.documents))
        self.sinks.metrics(message)

    def _say_if_behind(self, pace: LearnerPace) -> None:
        """A warning and an alert when the learner falls behind its readers (once, until it
        keeps up again): the readers then wait for its versions."""
        if pace.behind and not self._learner_behind:
            log.warning("the learner takes in %.2f documents/s and the readers could read %.2f: they wait for its "
                        "versions; processor.learner.every: %d would keep up (now %d)", pace.learner_documents_per_s,
                        pace.readers_documents_per_s, pace.every_to_keep_up, pace.every)
            self.sinks.alert({"type": "learner_behind", "stream": self.stream, **pace.as_dict(), "time": time.time()})
        self._learner_behind = pace.behind

    def _run_figures(self) -> dict[str, float | None]:
        lags = partition_lag(self.ledger.committable(), self.source.highwaters())
        last = self._last_outcome
        return {
            "lag": float(sum(lags.values())) if lags else None,
            "delta_ratio": last.delta_ratio if last is not None and last.delta_ratio >= 0 else None,
            "slow_delta_ratio": last.slow_delta_ratio if last is not None and last.slow_delta_ratio > 0 else None,
            "rollbacks": float(len(self.rollbacks)),
            **self.recovery.figures(),
        }
