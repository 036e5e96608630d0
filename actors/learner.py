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

Not every document is learned: the driver holds some out (the promotion gate's slice) and keeps
others out (``pipeline.processing.learning_admission``); they take their place in the order and
publish the same weights again. At a checkpoint's cut the gate (``actors.promotion_gate``) judges
the weights, and a rejected candidate sends the learner back to ``last-good``.
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

from actors.call_types import GATE_KEY, PUBLISHED_KEY, DocumentOutcome, DocumentTask, HandedStates, StateBlob, ReaderSpec
from actors.document_reader import DocumentReader
from actors.learning_budget import LearningBudget, OutlierWindows
from actors.promotion_gate import PromotionGate, Verdict
from actors.reading_modes import SelfLearning
from actors.state_store import GLOBAL_KEY
from ttt_model.slow import SlowVersion, rehearsal_chunks

log = logging.getLogger(__name__)


class StreamLearner:
    """Plain-class core of ``actors.learner_actor.LearnerActor`` (tested and benchmarked without Ray)."""

    def __init__(self, spec: ReaderSpec, lag: int = 1, name: str = "learner", every: int = 1, gate: Any = None,
                 outlier_margin: float | None = None):
        """``every``: learn from one in ``every`` of the documents it may learn (neither held out
        nor kept out), in the ledger's order (the others only take their place in it), for a
        learner slower than its readers. ``gate``: the stream's
        GateConfig (None, or not enabled: every checkpoint goes live unjudged). ``outlier_margin``:
        a window whose loss is above the median of the last windows learned by more than this
        fraction takes no slow step (None: every window steps)."""
        # The learner reads every document in its own mode (whatever the readers' is): the global
        # slow state, no shadow evaluation but the driver's, no context parallelism (windows of
        # max_document_tokens), the layers below the lowest adapted one apart, or taken from the
        # reader that read them (``learn``'s ``below``).
        self.reader = DocumentReader(spec, name=name, mode=lambda host: SelfLearning(host, "global", 0.0, split=True))
        self.mode = self.reader.mode
        self.name = name
        self.lag = lag
        self.every = every
        self.learned = 0  # documents learned from
        self.position = 0  # documents given to ``learn`` since the stream started (its ledger order)
        # Of those neither held out nor kept out, the ones learned: one in ``every``, the newer first.
        self.budget = LearningBudget(every)
        self.published: deque[SlowVersion] = deque(maxlen=lag)  # versions position - lag + 1 .. position
        self.failures = 0
        self.learn_s = 0.0
        self.taken_here = 0  # documents taken in since this learner was built or restored (its pace)
        self.gate = PromotionGate(gate, self.reader.model, self.reader.slow, self._probe(gate)) \
            if gate is not None and gate.enabled else None
        self.outlier_windows = OutlierWindows(
            outlier_margin, lambda: self.gate.kept_out_one("outlier loss") if self.gate is not None else None)
        if outlier_margin is not None:
            self.reader.slow.admit = self.outlier_windows.admit
        self._publish()

    def _probe(self, gate: Any) -> torch.Tensor | None:
        """The gate's probe: chunks of the rehearsal file past those the adapters rehearse (the
        model's own kind of text, never trained on); None without a rehearsal file or past its end."""
        slow = self.reader.slow_config
        if gate is None or not gate.enabled or slow.rehearsal_path is None:
            return None
        tokens = slow.rehearsal_tokens or 256
        chunks = rehearsal_chunks(slow.rehearsal_path, self.reader.tokenizer, tokens, slow.rehearsal_chunks + gate.probe_chunks)
        probe = chunks[slow.rehearsal_chunks :]
        if not len(probe):
            log.warning("%s: %s has no text past the %d chunks it rehearses: the gate has no probe (no forgetting "
                        "budget)", self.name, slow.rehearsal_path, slow.rehearsal_chunks)
            return None
        return probe

    def _slow(self):
        return self.mode.states.get(None).state.slow

    def _publish(self, changed: bool = True) -> None:
        if changed or not self.published:
            self.published.append(self._slow().version(self.position))
        else:  # the same weights under the next index
            self.published.append(SlowVersion(self.position, self.published[-1].adapters))

    def version(self, index: int) -> SlowVersion:
        """Version ``index`` (the slow weights after ``index`` documents), which the readers of
        documents index + lag - 1 read with; it must be among the last ``lag`` published."""
        published = tuple(self.published)  # a copy: the model thread publishes meanwhile
        for version in published:
            if version.index == index:
                return version
        if published and index < published[0].index and len(published) < self.lag:
            # Restored from a checkpoint written with a smaller lag: the versions before it are
            # gone; the oldest held stands in (the same on every replay of that checkpoint).
            return published[0]
        held = [v.index for v in published]
        raise ValueError(f"{self.name}: version {index} is not held (held: {held}; lag {self.lag})")

    def _skipped(self, task: DocumentTask) -> str | None:
        """Why ``task`` is not learned (held out, kept out, not taken: ``learner.every``), or None;
        counted where it goes (the gate's slice and figures, the budget)."""
        if task.held_out:
            if self.gate is not None:
                self.gate.hold_out(self.position, self.reader.tokenizer(task.text, add_special_tokens=False)["input_ids"])
            return "held out"
        if task.kept_out is not None:
            if self.gate is not None:
                self.gate.kept_out_one(task.kept_out.split(":")[0])
            return task.kept_out
        if not self.budget.takes(task):
            return "not learned (learner.every)"
        return None

    def learn(self, task: DocumentTask, below: HandedStates | None = None) -> dict[str, Any]:
        """Read ``task`` with slow steps and publish the next version. A document the learner
        rejects or fails on teaches nothing, and still takes its place in the order. ``below``:
        the hidden states its reader computed below the lowest adapted layer
        (``DocumentReader.take_handed``; None: the learner computes them, the same bits)."""
        start = time.perf_counter()
        self.taken_here += 1
        skipped = self._skipped(task)
        if skipped is not None:
            self.position += 1
            self._publish(changed=False)
            return {"ok": True, "tokens": 0, "loss": None, "reason": skipped, "version": self.position}
        self.learned += 1
        if self.gate is not None:
            self.gate.learned_one()
        try:
            outcome = self.reader.process(replace(task, shadow=False), below=below)
            report = {"ok": outcome.ok, "tokens": outcome.tokens, "loss": outcome.loss, "reason": outcome.reason}
        except Exception as err:  # noqa: BLE001 - the same document fails the same way on a replay
            self.failures += 1
            log.warning("%s: learning from %s failed: %r", self.name, task.id, err)
            report = {"ok": False, "tokens": 0, "loss": None, "reason": repr(err)}
        self.position += 1
        self._publish()
        self.learn_s += time.perf_counter() - start
        return {**report, "version": self.position}

    def read(self, task: DocumentTask) -> DocumentOutcome:
        """The synchronous learner (``processor.learner.synchronous``): read ``task`` as a reader
        would, scoring each chunk with the weights before its slow step, and learn from it in
        the same forward; a document not to be learned is read without steps. Its outcome is the
        document's result (with the base shadow where the driver drew one); it raises what
        reading it raised, having taken its place in the order all the same."""
        start = time.perf_counter()
        self.taken_here += 1
        skipped = self._skipped(task)
        version, admit = self.position, self.reader.slow.admit
        if skipped is None:
            self.learned += 1
            if self.gate is not None:
                self.gate.learned_one()
        else:
            self.reader.slow.admit = lambda loss: False  # scored, no step
        try:
            outcome = self.reader.process(task)
        except Exception:
            self.failures += 1
            raise
        finally:
            self.reader.slow.admit = admit
            self.position += 1
            self._publish(changed=skipped is None)
            self.learn_s += time.perf_counter() - start
        outcome.slow_version = version
        return outcome

    def judge(self, take: bool = True, settle: bool = True) -> tuple[Verdict | None, list[StateBlob]]:
        """At a checkpoint's cut (after the ``learn`` calls it covers): the gate's verdict on the
        weights now, and the snapshot the version holds (the candidate, last-good's state and the
        verdict); then the verdict is taken (rejected: back to last-good). Without a gate: (None,
        the snapshot). ``take`` False: a cut that is no judging point (the processor judges at
        positions the ledger fixes): ``unjudged``, and nothing changes. ``settle`` False: the
        verdict is given but not taken (a stop: the next run goes on as if it had not stopped)."""
        if self.gate is None:
            return None, self.snapshot()
        if not take:
            return self.gate.unjudged(self.position), self.snapshot()
        slow = self._slow()
        verdict = self.gate.judge(self.position, slow, slow.state_dict(), self._slow_of)
        if not settle:
            return verdict, self.snapshot()
        blobs = self.snapshot(verdict)
        self._settle(verdict)
        log.info("%s: version at %d %s: %s", self.name, self.position, verdict.verdict, verdict.reason)
        return verdict, blobs

    def _slow_of(self, data: bytes):
        state = self.mode.new_state()
        state.load_state_dict(load(data))
        return state.slow

    def _settle(self, verdict: Verdict) -> None:
        self._slow()  # made, if a restore to the base model left none
        (current,) = self.reader.snapshot()
        back = self.gate.settle(verdict, current.data)
        if back is None:
            return
        self.reader.restore([StateBlob(GLOBAL_KEY, back, hashlib.sha256(back).hexdigest(), 0)] if back else [])
        # The versions the next documents read with are last-good's weights too.
        adapters = self._slow().version(self.position).adapters
        versions = [SlowVersion(v.index, adapters) for v in self.published]
        self.published.clear()
        self.published.extend(versions)

    def snapshot(self, verdict: Verdict | None = None) -> list[StateBlob]:
        """The slow state (optimiser moments, rehearsal position and step included), the
        published versions still read with and the gate's state (with ``verdict``, the one taken
        at this cut), as blobs; call after the ``learn`` calls to cover."""
        blobs = self.reader.snapshot()
        tensors = {"position": torch.tensor([self.position], dtype=torch.int64),
                   **self.budget.tensors(), **self.outlier_windows.tensors()}
        for version in self.published:
            # Versions of documents not learned share their predecessor's tensors; a file holds copies.
            tensors.update({k: t.clone() for k, t in version.state_dict().items()})
        data = save(tensors)
        blobs.append(StateBlob(PUBLISHED_KEY, data, hashlib.sha256(data).hexdigest(), self.position))
        if self.gate is not None:
            blobs.append(self.gate.snapshot(verdict))
        return blobs

    def restore(self, blobs: list[StateBlob]) -> None:
        """Back to a snapshot's state and versions ([]: the base model, position 0)."""
        published = [b for b in blobs if b.key == PUBLISHED_KEY]
        gate = [b for b in blobs if b.key == GATE_KEY]
        states = [b for b in blobs if b.key not in (PUBLISHED_KEY, GATE_KEY)]
        if blobs and len(published) != 1:
            raise ValueError(f"{self.name}: a learner snapshot has one {PUBLISHED_KEY} blob, got {len(published)}")
        if published and hashlib.sha256(published[0].data).hexdigest() != published[0].sha256:
            raise ValueError(f"{self.name}: {PUBLISHED_KEY}: sha256 does not match")
        self.reader.restore(states)
        self.learn_s, self.taken_here = 0.0, 0  # the pace is this run's, from here
        verdict = self.gate.restore(gate[0] if gate else None) if self.gate is not None else None
        if not published:
            self.position = 0
            self.budget.reset()
            self.outlier_windows.losses.clear()
            self.published.clear()
            self._publish()
            return
        tensors = load(published[0].data)
        position = int(tensors.pop("position")[0])
        self.budget.load(tensors, position)
        self.outlier_windows.load(tensors)
        versions = SlowVersion.from_state_dict(tensors)
        if not versions or versions[-1].index != position:
            raise ValueError(f"{self.name}: the snapshot's versions {[v.index for v in versions]} end before "
                             f"its position {position}")
        self.position = position
        self.published.clear()
        self.published.extend(versions[-self.lag :])
        if verdict is not None:  # taken at that cut: taken again, as the learner that judged did
            self._settle(verdict)

    def stats(self) -> dict[str, Any]:
        return {**self.reader.stats(), "reader": self.name, "position": self.position, "lag": self.lag,
                "every": self.every, "learned": self.learned,
                "learn_failures": self.failures, "learn_s": self.learn_s, "taken_here": self.taken_here, "outlier_windows": self.outlier_windows.outliers,
                "slow_steps": self._slow().steps,
                **({"gate": self.gate.verdict.to_dict()} if self.gate is not None and self.gate.verdict else {})}
