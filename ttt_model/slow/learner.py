"""Slow weights: low-rank adapters that a stream trains online, from one document to the next.

The fast weights (In-Place TTT, ``ttt_model.model.layer``) adapt within one document and restart at
the next; the slow weights carry what the stream teaches across documents. They are low-rank
deltas on chosen linear projections,

    W = W_0 + (alpha / r) B A          A: [r, in] random, B: [out, r] zero (W = W_0 at first)

attached as torch parametrizations, so that every use of a weight sees the adapted matrix, the
TTT layer's own W_0 (the matrix its fast weights are added to) included. Reading a document,
each chunk is first scored by the current slow + fast weights (prequential), then one step of
the next-token loss on that chunk updates A and B (Adam). Three bounds keep them from drifting
and forgetting: an L2 pull towards the base (decoupled decay of A and B), a cap on
||(alpha/r) B A|| / ||W_0|| per matrix, and a small buffer of earlier chunks replayed with each
new one. The adapters, Adam's moments and the replay buffer are all state: a SlowState saved and
restored bit for bit, so that a replayed stream ends in the same state.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ttt_model.config import SlowConfig
from ttt_model.data import load_documents
from ttt_model.model.forward_call import ttt_forward
from ttt_model.slow.head_loss import head_nll_and_grad
from ttt_model.model.lower_layers import UpperLayersCache, hidden_below_batched, layers_from
from ttt_model.model.patch import decoder_layers, decoder_of, static_mode
from ttt_model.slow.rehearsal_graph import RehearsalGraph, graphs_available
from ttt_model.slow.state import AdapterTensors, SlowState, SlowVersion

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class LowRankDelta(nn.Module):
    """Parametrization W -> W + scale * B A, with A and B bound from a SlowState (None: W)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.A is None or not self.enabled:
            return weight
        return weight + (self.scale * (self.B @ self.A)).to(weight.dtype)


