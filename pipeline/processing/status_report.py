"""StatusReport: what a running stream says about itself, once a status interval and at its end.

A status message on the metrics topic (the ledger, the run's figures, every reader's and the
learner's own report, the learner's pace), the figures the observers take from it
(``StatusTick``), and progress each second (``Progress``). It follows the stream through its
events (the last document read, the rollbacks), and warns once when the learner falls behind.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from pipeline.observability.metrics import partition_lag
from pipeline.processing.learner_pace import LearnerPace, learner_pace
from pipeline.processing.ledger import StreamLedger
from pipeline.processing.reader_pool import Learner
from pipeline.processing.recovery import RecoveryPolicy
from pipeline.processing.run_summary import RunSummary
from pipeline.stream_events import DocumentRead, Progress, RolledBack, StatusTick, StreamEvents
from pipeline.stream_io.sink import KafkaSinks
from pipeline.stream_io.source import KafkaDocumentSource

log = logging.getLogger(__name__)


class StatusReport:
    """``status``: the readers' and the learner's own reports (best effort: a failure is said in
    the message, the stream goes on)."""

    def __init__(self, stream: str, ledger: StreamLedger, source: KafkaDocumentSource, summary: RunSummary,
                 recovery: RecoveryPolicy, learner: Learner, status: Callable[[], dict[str, Any]],
                 events: StreamEvents, sinks: KafkaSinks):
        self.stream = stream
        self.ledger = ledger
        self.source = source
        self.summary = summary
        self.recovery = recovery
        self.learner = learner
        self.status = status
        self.events = events
        self.sinks = sinks
        self.last_outcome = None
        self.rollbacks = 0
        self.learner_behind = False
        events.subscribe(DocumentRead, self._read)
        events.subscribe(RolledBack, self._rolled_back)

    def _read(self, event: DocumentRead) -> None:
        self.last_outcome = event.outcome

    def _rolled_back(self, event: RolledBack) -> None:
        self.rollbacks += 1

    def progress(self) -> None:
        self.events.publish(Progress(self.ledger.committable(), self.source.highwaters(), self.ledger.in_flight,
                                     self.ledger.queued))

    def publish(self, elapsed_s: float, final: bool = False) -> None:
        message = {
            "type": "status",
            "stream": self.stream,
            "time": time.time(),
            "final": final,
            "in_flight": self.ledger.in_flight,
            "queued": self.ledger.queued,
            "committed": {str(p): o for p, o in self.ledger.committable().items()},
            "checkpoint": self.recovery.status(),
            **self.summary.as_dict(),
        }
        message["wall_s"] = round(elapsed_s, 3)  # the run so far, not the summary's final figure
        try:
            report = self.status()
            message["readers"] = report["readers"]
            for part in ("context_parallel", "learner"):
                if part in report:
                    message[part] = report[part]
            # A synchronous learner is its own reader: it cannot fall behind itself.
            reads = "learner" in report and not getattr(self.learner, "synchronous", False)
            pace = learner_pace(report["readers"], report["learner"]) if reads else None
            if pace is not None:
                message["learner_pace"] = pace.as_dict()
                self._say_if_behind(pace)
        except Exception as err:  # noqa: BLE001 - status is best effort; the stream goes on
            message["readers_error"] = repr(err)
        self.events.publish(StatusTick(message, self._figures(), self.recovery.documents_before + self.summary.documents))
        self.sinks.metrics(message)

    def _say_if_behind(self, pace: LearnerPace) -> None:
        """A warning and an alert when the learner falls behind its readers (once, until it
        keeps up again): the readers then wait for its versions."""
        if pace.behind and not self.learner_behind:
            log.warning("the learner takes in %.2f documents/s and the readers could read %.2f: they wait for its "
                        "versions; processor.learner.every: %d would keep up (now %d)", pace.learner_documents_per_s,
                        pace.readers_documents_per_s, pace.every_to_keep_up, pace.every)
            self.sinks.alert({"type": "learner_behind", "stream": self.stream, **pace.as_dict(), "time": time.time()})
        self.learner_behind = pace.behind

    def _figures(self) -> dict[str, float | None]:
        lags = partition_lag(self.ledger.committable(), self.source.highwaters())
        last = self.last_outcome
        return {
            "lag": float(sum(lags.values())) if lags else None,
            "delta_ratio": last.delta_ratio if last is not None and last.delta_ratio >= 0 else None,
            "slow_delta_ratio": last.slow_delta_ratio if last is not None and last.slow_delta_ratio > 0 else None,
            "rollbacks": float(self.rollbacks),
            **self.recovery.figures(),
        }
