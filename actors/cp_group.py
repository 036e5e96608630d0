"""A context-parallel group of Ray actors: one process group (gloo on CPU, nccl on GPU) per
group, members placed together by a placement group, rendezvous through Ray.

    group = ContextParallelActors(model_path, world=2)
    reading = group.read(input_ids, state)   # one long document, split over the members
    group.shutdown()

Each member holds the same model; ``read`` hands member r the r-th contiguous segment and every
member runs ``ttt_model.parallel.context_parallel_forward``, starting from the caller's
fast-weight state. A member that dies fails the document (``ray.exceptions.RayActorError``).

The stream processor uses one ``ContextParallelService`` per stream: an actor that owns a group,
serves the readers' long documents one at a time (a process group runs one collective sequence
at a time) and, after a member failure, raises ``ContextParallelFailure`` and builds a fresh
group for the next read; the processor then retries the document from the last checkpoint.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.call_types import ContextParallelSpec
from ttt_model.config import SlowConfig, TTTConfig

if TYPE_CHECKING:
    import torch


@dataclass
class ContextParallelReading:
    """What one context-parallel read of a document gives back."""

    nll: torch.Tensor  # (B, N - 1): -log p(token | prefix) for tokens 1..N-1
    state: dict[str, torch.Tensor]  # the streaming state after the document (same on every member)
    logits: list[torch.Tensor] | None  # per member, when asked for
    seconds: list[float]  # per member: the forward
    communication_seconds: list[float]  # per member: inside collectives


@ray.remote
class ContextParallelMember:
    def __init__(self, model_path: str, rank: int, world: int, device: str = "cpu", ttt: TTTConfig | None = None,
                 num_threads: int | None = None, slow: SlowConfig | None = None):
        import torch  # here, not above: the supervisor, which only starts the actors, never loads torch

        from ttt_model.factory import build_model

        if num_threads:
            torch.set_num_threads(num_threads)
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        # The stream's model; with slow weights, the adapters bound to the version each read is given.
        self.model, self.slow = build_model(model_path, ttt or TTTConfig(), slow or SlowConfig(), self.device,
                                            torch.float32 if device == "cpu" else torch.bfloat16)

    def rendezvous_address(self) -> tuple[str, int]:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, address: str, port: int) -> None:
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=self.world)

    def pid(self) -> int:
        import os

        return os.getpid()

    def forward(self, segment: torch.Tensor, lengths: tuple[int, ...], with_logits: bool,
                start_state: dict[str, torch.Tensor] | None = None, version: Any = None) -> dict[str, Any]:
        """``version``: the SlowVersion to read with (the members were built with its adapters)."""
        if version is not None and self.slow is None:
            raise ValueError("a slow version was given to a member built without slow weights")
        if self.slow is None:
            return self._forward(segment, lengths, with_logits, start_state)
        with self.slow.bound(self.slow.state_of(version) if version is not None else None):
            return self._forward(segment, lengths, with_logits, start_state)

    def _forward(self, segment: torch.Tensor, lengths: tuple[int, ...], with_logits: bool,
                 start_state: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        import time

        import torch

        from ttt_model.parallel import CommunicationTimer, ContextParallelGroup, context_parallel_forward
        from ttt_model.model.state import FastWeightState
        from ttt_model.model.token_nll import token_nll

        timer = CommunicationTimer()
        cp = ContextParallelGroup(self.rank, lengths, timer=timer)
        segment = segment.to(self.device)  # once: the forward and the NLL both read it there
        state = FastWeightState.for_model(self.model, batch_size=segment.shape[0])
        if start_state is not None:
            state.load_state_dict(start_state)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = context_parallel_forward(self.model, segment, cp, state)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return {"logits": logits.float().cpu() if with_logits else None, "last": logits[:, -1].float().cpu(),
                # NLL of tokens 1.. of the segment from its own logits (the first token's comes
                # from the previous member's last logits).
                "log_probs": token_nll(logits[:, :-1], segment[:, 1:]).cpu(),
                "state": state.state_dict() if self.rank == 0 else None,
                "seconds": seconds, "communication_seconds": timer.seconds}

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _get_all_or_fail(refs: list) -> list:
    """ray.get of every ref, raising as soon as one fails: the survivors of a dead member wait in
    a collective that will never complete, so waiting for all of them would hang."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)  # raises RayActorError / RayTaskError for a failed member
    return ray.get(refs)


