"""A context-parallel group of Ray actors: one process group (gloo on CPU, nccl on GPU) per
group, members placed together by a placement group, rendezvous through Ray.

    group = ContextParallelActors(model_path, world=2)
    reading = group.read(input_ids)        # one long document, split over the members
    group.shutdown()

Each member holds the same model; ``read`` hands member r the r-th contiguous segment and every
member runs ``ttt_model.parallel.context_parallel_forward``. A member that dies fails the
document (``ray.exceptions.RayActorError``); the caller retries it, e.g. from its last checkpoint.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ttt_model.parallel import ContextParallelGroup, split_lengths


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
    def __init__(self, model_path: str, rank: int, world: int, device: str = "cpu"):
        from ttt_model.patch import load_ttt_model

        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.model = load_ttt_model(model_path, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
        self.model.to(self.device).eval()

    def rendezvous_address(self) -> tuple[str, int]:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, address: str, port: int) -> None:
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=self.world)

    def forward(self, segment: torch.Tensor, lengths: tuple[int, ...], with_logits: bool) -> dict[str, Any]:
        import time

        from ttt_model.parallel import CommunicationTimer, context_parallel_forward
        from ttt_model.state import FastWeightState

        timer = CommunicationTimer()
        cp = ContextParallelGroup(self.rank, lengths, timer=timer)
        state = FastWeightState.for_model(self.model, batch_size=segment.shape[0])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = context_parallel_forward(self.model, segment.to(self.device), cp, state)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return {"logits": logits.float().cpu() if with_logits else None, "last": logits[:, -1].float().cpu(),
                "log_probs": _segment_nll(logits, segment.to(self.device)).cpu(),
                "state": state.state_dict() if self.rank == 0 else None,
                "seconds": seconds, "communication_seconds": timer.seconds}

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _segment_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """NLL of tokens 1.. of the segment from its own logits (the first token's comes from the
    previous member's last logits)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")


class ContextParallelActors:
    """``world`` members in one placement group, joined into one process group."""

    def __init__(self, model_path: str, world: int, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 strategy: str = "PACK", timeout_s: float = 300.0):
        self.world = world
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.placement = placement_group([bundle] * world, strategy=strategy)
        ray.get(self.placement.ready(), timeout=timeout_s)
        device = "cuda" if num_gpus else "cpu"
        self.members = [
            ContextParallelMember.options(
                num_cpus=num_cpus, num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=r),
            ).remote(model_path, r, world, device)
            for r in range(world)
        ]
        address, port = ray.get(self.members[0].rendezvous_address.remote(), timeout=timeout_s)
        ray.get([m.join.remote(address, port) for m in self.members], timeout=timeout_s)

    def read(self, input_ids: torch.Tensor, with_logits: bool = False) -> ContextParallelReading:
        lengths = split_lengths(input_ids.shape[1], self.world)
        bounds = [sum(lengths[:r]) for r in range(self.world + 1)]
        parts = ray.get([
            m.forward.remote(input_ids[:, bounds[r] : bounds[r + 1]], lengths, with_logits)
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

    def shutdown(self) -> None:
        try:
            ray.get([m.leave.remote() for m in self.members], timeout=30)
        except ray.exceptions.RayError:
            pass
        for m in self.members:
            ray.kill(m)
        remove_placement_group(self.placement)
