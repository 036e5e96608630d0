"""The In-Place TTT MLP: a gated MLP whose down projection carries fast weights.

For input x (the post-attention-normalised hidden states, shape [n, d]):

    h   = act(x W_gate^T) * (x W_up^T)            keys                [n, D]
    t   = x  or the input embeddings              target              [n, d]
    t~  = depthwise Conv1d(t) inside each chunk   sees 2 tokens ahead [C, d]
    V   = t~ P                                    values              [C, d]
    dW_i = eta * V_i^T h_i                        one chunk's update  [d, D]
    O_i  = h_i (W_0 + sum_{j<i} dW_j)^T           apply, then update

Chunk i is served by the updates of chunks < i only, so the conv's look-ahead leaks nothing.

The forward walks the chunks with one running fast-weight matrix per sequence. Folding W_0 into
it makes each chunk's output a single matrix product of the same size as the base model's, so the
only extra work is the update product V_i^T h_i, and no per-chunk weight matrix is kept.
The same loop serves the parallel form (a whole sequence, no state) and the streaming form
(pieces of any length, with the running weights and the unfinished chunk's tail kept in a
``LayerFastWeights``); both therefore give the same numbers.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ttt_model.model.chunk_conv import chunk_conv
from ttt_model.config import TTTConfig
from ttt_model.model.forward_call import current_call
from ttt_model.model.state import LayerFastWeights
from ttt_model.model.update_rule import FastWeightWalk


class InPlaceTTTMLP(nn.Module):
    """Drop-in replacement for a Llama/Qwen/Mistral gated MLP with In-Place TTT on down_proj."""

    is_ttt_mlp = True

    def __init__(self, mlp: nn.Module, config: TTTConfig, layer_idx: int):
        super().__init__()
        # Same attribute names as the wrapped MLP, so checkpoint keys stay the same.
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.hidden_size = self.down_proj.out_features
        self.intermediate_size = self.down_proj.in_features
        self.layer_idx = layer_idx
        self.config = config
        # A plain attribute, not a submodule: the wrapped MLP shares our parameters.
        object.__setattr__(self, "base_mlp", mlp)
        self._derived: dict[str, tuple[tuple[int, int], Any]] = {}

        d, weight = self.hidden_size, self.down_proj.weight
        self.ttt_conv = nn.Conv1d(
            d, d, config.conv_kernel, padding=config.conv_kernel // 2, groups=d, bias=False,
            device=weight.device, dtype=weight.dtype,
        )
        self.ttt_proj = (
            nn.Linear(d, d, bias=False, device=weight.device, dtype=weight.dtype) if config.use_proj else None
        )
        self.reset_ttt_parameters()

    @torch.no_grad()
    def reset_ttt_parameters(self) -> None:
        """Conv at zero (the model equals the base model), P diagonal with N(0, 0.02) entries."""
        self.ttt_conv.weight.zero_()
        if self.ttt_proj is not None:
            diagonal = torch.randn(self.hidden_size, device=self.ttt_proj.weight.device) * 0.02
            self.ttt_proj.weight.copy_(torch.diag(diagonal))

    # -- the method ------------------------------------------------------------------------------

    def update_values(self, t: torch.Tensor) -> torch.Tensor:
        """eta * V for whole chunks: (B, n*C, d) -> (B, n, C, d), the conv restarted in every chunk.

        eta is folded into the k x d conv taps (``chunk_conv``: one Triton kernel on a GPU).
        """
        mixed = chunk_conv(t, self.conv_taps(), self.config.chunk_size)
        return self.ttt_proj(mixed) if self.ttt_proj is not None else mixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = current_call()
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # (B, L, D)
        fast = None if call.state is None else call.state.layers[self.layer_idx]
        if self.config.objective == "gradient":
            # Dynamic evaluation: the fast weights are learned by the optimiser between chunks.
            return self.walk(None if fast is None else fast.delta).serve(h)
        t = x if self.config.target == "hidden_states" else call.target_embeddings(x)
        if call.layer_rule is not None:
            return call.layer_rule(self, h, t, fast)
        return self.apply_then_update(h, t, fast, call.document_starts, call.update_lengths, call.frozen_updates)

    def walk(self, delta: torch.Tensor | None, general: bool = False) -> FastWeightWalk:
        """This layer's running fast weights, starting from ``delta``."""
        w0_norm = (
            self.w0_norm()
            if self.config.max_delta_ratio is not None else None
        )
        return FastWeightWalk(self.down_proj, self.config, delta, w0_norm, general)

    def apply_then_update(
        self, h: torch.Tensor, t: torch.Tensor, fast: LayerFastWeights | None,
        document_starts: torch.Tensor | None = None, update_lengths: torch.Tensor | None = None,
        frozen_updates: bool = False,
    ) -> torch.Tensor:
        """Outputs for h, chunk by chunk; updates ``fast`` in place when it is given.

        ``document_starts`` (B, n_chunks) bool: chunk k begins a new document in that row, so the
        fast weights restart there (training on packed windows, whole windows only).
        ``update_lengths`` (B,): right-padded rows; the keys and targets of row b past
        ``update_lengths[b]`` are zeroed for the updates (not for the outputs), so that the
        padding teaches the fast weights nothing (a zero key adds nothing to V^T h, and zero
        targets are what ``flush_tail`` pads a last chunk with).
        ``frozen_updates``: the updates are computed from detached keys and targets, so that a
        backward through the outputs reaches h (and the weights before it) but not the fast
        weights' history: a slow step trains through the score without the fast-weight graph.
        """
        L = h.shape[1]
        C = self.config.chunk_size
        r = 0 if fast is None else fast.tail_len
        if r:
            # Prepend the unfinished chunk so that chunk borders fall on multiples of C.
            h_all, t_all = torch.cat([fast.tail_h, h], dim=1), torch.cat([fast.tail_t, t], dim=1)
        else:
            h_all, t_all = h, t
        n_full = (r + L) // C
        training_conv = torch.is_grad_enabled() and self.ttt_conv.weight.requires_grad
        if (
            not training_conv
            and self.conv_is_zero()
            and (fast is None or not fast.delta.any())
        ):
            # A zero conv makes every update zero: this is exactly the base MLP (fresh model).
            # Not while training: the zero-initialised conv must still receive its gradient.
            out, delta = F.linear(h, self.down_proj.weight, self.down_proj.bias), None
        else:
            if document_starts is not None and (r or fast is not None):
                raise ValueError("document restarts apply to whole windows, not to a streaming state")
            h_upd = h_all
            if update_lengths is not None:
                if r:
                    raise ValueError("update_lengths apply to whole windows, not to a streaming state")
                keep = torch.arange(h_all.shape[1], device=h_all.device) < update_lengths.to(h_all.device)[:, None]
                h_upd, t_all = h_all * keep[..., None].to(h_all.dtype), t_all * keep[..., None].to(t_all.dtype)
            grad_through_updates = torch.is_grad_enabled() and not frozen_updates
            if frozen_updates:
                h_upd, t_all = h_upd.detach(), t_all.detach()
            with torch.set_grad_enabled(grad_through_updates):
                values = self.update_values(t_all[:, : n_full * C]) if n_full else None  # eta V, (B, n, C, d)
            # With grad on, the walk's W_0 carries the graph (the slow weights' adapters on it)
            walk = self.walk(None if fast is None else fast.delta, general=document_starts is not None)
            outputs = []
            for k, served, update_after in self._chunk_schedule(h_all.shape[1], r, keep_last=fast is not None):
                if document_starts is not None:
                    walk.restart(document_starts[:, k])
                if served is not None:
                    outputs.append(walk.serve(h_all[:, served]))
                if update_after:
                    with torch.set_grad_enabled(grad_through_updates):
                        walk.update(values[:, k], h_upd[:, k * C : (k + 1) * C])
            out, delta = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], walk.delta

        if fast is not None:
            fast.delta = delta if delta is not None else fast.delta
            fast.tail_h = h_upd[:, n_full * C :].detach()
            fast.tail_t = t_all[:, n_full * C :].detach()
            fast.tokens_seen += L
            fast.updates += n_full
        return out

    @torch.no_grad()
    def flush_tail(self, fast: LayerFastWeights) -> None:
        """Apply the unfinished chunk's update now, as if the stream ended there.

        The tail is zero-padded to a whole chunk, as the parallel form pads a sequence's last
        chunk: padded rows of h are zero, so they add nothing to V^T h. Used at document ends,
        so that a state that outlives a document learns from all of it, short documents too.
        """
        r = fast.tail_len
        if r == 0:
            return
        C = self.config.chunk_size
        h = F.pad(fast.tail_h, (0, 0, 0, C - r))
        t = F.pad(fast.tail_t, (0, 0, 0, C - r))
        walk = self.walk(fast.delta, general=True)  # one update: added to delta itself, no W_0 round trip
        walk.update(self.update_values(t)[:, 0], h)
        fast.delta = walk.delta
        fast.tail_h, fast.tail_t = fast.tail_h[:, :0], fast.tail_t[:, :0]
        fast.updates += 1

    # -- quantities of the weights, cached until a weight changes --------------------------------

    def conv_is_zero(self) -> bool:
        """Whether the TTT conv is all zero (saves a device sync on every forward)."""
        return self._cached("conv_zero", self.ttt_conv.weight, lambda w: not bool(w.any()))

    def conv_taps(self) -> torch.Tensor:
        """eta times the conv's taps as (k, d) (Conv1d cross-correlates). Without autograd it is
        computed once per weight: two launches fewer per layer and forward, which a launch-bound
        prefill of a few thousand tokens feels."""
        eta, weight = self.config.eta, self.ttt_conv.weight
        if torch.is_grad_enabled():  # a graph through the taps (training), or one that saves them
            return eta * weight[:, 0, :].t()
        return self._cached(f"taps@{eta}", weight, lambda w: (eta * w[:, 0, :].t()).contiguous())

    def w0_norm(self) -> torch.Tensor:
        """||W_down||_F, for the cap on ||delta|| / ||W_down||."""
        return self._cached("w0_norm", self.down_proj.weight, lambda w: torch.linalg.matrix_norm(w.float()))

    def _cached(self, what: str, weight: torch.Tensor, compute: Callable[[torch.Tensor], Any]) -> Any:
        """``compute(weight)``, recomputed only when the weight is written or replaced.

        Only parameters are cached: a parametrized weight (slow weights, ttt_model.slow) is a new
        tensor at every access, whose address a later one may reuse with other values.
        """
        if not isinstance(weight, nn.Parameter):
            return compute(weight.detach())
        key = (weight._version, weight.data_ptr())
        cached = self._derived.get(what)
        if cached is None or cached[0] != key:
            cached = (key, compute(weight.detach()))
            self._derived[what] = cached
        return cached[1]

    def _chunk_schedule(self, N: int, r: int, keep_last: bool):
        """For each chunk k of the N tokens (the first r already served): (k, slice of the
        tokens it serves or None, whether its update is applied after them)."""
        C = self.config.chunk_size
        n_chunks, n_full = math.ceil(N / C), N // C
        for k in range(n_chunks):
            lo, hi = max(k * C, r), min((k + 1) * C, N)
            # Without a state to keep, the last chunk's update would serve no token.
            yield k, slice(lo, hi) if hi > lo else None, k < n_full and (keep_last or k < n_chunks - 1)
