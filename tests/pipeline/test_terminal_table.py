"""CLI tables in an 80-column terminal: the columns a reader needs are shown uncut, optional ones
give way (least needed first)."""

import time

from rich.console import Console

from pipeline.observability.terminal_table import TableColumn, fitting_table
from tests.pipeline.test_status_view import status_output

VERSIONS = [TableColumn("version"), TableColumn("aliases"), TableColumn("reason"), TableColumn("parent", 2),
            TableColumn("documents", justify="right"), TableColumn("loss", justify="right"),
            TableColumn("offsets", 3), TableColumn("created", 1)]
ROW = ["12", "last-good,live", "rollback to v9 (loss_jump)", "11", "1200", "3.7802",
       '{"0": 5012, "1": 4990, "2": 5003, "3": 5001}', "2026-12-03 15:04:05"]


def rendered(width: int, columns=VERSIONS, rows=(ROW,)) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(fitting_table(console, "s-ttt (http://127.0.0.1:5000)", columns, [list(r) for r in rows]))
    return console.export_text()


def test_in_80_columns_the_needed_columns_are_uncut_and_the_optional_ones_give_way():
    out = rendered(80)
    assert max(len(line) for line in out.splitlines()) <= 80
    for cell in ("12", "last-good,live", "rollback to v9 (loss_jump)", "1200", "3.7802", "documents", "version",
                 "aliases", "reason", "loss"):
        assert cell in out, out
    assert "…" not in out and "offsets" not in out  # the widest optional column went first
    wide = rendered(200)
    assert '{"0": 5012, "1": 4990, "2": 5003, "3": 5001}' in wide and "created" in wide and "parent" in wide


def test_the_readers_table_fits_80_columns():
    report = {"stream": "s", "time": time.time(), "final": False, "documents": 12, "dead_letters": 0,
              "tokens_per_s": 100.0, "in_flight": 1, "queued": 0,
              "readers": [{"reader": "prod-stream-reader-0", "alive": True, "restarted": False, "partitions": [0, 1, 2],
                           "documents": 1200, "tokens": 4_800_000, "parallel_windows": 5, "device": "cuda:0",
                           "node_id": "f3a9c2d1e0b4", "node_ip": "10.0.0.7"}]}
    out = status_output(report, width=80)
    assert "prod-stream-reader-0" in out and "0,1,2" in out and "1200" in out and "…" not in out, out