class ContextParallelActors:
    """``world`` members in one placement group, joined into one process group."""

    def __init__(self, model_path: str, world: int, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 strategy: str = "PACK", timeout_s: float = 300.0, ttt: TTTConfig | None = None,
                 num_threads: int | None = None, slow: SlowConfig | None = None):
        self.world = world
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.placement = placement_group([bundle] * world, strategy=strategy)
        ray.get(self.placement.ready(), timeout=timeout_s)
        device = "cuda" if num_gpus else "cpu"
        self.members = [
            ContextParallelMember.options(
                num_cpus=num_cpus, num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=r),
            ).remote(model_path, r, world, device, ttt, num_threads, slow)
            for r in range(world)
        ]
        address, port = ray.get(self.members[0].rendezvous_address.remote(), timeout=timeout_s)
        ray.get([m.join.remote(address, port) for m in self.members], timeout=timeout_s)

    def read(self, input_ids: torch.Tensor, with_logits: bool = False,
             state: dict[str, torch.Tensor] | None = None, version: Any = None) -> ContextParallelReading:
        """Read one document; ``state`` (a FastWeightState.state_dict with no unfinished chunk)
        is where the fast weights start, fresh when None; ``version`` the slow weights to read
        with (a SlowVersion; the group built with ``slow``)."""
        import torch

        from ttt_model.parallel import split_lengths

        lengths = split_lengths(input_ids.shape[1], self.world)
        bounds = [sum(lengths[:r]) for r in range(self.world + 1)]
        state_ref = ray.put(state) if state is not None else None
        version_ref = ray.put(version) if version is not None else None
        parts = _get_all_or_fail([
            m.forward.remote(input_ids[:, bounds[r] : bounds[r + 1]], lengths, with_logits, state_ref, version_ref)
            for r, m in enumerate(self.members)
        ])
        nll = []
        for r, part in enumerate(parts):
            if r > 0:  # the first token of a segment is predicted by the previous segment's last logits
                first = input_ids[:, bounds[r]]
                nll.append(-torch.log_softmax(parts[r - 1]["last"], -1).gather(-1, first[:, None]))
            nll.append(part["log_probs"])
        return ContextParallelReading(
            nll=torch.cat(nll, dim=1), state=parts[0]["state"],
            logits=[p["logits"] for p in parts] if with_logits else None,
            seconds=[p["seconds"] for p in parts], communication_seconds=[p["communication_seconds"] for p in parts],
        )

    def shutdown(self, graceful: bool = True) -> None:
        """Leave the process group and stop the members; after a failure (``graceful`` False)
        the survivors may be blocked in a collective, so they are killed at once."""
        if graceful:
            try:
                ray.get([m.leave.remote() for m in self.members], timeout=30)
            except ray.exceptions.RayError:
                pass
        for m in self.members:
            ray.kill(m)
        remove_placement_group(self.placement)


class ContextParallelFailure(RuntimeError):
    """A context-parallel read failed (a member died, or the group could not be formed)."""


@ray.remote(num_cpus=0, max_concurrency=1)
class ContextParallelService:
    """One group for a stream, shared by its readers: reads run one at a time, and a group that
    lost a member is replaced before the next read."""

    def __init__(self, spec: ContextParallelSpec):
        self.spec = spec
        self.group: ContextParallelActors | None = None
        self.reads = 0
        self.failures = 0

    def _ensure_group(self) -> ContextParallelActors:
        if self.group is None:
            s = self.spec
            self.group = ContextParallelActors(s.model_path, s.world, s.num_cpus, s.num_gpus, strategy=s.strategy,
                                               ttt=s.ttt, num_threads=s.num_threads, slow=s.slow)
        return self.group

    def read(self, input_ids: torch.Tensor, state: dict[str, torch.Tensor] | None,
             version: Any = None) -> tuple[torch.Tensor, dict]:
        """(nll of tokens 1.., the state after the document); ``version``: its slow weights."""
        try:
            reading = self._ensure_group().read(input_ids, state=state, version=version)
        except (ray.exceptions.RayError, RuntimeError) as err:
            self.failures += 1
            if self.group is not None:
                self.group.shutdown(graceful=False)
                self.group = None
            raise ContextParallelFailure(f"context-parallel read failed: {type(err).__name__}: {err}") from None
        self.reads += 1
        return reading.nll, reading.state

    def member_pids(self) -> list[int]:
        return ray.get([m.pid.remote() for m in self._ensure_group().members])

    def stats(self) -> dict[str, Any]:
        return {"world": self.spec.world, "reads": self.reads, "failures": self.failures,
                "formed": self.group is not None}

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None
