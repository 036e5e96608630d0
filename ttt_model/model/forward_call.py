"""What one forward of a TTT model reads besides its inputs.

Hugging Face decoder layers call their MLP with the hidden states alone, so the per-call inputs of
the TTT layers (which fast-weight state to stream, where packed documents restart, the layer rule
of a parallel form, the input embeddings) cannot travel as arguments through the model's forward.
They travel in a ``ContextVar`` set around the call::

    with ttt_forward(state=state):
        logits = model(input_ids).logits

Each forward sees its own ``TTTCall``: forwards may nest, or run in other threads on the same
model, and nothing is left behind on the model afterwards. A forward with no ``ttt_forward``
around it is the plain parallel form (no state kept).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterator

import torch

if TYPE_CHECKING:
    from ttt_model.model.state import FastWeightState, LayerFastWeights

# (mlp, h, t, fast) -> the layer's output: how a TTT layer applies and updates its fast weights.
LayerRule = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, "LayerFastWeights | None"], torch.Tensor]


@dataclass
class TTTCall:
    """The per-call inputs of the TTT layers of one forward."""

    state: "FastWeightState | None" = None
    # Training on packed windows: (B, n_chunks) bool, chunk k begins a new document, so the
    # fast weights restart there.
    document_starts: torch.Tensor | None = None
    # A batch of right-padded documents: (B,) the tokens of each row whose chunks update its fast
    # weights; the keys and targets past them add nothing (they still get outputs).
    update_lengths: torch.Tensor | None = None
    # Replaces the layers' own apply-then-update (the context-parallel form sets it).
    layer_rule: LayerRule | None = None
    # The decoder's input embeddings, for the 'input_embeddings' target (set by the model's hooks).
    input_embeds: torch.Tensor | None = None
    # The fast-weight updates are taken out of the autograd graph: a caller that trains other
    # weights (the slow weights) through this forward's outputs, not through the fast weights.
    frozen_updates: bool = False
    outer: "TTTCall | None" = None

    def target_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        embeds = self.input_embeds
        if embeds is None or embeds.shape[:2] != x.shape[:2]:
            raise RuntimeError("TTT target 'input_embeddings' needs the decoder's input embeddings for this call")
        return embeds.to(x.dtype)


_PLAIN = TTTCall()
_CURRENT: ContextVar[TTTCall | None] = ContextVar("ttt_call", default=None)


def current_call() -> TTTCall:
    """The innermost call's inputs (the plain parallel form outside any ``ttt_forward``)."""
    return _CURRENT.get() or _PLAIN


@contextmanager
def ttt_forward(
    state: "FastWeightState | None" = None,
    document_starts: torch.Tensor | None = None,
    layer_rule: LayerRule | None = None,
    input_embeds: torch.Tensor | None = None,
    update_lengths: torch.Tensor | None = None,
    frozen_updates: bool | None = None,
) -> Iterator[TTTCall]:
    """Run the forwards inside this block with these per-call inputs; those left None are the
    enclosing block's."""
    outer = _CURRENT.get() or _PLAIN
    call = TTTCall(
        state=state if state is not None else outer.state,
        document_starts=document_starts if document_starts is not None else outer.document_starts,
        update_lengths=update_lengths if update_lengths is not None else outer.update_lengths,
        layer_rule=layer_rule if layer_rule is not None else outer.layer_rule,
        input_embeds=input_embeds if input_embeds is not None else outer.input_embeds,
        frozen_updates=frozen_updates if frozen_updates is not None else outer.frozen_updates,
        outer=_CURRENT.get(),
    )
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)


def enter_decoder(input_embeds: torch.Tensor | None) -> None:
    """The decoder's forward begins (a hook): a call of its own that sees its input embeddings."""
    outer = _CURRENT.get()
    _CURRENT.set(replace(outer or _PLAIN, input_embeds=input_embeds, outer=outer))


def set_input_embeds(embeds: torch.Tensor) -> None:
    """The embedding layer computed the decoder's input embeddings (a hook)."""
    call = _CURRENT.get()
    if call is not None:
        call.input_embeds = embeds


def leave_decoder() -> None:
    """The decoder's forward ended, normally or not (a hook): back to the enclosing call."""
    call = _CURRENT.get()
    if call is not None:
        _CURRENT.set(call.outer)
