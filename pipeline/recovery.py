"""RecoveryPolicy: what the processor does when reading goes wrong, in one place.

- A worker died (``worker_died``). With checkpoints: the restarted worker takes the states of
  the last checkpoint and its partitions are read again from that checkpoint's offsets (states
  exactly once; the results since then are sent again: results at least once). The documents
  in flight at the death are read again one at a time; one that kills its worker alone
  ``max_attempts`` times (deaths counted across rewinds) goes to the dead-letter topic. Without: the
  documents it held go back to the head of its queue for the restarted worker (best effort: its
  state starts over).
- A context-parallel read failed (``context_parallel_failed``): the worker is alive but may
  have learned part of the document and read on past it; with checkpoints it goes back to the
  last checkpoint as above, without it the document is sent again. A document that fails
  ``max_attempts`` times goes to the dead-letter topic (with checkpoints, the worker still goes
  back, so that nothing of it stays learned, and the document is passed over when read again).
- A rollback (``restore_all``): every worker takes the states of a checkpointed version.
- The model registry is unreachable: ``StreamCheckpointer`` retries with backoff and holds the
  offsets back; reading pauses once ``max_pending_documents`` wait (pipeline.checkpoint).
"""

from __future__ import annotations

import logging
from typing import Callable

from actors.call_types import StateBlob
from pipeline.checkpoint import BASE, LAST_GOOD, Checkpoint, StreamCheckpointer
from pipeline.config import ProcessorConfig
from pipeline.ledger import PendingDocument, StreamLedger
from pipeline.rescale import split_learner, states_for_workers
from pipeline.run_summary import RunSummary
from pipeline.source import KafkaDocumentSource
from pipeline.reader_pool import ContextParallelFailure, DocumentFailed, Learner, WorkerDied, ReaderPool

log = logging.getLogger(__name__)

# How long the documents still in flight on a failed worker get to come back.
IN_FLIGHT_WAIT_S = 60.0


