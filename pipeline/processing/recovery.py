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
- A rollback (``rollback``, with checkpoints; ``pipeline.processing.rollback``): every reader
  takes the states of a checkpointed version, recorded as a new version that becomes ``live``.
- The model registry is unreachable: ``StreamCheckpointer`` retries with backoff and holds the
  offsets back; reading pauses once ``max_pending_documents`` wait (pipeline.state.checkpoint).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from actors.call_types import StateTarget
from pipeline.state.checkpoint import BASE, LAST_GOOD, StreamCheckpointer
from pipeline.config import ProcessorConfig
from pipeline.processing.ledger import PendingDocument, StreamLedger
from pipeline.observability.monitor import Breach
from pipeline.processing.reader_pool import ContextParallelFailure, DocumentFailed, Learner, ReaderPool, ReaderDied
from pipeline.processing.rollback import Rollbacks, states_of
from pipeline.processing.run_summary import RunSummary
from pipeline.stream_io.sink import KafkaSinks
from pipeline.stream_io.source import KafkaDocumentSource
from pipeline.stream_events import CheckpointWritten, StreamEvents
from pipeline.state.promotion import PROMOTED, REJECTED, verdict_metrics, verdict_tags

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
        self.rollbacks = Rollbacks(self)
        self._to_erase: set[str] = set()  # forgotten state keys whose files are not erased yet
        self._judged_at = 0  # the learner's position at the gate's last verdict (or where this run started)

    def attach(self, parts: StreamParts) -> None:
        super().attach(parts)
        self._judged_at = parts.learner.position

    @property
    def rolling_back(self) -> bool:
        return self.rollbacks.rolling_back

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

    def judged_here(self) -> None:
        """The learner's state now is one the gate has judged (restored from a version)."""
        self._judged_at = self.parts.learner.position

    def _back_to_checkpoint(self, w: int, restarted: bool) -> None:
        parts = self.parts
        handles = parts.ledger.handles(w)
        parts.pool.wait(handles, timeout_s=IN_FLIGHT_WAIT_S, every=True)
        for handle in handles:
            parts.ledger.take(handle)  # read again below, whatever became of them
        if restarted and not parts.pool.wait_ready(w, parts.config.restart_timeout_s):
            raise RuntimeError(f"reader {parts.pool.names[w]} did not come back within "
                               f"{parts.config.restart_timeout_s} s")
        version = self.checkpointer.model_version
        blobs = states_of(self.checkpointer.store.load(version), parts)[parts.pool.names[w]] if version else []
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
        self.rollbacks.on_breach(breach)

    def rollback(self, target: str, cause: str, request_id: str | None = None) -> str | None:
        return self.rollbacks.rollback(target, cause, request_id)

    def status(self) -> dict[str, Any]:
        c = self.checkpointer
        return {"version": c.model_version, "pending_documents": c.pending_documents, "failures": c.failures,
                "reading_paused": c.backlog_full}

    def figures(self) -> dict[str, float | None]:
        c = self.checkpointer
        return {"checkpoint_version": float(c.model_version) if c.model_version else None, "checkpoint_failures": float(c.failures)}
