"""What `ttt-stream status` prints from a status report (the report itself is tested end to end)."""

import time

from pipeline import cli


def status_output(report: dict, width: int) -> str:
    """What `ttt-stream status` prints for ``report`` in a terminal ``width`` columns wide."""
    saved, cli.console.width = cli.console.width, width
    try:
        with cli.console.capture() as captured:
            cli._print_stream_status({"last_report": report, "partitions": []})
    finally:
        cli.console.width = saved
    return captured.get()


def test_status_shows_readers_and_the_context_parallel_group():
    report = {
        "stream": "s", "time": time.time(), "final": False, "documents": 12, "dead_letters": 0,
        "tokens_per_s": 100.0, "in_flight": 1, "queued": 0,
        "readers": [{"reader": "s-reader-0", "alive": True, "partitions": [0, 1], "documents": 12,
                     "tokens": 9000, "parallel_windows": 5, "device": "cpu",
                     "node_id": "f3a9c2d1e0b4", "node_ip": "10.0.0.7"}],
        "context_parallel": {"world": 2, "reads": 5, "failures": 1, "formed": True},
    }
    out = status_output(report, width=200)  # a wide terminal: no wrapped cells
    assert "s-reader-0" in out and "context-parallel group: 2 members, 5 reads, 1 failures" in out
    assert "parallel" in out and " 5 " in out
    assert "10.0.0.7 (f3a9c2d1)" in out  # the node each reader runs on
