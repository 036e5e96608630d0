"""The supervisor: starts the reader actors, owns the partition -> reader assignment, watches
their health and reports status.

Readers are restarted by Ray (``max_restarts``); a document in flight on a reader that died
fails with ``RayActorError`` and the caller sends it again once the reader is back. With a
context-parallel spec, the supervisor also starts the stream's ContextParallelService, to which
every reader hands its long windows.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from actors.assignment import assign_partitions
from actors.call_types import ContextParallelSpec
from actors.cp_group import ContextParallelService
from actors.call_types import ReaderSpec
from actors.learner_actor import LearnerActor
from actors.reader_actor import ReaderActor
from actors.reader_names import reader_name

log = logging.getLogger(__name__)


class Supervisor:
    """Plain-class core of SupervisorActor: reader handles, assignment, status."""

    def __init__(self, stream: str, spec: ReaderSpec, readers: int, num_cpus: float, num_gpus: float,
                 max_restarts: int, context_parallel: ContextParallelSpec | None = None, strategy: str = "SPREAD",
                 learner: Any = None, memory_mb: int | None = None):
        """``learner``: the stream's LearnerConfig (lag, every, num_cpus, num_gpus), when it has one;
        ``memory_mb``: the memory Ray reserves for each reader (None: none reserved)."""
        self.stream = stream
        # One bundle per reader: Ray places them by ``strategy`` over the nodes, and a bundle of a
        # lost node is placed again on a node with room, where Ray restarts its reader.
        memory = {"memory": memory_mb * 2**20} if memory_mb else {}
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **memory}
        self.strategy = strategy
        # A synchronous learner reads every document itself: no readers.
        readers = 0 if learner is not None and learner.synchronous else readers
        self.placement = placement_group([bundle] * readers, strategy=strategy) if readers else None
        self.started = time.time()
        self.names = [reader_name(stream, i) for i in range(readers)]
        self.context_parallel = (
            ContextParallelService.options(name=f"{stream}-context-parallel", max_restarts=-1)
            .remote(context_parallel)
            if context_parallel is not None else None
        )
        self.readers = [
            ReaderActor.options(
                # No lifetime limit: the processor counts deaths per document and per window
                # (processor.max_attempts, max_restarts in restart_window_s).
                name=name, max_restarts=-1, max_task_retries=0, num_cpus=num_cpus, num_gpus=num_gpus, **memory,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=i),
            ).remote(spec, name, self.context_parallel)
            for i, name in enumerate(self.names)
        ]
        self.assignment: dict[int, int] = {}
        # Not restarted by Ray: what it learned since the last checkpoint dies with it, and the
        # processor stops so that the next run resumes from that checkpoint (LearnerDied).
        self.learner_name = f"{stream}-learner"
        self.learner = None
        if learner is not None:
            self.learner = LearnerActor.options(
                name=self.learner_name, max_restarts=0, num_cpus=learner.num_cpus, num_gpus=learner.num_gpus,
            ).remote(spec, learner.lag, self.learner_name, learner.every, learner.gate,
                      learner.admission.outlier_loss_margin if learner.admission.enabled else None)
            if learner.synchronous:
                self.readers, self.names = [self.learner], [self.learner_name]

    def wait_ready(self, timeout_s: float) -> list[str]:
        try:
            if self.placement is not None:
                ray.get(self.placement.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            bundles = self.placement.bundle_specs
            raise RuntimeError(f"the cluster has no room for {len(bundles)} readers of {bundles[0]} placed "
                               f"{self.strategy} (processor.placement_strategy) within {timeout_s:.0f} s; "
                               f"it has {ray.available_resources()} free") from None
        learner = [self.learner.ready.remote()] if self.learner is not None else []
        return ray.get([w.ready.remote() for w in self.readers] + learner, timeout=timeout_s)

    def assign(self, partitions: list[int]) -> tuple[list[Any], list[str], dict[int, int]]:
        """(reader handles, their names, partition -> reader index)."""
        self.assignment = assign_partitions(partitions, len(self.readers))
        return self.readers, self.names, self.assignment

    def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        refs = [w.stats.remote() for w in self.readers]
        readers = []
        for i, ref in enumerate(refs):
            try:
                stats = ray.get(ref, timeout=timeout_s)
                stats["alive"] = True
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                stats = {"reader": reader_name(self.stream, i), "alive": False, "error": type(err).__name__}
            stats["partitions"] = sorted(p for p, w in self.assignment.items() if w == i)
            readers.append(stats)
        report = {"stream": self.stream, "uptime_s": time.time() - self.started, "placement": self.strategy,
                  "readers": readers}
        if self.learner is not None:
            try:
                report["learner"] = {**ray.get(self.learner.stats.remote(), timeout=timeout_s), "alive": True}
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                report["learner"] = {"reader": self.learner_name, "alive": False, "error": type(err).__name__}
        if self.context_parallel is not None:
            try:
                report["context_parallel"] = ray.get(self.context_parallel.stats.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                report["context_parallel"] = {"error": type(err).__name__}
        return report

    def shutdown(self) -> None:
        if self.learner is not None:
            ray.kill(self.learner)
        if self.context_parallel is not None:
            ray.get(self.context_parallel.shutdown.remote(), timeout=60)
        if self.placement is not None:
            remove_placement_group(self.placement)


@ray.remote(num_cpus=0)
class SupervisorActor:
    def __init__(self, stream: str, spec: ReaderSpec, readers: int, num_cpus: float, num_gpus: float,
                 max_restarts: int, context_parallel: ContextParallelSpec | None = None, strategy: str = "SPREAD",
                 learner: Any = None, memory_mb: int | None = None):
        self.supervisor = Supervisor(stream, spec, readers, num_cpus, num_gpus, max_restarts, context_parallel,
                                     strategy, learner, memory_mb)

    def wait_ready(self, timeout_s: float) -> list[str]:
        return self.supervisor.wait_ready(timeout_s)

    def assign(self, partitions: list[int]) -> tuple[list[Any], list[str], dict[int, int]]:
        return self.supervisor.assign(partitions)

    def learner(self) -> tuple[Any, str]:
        """(the learner's handle, its name)."""
        return self.supervisor.learner, self.supervisor.learner_name

    def status(self) -> dict[str, Any]:
        return self.supervisor.status()

    def shutdown(self) -> None:
        self.supervisor.shutdown()


class StreamActors:
    """The driver's hold on a stream's actors: the supervisor and, through it, the readers and the
    learner. The supervisor (owner of the readers: they die with it) lives on the driver's node,
    whose fate it shares anyway, never on a worker node that may be lost. Not soft: Ray's soft
    affinity passes over a node without CPUs, such as a head kept free of readers."""

    def __init__(self, stream: str, spec: ReaderSpec, readers: int, num_cpus: float, num_gpus: float,
                 max_restarts: int, context_parallel: ContextParallelSpec | None = None, strategy: str = "SPREAD",
                 learner: Any = None, memory_mb: int | None = None):
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.supervisor = SupervisorActor.options(scheduling_strategy=here).remote(
            stream, spec, readers, num_cpus, num_gpus, max_restarts, context_parallel, strategy, learner, memory_mb)

    def wait_ready(self, timeout_s: float) -> list[str]:
        return ray.get(self.supervisor.wait_ready.remote(timeout_s))

    def assign(self, partitions: list[int]) -> tuple[list[Any], list[str], dict[int, int]]:
        """(the readers' handles, their names, partition -> reader index)."""
        return ray.get(self.supervisor.assign.remote(partitions))

    def learner(self) -> tuple[Any, str]:
        """(the learner's handle, its name)."""
        return ray.get(self.supervisor.learner.remote())

    def status(self) -> dict[str, Any]:
        """The readers' own reports."""
        return ray.get(self.supervisor.status.remote(), timeout=10)

    def shutdown(self) -> None:
        try:
            ray.get(self.supervisor.shutdown.remote(), timeout=60)
        except ray.exceptions.RayError as err:
            log.warning("supervisor shutdown: %s", err)
        ray.kill(self.supervisor)
