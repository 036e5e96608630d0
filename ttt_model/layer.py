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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ttt_model.config import TTTConfig
from ttt_model.state import LayerFastWeights, accumulator_dtype, apply_update

if TYPE_CHECKING:
    from ttt_model.patch import TTTRuntime


class InPlaceTTTMLP(nn.Module):
    """Drop-in replacement for a Llama/Qwen/Mistral gated MLP with In-Place TTT on down_proj."""

    is_ttt_mlp = True

    def __init__(self, mlp: nn.Module, config: TTTConfig, layer_idx: int, runtime: "TTTRuntime"):
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
        # Plain attributes, not submodules: the wrapped MLP shares our parameters and the runtime
        # is per-model context, neither belongs in the state dict.
        object.__setattr__(self, "base_mlp", mlp)
        object.__setattr__(self, "runtime", runtime)

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

        The depthwise conv is computed as k shifted multiply-adds in the (C, d) layout rather
        than through nn.Conv1d, whose (d, C) layout costs two transposing copies and a slow
        generic depthwise kernel on GPU. eta is folded into the k x d kernel taps. The result
        is a strided view: each chunk's (C, d) block is contiguous, which is all the update
        product needs.
        """
        B, T, d = t.shape
        C = self.config.chunk_size
        n = T // C
        k = self.config.conv_kernel
        half = k // 2
        taps = self.config.eta * self.ttt_conv.weight[:, 0, :].t()  # (k, d); Conv1d cross-correlates
        # Each chunk gets its own zero border, then every tap is one contiguous (vectorised) pass
        # over the flattened buffer; rows computed in the borders are garbage and dropped below.
        padded = F.pad(t.reshape(B * n, C, d), (0, 0, half, half)).reshape(-1, d)  # (B*n*(C+2h), d)
        rows = padded.shape[0] - 2 * half
        mixed = torch.zeros_like(padded)
        inner = mixed[half : half + rows]
        for j in range(k):
            inner.addcmul_(padded[j : j + rows], taps[j])
        v = self.ttt_proj(mixed) if self.ttt_proj is not None else mixed
        return v.reshape(B * n, C + 2 * half, d)[:, half : half + C].reshape(B, n, C, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # (B, L, D)
        fast = self.runtime.layer_state(self.layer_idx)
        if self.config.objective == "gradient":
            # Dynamic evaluation: the fast weights are learned by the optimiser between chunks.
            return self._project(h, None if fast is None else fast.delta)
        t = x if self.config.target == "hidden_states" else self.runtime.target_embeddings(x)
        if self.runtime.context_parallel is not None:
            from ttt_model.parallel import apply_then_update_parallel

            return apply_then_update_parallel(self, h, t, fast, self.runtime.context_parallel)
        return self.apply_then_update(h, t, fast)

    def apply_then_update(
        self, h: torch.Tensor, t: torch.Tensor, fast: LayerFastWeights | None
    ) -> torch.Tensor:
        """Outputs for h, chunk by chunk; updates ``fast`` in place when it is given."""
        L = h.shape[1]
        C = self.config.chunk_size
        r = 0 if fast is None else fast.tail_len
        delta = None if fast is None else fast.delta  # sum of past dW, (B, d, D), fp32 or wider
        if r:
            # Prepend the unfinished chunk so that chunk borders fall on multiples of C.
            h_all, t_all = torch.cat([fast.tail_h, h], dim=1), torch.cat([fast.tail_t, t], dim=1)
        else:
            h_all, t_all = h, t
        n_full = (r + L) // C
        training_conv = torch.is_grad_enabled() and self.ttt_conv.weight.requires_grad
        if (
            not training_conv
            and self.runtime.is_zero(self.layer_idx, self.ttt_conv.weight)
            and (fast is None or not fast.delta.any())
        ):
            # A zero conv makes every update zero: this is exactly the base MLP (fresh model).
            # Not while training: the zero-initialised conv must still receive its gradient.
            out = F.linear(h, self.down_proj.weight, self.down_proj.bias)
        else:
            values = self.update_values(t_all[:, : n_full * C]) if n_full else None  # eta V, (B, n, C, d)
            general = torch.is_grad_enabled() or self.config.has_safeguards or self.runtime.document_starts is not None
            loop = self._chunk_loop if general else self._chunk_loop_inference
            out, delta = loop(h_all, values, r, delta, keep_last=fast is not None)

        if fast is not None:
            fast.delta = delta if delta is not None else fast.delta
            fast.tail_h = h_all[:, n_full * C :].detach()
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
        update = torch.matmul(self.update_values(t)[:, 0].transpose(1, 2), h)  # (B, d, D)
        w0_norm = (
            self.runtime.w0_norm(self.layer_idx, self.down_proj.weight)
            if self.config.max_delta_ratio is not None else None
        )
        fast.delta = apply_update(fast.delta, update, self.config, w0_norm)
        fast.tail_h, fast.tail_t = fast.tail_h[:, :0], fast.tail_t[:, :0]
        fast.updates += 1

    def _chunk_schedule(self, N: int, r: int, keep_last: bool):
        """For each chunk k of the N tokens (the first r already served): (k, slice of the
        tokens it serves or None, whether its update is applied after them)."""
        C = self.config.chunk_size
        n_chunks, n_full = math.ceil(N / C), N // C
        for k in range(n_chunks):
            lo, hi = max(k * C, r), min((k + 1) * C, N)
            # Without a state to keep, the last chunk's update would serve no token.
            yield k, slice(lo, hi) if hi > lo else None, k < n_full and (keep_last or k < n_chunks - 1)

    def _chunk_loop(
        self, h_all: torch.Tensor, values: torch.Tensor | None, r: int, delta: torch.Tensor | None, keep_last: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The general loop: out-of-place (differentiable), with the safeguards on every update."""
        C = self.config.chunk_size
        w0_norm = (
            self.runtime.w0_norm(self.layer_idx, self.down_proj.weight)
            if self.config.max_delta_ratio is not None else None
        )
        restarts = self.runtime.document_starts
        if restarts is not None and (r or delta is not None):
            raise ValueError("document restarts apply to whole windows, not to a streaming state")
        outputs = []
        for k, served, update_after in self._chunk_schedule(h_all.shape[1], r, keep_last):
            if restarts is not None and delta is not None:
                delta = delta * (~restarts[:, k]).to(delta.dtype)[:, None, None]
            if served is not None:
                outputs.append(self._project(h_all[:, served], delta))
            if update_after:
                update = torch.matmul(values[:, k].transpose(1, 2), h_all[:, k * C : (k + 1) * C])  # (B, d, D)
                delta = apply_update(delta, update, self.config, w0_norm)
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], delta

    @torch.no_grad()
    def _chunk_loop_inference(
        self, h_all: torch.Tensor, values: torch.Tensor | None, r: int, delta: torch.Tensor | None, keep_last: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The same loop for inference without safeguards, with fewer passes over d x D matrices.

        It keeps the running weight W_0 + delta itself in the accumulator dtype, so each chunk
        costs one cast to the model's dtype for its output and one fused multiply-accumulate for
        its update (the GEMM adds into the float32 weight on CUDA), instead of five passes.
        """
        C = self.config.chunk_size
        weight = self.down_proj.weight  # (d, D)
        acc = accumulator_dtype(weight.dtype)
        running = None if delta is None else weight.to(acc) + delta  # (B, d, D)
        outputs = []
        for k, served, update_after in self._chunk_schedule(h_all.shape[1], r, keep_last):
            if served is not None:
                if running is None:
                    outputs.append(F.linear(h_all[:, served], weight, self.down_proj.bias))
                else:
                    outputs.append(self._linear_per_sequence(h_all[:, served], running.to(weight.dtype)))
            if update_after:
                if running is None:
                    running = weight.to(acc).expand(h_all.shape[0], *weight.shape).clone()
                running = multiply_accumulate(running, values[:, k].transpose(1, 2), h_all[:, k * C : (k + 1) * C])
        delta = running - weight.to(acc) if keep_last and running is not None else None
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], delta

    def _project(self, h: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """h (W_0 + delta)^T (+ bias), with W_0 folded in so it is one matrix product."""
        weight = self.down_proj.weight  # (d, D)
        if delta is None:
            return F.linear(h, weight, self.down_proj.bias)
        return self._linear_per_sequence(h, (weight + delta).to(h.dtype))

    def _linear_per_sequence(self, h: torch.Tensor, fast_weight: torch.Tensor) -> torch.Tensor:
        """h[b] @ fast_weight[b]^T (+ bias) for each sequence b: (B, c, D) x (B, d, D) -> (B, c, d)."""
        # F.linear is the base model's kernel: a batch of one is a single plain matrix product.
        if h.shape[0] == 1:
            return F.linear(h[0], fast_weight[0], self.down_proj.bias)[None]
        return torch.stack([F.linear(h[b], fast_weight[b], self.down_proj.bias) for b in range(h.shape[0])])


def multiply_accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b, in place, for a wide ``acc`` and narrow a, b: fused into the GEMM where it can."""
    if acc.dtype == a.dtype:
        return acc.baddbmm_(a, b)
    if acc.is_cuda:
        return torch.baddbmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    return acc + torch.bmm(a, b).to(acc.dtype)