class SlowLearner:
    """Attaches low-rank slow weights to a model and trains a bound SlowState while reading.

    One learner per model replica; the states (one per stream or per key) are data, bound to
    the model's adapters for the duration of a document with ``bound(state)``.
    """

    def __init__(self, model: nn.Module, config: SlowConfig, rehearsal: torch.Tensor | None = None):
        self.model = model
        self.config = config
        # (n, chunk) token ids of the base model's own kind of text (``rehearsal_chunks``).
        self.rehearsal = rehearsal
        # Asked with each chunk's loss before its step (None: every chunk steps): a learner keeps
        # a chunk whose loss is an outlier from its weights (actors.learner).
        self.admit: Callable[[float], bool] | None = None
        self.modules = _target_linears(model, config)
        if not self.modules:
            raise ValueError(f"SlowConfig.targets: no linear module of the model matches {config.targets}")
        self._rehearsal_inputs: dict[int, torch.Tensor] = {}  # rehearsed chunk -> hidden state below the adapters
        self._rehearsal_graph: RehearsalGraph | None = None  # on a GPU: rehearsals replayed (``rehearsal_graph``)
        self._base_norms: dict[str, torch.Tensor] | None = None  # ||W_0||_F per adapted matrix
        # Rehearsals through ``RehearsalGraph`` (on a GPU: replayed from a CUDA graph; elsewhere,
        # where a test turns it on, run eagerly from its static tensors).
        self.graph_rehearsals = graphs_available(next(model.parameters()).device)
        self.deltas: dict[str, LowRankDelta] = {}
        for name, module in self.modules.items():
            delta = LowRankDelta(config.scale)
            parametrize.register_parametrization(module, "weight", delta, unsafe=True)
            self.deltas[name] = delta

    # -- states --------------------------------------------------------------------------------

    def new_state(self) -> SlowState:
        """A state equal to the base model (B = 0), A drawn from a generator seeded per matrix."""
        adapters = {}
        r = self.config.rank
        for name, module in self.modules.items():
            out_features, in_features = self.base_weight(name).shape
            seed = int.from_bytes(hashlib.sha256(f"{self.config.seed}:{name}".encode()).digest()[:8], "big") >> 1
            generator = torch.Generator().manual_seed(seed)
            A = (torch.randn(r, in_features, generator=generator) / math.sqrt(in_features))
            device = self.base_weight(name).device
            A = A.to(device)
            B = torch.zeros(out_features, r, device=device)
            adapters[name] = AdapterTensors(A, B, torch.zeros_like(A), torch.zeros_like(A),
                                            torch.zeros_like(B), torch.zeros_like(B))
        return SlowState(adapters)

    def state_of(self, version: SlowVersion) -> SlowState:
        """A state that reads with ``version`` (its A and B on the model's device; no optimiser
        moments: a reader does not train it)."""
        if set(version.adapters) != set(self.modules):
            raise ValueError(f"slow version {version.index} does not fit these adapters: "
                             f"{sorted(set(version.adapters) ^ set(self.modules))[:4]}")
        adapters = {}
        for name, (A, B) in version.adapters.items():
            device = self.base_weight(name).device
            A, B = A.to(device), B.to(device)
            adapters[name] = AdapterTensors(A, B, A[:0], A[:0], B[:0], B[:0])
        return SlowState(adapters)

    def base_weight(self, name: str) -> torch.Tensor:
        return self.modules[name].parametrizations.weight.original

    def base_norms(self) -> dict[str, torch.Tensor]:
        """||W_0||_F per adapted matrix, 0-d float32 on its device (W_0 does not change: taken once)."""
        if self._base_norms is None:
            self._base_norms = {n: torch.linalg.matrix_norm(self.base_weight(n).detach().float()) for n in self.modules}
        return self._base_norms

    def delta_ratio(self, state: SlowState) -> float:
        """The largest ||delta|| / ||W_0|| over the adapted matrices: how far the model moved."""
        ratios = state.delta_ratios(self.base_norms(), self.config.scale)
        return max(ratios.values())

    @contextmanager
    def bound(self, state: SlowState | None) -> Iterator[None]:
        """The model with ``state``'s slow weights (None: the base weights) for the block."""
        with self.bound_to(self._parameters(state) if state is not None else None):
            yield

    @contextmanager
    def bound_to(self, parameters: list[torch.Tensor] | None) -> Iterator[None]:
        """The model with the slow weights ``parameters`` (``A, B`` per adapter, in ``modules``'
        order, as ``_parameters``; None: the base weights) for the block, then those bound before."""
        before = [(delta.A, delta.B) for delta in self.deltas.values()]
        for i, delta in enumerate(self.deltas.values()):
            delta.A = None if parameters is None else parameters[2 * i]
            delta.B = None if parameters is None else parameters[2 * i + 1]
        try:
            yield
        finally:
            for delta, (A, B) in zip(self.deltas.values(), before):
                delta.A, delta.B = A, B

    # -- learning ------------------------------------------------------------------------------

    def read(self, session, input_ids: torch.Tensor, state: SlowState, chunk_tokens: int,
             below: torch.Tensor | None = None) -> torch.Tensor:
        """Read ``input_ids`` (1, L) through ``session`` chunk by chunk: score each chunk with the
        current slow + fast weights, then take one slow step on it. Returns the nll (1, L).
        ``below``: the hidden states (1, L, d) entering the lowest adapted layer, computed before
        (``ttt_model.model.lower_layers``): only the adapted layers and the head run.

        The forward that scores a chunk is the graph its step flows back through: the head's
        loss and its gradient come out of the same logits (``head_nll_and_grad``), the
        fast-weight updates stay out of the graph, and the backward stops at the lowest adapted
        layer. Replayed and rehearsed chunks add one forward each, on the steps they join.
        """
        head = self.model.get_output_embeddings().weight
        nll = []
        for start in range(0, input_ids.shape[1], chunk_tokens):
            piece = input_ids[:, start : start + chunk_tokens]
            learn = piece.shape[1] >= 2
            extra = self._extra_chunks(state) if learn else []
            with self.bound(state), self._trainable(state, learn):
                try:
                    whole = start == 0 and piece.shape[1] == input_ids.shape[1]  # no later piece reads its cache
                    handed = None if below is None else (self.lowest_layer, below[:, start : start + chunk_tokens])
                    hidden, first = session.feed_hidden(piece, grad=learn, cache=not whole, below=handed)
                    n = piece.shape[1]
                    scale = 1.0 / ((n - 1) * (1 + len(extra))) if learn else 0.0
                    scored, grad = head_nll_and_grad(hidden[0, :-1], head, piece[0, 1:], scale)
                    nll.append(torch.cat([first.float(), scored.float()])[None])
                    if learn and self.admit is not None:
                        learn = self.admit(float(scored.double().mean()))
                    if learn:
                        hiddens, grads, replayed = [hidden[0, :-1]], [grad], None
                        for ids, rehearsed in extra:
                            extra_scale = 1.0 / ((ids.shape[0] - 1) * (1 + len(extra)))
                            graphed = self._graphed_rehearsal(state, rehearsed, extra_scale)
                            if graphed is not None:  # the graph's own tensors: summed before its next replay
                                replayed = torch._foreach_mul(graphed, 1.0) if replayed is None else \
                                    torch._foreach_add(replayed, graphed)
                                continue
                            h = self._extra_hidden(ids, rehearsed)[0, :-1]
                            hiddens.append(h)
                            grads.append(head_nll_and_grad(h, head, ids[1:], extra_scale)[1])
                        step = list(torch.autograd.grad(hiddens, self._parameters(state), grads))
                        if replayed is not None:
                            torch._foreach_add_(step, replayed)
                        self._step(state, step)
                        state.tokens += n
                finally:
                    session.detach_()
            # Only what was learned is replayed: not a chunk kept from the weights (admit).
            if learn and self.config.replay_chunks and piece.shape[1] == chunk_tokens:
                self._remember(state, piece[0])
        return torch.cat(nll, dim=1)

    def _extra_chunks(self, state: SlowState) -> list[tuple[torch.Tensor, int | None]]:
        """The chunks that join the next step besides the stream's, as (1-d token ids, index
        of a rehearsed chunk or None): one replayed (with ``replay_chunks``), one rehearsed
        every ``rehearsal_every`` steps."""
        extra = []
        if state.replay is not None:
            extra.append((state.replay[state.steps % state.replay.shape[0]], None))
        every = self.config.rehearsal_every
        if self.rehearsal is not None and state.steps % every == 0:
            index = (state.steps // every) % self.rehearsal.shape[0]
            extra.append((self.rehearsal[index], index))
        return extra

    def _graphed_rehearsal(self, state: SlowState, rehearsed: int | None, scale: float) -> list[torch.Tensor] | None:
        """A rehearsed chunk's gradient replayed from its CUDA graph (``rehearsal_graph``), or
        None where it runs eagerly (not rehearsed, not on a GPU, no capture)."""
        if rehearsed is None or self.lowest_layer == 0 or not self.graph_rehearsals:
            return None
        if self._rehearsal_graph is None:
            self._rehearsal_graph = RehearsalGraph(self, state, self._rehearsal_hidden,
                                                   capture=self.rehearsal.device.type == "cuda")
        return self._rehearsal_graph.grads(state, rehearsed, scale)

    def _rehearsal_hidden(self, rehearsed: int) -> torch.Tensor:
        """The hidden state (1, n, d) of rehearsed chunk ``rehearsed`` entering the lowest adapted
        layer: computed once, for every rehearsed chunk at the first rehearsal."""
        if not self._rehearsal_inputs:
            self._rehearsal_inputs = dict(enumerate(hidden_below_batched(self.model, self.rehearsal, self.lowest_layer)))
        return self._rehearsal_inputs[rehearsed]

    def rehearsed_hidden(self, ids: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        """The last hidden states (1, n, d) of a chunk ``ids`` (n,) read alone (fresh fast
        weights, their updates out of the graph) from ``below``, its hidden state entering the
        lowest adapted layer: only the adapted layers run. A cache of their own keeps the decoder
        from checking the positions for packed sequences (a wait on the device)."""
        cache = UpperLayersCache(self.model.config, self.lowest_layer)
        with layers_from(self.model, self.lowest_layer, below), ttt_forward(frozen_updates=True):
            return decoder_of(self.model)(input_ids=ids[None], past_key_values=cache, use_cache=True).last_hidden_state

    def _extra_hidden(self, ids: torch.Tensor, rehearsed: int | None) -> torch.Tensor:
        """The last hidden states (1, n, d) of a chunk read alone (the plain parallel form, fresh
        fast weights, their updates out of the graph). A rehearsed chunk is fixed text, and the
        layers below the lowest adapted one do not depend on the slow weights: its hidden state
        there is computed once, for every rehearsed chunk at the first rehearsal, and only the
        adapted layers run again."""
        if rehearsed is None or self.lowest_layer == 0:
            with ttt_forward(frozen_updates=True):
                return decoder_of(self.model)(input_ids=ids[None]).last_hidden_state
        return self.rehearsed_hidden(ids, self._rehearsal_hidden(rehearsed))

    @property
    def lowest_layer(self) -> int:
        """The lowest decoder layer with an adapter: a step's backward stops there."""
        return min(int(n.split("layers.")[1].split(".")[0]) for n in self.modules)

    def _parameters(self, state: SlowState, part: str = "") -> list[torch.Tensor]:
        """``state``'s ``A, B`` per adapter (``part`` "m_": Adam's first moments, "v_": its
        second), in the model's order of the adapters (``bound_to``'s)."""
        return [getattr(state.adapters[name], f"{part}{p}") for name in self.deltas for p in ("A", "B")]

    @contextmanager
    def _trainable(self, state: SlowState, on: bool) -> Iterator[None]:
        params = self._parameters(state) if on else []
        for p in params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(False)

    def _step(self, state: SlowState, grads: tuple[torch.Tensor, ...]) -> None:
        """One Adam step on every A and B at once (foreach kernels: a few launches for all the
        adapters, no wait on the host), with the clip, the L2 pull to the base and the cap."""
        cfg = self.config
        params, moments, squares = self._parameters(state), self._parameters(state, "m_"), self._parameters(state, "v_")
        with torch.no_grad():
            grads = list(grads)
            if cfg.max_grad_norm is not None:
                total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                torch._foreach_mul_(grads, torch.clamp(cfg.max_grad_norm / (total + 1e-6), max=1.0))
            state.steps += 1
            b1, b2 = ADAM_BETAS
            correction1, correction2 = 1 - b1 ** state.steps, 1 - b2 ** state.steps
            torch._foreach_mul_(moments, b1)
            torch._foreach_add_(moments, grads, alpha=1 - b1)
            torch._foreach_mul_(squares, b2)
            torch._foreach_addcmul_(squares, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(squares)
            torch._foreach_div_(denom, math.sqrt(correction2))
            torch._foreach_add_(denom, ADAM_EPS)
            if cfg.l2_to_base:
                torch._foreach_mul_(params, 1 - cfg.lr * cfg.l2_to_base)
            torch._foreach_addcdiv_(params, moments, denom, value=-cfg.lr / correction1)
            if cfg.max_delta_ratio is not None:
                for name, adapter in state.adapters.items():
                    delta = cfg.scale * torch.linalg.matrix_norm(adapter.B @ adapter.A)
                    bound = cfg.max_delta_ratio * self.base_norms()[name]
                    adapter.B.mul_(torch.clamp(bound / (delta + 1e-12), max=1.0))

    def _remember(self, state: SlowState, chunk: torch.Tensor) -> None:
        """Keep ``chunk`` in the replay ring buffer (the oldest is replaced when full)."""
        if state.replay is None:
            state.replay = chunk[None].clone()
        elif state.replay.shape[0] < self.config.replay_chunks:
            state.replay = torch.cat([state.replay, chunk[None]])
        else:
            state.replay[state.replay_next] = chunk
            state.replay_next = (state.replay_next + 1) % self.config.replay_chunks

    # -- adapter reuse -------------------------------------------------------------------------

    @torch.no_grad()
    def signature(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A cheap embedding of a document: the base model's (TTT off, no slow weights) mean last
        hidden state over ``input_ids`` (1, L), float32 (hidden,)."""
        with self.disabled(), static_mode(self.model):
            out = self.model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1][0].float().mean(0)

    @staticmethod
    def nearest(signature: torch.Tensor, candidates: dict[str, torch.Tensor]) -> tuple[str, float] | None:
        """The candidate key with the highest cosine similarity to ``signature`` (ties: the
        smallest key, so that a replayed stream chooses the same), or None without candidates."""
        best = None
        for key in sorted(candidates):
            similarity = float(torch.nn.functional.cosine_similarity(signature, candidates[key].to(signature), dim=0))
            if best is None or similarity > best[1]:
                best = (key, similarity)
        return best

    # -- the static model ----------------------------------------------------------------------

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model: every slow delta off for the block (for the shadow evaluation)."""
        for delta in self.deltas.values():
            delta.enabled = False
        try:
            yield
        finally:
            for delta in self.deltas.values():
                delta.enabled = True

    @torch.no_grad()
    def merge_into_model(self, state: SlowState) -> nn.Module:
        """Fold ``state`` into the weights and remove the adapters: a plain model again."""
        with self.bound(state):
            for module in self.modules.values():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self.deltas = {}
        return self.model


def rehearsal_chunks(path: str | Path, tokenizer, chunk_tokens: int, count: int) -> torch.Tensor:
    """The first ``count`` full chunks of ``chunk_tokens`` tokens of the documents in ``path``
    (JSONL), each document cut into chunks on its own: (count, chunk_tokens) token ids."""
    chunks: list[list[int]] = []
    for doc in load_documents(path):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        chunks += [ids[i : i + chunk_tokens] for i in range(0, len(ids) - chunk_tokens + 1, chunk_tokens)]
        if len(chunks) >= count:
            return torch.tensor(chunks[:count], dtype=torch.long)
    if not chunks:
        raise ValueError(f"SlowConfig.rehearsal_path: {path} has no document of {chunk_tokens} tokens or more")
    return torch.tensor(chunks, dtype=torch.long)


def _target_linears(model: nn.Module, config: SlowConfig) -> dict[str, nn.Linear]:
    """The model's nn.Linear modules named ``...layers.<i>.<...>.<target>``, in model order."""
    count = len(decoder_layers(model))
    if config.layers is not None and any(not -count <= i < count for i in config.layers):
        raise ValueError(f"SlowConfig.layers: {config.layers} outside the model's {count} decoder layers")
    layers = None if config.layers is None else {i % count for i in config.layers}
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in config.targets:
            continue
        parts = name.split(".")
        layer = next((int(parts[i + 1]) for i, p in enumerate(parts[:-1]) if p == "layers" and parts[i + 1].isdigit()), None)
        if layer is None or (layers is not None and layer not in layers):
            continue
        found[name] = module
    return found
