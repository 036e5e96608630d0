"""StreamMetrics without a stream: what each report does to the series, the endpoint's refusal of
a taken port, and the Grafana dashboard asking only for series that exist."""

from __future__ import annotations

import json
import re
import socket
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from actors.call_types import DocumentOutcome
from pipeline.config import ControlConfig
from pipeline.observability.metrics import StreamMetrics
from tests.conftest import ROOT



def samples(metrics: StreamMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_reports_move_the_series():
    m = StreamMetrics("s1")
    m.document(DocumentOutcome("a", ok=True, tokens=100, loss=2.0, base_loss=2.5, latency_ms=40.0, delta_ratio=0.3))
    m.document(DocumentOutcome("b", ok=True, tokens=50, loss=3.0, latency_ms=60.0, delta_ratio=0.5,
                               slow_delta_ratio=0.01))
    m.dead_letter("bad JSON: Expecting value at line 1 column 1")
    m.dead_letter("bad JSON: Unterminated string at line 1 column 9")
    m.dead_letter("field 'id' must be a non-empty string, got ''")
    m.checkpoint("4", "periodic")
    m.checkpoint(None, "periodic")
    m.rollback("max_loss_jump")
    m.alert("max_loss_jump")
    m.progress({0: 10, 1: 7}, {0: 15, 1: None}, in_flight=2, queued=3)
    s = samples(m)
    one = (("stream", "s1"),)
    assert s[("ttt_stream_documents_total", one)] == 2
    assert s[("ttt_stream_tokens_total", one)] == 150
    assert s[("ttt_stream_document_loss_sum", one)] == 5.0 and s[("ttt_stream_document_loss_count", one)] == 2
    assert s[("ttt_stream_sampled_base_loss_sum", one)] == 2.5
    assert s[("ttt_stream_sampled_adapted_loss_count", one)] == 1  # only the document with a base loss
    assert s[("ttt_stream_delta_ratio", one)] == 0.5 and s[("ttt_stream_slow_delta_ratio", one)] == 0.01
    assert s[("ttt_stream_document_seconds_sum", one)] == pytest.approx(0.1)
    assert s[("ttt_stream_dead_letters_total", (("reason", "bad JSON"), ("stream", "s1")))] == 2  # one series per kind
    assert s[("ttt_stream_dead_letters_total", (("reason", "field 'id'"), ("stream", "s1")))] == 1
    assert s[("ttt_stream_checkpoints_total", (("reason", "periodic"), ("stream", "s1")))] == 1
    assert s[("ttt_stream_checkpoint_failures_total", one)] == 1
    assert s[("ttt_stream_checkpoint_version", one)] == 4
    assert s[("ttt_stream_last_checkpoint_timestamp_seconds", one)] > 1.7e9
    assert s[("ttt_stream_rollbacks_total", (("cause", "max_loss_jump"), ("stream", "s1")))] == 1
    assert s[("ttt_stream_degradation_alerts_total", (("rule", "max_loss_jump"), ("stream", "s1")))] == 1
    assert s[("ttt_stream_partition_lag", (("partition", "0"), ("stream", "s1")))] == 5
    assert ("ttt_stream_partition_lag", (("partition", "1"), ("stream", "s1"))) not in s  # end not known yet
    assert s[("ttt_stream_committed_offset", (("partition", "1"), ("stream", "s1")))] == 7
    assert s[("ttt_stream_in_flight", one)] == 2 and s[("ttt_stream_queued", one)] == 3


def test_the_endpoint_serves_and_a_taken_port_is_refused_with_the_field_named():
    m = StreamMetrics("s2")
    port = m.serve("127.0.0.1", 0)
    try:
        m.document(DocumentOutcome("a", ok=True, tokens=7, loss=1.0))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert 'ttt_stream_tokens_total{stream="s2"} 7.0' in response.read().decode()
        with pytest.raises(OSError, match="processor.metrics: cannot serve on 127.0.0.1:"):
            StreamMetrics("s3").serve("127.0.0.1", port)
    finally:
        m.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # closed with the run


def test_the_grafana_dashboard_asks_only_for_series_the_processor_serves():
    m = StreamMetrics("s")
    m.document(DocumentOutcome("a", ok=True, tokens=1, loss=1.0, base_loss=1.0, slow_delta_ratio=0.1))
    m.dead_letter("empty text")
    m.checkpoint(None, "periodic")
    m.checkpoint("1", "periodic", {"verdict": "promoted", "gain_vs_base": -0.05, "gain_vs_last_good": -0.01,
                                   "forgetting": 0.002})
    m.learning.labels("s", "admitted").inc()
    m.rollback("manual")
    m.alert("non_finite")
    m.progress({0: 1}, {0: 2}, 0, 0)
    served = {name for name, _ in samples(m)}
    dashboard = json.loads((ROOT / "infra" / "grafana" / "ttt-stream.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    asked = {name for e in exprs for name in re.findall(r"\bttt_stream_[a-z_]+", e)}
    assert len(exprs) >= 12 and asked
    assert asked <= served, asked - served


def test_reason_labels_stay_a_closed_set_whatever_the_records_say():
    """12,000 control records, each with an action of its own: each refusal quotes the record,
    and still the dead-letter series are one per kind."""
    from pipeline.stream_io.control import CommandVerifier, parse_command
    from pipeline.stream_io.messages import REASON_KINDS

    m = StreamMetrics("s1")
    verifier = CommandVerifier(b"k", ControlConfig(), "s1", "g")
    for i in range(12_000):
        m.dead_letter(parse_command(f'{{"action": "a{i}:{"x" * (i % 50)}"}}'.encode(), verifier))
    m.dead_letter("a reason nobody wrote down: " + "y" * 10_000)
    labels = {dict(labels)["reason"] for (name, labels) in samples(m) if name == "ttt_stream_dead_letters_total"}
    assert labels == {"unknown action", "other"} and labels <= set(REASON_KINDS) | {"other"}
