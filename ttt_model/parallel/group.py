"""The ranks of a context-parallel group: which segment of the document each holds, how
a document is split among them, and the collectives they exchange rows with."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


class CommunicationTimer:
    """Seconds spent inside this module's collectives (synchronised on CUDA), for benchmarks."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> "CommunicationTimer":
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._start


@dataclass(frozen=True)
class ContextParallelGroup:
    """Which contiguous segment of the document this rank holds."""

    rank: int
    lengths: tuple[int, ...]  # tokens per rank, in order
    group: dist.ProcessGroup | None = None
    timer: CommunicationTimer | None = None

    def collective(self):
        return self.timer if self.timer is not None else contextlib.nullcontext()

    @property
    def world(self) -> int:
        return len(self.lengths)

    @property
    def start(self) -> int:
        return sum(self.lengths[: self.rank])

    @property
    def end(self) -> int:
        return self.start + self.lengths[self.rank]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def bounds(self, q: int) -> tuple[int, int]:
        s = sum(self.lengths[:q])
        return s, s + self.lengths[q]


def split_lengths(total: int, world: int, attention_weight: float = 0.0) -> tuple[int, ...]:
    """Contiguous segments of equal cost, where the token at position i costs
    ``1 + attention_weight * i`` (its projections and MLP, plus attention over i keys): with
    ``attention_weight`` 0, near-equal lengths; above 0, later segments get fewer tokens, since
    their queries see more keys. Measure the weight as (b / a) of a forward time a*N + b*N^2."""
    if total < world:
        raise ValueError(f"cannot split {total} tokens over {world} ranks")
    if attention_weight <= 0:
        base, extra = divmod(total, world)
        return tuple(base + (1 if q < extra else 0) for q in range(world))
    w = attention_weight

    def cost(n: float) -> float:  # cost of the first n tokens
        return n + w * n * n / 2

    bounds = [0]
    for q in range(1, world):
        target = cost(total) * q / world
        n = (-1 + (1 + 2 * w * target) ** 0.5) / w  # cost(n) = target
        bounds.append(min(max(int(round(n)), bounds[-1] + 1), total - (world - q)))
    bounds.append(total)
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def all_gather_rows(x: torch.Tensor, cp: ContextParallelGroup, dim: int) -> list[torch.Tensor]:
    """Every rank's ``x`` (lengths differ along ``dim``): padded to the longest, gathered, trimmed."""
    longest = max(cp.lengths)
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, longest - x.shape[dim]]
    padded = F.pad(x, pad).contiguous()
    out = [torch.empty_like(padded) for _ in range(cp.world)]
    with cp.collective():
        dist.all_gather(out, padded, group=cp.group)
    return [t.narrow(dim, 0, n) for t, n in zip(out, cp.lengths)]


def all_gather_same(x: torch.Tensor, cp: ContextParallelGroup) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(cp.world)]
    with cp.collective():
        dist.all_gather(out, x.contiguous(), group=cp.group)
    return out


def all_gather_rows_padded(x: torch.Tensor, cp: ContextParallelGroup) -> list[torch.Tensor]:
    """Like all_gather_rows for pieces whose lengths are not the segment lengths."""
    n = torch.tensor([x.shape[1]], device=x.device)
    sizes = [int(v) for v in all_gather_same(n, cp)]
    longest = max(max(sizes), 1)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[1]))
    gathered = all_gather_same(padded, cp)
    return [g[:, :m] for g, m in zip(gathered, sizes)]
