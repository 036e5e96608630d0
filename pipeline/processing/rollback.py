"""Rollbacks of a checkpointed stream (``CheckpointedRecovery.rollback``): every reader, and the
learner, back to the states of a version, recorded as a new version; a monitor rule that fires
(``on_breach``) asks for one to last-good."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pipeline.observability.monitor import Breach
from pipeline.state.checkpoint import BASE, LAST_GOOD, Checkpoint
from pipeline.state.promotion import servable
from pipeline.state.rescale import split_learner, states_for_readers
from pipeline.stream_events import CheckpointWritten, RolledBack

if TYPE_CHECKING:
    from actors.call_types import StateBlob
    from pipeline.processing.recovery import CheckpointedRecovery, StreamParts

log = logging.getLogger(__name__)


def states_of(checkpoint: Checkpoint, parts: StreamParts) -> dict[str, list[StateBlob]]:
    """A version's states for this run's readers (it may come from a run with other readers)."""
    return states_for_readers(checkpoint, parts.pool.names, parts.reader_of, parts.config.scope)


class Rollbacks:
    def __init__(self, recovery: CheckpointedRecovery):
        self.recovery = recovery  # its parts, its checkpointer, and the gate's bookkeeping
        self.rolling_back = False  # the documents in flight before a rollback are being finished
        self._breach_at_documents = 0

    def on_breach(self, breach: Breach) -> None:
        """A monitor rule fired: alert, and roll back to last-good (``monitor.auto_rollback``)."""
        parts = self.recovery.parts
        self._breach_at_documents = parts.summary.documents
        log.warning("degradation: rule %s on document %s: %s", breach.rule, breach.document, breach.values)
        parts.sinks.alert({"type": "alert", "stream": parts.stream, "rule": breach.rule, "values": breach.values,
                           "document": breach.document, "version": self.recovery.checkpointer.model_version, "time": time.time()})
        if parts.config.monitor.auto_rollback:
            self.rollback(LAST_GOOD, cause=breach.rule)

    def restore_all(self, target: str) -> Checkpoint:
        """Every reader takes the states of checkpoint ``target`` (a version, an alias, or
        ``base``: fresh states, the base model as the stream started; ``last-good`` before any
        version passed the monitor is ``base`` too); raises what loading it raises
        (CheckpointError, MLflow down), changing nothing."""
        parts = self.recovery.parts
        store = self.recovery.checkpointer.store
        if target == LAST_GOOD and store.registry.resolve(LAST_GOOD) is None:
            log.warning("no version is %s yet: rolling back to the base model (fresh states)", LAST_GOOD)
            target = BASE
        learner = parts.learner.name
        if target == BASE:
            checkpoint = Checkpoint.base(parts.pool.names + ([learner] if learner else []))
        else:
            checkpoint = store.load(target)
        readers, learned = split_learner(checkpoint, learner)
        states = readers.states if target == BASE else states_of(readers, parts)
        for w, name in enumerate(parts.pool.names):
            parts.pool.restore(w, states.get(name, []))  # none: the synchronous learner, restored below
        parts.learner.restore(learned)
        self.recovery.judged_here()
        if target == BASE and learner:  # the version recording the rollback holds the fresh learner
            checkpoint.states.update(parts.learner.states())
        return checkpoint

    def rollback(self, target: str, cause: str, request_id: str | None = None) -> str | None:
        """Every reader back to the states of version ``target`` (number or alias), recorded as a
        new version (reason ``rollback``) that becomes ``live``. The stream reads on from where it
        is: the documents since ``target`` stay read, their learning is dropped. A monitor rule
        that fires while the documents in flight finish asks for no second rollback."""
        parts, checkpointer = self.recovery.parts, self.recovery.checkpointer
        started = time.monotonic()
        self.rolling_back = True
        try:
            parts.settle()  # documents already on the readers finish first
        finally:
            self.rolling_back = False
        previous = checkpointer.model_version
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
        promote = checkpoint.version == BASE or servable(checkpointer.store.registry.version_tags(checkpoint.version))
        version = checkpointer.write(
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

