"""RunSummary: what one run of the stream processor did (the status reports and the checkpoints'
metrics read it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from actors.call_types import DocumentOutcome
from pipeline.stream_io.messages import reason_kind


@dataclass
class RunSummary:
    """What one run did; the loss figures are token-weighted means."""

    documents: int = 0
    dead_letters: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    # From the first record read to the last document finished: the rates use this, so that an
    # idle wait at the end (--until-idle) does not dilute them.
    first_record_at: float | None = None
    last_finished_at: float | None = None
    reader_busy_s: float = 0.0
    loss_sum: float = 0.0
    loss_tokens: int = 0
    sampled_documents: int = 0
    sampled_adapted_sum: float = 0.0
    sampled_base_sum: float = 0.0
    sampled_tokens: int = 0
    retries: int = 0
    parallel_failures: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def active_s(self) -> float:
        if self.first_record_at is None or self.last_finished_at is None:
            return 0.0
        return self.last_finished_at - self.first_record_at

    def add(self, outcome: DocumentOutcome) -> None:
        self.last_finished_at = time.monotonic()
        self.documents += 1
        self.tokens += outcome.tokens
        self.reader_busy_s += outcome.latency_ms / 1000.0
        if outcome.loss is not None:
            self.loss_sum += outcome.loss * outcome.tokens
            self.loss_tokens += outcome.tokens
            if outcome.base_loss is not None:
                self.sampled_documents += 1
                self.sampled_adapted_sum += outcome.loss * outcome.tokens
                self.sampled_base_sum += outcome.base_loss * outcome.tokens
                self.sampled_tokens += outcome.tokens

    def checkpoint_metrics(self) -> dict[str, float]:
        d = self.as_dict()
        keys = ("documents", "dead_letters", "tokens", "adapted_loss", "sampled_adapted_loss", "sampled_base_loss")
        return {k: float(d[k]) for k in keys if d[k] is not None}

    def reject(self, reason: str) -> None:
        self.last_finished_at = time.monotonic()
        self.dead_letters += 1
        kind = reason_kind(reason)
        self.reasons[kind] = self.reasons.get(kind, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        return {
            "documents": self.documents,
            "dead_letters": self.dead_letters,
            "dead_letter_reasons": dict(self.reasons),
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 3),
            "active_s": round(self.active_s, 3),
            "documents_per_s": ratio(self.documents, self.active_s),
            "tokens_per_s": ratio(self.tokens, self.active_s),
            "reader_busy_s": round(self.reader_busy_s, 3),
            "adapted_loss": ratio(self.loss_sum, self.loss_tokens),
            "sampled_documents": self.sampled_documents,
            "sampled_adapted_loss": ratio(self.sampled_adapted_sum, self.sampled_tokens),
            "sampled_base_loss": ratio(self.sampled_base_sum, self.sampled_tokens),
            "retries": self.retries,
            "parallel_failures": self.parallel_failures,
        }
