"""TTTSession: feed a document in pieces of any length, get logits and per-token loss.

The session owns the attention KV cache and a FastWeightState. With the in-place objective the
TTT layers update the state themselves exactly when a chunk completes, so any split of the
input gives the logits of one parallel forward over the whole sequence. With the gradient
objective each chunk is scored first, then the session takes optimiser steps on the fast
weights over that chunk (prequential: a chunk is never scored by weights that saw it).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ttt_model.model.forward_call import ttt_forward
from ttt_model.model.lower_layers import UpperLayersCache, layers_from
from ttt_model.model.objectives import gradient_objective_loss, make_optimizer
from ttt_model.model.patch import decoder_of
from ttt_model.model.state import FastWeightState, ttt_layers
from ttt_model.model.token_nll import token_nll
from ttt_model.model.update_rule import apply_update


@dataclass
class StepOutput:
    logits: torch.Tensor  # (B, L, V)
    nll: torch.Tensor  # (B, L) float32: -log p(token | prefix); NaN for the stream's first token


class TTTSession:
    """Streaming inference with test-time training over one stream of tokens per batch row."""

    def __init__(self, model: nn.Module, state: FastWeightState | None = None, batch_size: int = 1):
        self.model = model
        self.state = state if state is not None else FastWeightState.for_model(model, batch_size)
        self.config = next(iter(ttt_layers(model).values())).config
        self.cache = DynamicCache(config=model.config)
        self.last_logits: torch.Tensor | None = None  # (B, V): predicts the next piece's first token
        self._pending: list[torch.Tensor] = []  # ids of the unfinished chunk (gradient objective)
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_params: list[int] = []

    def reset(self, keep_state: bool = False) -> None:
        """Start a new document: empty cache; the fast weights too unless ``keep_state``."""
        if not keep_state:
            self.state.reset()
        self.cache = DynamicCache(config=self.model.config)
        self.last_logits = None
        self._pending = []

    def end_document(self) -> None:
        """Close the current document and keep the fast weights for the next one.

        The unfinished chunk is learned from now (zero-padded, as the parallel form pads the
        last chunk), so that a state shared by many documents learns from short ones too; then
        the attention cache is dropped: the next document starts a new context.
        """
        if self.config.objective == "gradient":
            if self._pending:
                self._learn_chunk(torch.cat(self._pending, dim=1), scored=True)
        else:
            mlps = ttt_layers(self.model)
            for idx, layer in self.state:
                mlps[idx].flush_tail(layer)
        self.reset(keep_state=True)

    def feed(self, input_ids: torch.Tensor, grad: bool = False) -> StepOutput:
        """Process the next piece (B, L) of the stream: score it, then learn from it.

        ``grad``: keep the autograd graph of the logits (in-place objective only), so that a
        caller can train other weights on this piece's score; call ``detach_`` after.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != self.state.batch_size:
            raise ValueError(f"input_ids must be (batch={self.state.batch_size}, L), got {tuple(input_ids.shape)}")
        if self.config.objective == "gradient":
            if grad:
                raise ValueError("feed(grad=True) needs the in_place objective: the gradient objective trains itself")
            logits = self._feed_gradient(input_ids)
        else:
            logits = self._forward(input_ids, grad=grad)
        return StepOutput(logits=logits, nll=self._nll(logits, input_ids))

    def read_window(self, input_ids: torch.Tensor) -> StepOutput:
        """Start a new attention context and read ``input_ids`` (B, L) whole: ``reset(keep_state=
        True)`` then ``feed``, without the attention cache that nothing would read (a copy of
        every layer's keys and values saved). The fast weights carry on as with ``feed``."""
        self.reset(keep_state=True)
        if self.config.objective == "gradient":
            return self.feed(input_ids)
        with torch.no_grad(), ttt_forward(state=self.state):
            logits = self.model(input_ids=input_ids, use_cache=False).logits
        return StepOutput(logits=logits, nll=self._nll(logits, input_ids))

    def feed_hidden(self, input_ids: torch.Tensor, grad: bool = False, cache: bool = True,
                    below: tuple[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Process the next piece (B, L) of the stream up to the head: its last hidden states
        (B, L, d), for a caller that applies the head itself (a slow step,
        ``ttt_model.slow.head_loss``), and the nll (B,) of its first token under the previous piece's
        logits (NaN at the stream's start).

        ``grad``: keep the autograd graph of the hidden states. The fast weights are applied and
        updated as by ``feed``, their updates out of the graph; call ``detach_`` after.
        ``cache``: False for a piece that is a whole attention context (a new one, and nothing
        read after it), whose keys and values are then not kept. ``below``: (layer, the piece's
        hidden states (B, L, d) entering decoder layer ``layer``), computed before: the layers
        below it do not run (``ttt_model.model.lower_layers``), nor do their fast weights change; every
        piece of an attention context then comes with them, from the same layer.
        """
        if self.config.objective != "in_place":
            raise ValueError("feed_hidden needs the in_place objective: the gradient objective trains itself")
        if not cache and self.cache.get_seq_length() > 0:
            raise ValueError("feed_hidden(cache=False) starts an attention context: reset the session first")
        if below is not None and cache and not isinstance(self.cache, UpperLayersCache):
            if self.cache.get_seq_length() > 0:
                raise ValueError("feed_hidden(below=...) in an attention context begun without it")
            self.cache = UpperLayersCache(self.model.config, below[0])
        start = layers_from(self.model, *below) if below is not None else nullcontext()
        with torch.set_grad_enabled(grad), ttt_forward(state=self.state, frozen_updates=True), start:
            decoder = decoder_of(self.model)
            if cache:
                hidden = decoder(input_ids=input_ids, past_key_values=self.cache, use_cache=True).last_hidden_state
            else:
                hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        first = self._first_nll(input_ids)
        with torch.no_grad():
            self.last_logits = self.model.get_output_embeddings()(hidden[:, -1])
        return hidden, first

    def detach_(self) -> None:
        """Cut the autograd graph from the fast weights and the attention cache."""
        self.state.detach_()
        self._detach_cache()

    # -- internals -----------------------------------------------------------------------------

    def _forward(self, input_ids: torch.Tensor, grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad), ttt_forward(state=self.state):
            out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True)
        return out.logits

    def _nll(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        nll = torch.empty(input_ids.shape, dtype=torch.float32, device=logits.device)
        nll[:, 0] = self._first_nll(input_ids)
        nll[:, 1:] = token_nll(logits[:, :-1].detach(), input_ids[:, 1:])
        self.last_logits = logits[:, -1].detach()
        return nll

    def _first_nll(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The piece's first token under the previous piece's last logits (B,), NaN at the start."""
        if self.last_logits is None:
            return torch.full(input_ids.shape[:1], float("nan"), device=input_ids.device)
        return token_nll(self.last_logits, input_ids[:, 0])

    def _feed_gradient(self, input_ids: torch.Tensor) -> torch.Tensor:
        C = self.config.chunk_size
        outputs, start = [], 0
        L = input_ids.shape[1]
        while start < L:
            filled = sum(p.shape[1] for p in self._pending)
            end = min(L, start + C - filled)
            piece = input_ids[:, start:end]
            if filled == 0 and end - start == C and self.config.gradient_steps > 0:
                # A whole chunk at once: its first gradient forward is also its score.
                outputs.append(self._learn_chunk(piece, scored=False))
            else:
                outputs.append(self._forward(piece).detach())
                self._pending.append(piece)
                if filled + piece.shape[1] == C:
                    self._learn_chunk(torch.cat(self._pending, dim=1), scored=True)
            start = end
        return torch.cat(outputs, dim=1)

    def _learn_chunk(self, chunk_ids: torch.Tensor, scored: bool) -> torch.Tensor | None:
        """Optimiser steps on the fast weights over one complete chunk; returns its score logits."""
        self._pending = []
        C = chunk_ids.shape[1]
        steps = self.config.gradient_steps
        if steps == 0:
            return None
        deltas = [layer.delta for _, layer in self.state]
        if [id(d) for d in deltas] != self._optimizer_params:
            for d in deltas:
                d.requires_grad_(True)
            self._optimizer = make_optimizer(self.config, deltas)
            self._optimizer_params = [id(d) for d in deltas]
        # ||W_down|| per layer, for the cap on ||delta|| / ||W_down|| (only when it is set).
        w0_norms = (
            {idx: mlp.w0_norm() for idx, mlp in ttt_layers(self.model).items()}
            if self.config.max_delta_ratio is not None else {}
        )
        score_logits = None
        for step in range(steps):
            if scored or step > 0:
                self.cache.crop(-C)  # the chunk's keys and values are recomputed with grad
            logits = self._forward(chunk_ids, grad=True)
            if score_logits is None and not scored:
                score_logits = logits.detach()
            loss = gradient_objective_loss(self.config, logits, chunk_ids)
            grads = torch.autograd.grad(loss, deltas)
            before = [d.detach().clone() for d in deltas]
            for d, g in zip(deltas, grads):
                d.grad = g
            self._optimizer.step()
            with torch.no_grad():
                for (idx, layer), old in zip(self.state, before):
                    layer.delta.copy_(apply_update(old, layer.delta - old, self.config, w0_norms.get(idx)))
                    layer.delta.grad = None
                    layer.updates += 1
            self._detach_cache()
        for _, layer in self.state:
            layer.tokens_seen += C
        return score_logits

    def _detach_cache(self) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None:
                layer.keys = layer.keys.detach()
                layer.values = layer.values.detach()
