"""How a reader reads the windows of one document, chosen once when the reader is built.

- ``FastReader``: the fast weights (In-Place TTT) alone, chunk by chunk. Also the reader of a
  learner's version: the reader binds the version's slow weights around the read.
- ``SlowStepReader``: the fast weights on top of the scope's slow weights, which take their lean
  step on what was just scored (``ttt_model.slow.SlowLearner.read``). The learner's
  (``split``) runs the layers below the lowest adapted one first, or takes their hidden states
  from the reader that computed them (``ttt_model.model.lower_layers``), then the adapted layers.
- ``ContextParallelReader``: windows of at least ``min_tokens`` tokens go to a context-parallel
  group (``actors.cp_group``), starting from this reader's fast weights; shorter ones to a
  FastReader.

Each returns the loss of tokens 1.. of every window, and leaves the scope's state as the next
document of the scope must find it. Documents read as a batch (``DocumentReader.process_batch``)
do not go through a reader.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from ttt_model.adapted_state import AdaptedState
from ttt_model.model.lower_layers import hidden_below
from ttt_model.model.session import TTTSession
from ttt_model.slow import SlowLearner, SlowVersion

# (input ids (1, N), fast-weight state dict, slow version or None)
#   -> (nll of tokens 1..N-1 (1, N-1), state dict after)
LongDocumentReader = Callable[[torch.Tensor, dict[str, torch.Tensor], SlowVersion | None],
                              tuple[torch.Tensor, dict[str, torch.Tensor]]]


class WindowReader(Protocol):
    parallel_windows: int  # windows read by a context-parallel group

    def read(self, adapted: AdaptedState, windows: list[torch.Tensor]) -> torch.Tensor:
        """The nll (1-d) of tokens 1.. of each window of one document, concatenated."""


class FastReader:
    """Fast weights only. ``carries_over``: the fast weights outlive the document (the global
    and per_key scopes without slow weights), so its unfinished last chunk is learned at its end."""

    parallel_windows = 0

    def __init__(self, model: nn.Module, carries_over: bool):
        self.model = model
        self.carries_over = carries_over

    def read(self, adapted: AdaptedState, windows: list[torch.Tensor]) -> torch.Tensor:
        session = TTTSession(self.model, adapted.fast)
        # Each window is a fresh attention context; the fast weights (and the unfinished chunk)
        # carry over, which is how a TTT model reads past its attention span.
        nll = [session.read_window(window).nll[0, 1:] for window in windows]
        if self.carries_over:
            session.end_document()
        return torch.cat(nll)


class SlowStepReader:
    """Fast weights on the scope's slow weights, one slow step per ``chunk_tokens`` read.
    ``split``: the layers below the lowest adapted one run apart, first (or not at all, where
    ``read`` is given their hidden states); a reader that learns itself reads in one forward."""

    parallel_windows = 0

    def __init__(self, model: nn.Module, learner: SlowLearner, chunk_tokens: int, split: bool = False):
        self.model = model
        self.learner = learner
        self.chunk_tokens = chunk_tokens
        self.split = split
        self.handed = 0  # documents read from hidden states a reader handed on

    def read(self, adapted: AdaptedState, windows: list[torch.Tensor],
             below: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``below``: per window, the hidden states (1, n, d) entering the lowest adapted layer,
        as ``ttt_model.model.lower_layers.hidden_below`` computes them (``split`` only)."""
        if self.split and below is not None and [b.shape[:2] for b in below] == [w.shape for w in windows]:
            self.handed += 1
        else:
            below = None
        session = TTTSession(self.model, adapted.fast)
        nll = []
        for i, window in enumerate(windows):
            handed = None
            if self.split:
                # Window by window, as the reader computed them: the layers below carry their own
                # fast weights from window to window, and only one window's states are held.
                handed = below[i].to(window.device) if below is not None else \
                    hidden_below(self.model, [window], self.learner.lowest_layer, adapted.fast)[0]
            session.reset(keep_state=True)
            nll.append(self.learner.read(session, window, adapted.slow, self.chunk_tokens, handed)[0, 1:])
        return torch.cat(nll)


class ContextParallelReader:
    """Long windows through a context-parallel group, the others through ``short``. A group's
    failure propagates (the caller retries the document)."""

    def __init__(self, short: FastReader, group: LongDocumentReader, min_tokens: int,
                 version: Callable[[], SlowVersion | None]):
        self.short = short
        self.group = group
        self.min_tokens = min_tokens
        self.version = version  # the slow version bound for the document being read, if any
        self.parallel_windows = 0

    def read(self, adapted: AdaptedState, windows: list[torch.Tensor]) -> torch.Tensor:
        state = adapted.fast
        session = TTTSession(self.short.model, state)
        nll = []
        for window in windows:
            if window.shape[1] < self.min_tokens:
                nll.append(session.read_window(window).nll[0, 1:])
                continue
            session.reset(keep_state=True)
            if any(layer.tail_len for _, layer in state):
                # The parallel form starts on a chunk border: a window after the first of a
                # split document learns its predecessor's unfinished chunk first, as a
                # document end does.
                session.end_document()
            window_nll, after = self.group(window.cpu(), state.state_dict(), self.version())
            state.load_state_dict(after)
            self.parallel_windows += 1
            nll.append(window_nll[0].to(window.device))
        if self.short.carries_over:
            session.end_document()
        return torch.cat(nll)
