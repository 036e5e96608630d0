"""The readers as the stream processor sees them: a pool it submits documents to, and the learner.

The processor's run loop (``pipeline.processing.processor``) knows nothing of Ray: it submits a document
to reader ``w``, waits for handles, reads outcomes (or the failure of a reader), snapshots and
restores states, and waits for a restarted reader. ``actors.ray_pool`` implements these over the
actors' handles (and names the failures the processor tells apart); unit tests use an in-process
pool of their own.
"""

from __future__ import annotations

from typing import Any, Hashable, Protocol

from actors.call_types import DocumentOutcome, DocumentTask, StateBlob, StateTarget
from actors.ray_pool import ContextParallelFailure, DocumentFailed, LearnerDied, ReaderDied

__all__ = ["ContextParallelFailure", "DocumentFailed", "Learner", "LearnerDied", "NoLearner", "ReaderDied",
           "ReaderPool"]


class ReaderPool(Protocol):
    """Reader ``w`` reads the documents submitted to it one at a time, in submission order."""

    names: list[str]

    def submit(self, reader: int, tasks: list[DocumentTask], slow_version: Hashable | None = None) -> list[Hashable]:
        """Send ``tasks`` to ``reader`` in one call (read in order; a per_document reader reads
        them in one forward); returns one handle per task, for ``wait`` and ``result``.
        ``slow_version``: the learner's slow weights to read them with (``Learner.submit``)."""

    def wait(self, handles: list[Hashable], timeout_s: float, every: bool = False) -> list[Hashable]:
        """The handles that are done: as soon as one is (all of them with ``every``), plus
        whatever else is done by then; [] after ``timeout_s``."""

    def result(self, handle: Hashable) -> DocumentOutcome:
        """The outcome of a done handle, else ReaderDied, ContextParallelFailure or DocumentFailed."""

    def write_states(self, target: StateTarget) -> dict[str, list[Any]]:
        """Every reader writes its states into ``target`` (after every document submitted before
        this call); their manifest entries by reader."""

    def restore(self, reader: int, blobs: list[StateBlob]) -> None:
        """Replace ``reader``'s states with ``blobs`` (after what was submitted before)."""

    def wait_ready(self, reader: int, timeout_s: float) -> bool:
        """Block until ``reader`` answers (a restarted one: its model loaded); False if it does
        not within ``timeout_s``."""

    def forget(self, reader: int, key: str) -> bool:
        """Drop ``key``'s per-key state on ``reader`` (after what was submitted before); whether
        it held one."""

    def restart(self, reader: int) -> None:
        """Stop ``reader`` where it is (a document past its deadline) and start it again: what it
        held in flight fails with ReaderDied."""

    def status(self) -> dict[str, Any]:
        """The readers' own reports (and the learner's, the context-parallel group's) for the
        status message: ``{"readers": [...], ...}``."""

    def hand_off(self, handle: Hashable) -> Hashable | None:
        """What reading the document of ``handle`` computed for the learner (an object handle to
        pass to ``Learner.hand_off``), taken once; None where nothing was kept."""


class Learner(Protocol):
    """The stream's learner (actors.learner) as the processor sees it; ``NoLearner`` where the
    stream has none."""

    name: str | None
    # True: the readers read with the learner's versions and keep nothing between documents, so
    # a failed read is sent again as it is (no rewind to a checkpoint).
    keeps_readers_stateless: bool

    def submit(self, task: DocumentTask) -> Hashable | None:
        """The next document of the stream, to learn from; returns the version that document is
        read with (pass it to ``ReaderPool.submit``)."""

    def hand_off(self, task: DocumentTask, handed: Hashable | None) -> None:
        """``task`` is read (or rejected): what its reader computed for the learner
        (``ReaderPool.hand_off``), None where nothing (the learner then computes it itself)."""

    def check(self) -> None:
        """Raise LearnerDied if the learner is gone."""

    def snapshot(self) -> list[StateBlob]:
        """The learner's state after every document submitted before this call."""

    def states(self) -> dict[str, list[StateBlob]]:
        """``snapshot`` under the learner's name, as a checkpoint holds it ({} without one)."""

    position: int  # documents submitted since the stream started (restored ones included)

    def judged_states(self, judge: bool = True, settle: bool = True
                      ) -> tuple[dict[str, Any] | None, dict[str, list[StateBlob]]]:
        """At a checkpoint's cut: the promotion gate's verdict on the weights (None: no gate) and
        ``states`` as the version holds them; the learner then takes the verdict. ``judge``
        False: the cut is no judging point; the verdict is ``unjudged`` and nothing changes.
        ``settle`` False: judged, but the learner does not take the verdict (a stop)."""

    def restore(self, blobs: list[StateBlob]) -> None:
        """Back to ``blobs`` ([]: the base model); the order of documents restarts from there."""


class NoLearner:
    """A stream without a learner: readers learn what they learn themselves."""

    name = None
    keeps_readers_stateless = False

    def submit(self, task: DocumentTask) -> None:
        return None

    def hand_off(self, task: DocumentTask, handed: Hashable | None) -> None:
        pass

    def check(self) -> None:
        pass

    def snapshot(self) -> list[StateBlob]:
        return []

    def states(self) -> dict[str, list[StateBlob]]:
        return {}

    position = 0

    def judged_states(self, judge: bool = True, settle: bool = True) -> tuple[None, dict[str, list[StateBlob]]]:
        return None, {}

    def restore(self, blobs: list[StateBlob]) -> None:
        if blobs:
            raise ValueError("this stream has no learner to restore a learner's state into")
