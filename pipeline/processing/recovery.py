"""What the processor does when reading goes wrong, and how it makes progress durable: two
policies, picked once (``pipeline.processing.job.build_processor``): ``CheckpointedRecovery`` (states and
offsets to MLflow, exactly-once states, rollbacks) and ``BestEffortRecovery`` (offsets committed
on a timer, nothing restored).

- A reader died (``reader_died``). With checkpoints: the restarted reader takes the states of
  the last checkpoint and its partitions are read again from that checkpoint's offsets (states
  exactly once; the results since then are sent again: results at least once). The documents
  in flight at the death are read again one at a time; one that kills its reader alone
  ``max_attempts`` times (deaths counted across rewinds) goes to the dead-letter topic. Without: the
  documents it held go back to the head of its queue for the restarted reader (best effort: its
  state starts over).
- A context-parallel read failed (``context_parallel_failed``): the reader is alive but may
  have learned part of the document and read on past it; with checkpoints it goes back to the
  last checkpoint as above, without it the document is sent again. A document that fails
  ``max_attempts`` times goes to the dead-letter topic (with checkpoints, the reader still goes
  back, so that nothing of it stays learned, and the document is passed over when read again).
- A rollback (``rollback``, with checkpoints): every reader takes the states of a checkpointed
  version, recorded as a new version that becomes ``live``.
- The model registry is unreachable: ``StreamCheckpointer`` retries with backoff and holds the
  offsets back; reading pauses once ``max_pending_documents`` wait (pipeline.state.checkpoint).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from actors.call_types import StateBlob, StateTarget
from pipeline.state.checkpoint import BASE, LAST_GOOD, Checkpoint, StreamCheckpointer
from pipeline.config import ProcessorConfig
from pipeline.processing.ledger import PendingDocument, StreamLedger
from pipeline.observability.monitor import Breach
from pipeline.processing.reader_pool import ContextParallelFailure, DocumentFailed, Learner, ReaderPool, ReaderDied
from pipeline.state.rescale import split_learner, states_for_readers
from pipeline.processing.run_summary import RunSummary
from pipeline.stream_io.sink import KafkaSinks
from pipeline.stream_io.source import KafkaDocumentSource
from pipeline.stream_events import CheckpointWritten, RolledBack, StreamEvents
from pipeline.state.promotion import PROMOTED, REJECTED, servable, verdict_metrics, verdict_tags

log = logging.getLogger(__name__)

# How long the documents still in flight on a failed reader get to come back.
IN_FLIGHT_WAIT_S = 60.0


class CommandFailed(RuntimeError):
    """A command could not be carried out and changed nothing (its sender is told; the stream goes on)."""


@dataclass
class StreamParts:
    """What a recovery policy works on: the processor's ledger and the parts around it."""

    config: ProcessorConfig
    stream: str
    ledger: StreamLedger
    pool: ReaderPool
    source: KafkaDocumentSource
    sinks: KafkaSinks
    reader_of: dict[int, int]  # partition -> reader
    summary: RunSummary
    learner: Learner
    events: StreamEvents
    reject: Callable[[PendingDocument, str], None]  # to the dead-letter topic, with the reason
    settle: Callable[[], None]  # collect until nothing is in flight (a consistent cut)


