"""ModelThread: runs every torch call of one model replica on one thread of its own.

A Ray actor with concurrency groups runs its methods on the groups' threads, not on the thread
that built the model. On CPU that costs a third of the throughput: each thread that starts an
OpenMP parallel region gets its own OpenMP team, and once libgomp manages more threads than there
are cores it stops spinning between regions (throttled wait), so every one of the thousands of
small regions per document waits on a futex wake-up. Measured on 2 cores, the same 2k-token
documents with slow weights: 5.8 s on the thread that built the model, 8.2 s once a second thread
had run any of them (bench/stream.py: the actor +34% over the same reader in-process). One thread
for building, reading, snapshots and restores keeps one team and also keeps the CUDA current
device and stream, which are per thread, the same for every call.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ModelThread:
    """``call(fn, *args)`` runs ``fn`` on this object's single thread and returns its result (or
    raises its exception) in the caller's thread. Calls from several threads run one at a time,
    in the order they arrive."""

    def __init__(self, name: str = "model"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._executor.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