class RecoveryPolicy:
    def __init__(
        self,
        config: ProcessorConfig,
        ledger: StreamLedger,
        pool: ReaderPool,
        source: KafkaDocumentSource,
        worker_of: dict[int, int],
        checkpointer: StreamCheckpointer | None,
        summary: RunSummary,
        reject: Callable[[PendingDocument, str], None],
        learner: Learner | None = None,
    ):
        self.config = config
        self.ledger = ledger
        self.pool = pool
        self.source = source
        self.worker_of = worker_of  # partition -> worker
        self.checkpointer = checkpointer
        self.summary = summary
        self.reject = reject  # to the dead-letter topic, with the reason
        # With a learner the workers keep nothing between documents: a failed read is sent again
        # with the same version, and the result is what it would have been (no rewind needed).
        self.learner = learner

    def worker_died(self, pending: PendingDocument) -> None:
        if self.checkpointer is not None and self.learner is None:
            suspects = [pending, *self.ledger.in_flight_on(pending.worker)]
            deaths = self.ledger.worker_died(suspects)
            if len(suspects) == 1 and deaths[pending.position] >= self.config.max_attempts:
                # Alone in flight, again: this document kills its worker. It goes to the
                # dead-letter topic once and is passed over when the partition is read again.
                self.reject(pending, f"its worker died {deaths[pending.position]} times reading it "
                                     "(a crash, or processor.document_timeout_s)")
                self.ledger.give_up(pending)
            self._back_to_checkpoint(pending.worker, restarted=True)
        else:
            self._retry_on_restart(pending)

    def context_parallel_failed(self, pending: PendingDocument, reason: str) -> None:
        failures = self.ledger.parallel_failure(pending)
        self.summary.parallel_failures += 1
        log.warning("context-parallel read of %s/%d failed (%d): %s", *pending.position, failures, reason)
        stateful = self.checkpointer is not None and self.learner is None
        if failures >= self.config.max_attempts:
            self.reject(pending, f"context-parallel read failed {failures} times: {reason}")
            if stateful:
                # What the failed read learned goes too; the partition is read again without it.
                self.ledger.give_up(pending)
                self._back_to_checkpoint(pending.worker, restarted=False)
        elif stateful:
            self._back_to_checkpoint(pending.worker, restarted=False)
        else:
            # Sent again after what is already on the worker: without checkpoints, best effort.
            self.summary.retries += 1
            self.ledger.retry_first(pending)

    def restore_all(self, target: str) -> Checkpoint:
        """Every worker takes the states of checkpoint ``target`` (a version, an alias, or
        ``base``: fresh states, the base model as the stream started; ``last-good`` before any
        version passed the monitor is ``base`` too); raises what loading it raises
        (CheckpointError, MLflow down), changing nothing."""
        store = self.checkpointer.store
        if target == LAST_GOOD and store.resolve(LAST_GOOD) is None:
            log.warning("no version is %s yet: rolling back to the base model (fresh states)", LAST_GOOD)
            target = BASE
        learner = self.learner.name if self.learner is not None else None
        if target == BASE:
            checkpoint = Checkpoint.base(self.pool.names + ([learner] if learner else []))
        else:
            checkpoint = store.load(target)
        workers, learned = split_learner(checkpoint, learner)
        states = workers.states if target == BASE else self._states_of(workers)
        for w, name in enumerate(self.pool.names):
            self.pool.restore(w, states[name])
        if self.learner is not None:
            self.learner.restore(learned)
            if target == BASE:  # the version recording the rollback holds the fresh learner
                checkpoint.states[learner] = self.learner.snapshot()
        return checkpoint

    def _states_of(self, checkpoint: Checkpoint) -> dict[str, list[StateBlob]]:
        # The version may come from a run with other workers (rescaled since).
        return states_for_workers(checkpoint, self.pool.names, self.worker_of, self.config.scope)

    def _back_to_checkpoint(self, w: int, restarted: bool) -> None:
        handles = self.ledger.handles(w)
        self.pool.wait(handles, timeout_s=IN_FLIGHT_WAIT_S, every=True)
        for handle in handles:
            self.ledger.take(handle)  # read again below, whatever became of them
        if restarted and not self.pool.wait_ready(w, self.config.restart_timeout_s):
            raise RuntimeError(f"worker {self.pool.names[w]} did not come back within {self.config.restart_timeout_s} s")
        version = self.checkpointer.version
        blobs = self._states_of(self.checkpointer.store.load(version))[self.pool.names[w]] if version else []
        self.pool.restore(w, blobs)
        positions = {p: self.checkpointer.offsets.get(p, 0) for p, i in self.worker_of.items() if i == w}
        positions = self.source.seek(positions)
        self.ledger.rewind(w, positions)
        self.summary.retries += 1
        log.warning("worker %s %s: restored from checkpoint %s, partitions %s read again from %s",
                    self.pool.names[w], "died" if restarted else "failed a document",
                    version or "(none: fresh state)", sorted(positions), positions)

    def _retry_on_restart(self, first: PendingDocument) -> None:
        """Every document in flight on the dead worker failed with it: wait for all of them, then
        put them back at the head of its queue in offset order, for the restarted actor."""
        w = first.worker
        handles = self.ledger.handles(w)
        done = set(self.pool.wait(handles, timeout_s=IN_FLIGHT_WAIT_S, every=True))
        failed = [first]
        for handle in handles:
            try:
                if handle not in done:
                    raise WorkerDied(f"no answer within {IN_FLIGHT_WAIT_S:.0f} s")
                self.pool.result(handle)
            except (WorkerDied, ContextParallelFailure, DocumentFailed):  # any failure of a dead worker's call is a retry
                failed.append(self.ledger.take(handle))
            # else: it finished before the crash and is collected normally
        failed.sort(key=lambda p: p.position, reverse=True)
        back = self.pool.wait_ready(w, self.config.restart_timeout_s)
        for pending in failed:
            if not back or pending.attempts >= self.config.max_attempts:
                self.reject(pending, f"worker failed: {pending.attempts} attempts died with the worker")
            else:
                self.summary.retries += 1
                self.ledger.retry_first(pending)
        log.warning("worker %d died; %d documents go back to its queue", w, len(failed))
