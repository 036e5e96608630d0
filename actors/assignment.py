"""Which reader reads which partition of the documents topic."""

from __future__ import annotations


def assign_partitions(partitions: list[int], readers: int) -> dict[int, int]:
    """Partition -> reader index, round robin over the sorted partitions (stable across runs,
    so a restart gives every reader the partitions, and hence the state, it had)."""
    if readers < 1:
        raise ValueError("need at least one reader")
    return {p: i % readers for i, p in enumerate(sorted(partitions))}
