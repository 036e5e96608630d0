"""The learner: trains a stream's slow weights from the documents its readers read, and publishes
them as immutable versions.

Readers (``DocumentReader`` with ``slow_from_learner``) read at the speed of a static model with a
fixed version; the learner reads the same documents, in the order the processor took them from
the topic (the ledger's), each one prequentially with the lean slow step of
``ttt_model.slow.SlowLearner.read``, and after document n publishes version n + 1. Document n is
read with version max(0, n + 1 - lag): a function of the ledger, never of timing, so that a run
restored from a checkpoint reads and learns exactly what a run without the restart did. A reader
whose version is not published yet waits for it (Ray holds its call until the object exists).

``global`` scope only: one slow state for the whole stream, however many readers. Under
``per_key`` a key's documents come from one partition and so one reader, which learns that key's
slow weights itself (the synchronous path).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from dataclasses import replace
from typing import Any

import torch
from safetensors.torch import load, save

from actors.call_types import PUBLISHED_KEY, DocumentTask, StateBlob, ReaderSpec
from actors.document_reader import DocumentReader
from ttt_model.slow import SlowVersion

log = logging.getLogger(__name__)


class StreamLearner:
    """Plain-class core of ``actors.learner_actor.LearnerActor`` (tested and benchmarked without Ray)."""

    def __init__(self, spec: ReaderSpec, lag: int = 1, name: str = "learner", every: int = 1):
        """``every``: learn from documents 0, every, 2 * every, ... of the order (the others only
        take their place in it), for a learner slower than its readers."""
        # The learner is the synchronous reader of every document: slow steps, no shadow
        # evaluation, no context parallelism (it reads windows of max_document_tokens).
        spec = replace(spec, slow_from_learner=False, scope="global", base_loss_sample_rate=0.0,
                       context_parallel_min_tokens=None, tokenize_ahead=False)
        self.worker = DocumentReader(spec, name=name)
        self.name = name
        self.lag = lag
        self.every = every
        self.learned = 0  # documents learned from
        self.position = 0  # documents given to ``learn`` since the stream started (its ledger order)
        self.published: deque[SlowVersion] = deque(maxlen=lag)  # versions position - lag + 1 .. position
        self.failures = 0
        self.learn_s = 0.0
        self._publish()

    def _slow(self):
        return self.worker.states.get(None).state.slow

    def _publish(self, changed: bool = True) -> None:
        if changed or not self.published:
            self.published.append(self._slow().version(self.position))
        else:  # the same weights under the next index
            self.published.append(SlowVersion(self.position, self.published[-1].adapters))

    def version(self, index: int) -> SlowVersion:
        """Version ``index`` (the slow weights after ``index`` documents), which the readers of
        documents index + lag - 1 read with; it must be among the last ``lag`` published."""
        for version in self.published:
            if version.index == index:
                return version
        held = [v.index for v in self.published]
        raise ValueError(f"{self.name}: version {index} is not held (held: {held}; lag {self.lag})")

    def learn(self, task: DocumentTask) -> dict[str, Any]:
        """Read ``task`` with slow steps and publish the next version. A document the learner
        rejects or fails on teaches nothing, and still takes its place in the order."""
        start = time.perf_counter()
        if self.position % self.every:
            self.position += 1
            self._publish(changed=False)
            return {"ok": True, "tokens": 0, "loss": None, "reason": "not learned (learner.every)",
                    "version": self.position}
        self.learned += 1
        try:
            outcome = self.worker.process(task)
            report = {"ok": outcome.ok, "tokens": outcome.tokens, "loss": outcome.loss, "reason": outcome.reason}
        except Exception as err:  # noqa: BLE001 - the same document fails the same way on a replay
            self.failures += 1
            log.warning("%s: learning from %s failed: %r", self.name, task.id, err)
            report = {"ok": False, "tokens": 0, "loss": None, "reason": repr(err)}
        self.position += 1
        self._publish()
        self.learn_s += time.perf_counter() - start
        return {**report, "version": self.position}

    def snapshot(self) -> list[StateBlob]:
        """The slow state (optimiser moments, rehearsal position and step included) and the
        published versions still read with, as blobs; call after the ``learn`` calls to cover."""
        blobs = self.worker.snapshot()
        tensors = {"position": torch.tensor([self.position], dtype=torch.int64)}
        for version in self.published:
            tensors.update(version.state_dict())
        data = save(tensors)
        return blobs + [StateBlob(PUBLISHED_KEY, data, hashlib.sha256(data).hexdigest(), self.position)]

    def restore(self, blobs: list[StateBlob]) -> None:
        """Back to a snapshot's state and versions ([]: the base model, position 0)."""
        published = [b for b in blobs if b.key == PUBLISHED_KEY]
        states = [b for b in blobs if b.key != PUBLISHED_KEY]
        if blobs and len(published) != 1:
            raise ValueError(f"{self.name}: a learner snapshot has one {PUBLISHED_KEY} blob, got {len(published)}")
        if published and hashlib.sha256(published[0].data).hexdigest() != published[0].sha256:
            raise ValueError(f"{self.name}: {PUBLISHED_KEY}: sha256 does not match")
        self.worker.restore(states)
        if not published:
            self.position = 0
            self.published.clear()
            self._publish()
            return
        tensors = load(published[0].data)
        position = int(tensors.pop("position")[0])
        versions = SlowVersion.from_state_dict(tensors)
        if not versions or versions[-1].index != position:
            raise ValueError(f"{self.name}: the snapshot's versions {[v.index for v in versions]} end before "
                             f"its position {position}")
        self.position = position
        self.published.clear()
        self.published.extend(versions[-self.lag :])

    def stats(self) -> dict[str, Any]:
        return {**self.worker.stats(), "worker": self.name, "position": self.position, "lag": self.lag,
                "every": self.every, "learned": self.learned,
                "learn_failures": self.failures, "learn_s": self.learn_s,
                "slow_steps": self._slow().steps}
