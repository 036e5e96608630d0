"""The learner as a Ray actor (the plain class is ``actors.learner.StreamLearner``)."""

from __future__ import annotations

from typing import Any

import ray

from actors.call_types import DocumentTask, StateBlob, ReaderSpec
from actors.learner import StreamLearner
from actors.model_thread import ModelThread
from ttt_model.slow import SlowVersion


@ray.remote(concurrency_groups={"control": 1})
class LearnerActor:
    """The Ray shell of StreamLearner: ``version``, ``learn``, ``snapshot`` and ``restore`` run in
    the order the processor sends them, on one model thread."""

    def __init__(self, spec: ReaderSpec, lag: int, name: str, every: int = 1, gate: Any = None,
                 outlier_margin: float | None = None):
        self.model_thread = ModelThread(f"{name}-model")
        self.learner = self.model_thread.call(StreamLearner, spec, lag, name, every, gate, outlier_margin)

    def version(self, index: int) -> SlowVersion:
        return self.learner.version(index)

    def learn(self, task: DocumentTask) -> dict[str, Any]:
        return self.model_thread.call(self.learner.learn, task)

    def position(self) -> int:
        return self.learner.position

    def snapshot(self) -> list[StateBlob]:
        return self.model_thread.call(self.learner.snapshot)

    def judge(self, take: bool = True, settle: bool = True) -> tuple[dict[str, Any] | None, list[StateBlob]]:
        verdict, blobs = self.model_thread.call(self.learner.judge, take, settle)
        return (verdict.to_dict() if verdict is not None else None), blobs

    def restore(self, blobs: list[StateBlob]) -> None:
        self.model_thread.call(self.learner.restore, blobs)

    @ray.method(concurrency_group="control")
    def stats(self) -> dict[str, Any]:
        return self.learner.stats()

    @ray.method(concurrency_group="control")
    def ready(self) -> str:
        return self.learner.name
