"""The apply-then-update step of one TTT layer, written once.

A layer's fast weights move chunk by chunk: the tokens of chunk i are served by W_0 + delta, then
chunk i's update joins delta under the safeguards (``apply_update``). ``FastWeightWalk`` is that
running weight; the training and inference chunk loops, the flush of an unfinished chunk at a
document's end and the context-parallel walk all step it, so they cannot drift apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttt_model.config import TTTConfig
from ttt_model.model.state import accumulator_dtype


def apply_update(
    delta: torch.Tensor | None, update: torch.Tensor, config: TTTConfig, w0_norm: torch.Tensor | float | None
) -> torch.Tensor:
    """delta + update under the safeguards: per-update clip, decay, cap on ||delta|| / ||W_0||.

    Out of place, so that training can differentiate through it. ``w0_norm`` is needed only
    when the cap (``max_delta_ratio``) is set.
    """
    update = update.to(accumulator_dtype(update.dtype))
    if config.max_update_norm is not None:
        norm = torch.linalg.matrix_norm(update, keepdim=True)  # (B, 1, 1)
        update = update * torch.clamp(config.max_update_norm / (norm + 1e-12), max=1.0)
    if delta is None:
        delta = update
    else:
        if config.decay is not None:
            delta = delta * (1.0 - config.decay)
        delta = delta + update
    if config.max_delta_ratio is not None:
        norm = torch.linalg.matrix_norm(delta, keepdim=True)
        delta = delta * torch.clamp(config.max_delta_ratio * w0_norm / (norm + 1e-12), max=1.0)
    return delta


def multiply_accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b, in place, for a wide ``acc`` and narrow a, b: fused into the GEMM where it can."""
    if acc.dtype == a.dtype:
        return acc.baddbmm_(a, b)
    if acc.is_cuda:
        return torch.baddbmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    return acc + torch.bmm(a, b).to(acc.dtype)


class FastWeightWalk:
    """One layer's fast weights W_0 + delta over consecutive chunks: ``serve`` a chunk's tokens,
    then ``update`` with the chunk (or ``add`` an update computed elsewhere).

    Two forms, chosen once. The general form keeps ``delta`` and steps it out of place through
    ``apply_update`` (differentiable, safeguards on every update, document restarts; asked for
    with ``general``, and always taken with grad or safeguards). Inference
    without safeguards keeps the running weight W_0 + delta itself in the accumulator dtype, so
    a chunk costs one cast to serve and one fused multiply-accumulate to update instead of five
    passes over d x D matrices.
    """

    def __init__(
        self, down_proj: torch.nn.Linear, config: TTTConfig, delta: torch.Tensor | None,
        w0_norm: torch.Tensor | None = None, general: bool = False,
    ):
        self.weight, self.bias, self.config = down_proj.weight, down_proj.bias, config
        self.w0_norm = w0_norm  # needed only with the cap (max_delta_ratio)
        self.general = general or torch.is_grad_enabled() or config.has_safeguards
        self.acc = accumulator_dtype(self.weight.dtype)
        if self.general:
            self._delta, self._running = delta, None
        else:
            self._delta, self._running = None, None if delta is None else self.weight.to(self.acc) + delta

    @property
    def delta(self) -> torch.Tensor | None:
        """The sum of the updates so far (None before the first)."""
        if self.general or self._running is None:
            return self._delta
        return torch.sub(self._running, self.weight)  # type promotion casts W_0 inside the kernel

    def serve(self, h: torch.Tensor) -> torch.Tensor:
        """h (W_0 + delta)^T (+ bias): (B, c, D) -> (B, c, d)."""
        if self.general:
            if self._delta is None:
                return F.linear(h, self.weight, self.bias)
            return self._per_sequence(h, (self.weight + self._delta).to(h.dtype))
        if self._running is None:
            return F.linear(h, self.weight, self.bias)
        return self._per_sequence(h, self._running.to(self.weight.dtype))

    def update(self, values: torch.Tensor, h: torch.Tensor) -> None:
        """The update of one whole chunk: (eta V)^T h, with values (B, C, d) and h (B, C, D)."""
        if self.general:
            self.add(torch.matmul(values.transpose(1, 2), h))
            return
        if self._running is None:
            # One launch: copy_ broadcasts and casts (to() then clone() were two).
            self._running = torch.empty(h.shape[0], *self.weight.shape, dtype=self.acc, device=h.device).copy_(self.weight)
        self._running = multiply_accumulate(self._running, values.transpose(1, 2), h)

    def add(self, update: torch.Tensor) -> None:
        """One chunk's update (B, d, D), already summed."""
        if self.general:
            self._delta = apply_update(self._delta, update, self.config, self.w0_norm)
        elif self._running is None:
            self._running = self.weight.to(self.acc) + update.to(self.acc)
        else:
            self._running = self._running + update.to(self.acc)

    def restart(self, starting: torch.Tensor) -> None:
        """Sequences b with ``starting[b]`` begin a new document: their fast weights go back to W_0."""
        if not self.general:
            raise RuntimeError("document restarts need the general form (FastWeightWalk(..., general=True))")
        if self._delta is not None:
            self._delta = self._delta * (~starting).to(self._delta.dtype)[:, None, None]

    def _per_sequence(self, h: torch.Tensor, fast_weight: torch.Tensor) -> torch.Tensor:
        """h[b] @ fast_weight[b]^T (+ bias) for each sequence b: (B, c, D) x (B, d, D) -> (B, c, d)."""
        # F.linear is the base model's kernel: a batch of one is a single plain matrix product;
        # several sequences are one batched product.
        if h.shape[0] == 1:
            return F.linear(h[0], fast_weight[0], self.bias)[None]
        out = torch.bmm(h, fast_weight.transpose(1, 2))
        return out if self.bias is None else out + self.bias