class RecoveryPolicy:
    """The interface both policies share; ``attach`` gives one the processor's parts."""

    documents_before = 0  # documents the stream read in earlier runs
    rolling_back = False  # the documents in flight before a rollback are being finished
    parts: StreamParts

    def attach(self, parts: StreamParts) -> None:
        self.parts = parts

    def accept_limit(self) -> int | None:
        """How many more documents may be taken in before progress is made durable (None: no limit)."""
        return None

    def release_recorded(self) -> None:
        """A quarantined key was released: record it with the next checkpoint, soon."""

    def reader_died(self, pending: PendingDocument) -> None:
        raise NotImplementedError

    def context_parallel_failed(self, pending: PendingDocument, reason: str) -> None:
        raise NotImplementedError

    def document_done(self) -> None:
        """One more document finished (its result sent)."""

    @property
    def reading_paused(self) -> bool:
        """Whether reading waits for progress to become durable."""
        return False

    def tick(self, now: float) -> None:
        """Called on every loop turn: make progress durable when it is due."""
        raise NotImplementedError

    def finish(self) -> None:
        """The run ends: make what was read durable."""
        raise NotImplementedError

    def refusal(self, action: str, target: str | None) -> str | None:
        """Why a control command cannot be carried out (None: it can)."""
        raise NotImplementedError

    def checkpoint(self, reason: str, judge: bool = True) -> str | None:
        raise NotImplementedError

    def forget(self, state_key: str) -> tuple[int, str | None]:
        """Erase ``state_key`` for good: how many readers held it, and the version without it."""
        raise NotImplementedError

    def rollback(self, target: str, cause: str, request_id: str | None = None) -> str | None:
        raise NotImplementedError

    def status(self) -> dict[str, Any] | None:
        return None

    def figures(self) -> dict[str, float | None]:
        """The policy's figures for the MLflow run (no checkpoints: none)."""
        return {"checkpoint_version": None, "checkpoint_failures": None}

    def _retry_on_restart(self, first: PendingDocument) -> None:
        """Every document in flight on the dead reader failed with it: wait for all of them, then
        put them back at the head of its queue in offset order, for the restarted actor."""
        parts, w = self.parts, first.reader
        handles = parts.ledger.handles(w)
        done = set(parts.pool.wait(handles, timeout_s=IN_FLIGHT_WAIT_S, every=True))
        failed = [first]
        for handle in handles:
            try:
                if handle not in done:
                    raise ReaderDied(f"no answer within {IN_FLIGHT_WAIT_S:.0f} s")
                parts.pool.result(handle)
            except (ReaderDied, ContextParallelFailure, DocumentFailed):  # any failure of a dead reader's call is a retry
                failed.append(parts.ledger.take(handle))
                parts.pool.hand_off(handle)  # what it handed on, if anything, is not wanted
            # else: it finished before the crash and is collected normally
        failed.sort(key=lambda p: p.position, reverse=True)
        back = parts.pool.wait_ready(w, parts.config.restart_timeout_s)
        for pending in failed:
            if not back or pending.attempts >= parts.config.max_attempts:
                parts.reject(pending, f"reader failed: {pending.attempts} attempts died with the reader")
            else:
                parts.summary.retries += 1
                parts.ledger.retry_first(pending)
        log.warning("reader %d died; %d documents go back to its queue", w, len(failed))

    def _send_again(self, pending: PendingDocument, reason: str) -> None:
        """A failed context-parallel read of a reader that keeps nothing it must undo: the
        document is sent again after what is already on the reader, up to max_attempts."""
        parts = self.parts
        failures = parts.ledger.parallel_failure(pending)
        parts.summary.parallel_failures += 1
        log.warning("context-parallel read of %s/%d failed (%d): %s", *pending.position, failures, reason)
        if failures >= parts.config.max_attempts:
            parts.reject(pending, f"context-parallel read failed {failures} times: {reason}")
        else:
            parts.summary.retries += 1
            parts.ledger.retry_first(pending)


class BestEffortRecovery(RecoveryPolicy):
    """Without checkpoints: offsets committed every ``commit_interval_s`` once the broker has the
    outputs; a dead reader's documents are sent again to its restarted actor, whose state starts
    over; no rollback, no forget."""

    def __init__(self) -> None:
        self._last_commit = time.monotonic()

    def reader_died(self, pending: PendingDocument) -> None:
        self._retry_on_restart(pending)

    def context_parallel_failed(self, pending: PendingDocument, reason: str) -> None:
        self._send_again(pending, reason)

    def tick(self, now: float) -> None:
        if now - self._last_commit >= self.parts.config.commit_interval_s:
            self.checkpoint("periodic")
            self._last_commit = now

    def finish(self) -> None:
        self.checkpoint("shutdown")

    def checkpoint(self, reason: str, judge: bool = True) -> str | None:
        """Commit what is read (no state is kept): after the broker has every output below it."""
        self.parts.sinks.flush()  # raises DeliveryError, and then nothing is committed
        self.parts.source.commit(self.parts.ledger.committable())
        return None

    def refusal(self, action: str, target: str | None) -> str | None:
        return f"refused: checkpoints off: {action} needs processor.checkpoint.enabled"

    def rollback(self, target: str, cause: str, request_id: str | None = None) -> str | None:
        raise RuntimeError("a rollback needs processor.checkpoint.enabled")

    def forget(self, state_key: str) -> tuple[int, str | None]:
        raise RuntimeError("a forget needs processor.checkpoint.enabled")


