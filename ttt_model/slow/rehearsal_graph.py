"""A rehearsed chunk's gradient on the adapters, replayed from a CUDA graph.

A rehearsed chunk is fixed text of a fixed length, and the layers below the lowest adapted one do
not depend on the slow weights (``ttt_model.model.lower_layers``): the chunk's gradient on the
adapters is a function of the adapters' values alone. Computing it runs the adapted layers, the
head and their backward on a few hundred positions: some two thousand kernels, which the host
takes longer to launch than the device to run (on an H200, ~18 ms a rehearsal at 2k-token
documents, a quarter of the slow step). On a GPU they are captured once, per loss scale, in a
CUDA graph, and each rehearsal copies the adapters' values and the chunk in and replays it.

The learner adds the gradient to the stream chunk's instead of taking both in one backward. It
is the eager one's within a bf16 rounding, not to the bit (0.13-0.64% apart on an H200, where the
eager run against itself is 0.0: the captured kernels round otherwise), and the same on every
replay and after a restart, which captures the same graph. Where a capture fails (a model whose
forward waits on the host), the learner rehearses eagerly from then on, and says so; the
allocator gets back what the capture held (``release_failed_capture``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import torch

from ttt_model.slow.head_loss import head_nll_and_grad

if TYPE_CHECKING:
    from ttt_model.slow.learner import SlowLearner
    from ttt_model.slow.state import SlowState

log = logging.getLogger(__name__)

# Eager runs before a capture, on a side stream (what CUDA graphs ask: lazy initialisations,
# the Triton kernel's compilation and cuBLAS's workspace happen outside the graph).
WARMUP_RUNS = 2


def graphs_available(device: torch.device) -> bool:
    """Whether rehearsals on ``device`` replay a CUDA graph (benches turn it off to compare)."""
    return device.type == "cuda"


class RehearsalGraph:
    """The gradient of a rehearsed chunk's scaled loss on the adapters, ``(A, B)`` per adapter in
    the learner's order: ``grads(state, index, scale)``. Holds one graph per loss scale seen, in
    one memory pool, and the static tensors they read (the adapters, the chunk and its hidden
    state below the adapters) and write (the gradients)."""

    def __init__(self, learner: SlowLearner, state: SlowState, hidden_below: Callable[[int], torch.Tensor],
                 capture: bool = True):
        """``capture`` False: each call runs what the graph holds, eagerly (its reference, on any
        device)."""
        self.learner = learner
        self.capture = capture
        self.hidden_below = hidden_below  # rehearsed chunk index -> (1, n, d) entering the lowest adapted layer
        self.params = [p.detach().clone().requires_grad_(True) for p in learner._parameters(state)]
        self.ids = learner.rehearsal[0].to(self.params[0].device).clone()
        self.below = hidden_below(0).clone()
        self.graphs: dict[float, tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]] = {}
        self.pool = None
        self.failed: str | None = None

    def grads(self, state: SlowState, index: int, scale: float) -> list[torch.Tensor] | None:
        """The gradient for ``state``'s adapters of ``scale`` times the summed nll of rehearsed
        chunk ``index``; valid until the next call. None where no graph could be captured."""
        if self.failed is not None:
            return None
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.learner._parameters(state))
            self.ids.copy_(self.learner.rehearsal[index])
            self.below.copy_(self.hidden_below(index))
        if not self.capture:
            return self._run(scale)
        if scale not in self.graphs:
            try:
                self.graphs[scale] = self._capture(scale)
            except Exception as err:  # noqa: BLE001 - any capture failure: rehearse eagerly
                self.failed = repr(err)
                log.warning("rehearsals run eagerly: their CUDA graph could not be captured (%s)", self.failed)
                return None
        graph, out = self.graphs[scale]
        graph.replay()
        return out

    def _run(self, scale: float) -> list[torch.Tensor]:
        learner = self.learner
        head = learner.model.get_output_embeddings().weight
        with torch.enable_grad(), learner.bound_to(self.params):
            hidden = learner.rehearsed_hidden(self.ids, self.below)[0, :-1]
            _, grad = head_nll_and_grad(hidden, head, self.ids[1:], scale)
            return list(torch.autograd.grad(hidden, self.params, grad))

    def _capture(self, scale: float) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
        device = self.below.device
        before = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(before)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._run(scale)
        before.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            # thread_local: the learner's other threads (tokenizing ahead, hand-offs) go on meanwhile.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._run(scale)
        except BaseException:
            release_failed_capture(device, self.pool)
            raise
        finally:
            # A capture that failed in its end leaves its own stream current: every later kernel
            # of this thread would go there.
            torch.cuda.set_stream(before)
        return graph, out


def release_failed_capture(device: torch.device, pool: tuple[int, int]) -> None:
    """Give the allocator back what a failed capture took: its claim on the memory pool, and the
    pool. Left as ``torch.cuda.graph`` leaves them (torch 2.11, on an H100), the allocator can no
    longer release its cache: 50 GB cached and freed, 60 GB asked for next, and it runs out of
    memory instead of giving the cache back; a learner rehearsing eagerly after a failed capture
    would die of it later, on a busy device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    for release in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        try:
            getattr(torch._C, release)(index, pool)
        except Exception as err:  # noqa: BLE001 - a capture that failed before claiming the pool
            log.debug("%s after a failed capture: %r", release, err)
