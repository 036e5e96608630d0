"""Degradation monitor: rules over a rolling window of results; a breach means alert + rollback.

Rules (each off when its bound is None):

- ``non_finite``: a non-finite loss or fast weight (immediately);
- ``delta_ratio``: the fast weights' ||dW|| / ||W_down|| of some layer above
  ``max_fast_delta_ratio`` (immediately);
- ``slow_delta_ratio``: the slow weights' ||B A|| / ||W_0|| of some matrix above
  ``max_slow_delta_ratio`` (immediately);
- ``adapted_over_base``: over the window's shadow-evaluated documents, the adapted loss above
  the static model's by more than ``max_loss_over_base`` (relative);
- ``loss_jump``: the window's mean adapted loss above the reference recorded when ``last-good``
  was set by more than ``max_loss_jump`` (relative).

The monitor passes a checkpoint (so that ``last-good`` may move to it) when no rule fired since
the previous one and the window holds at least ``min_documents``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from actors.call_types import DocumentOutcome


@dataclass(frozen=True)
class Breach:
    rule: str
    values: dict[str, Any]
    document: str


class DegradationMonitor:
    def __init__(self, config, reference_loss: float | None = None, chunk_tokens: int | None = None):
        self.config = config  # MonitorConfig
        # The TTT chunk: the fast weights' delta ratio is bounded per sqrt(chunks the document
        # spans) (None: the ratio itself), since it grows with the number of updates.
        self.chunk_tokens = chunk_tokens
        self.window: deque[DocumentOutcome] = deque(maxlen=config.window_documents)
        self.reference_loss = reference_loss  # mean adapted loss of the window when last-good was set
        self.breached_since_pass = False

    def observe(self, outcome: DocumentOutcome) -> Breach | None:
        self.window.append(outcome)
        breach = self._check(outcome)
        if breach is not None:
            self.breached_since_pass = True
        return breach

    def _check(self, outcome: DocumentOutcome) -> Breach | None:
        cfg = self.config
        if cfg.non_finite and (not outcome.finite or outcome.delta_ratio < 0 or outcome.slow_delta_ratio < 0):
            return Breach("non_finite", {"loss": outcome.loss, "fast_weight_norm": outcome.fast_weight_norm}, outcome.id)
        if cfg.max_fast_delta_ratio is not None:
            chunks = max(1, math.ceil(outcome.tokens / self.chunk_tokens)) if self.chunk_tokens else 1
            scaled = outcome.delta_ratio / math.sqrt(chunks)
            if scaled > cfg.max_fast_delta_ratio:
                return Breach("delta_ratio", {"delta_ratio": outcome.delta_ratio, "chunks": chunks,
                                              "per_sqrt_chunk": scaled, "bound": cfg.max_fast_delta_ratio}, outcome.id)
        if cfg.max_slow_delta_ratio is not None and outcome.slow_delta_ratio > cfg.max_slow_delta_ratio:
            return Breach("slow_delta_ratio", {"slow_delta_ratio": outcome.slow_delta_ratio,
                                               "bound": cfg.max_slow_delta_ratio}, outcome.id)
        if len(self.window) < cfg.min_documents:
            return None
        if cfg.max_loss_over_base is not None:
            sampled = [o for o in self.window if o.base_loss is not None and o.loss is not None]
            if len(sampled) >= cfg.min_documents:
                adapted = _weighted([(o.loss, o.tokens) for o in sampled])
                base = _weighted([(o.base_loss, o.tokens) for o in sampled])
                if adapted > base * (1 + cfg.max_loss_over_base):
                    return Breach("adapted_over_base", {"adapted_loss": adapted, "base_loss": base,
                                                        "margin": cfg.max_loss_over_base}, outcome.id)
        if cfg.max_loss_jump is not None and self.reference_loss is not None:
            current = self.window_loss()
            if current is not None and current > self.reference_loss * (1 + cfg.max_loss_jump):
                return Breach("loss_jump", {"window_loss": current, "last_good_loss": self.reference_loss,
                                            "bound": cfg.max_loss_jump}, outcome.id)
        return None

    def window_loss(self) -> float | None:
        scored = [(o.loss, o.tokens) for o in self.window if o.loss is not None]
        return _weighted(scored) if scored else None

    def passes(self) -> bool:
        """Whether the state checkpointed now may become ``last-good``; starts a new period."""
        ok = not self.breached_since_pass and len(self.window) >= self.config.min_documents
        self.breached_since_pass = False
        if ok:
            self.reference_loss = self.window_loss()
        return ok

    def reset(self) -> None:
        """After a rollback: the window described the state that was thrown away."""
        self.window.clear()
        self.breached_since_pass = False


def _weighted(pairs: list[tuple[float, int]]) -> float:
    total = sum(t for _, t in pairs)
    value = sum(v * t for v, t in pairs) / max(total, 1)
    return value if math.isfinite(value) else math.inf
