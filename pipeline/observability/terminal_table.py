"""Tables that fit the terminal: the columns a reader needs are never cut; optional ones are
dropped, least needed first, until the table fits (an 80-column terminal, or a log that rich
sizes to 80). Cutting every column to "docume…" helps no one."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


@dataclass(frozen=True)
class TableColumn:
    name: str
    # 0: always shown, in full; higher: dropped earlier when the terminal is too narrow.
    drop_rank: int = 0
    justify: str = "left"


def fitting_table(console: Console, title: str, columns: list[TableColumn], rows: list[list[str]]) -> Table:
    """``rows`` (one string per column) as a table as wide as ``console``, or as wide as its
    essential columns need: those wrap nowhere."""
    shown = list(range(len(columns)))
    while True:
        table = Table(title=title)
        for i in shown:
            column = columns[i]
            table.add_column(column.name, justify=column.justify, no_wrap=column.drop_rank == 0,
                             overflow="fold")
        for row in rows:
            table.add_row(*(row[i] for i in shown))
        optional = [i for i in shown if columns[i].drop_rank > 0]
        # Its natural width: measured as if the terminal had no edge (rich shrinks to fit it).
        natural = Measurement.get(console, console.options.update_width(100_000), table).maximum
        if not optional or natural <= console.width:
            return table
        shown.remove(max(optional, key=lambda i: columns[i].drop_rank))
