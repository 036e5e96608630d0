"""The layers below the slow weights' adapters, computed once.

Nothing below the lowest adapted decoder layer depends on the slow weights: the frozen layers and
the fast weights there (fresh at every document) give the same hidden states whatever version a
document is read with. A reader of a learner's version computes them anyway; it hands them on
(``capture_inputs``), and the learner runs only the adapted layers and the head on them
(``layers_from``), forward and backward. Where nothing was handed (a context-parallel window, a
reader that failed), the learner computes them itself with ``hidden_below``, the reader's own
forward stopped at that layer, so that the learner's result does not depend on where they came
from (``tests/ttt_model/test_lower_layers.py``: equal bit for bit on the CPU).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers import DynamicCache

from ttt_model.model.forward_call import ttt_forward
from ttt_model.model.patch import decoder_of
from ttt_model.model.state import FastWeightState


class ReachedLayer(Exception):
    """Ends a forward at the layer whose input was wanted."""


class KnownHidden(nn.Module):
    """Stands in for a decoder layer below ``layers_from``'s layer, where the hidden state is
    already known: returns it (or, with None, its input unchanged)."""

    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states if self.hidden is None else self.hidden


@contextmanager
def layers_from(model: nn.Module, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Forwards of the decoder inside the block start at ``layer`` with ``hidden`` (B, L, d), the
    input of that layer; the layers below stand aside (the embedding still runs: a TTT layer's
    target may read it). A cache used inside must be an ``UpperLayersCache`` of ``layer``."""
    decoder = decoder_of(model)
    layers = decoder.layers
    decoder.layers = nn.ModuleList([KnownHidden(hidden if i == 0 else None) for i in range(layer)] + list(layers[layer:]))
    try:
        yield
    finally:
        decoder.layers = layers


class UpperLayersCache(DynamicCache):
    """The attention cache of a decoder whose layers below ``first`` stand aside (``layers_from``):
    what the decoder asks of its first layer (the tokens seen, the mask's size) is asked of
    ``first``, the lowest layer that keeps keys and values."""

    def __init__(self, config, first: int):
        super().__init__(config=config)
        self.first = first
        # Each layer's attention kind (full, sliding, ...): a layer below stands for the first
        # layer from ``first`` up of its own kind (the mask of a sliding layer is a sliding one).
        kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        self._kept = {i: next((j for j in range(first, len(kinds)) if kinds[j] == kinds[i]), first)
                      for i in range(first)}

    def _kept_layer(self, layer_idx: int) -> int:
        return self._kept.get(layer_idx, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._kept_layer(layer_idx))

    def get_mask_sizes(self, query_length, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._kept_layer(layer_idx))

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_query_offset(self._kept_layer(layer_idx))


@contextmanager
def capture_inputs(model: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """The input hidden states of decoder layer ``layer`` in every forward inside the block, in
    order (detached; the forwards run on)."""
    captured: list[torch.Tensor] = []
    hook = decoder_of(model).layers[layer].register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        yield captured
    finally:
        hook.remove()


@torch.no_grad()
def hidden_below(model: nn.Module, windows: list[torch.Tensor], layer: int, state: FastWeightState) -> list[torch.Tensor]:
    """The input of decoder layer ``layer`` for each window of one document (1, n, d), read as a
    reader of a learner's version reads them (``TTTSession.read_window``: each window whole,
    ``state``'s fast weights carried on, updated by the layers below only); the layers above do
    not run."""
    from ttt_model.model.session import TTTSession

    session = TTTSession(model, state)
    out = []
    for window in windows:
        with capture_inputs(model, layer) as captured, stop_at(model, layer):
            try:
                session.read_window(window)
            except ReachedLayer:
                pass
        out.append(captured[0])
    return out


@contextmanager
def stop_at(model: nn.Module, layer: int) -> Iterator[None]:
    """Forwards inside the block raise ``ReachedLayer`` on entering decoder layer ``layer``
    (after hooks registered before this block, such as ``capture_inputs``, saw its input)."""

    def stop(module, args):
        raise ReachedLayer

    hook = decoder_of(model).layers[layer].register_forward_pre_hook(stop)
    try:
        yield
    finally:
        hook.remove()


@torch.no_grad()
def hidden_below_batched(model: nn.Module, chunks: torch.Tensor, layer: int, rows: int = 16) -> list[torch.Tensor]:
    """The input of decoder layer ``layer`` (1, n, d) of each of ``chunks`` (k, n) read alone with
    fresh fast weights (the plain parallel form), ``rows`` chunks per forward."""
    out: list[torch.Tensor] = []
    decoder = decoder_of(model)
    for start in range(0, chunks.shape[0], rows):
        with capture_inputs(model, layer) as captured, stop_at(model, layer), ttt_forward(frozen_updates=True):
            try:
                decoder(input_ids=chunks[start : start + rows])
            except ReachedLayer:
                pass
        out += [h[None].clone() for h in captured[0]]
    return out
