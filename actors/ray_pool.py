"""The readers and the learner over Ray: the driver's side of their actors.

``RayReaderPool`` is ``pipeline.processing.reader_pool.ReaderPool`` over
``actors.reader_actor.ReaderActor`` handles, ``RayLearner`` the learner over a
``actors.learner_actor.LearnerActor`` handle, ``SynchronousLearnerPool`` the pool of the
synchronous learner (it reads the documents itself). They turn Ray's failures into the ones the
processor tells apart:

- ``ReaderDied``: the reader process is gone, with every document it held (Ray restarts it);
- ``ContextParallelFailure``: the reader is alive but a context-parallel read of this document
  failed (a member died); the reader may have learned part of the document;
- ``DocumentFailed``: the reader raised on this document; the document is at fault;
- ``LearnerDied``: the learner is gone.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import ray

from actors.cp_group import ContextParallelFailure
from actors.call_types import DocumentOutcome, DocumentTask, StateBlob, StateTarget, is_handed_on

__all__ = ["ContextParallelFailure", "DocumentFailed", "LearnerDied", "RayLearner", "RayReaderPool",
           "ReaderDied", "SynchronousLearnerPool"]


class ReaderDied(RuntimeError):
    """The reader holding a document died; every document submitted to it failed with it."""


class DocumentFailed(RuntimeError):
    """The reader raised while reading one document (``cause``: what it raised)."""

    def __init__(self, cause: BaseException):
        super().__init__(repr(cause))
        self.cause = cause


class LearnerDied(RuntimeError):
    """The learner is gone with the slow weights learned since the last checkpoint: the run stops,
    and the next one resumes from that checkpoint."""


class RayLearner:
    """``Learner`` over a LearnerActor handle: ``version`` then ``learn`` per document, in the
    order of the ledger. The learner's calls in that order (``learn``, ``judge``, ``snapshot``,
    ``restore``) are counted; document n's ``version`` call names how many of them must have run
    before it answers: all those sent before it but the ``learn`` of the last lag - 1
    documents, so that a reader of document n runs beside the learner of documents n - lag + 1
    .. n - 1 (which may wait for what their readers hand on), never after a later call."""

    # Learn calls whose result is checked only once this many are outstanding (or at a checkpoint).
    CHECK_EVERY = 64
    keeps_readers_stateless = True

    def __init__(self, actor, name: str, lag: int, synchronous: bool = False):
        """``synchronous``: the learner reads the documents itself (``SynchronousLearnerPool``):
        ``submit`` only counts them."""
        self.actor, self.name, self.lag, self.synchronous = actor, name, lag, synchronous
        self.position = ray.get(actor.position.remote())
        self._calls = ray.get(actor.calls_done.remote())  # in-order calls sent to it (all done now)
        self._trailing_learns = 0  # of those, the learn calls since the last other one
        self._learning: list = []

    def _in_order(self, learn: bool) -> None:
        self._calls += 1
        self._trailing_learns = self._trailing_learns + 1 if learn else 0

    def submit(self, task: DocumentTask):
        if self.synchronous:
            self.position += 1
            self._in_order(learn=True)
            return None
        if not is_handed_on(task, self.lag) and not task.held_out and task.kept_out is None:
            self.actor.prepare.remote(task)  # a document it reads itself (else its reader hands the ids on)
        after = self._calls - min(self._trailing_learns, self.lag - 1)
        version = self.actor.version.remote(max(0, self.position + 1 - self.lag), after)
        self._learning.append(self.actor.learn.remote(task))
        self._in_order(learn=True)
        self.position += 1
        if len(self._learning) >= self.CHECK_EVERY:
            self.check()
        return version

    def hand_off(self, task: DocumentTask, handed) -> None:
        if not self.synchronous and is_handed_on(task, self.lag):
            # In a list: the learner fetches it itself, after the call (a lost one is computed).
            self.actor.offer.remote((task.partition, task.offset), [handed])

    def check(self) -> None:
        if self.synchronous:  # its reads fail with it: is it gone?
            try:
                ray.get(self.actor.ready.remote(), timeout=30)
            except ray.exceptions.RayError as err:
                raise LearnerDied(f"the learner {self.name} failed: {err}") from None
            return
        done, self._learning = ray.wait(self._learning, num_returns=len(self._learning), timeout=0)
        try:
            ray.get(done)
        except ray.exceptions.RayError as err:
            raise LearnerDied(f"the learner {self.name} failed: {err}") from None

    def snapshot(self) -> list[StateBlob]:
        self._in_order(learn=False)
        try:
            blobs = ray.get(self.actor.snapshot.remote())
        except ray.exceptions.RayError as err:
            raise LearnerDied(f"the learner {self.name} failed: {err}") from None
        self.check()
        return blobs

    def states(self) -> dict[str, list[StateBlob]]:
        return {self.name: self.snapshot()}

    def judged_states(self, judge: bool = True, settle: bool = True
                      ) -> tuple[dict[str, Any] | None, dict[str, list[StateBlob]]]:
        self._in_order(learn=False)
        try:
            verdict, blobs = ray.get(self.actor.judge.remote(judge, settle))
        except ray.exceptions.RayError as err:
            raise LearnerDied(f"the learner {self.name} failed: {err}") from None
        self.check()
        return verdict, {self.name: blobs}

    def restore(self, blobs: list[StateBlob]) -> None:
        self._in_order(learn=False)
        ray.get(self.actor.restore.remote(blobs))
        self.position = ray.get(self.actor.position.remote())
        self._learning = []


class SynchronousLearnerPool:
    """``ReaderPool`` whose one reader is the learner itself (``processor.learner.synchronous``):
    it reads and learns each document in one forward. Its state is the learner's, checkpointed
    and restored as the learner (``Learner``); as a reader it holds none."""

    def __init__(self, actor, name: str, status: Callable[[], dict[str, Any]] | None = None):
        self._pool = RayReaderPool([actor], [name], status=status)
        self.actor, self.names = actor, [name]

    def status(self) -> dict[str, Any]:
        return self._pool.status()

    def submit(self, reader: int, tasks: list[DocumentTask], slow_version=None) -> list:
        for task in tasks:
            self.actor.prepare.remote(task)  # tokenized while the documents before it are read
        refs = self.actor.process_batch.options(num_returns=len(tasks)).remote(tasks)
        return [refs] if len(tasks) == 1 else list(refs)

    def wait(self, handles: list, timeout_s: float, every: bool = False) -> list:
        return self._pool.wait(handles, timeout_s, every)

    def result(self, handle) -> DocumentOutcome:
        return self._pool.result(handle)

    def write_states(self, target: StateTarget) -> dict[str, list[Any]]:
        return {}

    def restore(self, reader: int, blobs: list[StateBlob]) -> None:
        pass  # restored as the learner

    def forget(self, reader: int, key: str) -> bool:
        return False

    def restart(self, reader: int) -> None:
        ray.kill(self.actor)  # its learning since the checkpoint goes with it: LearnerDied

    def wait_ready(self, reader: int, timeout_s: float) -> bool:
        return self._pool.wait_ready(reader, timeout_s)

    def hand_off(self, handle) -> None:
        return None


class RayReaderPool:
    """``ReaderPool`` over ReaderActor handles (restarted by Ray after a crash)."""

    def __init__(self, actors: list, names: list[str], hands_off: bool = False,
                 status: Callable[[], dict[str, Any]] | None = None):
        """``hands_off``: the readers return what they computed for the learner after the
        outcomes (``ReaderActor.process_batch``). ``status``: their own reports (the
        supervisor's, ``actors.supervisor.SupervisorActor.status``)."""
        self.actors = actors
        self.names = names
        self.hands_off = hands_off
        self._status = status
        self._handed: dict = {}  # outcome handle -> its hand-off's handle

    def status(self) -> dict[str, Any]:
        return self._status() if self._status is not None else {"readers": []}

    def submit(self, reader: int, tasks: list[DocumentTask], slow_version=None) -> list:
        for task in tasks:
            self.actors[reader].prepare.remote(task)  # tokenized while the documents before it are read
        # A slow version is the learner's ObjectRef: Ray starts the call once it is published.
        returns = len(tasks) * (2 if self.hands_off else 1)
        refs = self.actors[reader].process_batch.options(num_returns=returns).remote(tasks, slow_version)
        refs = [refs] if returns == 1 else list(refs)
        if self.hands_off:
            self._handed.update(zip(refs[: len(tasks)], refs[len(tasks) :]))
        return refs[: len(tasks)]

    def hand_off(self, handle):
        return self._handed.pop(handle, None)

    def wait(self, handles: list, timeout_s: float, every: bool = False) -> list:
        if not handles:
            return []
        ready, rest = ray.wait(handles, num_returns=len(handles) if every else 1, timeout=timeout_s)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return ready

    def result(self, handle) -> DocumentOutcome:
        try:
            outcome = ray.get(handle, timeout=0)
        except ray.exceptions.RayActorError as err:
            raise ReaderDied(str(err)) from None
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, ContextParallelFailure):
                raise err.cause from None
            raise DocumentFailed(err.cause) from None
        except ray.exceptions.RayError as err:  # the result is lost with its reader (object or owner gone)
            raise ReaderDied(str(err)) from None
        if isinstance(outcome, ContextParallelFailure):
            raise outcome
        if isinstance(outcome, BaseException):  # what reading this one document of a batch raised
            raise DocumentFailed(outcome)
        return outcome

    def write_states(self, target: StateTarget) -> dict[str, list[Any]]:
        return dict(zip(self.names, ray.get([a.write_states.remote(target) for a in self.actors])))

    def restore(self, reader: int, blobs: list[StateBlob]) -> None:
        ray.get(self.actors[reader].restore.remote(blobs))

    def forget(self, reader: int, key: str) -> bool:
        try:
            return ray.get(self.actors[reader].forget.remote(key))
        except ray.exceptions.RayActorError as err:
            raise ReaderDied(str(err)) from None

    def restart(self, reader: int) -> None:
        ray.kill(self.actors[reader], no_restart=False)

    def wait_ready(self, reader: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.actors[reader].ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return True
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                # Restarting (or out of restarts, which only the deadline tells apart here).
                time.sleep(0.5)
        return False
