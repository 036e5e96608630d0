"""What happens in a stream, as events, and the bus that carries them to their observers.

The processor publishes; the Prometheus metrics, the MLflow run, the degradation monitor and the
alert topic subscribe (``pipeline.processing.job.build_processor`` wires them), so that the run loop neither
knows which observers a deployment has nor checks for them. Handlers run synchronously, in the
order they subscribed, on the processor's thread.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

from actors.call_types import DocumentOutcome


@dataclass(frozen=True)
class DocumentRead:
    outcome: DocumentOutcome


@dataclass(frozen=True)
class DocumentRejected:
    """A record or document sent to the dead-letter topic."""

    reason: str


@dataclass(frozen=True)
class LearningDecided:
    """Whether the learner may learn a document just taken in: ``admitted``, ``held out``, or
    the kind of check that kept it out (pipeline.processing.learning_admission.KINDS)."""

    decision: str


@dataclass(frozen=True)
class CheckpointWritten:
    version: str | None  # None: the registry was out of reach, the checkpoint is retried
    reason: str  # periodic, shutdown, rollback, forget
    # The promotion gate's verdict (actors.promotion_gate): whether live moved to it (None: no
    # gate judged it; live moved unjudged), and the verdict with its figures.
    promoted: bool | None = None
    verdict: dict[str, Any] | None = None


@dataclass(frozen=True)
class RolledBack:
    cause: str  # a monitor rule, or manual
    record: dict[str, Any]  # what the alerts topic receives


@dataclass(frozen=True)
class Progress:
    """Once a second: where reading stands."""

    committed: dict[int, int]
    highwaters: dict[int, int | None]
    in_flight: int
    queued: int


@dataclass(frozen=True)
class StatusTick:
    """Every ``processor.status_interval_s``: the status message and the run's figures."""

    message: dict[str, Any]
    figures: dict[str, float | None]
    step: int  # documents the stream has read, over all runs


Event = TypeVar("Event")


class StreamEvents:
    def __init__(self) -> None:
        self._handlers: dict[type, list[Callable[[Any], None]]] = defaultdict(list)

    def subscribe(self, kind: type[Event], handler: Callable[[Event], None]) -> None:
        self._handlers[kind].append(handler)

    def publish(self, event: object) -> None:
        for handler in self._handlers[type(event)]:
            handler(event)


class EventObserver(Protocol):
    """What follows a stream through its events alone (the metrics endpoint, the MLflow run)."""

    def subscribe_to(self, events: StreamEvents) -> None:
        """Subscribe to the events it follows."""
