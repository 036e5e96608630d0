"""Which offsets may be committed: per partition, everything below the oldest unfinished record."""

from __future__ import annotations


class OffsetTracker:
    def __init__(self, start: dict[int, int] | None = None) -> None:
        self._open: dict[int, set[int]] = {}
        self._next: dict[int, int] = dict(start or {})  # partition -> one past the highest offset seen

    def started(self, partition: int, offset: int) -> None:
        self._open.setdefault(partition, set()).add(offset)
        self._next[partition] = max(self._next.get(partition, 0), offset + 1)

    def finished(self, partition: int, offset: int) -> None:
        self._open[partition].remove(offset)

    def committable(self) -> dict[int, int]:
        """Partition -> the next offset to read after a restart that loses nothing."""
        return {p: min(self._open[p]) if self._open.get(p) else nxt for p, nxt in self._next.items()}

    @property
    def open(self) -> int:
        return sum(len(s) for s in self._open.values())

    def rewind(self, partition: int, offset: int) -> None:
        """The partition will be read again from ``offset``: forget what was open beyond it."""
        self._open[partition] = set()
        self._next[partition] = offset
