"""Which worker reads which partition of the documents topic."""

from __future__ import annotations


def assign_partitions(partitions: list[int], workers: int) -> dict[int, int]:
    """Partition -> worker index, round robin over the sorted partitions (stable across runs,
    so a restart gives every worker the partitions, and hence the state, it had)."""
    if workers < 1:
        raise ValueError("need at least one worker")
    return {p: i % workers for i, p in enumerate(sorted(partitions))}
