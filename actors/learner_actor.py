"""The learner as a Ray actor (the plain class is ``actors.learner.StreamLearner``)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import ray

from actors.call_types import DocumentTask, HandedStates, ReaderSpec, StateBlob, is_handed_on
from actors.model_thread import ModelThread

if TYPE_CHECKING:
    from ttt_model.slow import SlowVersion

log = logging.getLogger(__name__)

# How long ``learn`` waits for what the document's reader hands on before it computes that
# itself (the same bits: only the time differs); offers kept for documents not learned yet, and
# positions given up on (an offer for one of them, arriving late, is dropped).
HANDOFF_WAIT_S, MAX_OFFERS, MAX_GIVEN_UP = 120.0, 256, 4096


@ray.remote(concurrency_groups={"control": 1, "versions": 1, "offers": 1, "prepare": 1})
class LearnerActor:
    """The Ray shell of StreamLearner: ``learn``, ``judge``, ``snapshot`` and ``restore`` run in
    the order the processor sends them, on one model thread, and are counted. ``version`` runs
    apart and answers once as many of them have run as it names (``RayLearner``); ``offer``
    (what a reader computed for a document) runs apart and wakes the ``learn`` waiting for it;
    ``prepare`` tokenizes a document ahead, apart, as ``ReaderActor.prepare``."""

    def __init__(self, spec: ReaderSpec, lag: int, name: str, every: int = 1, gate: Any = None,
                 outlier_margin: float | None = None):
        from actors.learner import StreamLearner  # in the learner's process only, as ReaderActor's reader

        self.model_thread = ModelThread(f"{name}-model")
        self.learner = self.model_thread.call(StreamLearner, spec, lag, name, every, gate, outlier_margin)
        self._changed = threading.Condition()
        self._done = 0  # in-order calls run
        # Documents whose version was handed out (one ``version`` call each, in the ledger's
        # order): ``learn`` of document n waits for n's, so that the learner never runs so far
        # ahead (over documents it does not wait for a reader of) that a version still to be
        # read has left the ``lag`` it holds.
        self._served = self.learner.position
        self._offers: OrderedDict[tuple[int, int], HandedStates | None] = OrderedDict()
        self._given_up: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.lag = lag
        self.handoffs_missed = 0

    def _in_order(self, fn, *args):
        try:
            return self.model_thread.call(fn, *args)
        finally:
            with self._changed:
                self._done += 1
                self._changed.notify_all()

    @ray.method(concurrency_group="versions")
    def version(self, index: int, after: int = 0) -> SlowVersion:
        with self._changed:
            self._changed.wait_for(lambda: self._done >= after)
        try:
            return self.learner.version(index)
        finally:
            with self._changed:
                self._served += 1
                self._changed.notify_all()

    def calls_done(self) -> int:
        return self._done

    @ray.method(concurrency_group="offers")
    def offer(self, position: tuple[int, int], handed: list) -> None:
        """What the reader of the document at ``position`` computed for the learner (``[ref]``,
        ``[None]``: nothing, or it failed)."""
        try:
            states = ray.get(handed[0]) if handed[0] is not None else None
        except ray.exceptions.RayError as err:  # lost with its reader: the learner computes it
            log.info("%s: the hand-off of %s is lost (%s)", self.learner.name, position, err)
            states = None
        with self._changed:
            if tuple(position) in self._given_up:  # learned already, from what the learner computed
                return
            self._offers[tuple(position)] = states
            while len(self._offers) > MAX_OFFERS:  # never waited for (a rollback between)
                self._offers.popitem(last=False)
            self._changed.notify_all()

    @ray.method(concurrency_group="prepare")
    def prepare(self, task: DocumentTask) -> None:
        # Its own thread, as ReaderActor's: the next document is tokenized while one is learned.
        self.learner.reader.prepare(task)

    def learn(self, task: DocumentTask) -> dict[str, Any]:
        below = None
        with self._changed:
            self._changed.wait_for(lambda: self._served > self.learner.position)
        if is_handed_on(task, self.lag):
            position = (task.partition, task.offset)
            with self._changed:
                if self._changed.wait_for(lambda: position in self._offers, timeout=HANDOFF_WAIT_S):
                    below = self._offers.pop(position)
                else:
                    self.handoffs_missed += 1
                    self._given_up[position] = None
                    while len(self._given_up) > MAX_GIVEN_UP:
                        self._given_up.popitem(last=False)
        return self._in_order(self.learner.learn, task, below)

    def process_batch(self, tasks: list[DocumentTask], version: Any = None):
        """The synchronous learner's reading (``processor.learner.synchronous``): as
        ``ReaderActor.process_batch``, one return value per task, its outcome or what reading it
        raised."""
        outcomes = []
        for task in tasks:
            try:
                outcomes.append(self._in_order(self.learner.read, task))
            except Exception as err:  # noqa: BLE001 - one bad document does not fail the others
                outcomes.append(err)
        return outcomes[0] if len(outcomes) == 1 else outcomes

    def position(self) -> int:
        return self.learner.position

    def snapshot(self) -> list[StateBlob]:
        return self._in_order(self.learner.snapshot)

    def judge(self, take: bool = True, settle: bool = True) -> tuple[dict[str, Any] | None, list[StateBlob]]:
        verdict, blobs = self._in_order(self.learner.judge, take, settle)
        return (verdict.to_dict() if verdict is not None else None), blobs

    def restore(self, blobs: list[StateBlob]) -> None:
        with self._changed:
            self._offers.clear()
        self._in_order(self.learner.restore, blobs)
        with self._changed:
            self._served = self.learner.position  # the next document's version is the next served

    @ray.method(concurrency_group="control")
    def stats(self) -> dict[str, Any]:
        return {**self.learner.stats(), "handoffs_missed": self.handoffs_missed}

    @ray.method(concurrency_group="control")
    def ready(self) -> str:
        return self.learner.name
