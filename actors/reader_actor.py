"""ReaderActor: the Ray shell around DocumentReader, one per model replica.

Documents run one at a time in submission order (the default concurrency group has one
thread), which is what keeps per-partition order and states deterministic; status calls use a
separate group so that they answer while a long document is being read, and ``prepare``
(tokenizing a document ahead of its ``process``) a third, so that it overlaps the reading. Every
call that touches the model runs on one ModelThread, whichever group's thread receives it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import ray

from actors.cp_group import ContextParallelFailure
from actors.call_types import DocumentOutcome, DocumentTask, ReaderSpec, StateBlob, StateTarget
from actors.model_thread import ModelThread

if TYPE_CHECKING:
    from ttt_model.slow import SlowVersion


@ray.remote(concurrency_groups={"control": 1, "prepare": 1})
class ReaderActor:
    def __init__(self, spec: ReaderSpec, name: str, context_parallel: Any = None):
        """``context_parallel``: a ContextParallelService handle that reads the long windows."""
        # Imported here, in the reader's own process: the supervisor, which only starts readers,
        # then never loads torch and transformers (seconds of every start of a stream).
        from actors.document_reader import DocumentReader

        reader = None
        if context_parallel is not None:
            def reader(ids, state, version):
                try:
                    return ray.get(context_parallel.read.remote(ids, state, version))
                except ray.exceptions.RayError as err:
                    cause = getattr(err, "cause", None)
                    raise ContextParallelFailure(str(cause or err)) from None

        self.model_thread = ModelThread(f"{name}-model")
        self.reader = self.model_thread.call(DocumentReader, spec, name, reader)
        with warnings.catch_warnings():  # it reads a deprecated property inside Ray itself
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed

    @ray.method(concurrency_group="prepare")
    def prepare(self, task: DocumentTask) -> None:
        # Its own thread: the next document is tokenized while this one is read.
        self.reader.prepare(task)

    def process(self, task: DocumentTask, version: SlowVersion | None = None) -> DocumentOutcome:
        return self.model_thread.call(self.reader.process, task, version)

    def process_batch(self, tasks: list[DocumentTask],
                      version: SlowVersion | None = None) -> DocumentOutcome | list[DocumentOutcome | Exception]:
        """One return value per task (``num_returns`` = len(tasks)): its outcome, or what reading
        it raised, so that one bad document does not fail the others. ``version``: the learner's
        slow weights to read with (passed as the learner's ObjectRef: Ray holds the call until
        the learner has published it). A reader that hands on to the learner
        (``spec.split_at_adapters``) returns as many again after them: each task's
        ``HandedStates`` (or None), an object of its own that the learner fetches."""
        outcomes = self.model_thread.call(self.reader.process_batch, tasks, errors_as_values=True, version=version)
        if self.reader.spec.split_at_adapters:
            outcomes = outcomes + [self.reader.take_handed(task.id) for task in tasks]
        return outcomes[0] if len(outcomes) == 1 else outcomes

    def snapshot(self) -> list[StateBlob]:
        # Default group: runs after every document submitted before it, a consistent cut.
        return self.model_thread.call(self.reader.snapshot)

    def write_states(self, target: StateTarget) -> bytes:
        # In order with the documents, as snapshot: the states after every one submitted before.
        return self.model_thread.call(self.reader.write_states, target)

    def restore(self, blobs: list[StateBlob]) -> None:
        self.model_thread.call(self.reader.restore, blobs)

    def forget(self, key: str) -> bool:
        return self.model_thread.call(self.reader.forget, key)

    @ray.method(concurrency_group="control")
    def stats(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        return {**self.reader.stats(), "restarted": self.restarted, "node_id": context.get_node_id(),
                "node_ip": ray.util.get_node_ip_address()}

    @ray.method(concurrency_group="control")
    def ready(self) -> str:
        return self.reader.name
