"""StreamMetrics: the stream processor's figures as a Prometheus endpoint.

The driver (``ttt-stream run``) sees every result, dead letter, checkpoint and rollback, so it
serves them, on ``processor.metrics.port``, in Prometheus' text format, as prometheus_client's
own HTTP server (the convention of Python services: scrape ``http://HOST:PORT/metrics``).
Ray's own metrics (actors, object store, GPU use of the readers' nodes) stay on Ray's endpoint;
these are the stream's. Every series carries the ``stream`` label, so one Prometheus scrapes
several streams. ``infra/grafana/ttt-stream.json`` is a dashboard over them.

Losses are summaries (sum and count: ``rate(sum) / rate(count)`` is the mean over any window);
``ttt_stream_sampled_*_loss`` are over the documents also scored by the base model, the pair that
says whether the stream's adaptation helps.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Summary, start_http_server

from actors.call_types import DocumentOutcome
from pipeline.stream_io.messages import reason_kind
from pipeline.observability.monitor import Breach
from pipeline.stream_events import (CheckpointWritten, DocumentRead, DocumentRejected, LearningDecided,
                                               Progress, RolledBack, StatusTick, StreamEvents)

log = logging.getLogger(__name__)


class StreamMetrics:
    def __init__(self, stream: str, registry: CollectorRegistry | None = None):
        self.stream = stream
        self.registry = registry or CollectorRegistry()
        self._server = None
        self.url: str | None = None
        labels, r = ["stream"], self.registry
        self.documents = Counter("ttt_stream_documents", "Documents read and answered", labels, registry=r)
        self.tokens = Counter("ttt_stream_tokens", "Tokens read", labels, registry=r)
        self.dead_letters = Counter("ttt_stream_dead_letters", "Records sent to the dead-letter topic, by reason",
                                    ["stream", "reason"], registry=r)
        self.loss = Summary("ttt_stream_document_loss", "Mean next-token loss of each document, adapted", labels,
                            registry=r)
        self.sampled_adapted = Summary("ttt_stream_sampled_adapted_loss",
                                       "Adapted loss of the documents also scored by the base model", labels, registry=r)
        self.sampled_base = Summary("ttt_stream_sampled_base_loss",
                                    "Base-model loss of the same sampled documents", labels, registry=r)
        self.delta_ratio = Gauge("ttt_stream_delta_ratio",
                                 "Largest ||delta|| / ||W_down|| of the last document's fast weights", labels, registry=r)
        self.slow_delta_ratio = Gauge("ttt_stream_slow_delta_ratio",
                                      "Largest slow-weight delta ratio after the last document", labels, registry=r)
        self.latency = Summary("ttt_stream_document_seconds", "Time a reader spent on a document", labels, registry=r)
        self.lag = Gauge("ttt_stream_partition_lag", "Records not yet committed: high watermark - committed offset",
                         ["stream", "partition"], registry=r)
        self.committed = Gauge("ttt_stream_committed_offset", "Next offset to read, committed", ["stream", "partition"],
                               registry=r)
        self.in_flight = Gauge("ttt_stream_in_flight", "Documents on the readers", labels, registry=r)
        self.queued = Gauge("ttt_stream_queued", "Documents read and waiting for a reader", labels, registry=r)
        self.checkpoints = Counter("ttt_stream_checkpoints", "Checkpoints written, by reason", ["stream", "reason"],
                                   registry=r)
        self.checkpoint_failures = Counter("ttt_stream_checkpoint_failures", "Checkpoints that could not be written",
                                           labels, registry=r)
        self.checkpoint_version = Gauge("ttt_stream_checkpoint_version", "Model version of the live checkpoint", labels,
                                        registry=r)
        self.last_checkpoint = Gauge("ttt_stream_last_checkpoint_timestamp_seconds",
                                     "Unix time of the last checkpoint written (age: time() - this)", labels, registry=r)
        self.rollbacks = Counter("ttt_stream_rollbacks", "Rollbacks, by cause (manual or a monitor rule)",
                                 ["stream", "cause"], registry=r)
        self.alerts = Counter("ttt_stream_degradation_alerts", "Monitor breaches, by rule", ["stream", "rule"], registry=r)
        self.learning = Counter("ttt_stream_learning_decisions",
                                "Documents taken in, by what the learner may do with them: admitted, held out, or the "
                                "check that kept them out", ["stream", "decision"], registry=r)
        self.verdicts = Counter("ttt_stream_version_verdicts", "Candidate versions judged by the promotion gate, by verdict",
                                ["stream", "verdict"], registry=r)
        self.gate = Gauge("ttt_stream_version_figure",
                          "The last judged version's figures: gain_vs_base, gain_vs_last_good, forgetting (relative "
                          "loss changes, negative is better)", ["stream", "figure"], registry=r)
        self.pace = Gauge("ttt_stream_learner_pace", "Documents a second the learner takes in, and the readers could "
                          "read (it is behind when below that); and the learner.every that would keep up",
                          ["stream", "figure"], registry=r)
        # Series at zero from the start (Prometheus' advice): a failure counter that does not
        # exist yet reads as "no data", not as "none".
        for metric in (self.documents, self.tokens, self.loss, self.sampled_adapted, self.sampled_base, self.latency,
                       self.in_flight, self.queued, self.checkpoint_failures):
            metric.labels(stream)

    # -- serving -------------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (a daemon thread); returns the port (``port`` 0: a free one)."""
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise OSError(f"processor.metrics: cannot serve on {host}:{port} ({err}); "
                          "choose another port (0: any free one) or set enabled: false") from err
        bound = self._server.server_address[1]
        self.url = f"http://{host}:{bound}/metrics"
        log.info("Prometheus metrics on %s", self.url)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def subscribe_to(self, events: StreamEvents) -> None:
        """Follow a stream's events (``pipeline.stream_events``)."""
        events.subscribe(DocumentRead, lambda e: self.document(e.outcome))
        events.subscribe(DocumentRejected, lambda e: self.dead_letter(e.reason))
        events.subscribe(CheckpointWritten, lambda e: self.checkpoint(e.version, e.reason, e.verdict))
        events.subscribe(LearningDecided, lambda e: self.learning.labels(self.stream, e.decision).inc())
        events.subscribe(RolledBack, lambda e: self.rollback(e.cause))
        events.subscribe(Breach, lambda e: self.alert(e.rule))
        events.subscribe(Progress, lambda e: self.progress(e.committed, e.highwaters, e.in_flight, e.queued))
        # Published before the status message goes out: it then says where to scrape.
        events.subscribe(StatusTick, lambda e: e.message.update({"metrics_url": self.url} if self.url else {}))
        events.subscribe(StatusTick, lambda e: self.learner_pace(e.message.get("learner_pace")))

    # -- what the processor reports --------------------------------------------------------------

    def learner_pace(self, pace: dict[str, Any] | None) -> None:
        for figure in ("learner_documents_per_s", "readers_documents_per_s", "every_to_keep_up"):
            if pace is not None:
                self.pace.labels(self.stream, figure).set(pace[figure])

    def document(self, outcome: DocumentOutcome) -> None:
        s = self.stream
        self.documents.labels(s).inc()
        self.tokens.labels(s).inc(outcome.tokens)
        self.latency.labels(s).observe(outcome.latency_ms / 1000.0)
        if outcome.loss is not None:
            self.loss.labels(s).observe(outcome.loss)
            if outcome.base_loss is not None:
                self.sampled_adapted.labels(s).observe(outcome.loss)
                self.sampled_base.labels(s).observe(outcome.base_loss)
        if outcome.delta_ratio >= 0:
            self.delta_ratio.labels(s).set(outcome.delta_ratio)
        if outcome.slow_delta_ratio >= 0:
            self.slow_delta_ratio.labels(s).set(outcome.slow_delta_ratio)

    def dead_letter(self, reason: str) -> None:
        self.dead_letters.labels(self.stream, reason_kind(reason)).inc()

    def checkpoint(self, version: str | None, reason: str, verdict: dict[str, Any] | None = None) -> None:
        if verdict is not None:
            self.verdicts.labels(self.stream, verdict["verdict"]).inc()
            for figure in ("gain_vs_base", "gain_vs_last_good", "forgetting"):
                if verdict.get(figure) is not None:
                    self.gate.labels(self.stream, figure).set(verdict[figure])
        if version is None:
            self.checkpoint_failures.labels(self.stream).inc()
            return
        self.checkpoints.labels(self.stream, reason).inc()
        self.checkpoint_version.labels(self.stream).set(float(version))
        self.last_checkpoint.labels(self.stream).set(time.time())

    def rollback(self, cause: str) -> None:
        self.rollbacks.labels(self.stream, cause).inc()

    def alert(self, rule: str) -> None:
        self.alerts.labels(self.stream, rule).inc()

    def progress(self, committed: dict[int, int], highwaters: dict[int, int | None], in_flight: int,
                 queued: int) -> None:
        s = self.stream
        for partition, offset in committed.items():
            self.committed.labels(s, str(partition)).set(offset)
        for partition, lag in partition_lag(committed, highwaters).items():
            self.lag.labels(s, str(partition)).set(lag)
        self.in_flight.labels(s).set(in_flight)
        self.queued.labels(s).set(queued)


def partition_lag(committed: dict[int, int], highwaters: dict[int, int | None]) -> dict[int, int]:
    """Records not yet finished per partition: high watermark - committable offset, for the
    partitions whose end is known (not before a partition's first fetch)."""
    return {p: max(0, highwaters[p] - o) for p, o in committed.items() if highwaters.get(p) is not None}