class CheckpointedRecovery(RecoveryPolicy):
    """With checkpoints: states and offsets written to MLflow as a version, offsets committed
    only after; a failed reader goes back to the last one; rollbacks to any version."""

    def __init__(self, checkpointer: StreamCheckpointer):
        self.checkpointer = checkpointer
        self.documents_before = checkpointer.documents
        self.rolling_back = False
        self._breach_at_documents = 0
        self._to_erase: set[str] = set()  # forgotten state keys whose files are not erased yet
        self._judged_at = 0  # the learner's position at the gate's last verdict (or where this run started)

    def attach(self, parts: StreamParts) -> None:
        super().attach(parts)
        self._judged_at = parts.learner.position

    @property
    def _gated(self) -> bool:
        parts = self.parts
        return parts.learner.name is not None and parts.config.learner.gate.enabled

    def _judging_due(self) -> bool:
        """The promotion gate judges when the learner has taken a multiple of ``every_documents``
        documents (a position the ledger fixes, so that a restored stream judges where the one
        that never stopped did), and at shutdown."""
        position = self.parts.learner.position
        return self._gated and position % self.parts.config.checkpoint.every_documents == 0 \
            and position != self._judged_at

    def accept_limit(self) -> int | None:
        """With the gate: no document past the next judging point until it is judged."""
        if not self._gated:
            return None
        if self._judging_due():
            return 0
        every = self.parts.config.checkpoint.every_documents
        return every - self.parts.learner.position % every

    # -- failures ------------------------------------------------------------------------------

    def reader_died(self, pending: PendingDocument) -> None:
        parts = self.parts
        if parts.learner.keeps_readers_stateless:
            # The readers keep nothing between documents: a failed read is sent again with the
            # same version, and the result is what it would have been (no rewind needed).
            self._retry_on_restart(pending)
            return
        suspects = [pending, *parts.ledger.in_flight_on(pending.reader)]
        deaths = parts.ledger.reader_died(suspects)
        if len(suspects) == 1 and deaths[pending.position] >= parts.config.max_attempts:
            # Alone in flight, again: this document kills its reader. It goes to the
            # dead-letter topic once and is passed over when the partition is read again.
            parts.reject(pending, f"its reader died {deaths[pending.position]} times reading it "
                                  "(a crash, or processor.document_timeout_s)")
            parts.ledger.give_up(pending)
        self._back_to_checkpoint(pending.reader, restarted=True)

    def context_parallel_failed(self, pending: PendingDocument, reason: str) -> None:
        parts = self.parts
        if parts.learner.keeps_readers_stateless:
            self._send_again(pending, reason)
            return
        failures = parts.ledger.parallel_failure(pending)
        parts.summary.parallel_failures += 1
        log.warning("context-parallel read of %s/%d failed (%d): %s", *pending.position, failures, reason)
        if failures >= parts.config.max_attempts:
            parts.reject(pending, f"context-parallel read failed {failures} times: {reason}")
            # What the failed read learned goes too; the partition is read again without it.
            parts.ledger.give_up(pending)
        self._back_to_checkpoint(pending.reader, restarted=False)

    def _states_of(self, checkpoint: Checkpoint) -> dict[str, list[StateBlob]]:
        # The version may come from a run with other readers (rescaled since).
        parts = self.parts
        return states_for_readers(checkpoint, parts.pool.names, parts.reader_of, parts.config.scope)

    def _back_to_checkpoint(self, w: int, restarted: bool) -> None:
        parts = self.parts
        handles = parts.ledger.handles(w)
        parts.pool.wait(handles, timeout_s=IN_FLIGHT_WAIT_S, every=True)
        for handle in handles:
            parts.ledger.take(handle)  # read again below, whatever became of them
        if restarted and not parts.pool.wait_ready(w, parts.config.restart_timeout_s):
            raise RuntimeError(f"reader {parts.pool.names[w]} did not come back within "
                               f"{parts.config.restart_timeout_s} s")
        version = self.checkpointer.version
        blobs = self._states_of(self.checkpointer.store.load(version))[parts.pool.names[w]] if version else []
        parts.pool.restore(w, blobs)
        positions = {p: self.checkpointer.offsets.get(p, 0) for p, i in parts.reader_of.items() if i == w}
        positions = parts.source.seek(positions)
        parts.ledger.rewind(w, positions)
        parts.summary.retries += 1
        log.warning("reader %s %s: restored from checkpoint %s, partitions %s read again from %s",
                    parts.pool.names[w], "died" if restarted else "failed a document",
                    version or "(none: fresh state)", sorted(positions), positions)

    # -- progress ------------------------------------------------------------------------------

    def document_done(self) -> None:
        self.checkpointer.document_done()

    @property
    def reading_paused(self) -> bool:
        return self.checkpointer.backlog_full

    def tick(self, now: float) -> None:
        if self._judging_due():
            self.checkpoint("periodic")
        elif self.checkpointer.due(now, by_count=not self._gated):  # with the gate, by time only: unjudged
            self.checkpoint("periodic", judge=False)

    def checkpoint(self, reason: str, judge: bool = True, settle: bool = True) -> str | None:
        """A consistent cut: finish what the readers hold, snapshot their states, write the
        checkpoint, and only then commit the offsets it records. ``judge``: the promotion gate
        judges the learner's weights here; ``settle``: and the learner takes the verdict."""
        parts = self.parts
        parts.settle()
        parts.sinks.flush()
        offsets = parts.ledger.committable()
        # The learner's one state at the same cut (every document accepted so far), judged by
        # the promotion gate first: the version is a candidate, live only if it passed.
        judge = judge and parts.learner.position != self._judged_at  # a verdict is taken once per position
        verdict, learned = parts.learner.judged_states(judge, settle)
        if judge and settle:
            self._judged_at = parts.learner.position

        def write_states(run: StateTarget) -> dict[str, list]:
            # Each reader writes its own states into the version's run; the driver gets their
            # entries only.
            return {**parts.pool.write_states(run), **learned}

        promoted = None if verdict is None else verdict["verdict"] == PROMOTED
        version = self.checkpointer.write(write_states, offsets, reason,
                                          {**parts.summary.checkpoint_metrics(), **verdict_metrics(verdict)},
                                          tags=verdict_tags(verdict, parts.config.learner.version_lag if verdict else None),
                                          promote=promoted is not False)
        parts.events.publish(CheckpointWritten(version, reason, promoted, verdict))
        if version is None and self._gated:
            # With the gate there is no checkpoint by count: the one that failed is owed, and
            # retried with the checkpointer's backoff (unjudged: its verdict is already taken).
            self.checkpointer.owed = True
        if version is not None:
            parts.source.commit(offsets)
            if promoted:
                self._set_last_good(version)
            if self._to_erase and reason != "forget":  # a forget whose own version failed
                self._erase_pending()
        if verdict is not None and verdict["unchanged"]:
            log.warning("the learner learned %d documents since the last version and its weights did not change",
                        verdict["learned"])
            parts.sinks.alert({"type": "unchanged_update", "stream": parts.stream, "version": version,
                               "learned": verdict["learned"], "digest": verdict["digest"], "time": time.time()})
        if verdict is not None and verdict["verdict"] == REJECTED:  # not an unjudged one (a checkpoint by time)
            log.warning("version %s rejected by the promotion gate (live stays): %s", version, verdict["reason"])
            parts.sinks.alert({"type": "version_rejected", "stream": parts.stream, "version": version,
                               "reason": verdict["reason"], "gain_vs_last_good": verdict.get("gain_vs_last_good"),
                               "forgetting": verdict.get("forgetting"), "time": time.time()})
        return version

    def release_recorded(self) -> None:
        self.checkpointer.owed = True  # written as soon as it may (unjudged), so a crash does not undo it

    def _set_last_good(self, version: str) -> None:
        try:
            self.checkpointer.store.registry.set_alias(LAST_GOOD, version)
        except Exception as err:  # noqa: BLE001 - MLflow went away just now: last-good moves with the next
            log.warning("could not move %s to v%s: %s", LAST_GOOD, version, err)

    def forget(self, state_key: str) -> tuple[int, str | None]:
        """A tombstone in the registry first (raises, changing nothing, while MLflow is out of
        reach): from then on no restore, rollback, rescale or export brings the key back, whoever
        loads, whatever fails next. Then the readers drop the key, a version is written without
        it, and only once that version exists are its state files erased from every earlier one
        (if the version cannot be written yet, both are done with the next one)."""
        parts = self.parts
        try:
            self.checkpointer.store.registry.forget(state_key)
        except Exception as err:  # noqa: BLE001 - the registry out of reach: nothing was changed
            raise CommandFailed(f"no tombstone could be written ({type(err).__name__}: {err})"[:500]) from None
        held = 0
        for w in range(len(parts.pool.names)):
            try:
                held += parts.pool.forget(w, state_key)
            except ReaderDied:
                pass  # it comes back with a checkpoint's states, which the tombstone filters
        self._to_erase.add(state_key)
        self.checkpointer.owed = True
        version = self.checkpoint("forget", judge=False)  # a command's time is no judging point
        if version is not None:
            self._erase_pending()
        return held, version

    def _erase_pending(self) -> None:
        for state_key in sorted(self._to_erase):
            try:
                self.checkpointer.store.erase(state_key)
                self._to_erase.discard(state_key)
            except Exception as err:  # noqa: BLE001 - MLflow out of reach: the tombstone holds; again later
                log.warning("could not erase the state files of %s yet: %s", state_key, err)

    def finish(self) -> None:
        cfg = self.parts.config.checkpoint
        deadline = time.monotonic() + cfg.retry_max_s * 4
        # With the gate, a stream that stops is judged where it stopped, even when a checkpoint by
        # time wrote the last documents already (unjudged): what it learned may go live.
        owed = self._gated and self.parts.learner.position != self._judged_at
        while (self.checkpointer.pending_documents or owed) and time.monotonic() < deadline:
            # Judged, and live moves if it passes; the learner keeps its state as it is (a stop is no
            # judging point: the next run goes on as the one that did not stop would have).
            if self.checkpoint("shutdown", settle=False) is not None:
                return
            owed = False  # judged, though not written: the next try records it unjudged
            time.sleep(cfg.retry_initial_s)
        if self.checkpointer.pending_documents:
            log.error("no checkpoint after shutdown: %d documents will be read again on restart",
                      self.checkpointer.pending_documents)

    # -- commands ------------------------------------------------------------------------------

    def refusal(self, action: str, target: str | None) -> str | None:
        scope = self.parts.config.scope
        if action == "forget":
            return None if scope == "per_key" else (
                f"refused: forget needs per_key scope: it erases a per_key state; this stream's scope is {scope!r}")
        if target not in (BASE, LAST_GOOD):
            try:
                known = self.checkpointer.store.registry.resolve(target) is not None
            except Exception:  # noqa: BLE001 - MLflow out of reach: the rollback itself reports it
                known = True
            if not known:
                return f"refused: unknown version: {self.checkpointer.store.name} has no version {target!r}"
        return None

    def on_breach(self, breach: Breach) -> None:
        """A monitor rule fired: alert, and roll back to last-good (``monitor.auto_rollback``)."""
        parts = self.parts
        self._breach_at_documents = parts.summary.documents
        log.warning("degradation: rule %s on document %s: %s", breach.rule, breach.document, breach.values)
        parts.sinks.alert({"type": "alert", "stream": parts.stream, "rule": breach.rule, "values": breach.values,
                           "document": breach.document, "version": self.checkpointer.version, "time": time.time()})
        if parts.config.monitor.auto_rollback:
            self.rollback(LAST_GOOD, cause=breach.rule)

    def restore_all(self, target: str) -> Checkpoint:
        """Every reader takes the states of checkpoint ``target`` (a version, an alias, or
        ``base``: fresh states, the base model as the stream started; ``last-good`` before any
        version passed the monitor is ``base`` too); raises what loading it raises
        (CheckpointError, MLflow down), changing nothing."""
        parts = self.parts
        store = self.checkpointer.store
        if target == LAST_GOOD and store.registry.resolve(LAST_GOOD) is None:
            log.warning("no version is %s yet: rolling back to the base model (fresh states)", LAST_GOOD)
            target = BASE
        learner = parts.learner.name
        if target == BASE:
            checkpoint = Checkpoint.base(parts.pool.names + ([learner] if learner else []))
        else:
            checkpoint = store.load(target)
        readers, learned = split_learner(checkpoint, learner)
        states = readers.states if target == BASE else self._states_of(readers)
        for w, name in enumerate(parts.pool.names):
            parts.pool.restore(w, states.get(name, []))  # none: the synchronous learner, restored below
        parts.learner.restore(learned)
        self._judged_at = parts.learner.position
        if target == BASE and learner:  # the version recording the rollback holds the fresh learner
            checkpoint.states.update(parts.learner.states())
        return checkpoint

    def rollback(self, target: str, cause: str, request_id: str | None = None) -> str | None:
        """Every reader back to the states of version ``target`` (number or alias), recorded as a
        new version (reason ``rollback``) that becomes ``live``. The stream reads on from where it
        is: the documents since ``target`` stay read, their learning is dropped. A monitor rule
        that fires while the documents in flight finish asks for no second rollback."""
        parts = self.parts
        started = time.monotonic()
        self.rolling_back = True
        try:
            parts.settle()  # documents already on the readers finish first
        finally:
            self.rolling_back = False
        previous = self.checkpointer.version
        try:
            checkpoint = self.restore_all(target)
        except Exception as err:  # noqa: BLE001 - CheckpointError or MLflow down: keep serving
            log.error("rollback to %s failed: %s", target, err)
            parts.sinks.alert({"type": "rollback_failed", "stream": parts.stream, "to": target, "error": str(err),
                               "request_id": request_id, "time": time.time()})
            return None
        serving_s, served_at = time.monotonic() - started, time.time()
        after_breach = None if cause == "manual" else parts.summary.documents - self._breach_at_documents
        parts.sinks.flush()
        offsets = parts.ledger.committable()
        # Live moves to it only if the target's weights are servable: a rejected candidate restores
        # as its verdict left the learner (at last-good), and an unjudged one waits for its verdict.
        promote = checkpoint.version == BASE or servable(self.checkpointer.store.registry.version_tags(checkpoint.version))
        version = self.checkpointer.write(
            checkpoint.states, offsets, "rollback", parts.summary.checkpoint_metrics(),
            tags={"rollback_to": checkpoint.version, "rollback_from": str(previous), "rollback_cause": cause},
            promote=promote,
        )
        if version is not None:
            parts.source.commit(offsets)
        record = {
            "type": "rollback", "stream": parts.stream, "cause": cause, "from": previous, "to": checkpoint.version,
            "version": version, "request_id": request_id, "serving_after_s": round(serving_s, 3),
            "documents_after_breach": after_breach, "served_at": served_at,
            "recorded_after_s": round(time.monotonic() - started, 3), "time": time.time(),
        }
        parts.events.publish(CheckpointWritten(version, "rollback"))
        parts.events.publish(RolledBack(cause, record))
        log.warning("rolled back to v%s (%s): readers serving it after %.2f s; recorded as v%s",
                    checkpoint.version, cause, serving_s, version)
        return version

    def status(self) -> dict[str, Any]:
        c = self.checkpointer
        return {"version": c.version, "pending_documents": c.pending_documents, "failures": c.failures,
                "reading_paused": c.backlog_full}

    def figures(self) -> dict[str, float | None]:
        c = self.checkpointer
        return {"checkpoint_version": float(c.version) if c.version else None, "checkpoint_failures": float(c.failures)}
