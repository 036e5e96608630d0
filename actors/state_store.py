"""Fast-weight states by scope: one shared state, or a bounded LRU of per-key states that spills
to disk (safetensors + sha256 sidecar) when it is full and reloads a key on demand, and forgets
keys past ``max_keys`` or unread for ``retention_documents`` documents."""

from __future__ import annotations

import ctypes
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load

from actors.call_types import Scope, StateBlob
from actors.state_upload import state_file_name
from ttt_model.adapted_state import AdaptedState
from ttt_model.model.state import StateIntegrityError, sidecar_path

log = logging.getLogger(__name__)

GLOBAL_KEY = "__global__"
# The state of documents without a key: not the empty key's (a tenant of its own). Tenant keys
# never hold control characters (pipeline.stream_io.messages.tenant_key), so no key is this one.
NO_KEY = "\x00no-key"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_states_to_the_os() -> bool:
    """Keep glibc's mmap threshold at 128 KiB in this process (whether it could).

    glibc raises the threshold to the size of each large block freed, up to 32 MiB, so after
    the first per-key state is freed the next ones (2.4 MB for the shipped model) come from the
    heap, whose freed space it does not give back: measured here, a reader's memory grew by about
    3 GB over 10,000 keys with 64 in memory. Fixed at 128 KiB, every state is its own mapping,
    returned when freed (flat, tests/actors/test_per_key_bounds.py)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator is not this one
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024))


@dataclass
class ScopedState:
    """One adapted state and how many documents it has absorbed (its version within a run)."""

    key: str
    state: AdaptedState
    documents: int = 0
    partition: int | None = None  # of the last document read with it
    last_read: int = 0  # the store's document count when it was last read with


class StateStore:
    """The states of one reader. ``get(key)`` returns the state a document must use.

    - ``global``: one state for every document (``key`` ignored).
    - ``per_key``: one state per key, at most ``capacity`` in memory; the least recently used is
      written to ``spill_dir`` and read back (hash verified) when its key comes again; its file is
      deleted then. At most ``max_keys`` keys are held in all: past that the least recently read
      spilled key is forgotten, as is one not read in the last ``retention_documents``
      documents (counted in documents, not seconds, so that a run restored from a checkpoint
      forgets exactly what a run without the restart did).
    - ``per_document``: one state, reset before every document.
    """

    def __init__(self, scope: Scope, new_state: Callable[[], AdaptedState], capacity: int, spill_dir: Path,
                 max_keys: int | None = None, retention_documents: int | None = None,
                 earlier_spill_dirs: tuple[Path, ...] = ()):
        """``earlier_spill_dirs``: folders this reader spilled to under another name (emptied
        too, with its own, at start)."""
        if scope not in ("global", "per_key", "per_document"):
            raise ValueError(f"unknown state scope {scope!r}")
        if max_keys is not None and max_keys < capacity:
            raise ValueError(f"max_keys {max_keys} is below the keys held in memory ({capacity})")
        self.scope = scope
        if scope == "per_key":
            return_freed_states_to_the_os()
        self._new_state = new_state
        self.capacity = capacity
        self.max_keys = max_keys
        self.retention_documents = retention_documents
        self.spill_dir = Path(spill_dir)
        self.earlier_spill_dirs = tuple(Path(d) for d in earlier_spill_dirs)
        self._live: OrderedDict[str, ScopedState] = OrderedDict()
        # key -> (sha256, documents, partition, last_read), least recently read first
        self._spilled: OrderedDict[str, tuple[str, int, int | None, int]] = OrderedDict()
        self._spilled_signatures: dict[str, torch.Tensor] = {}  # key -> its slow weights' signature
        if scope == "per_key":
            self._remove_earlier_spills()
        self.reads = 0  # documents read with a state of this store
        self.spills = 0
        self.reloads = 0
        self.expired = 0

    def get(self, key: str | None, partition: int | None = None) -> ScopedState:
        """The state to read a document of ``key`` from ``partition`` with (recorded on it)."""
        scoped = self._get(key)
        if partition is not None:
            scoped.partition = partition
        return scoped

    def _get(self, key: str | None) -> ScopedState:
        if self.scope != "per_key":
            scoped = self._live.get(GLOBAL_KEY)
            if scoped is None:
                scoped = self._live[GLOBAL_KEY] = ScopedState(GLOBAL_KEY, self._new_state())
            if self.scope == "per_document":
                scoped.state.reset()
            return scoped
        key = key if key is not None else NO_KEY
        self.reads += 1
        if key in self._live:
            self._live.move_to_end(key)
            scoped = self._live[key]
        else:
            scoped = self._reload(key) if key in self._spilled else ScopedState(key, self._new_state())
            self._live[key] = scoped
            while len(self._live) > self.capacity:
                self._spill(*self._live.popitem(last=False))
        scoped.last_read = self.reads
        self._expire()
        return scoped

    def _expire(self) -> None:
        while self._spilled:
            key, (_, _, _, last_read) = next(iter(self._spilled.items()))
            over = self.max_keys is not None and len(self) > self.max_keys
            stale = self.retention_documents is not None and self.reads - last_read > self.retention_documents
            if not (over or stale):
                return
            self.forget(key)
            self.expired += 1

    def forget(self, key: str) -> bool:
        """Drop ``key``'s state, in memory or spilled (its file deleted); whether it was held."""
        held = self._live.pop(key, None) is not None
        if key in self._spilled:
            del self._spilled[key]
            self._spilled_signatures.pop(key, None)
            held = True
        self._delete_spill_file(key)  # also one an earlier incarnation left, unknown to this one
        return held

    def __contains__(self, key: str | None) -> bool:
        key = key if key is not None else NO_KEY
        return key in self._live or key in self._spilled

    def peek(self, key: str) -> AdaptedState:
        """The state of ``key`` (read back from its spill file if spilled), without touching the
        LRU order: for reading it, not adapting it."""
        if key in self._live:
            return self._live[key].state
        state = self._new_state()
        state.load(self._path(key), expected_sha256=self._spilled[key][0])
        return state

    def signatures(self) -> dict[str, torch.Tensor]:
        """Every key's slow-weight signature (the embedding of its first document), where it has one."""
        live = {k: s.state.slow.signature for k, s in self._live.items()
                if s.state.slow is not None and s.state.slow.signature is not None}
        return {**self._spilled_signatures, **live}

    def snapshot(self) -> list[StateBlob]:
        """Every state, in memory or spilled (read back and hash-checked), as bytes."""
        return list(self.iter_snapshot())

    def iter_snapshot(self) -> Iterator[StateBlob]:
        """``snapshot`` one state at a time, in the order of the keys: a checkpoint of many
        spilled keys never holds more than one of them as bytes."""
        for key in sorted([*self._live, *self._spilled]):
            if key in self._live:
                scoped = self._live[key]
                data = scoped.state.to_bytes()
                yield StateBlob(key, data, hashlib.sha256(data).hexdigest(), scoped.documents, scoped.partition,
                                scoped.last_read)
                continue
            digest, documents, partition, last_read = self._spilled[key]
            data = self._path(key).read_bytes()
            got = hashlib.sha256(data).hexdigest()
            if got != digest:
                raise StateIntegrityError(f"spilled state of key {key!r}: sha256 {got} != recorded {digest}")
            yield StateBlob(key, data, digest, documents, partition, last_read)

    def restore(self, blobs: list[StateBlob]) -> None:
        """Replace every state with ``blobs`` (hash-checked first: on a mismatch nothing changes)."""
        for blob in blobs:
            got = hashlib.sha256(blob.data).hexdigest()
            if got != blob.sha256:
                raise StateIntegrityError(f"state of key {blob.key!r}: sha256 {got} != recorded {blob.sha256}")
        restored: OrderedDict[str, ScopedState] = OrderedDict()
        for blob in sorted(blobs, key=lambda b: b.last_read):  # least recently read first, as the LRU had them
            state = self._new_state()
            state.load_state_dict(load(blob.data))
            restored[blob.key] = ScopedState(blob.key, state, blob.documents, blob.partition, blob.last_read)
        for key in list(self._spilled):  # what was spilled before goes with its files
            self.forget(key)
        self._live, self._spilled_signatures = restored, {}
        self.reads = max((b.last_read for b in blobs), default=0)
        while len(self._live) > self.capacity:
            self._spill(*self._live.popitem(last=False))

    def __len__(self) -> int:
        return len(self._live) + len(self._spilled)

    @property
    def in_memory(self) -> int:
        return len(self._live)

    def _path(self, key: str) -> Path:
        return self.spill_dir / state_file_name(key)

    def _remove_earlier_spills(self) -> None:
        """Spill files of an earlier incarnation of this reader (it died, or had another name; its
        states come back from a checkpoint): nothing indexes them, so they would outlive a forget."""
        folders = [f for f in {self.spill_dir, *self.earlier_spill_dirs} if f.is_dir()]
        stale = [p for f in folders for p in f.iterdir() if p.is_file() and ".safetensors" in p.name]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.info("removed %d spill files of an earlier incarnation from %s", len(stale), sorted(map(str, folders)))

    def _delete_spill_file(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        sidecar_path(path).unlink(missing_ok=True)

    def _spill(self, key: str, scoped: ScopedState) -> None:
        digest = scoped.state.save(self._path(key), metadata={"key": key, "documents": str(scoped.documents)})
        self._spilled[key] = (digest, scoped.documents, scoped.partition, scoped.last_read)
        if scoped.state.slow is not None and scoped.state.slow.signature is not None:
            self._spilled_signatures[key] = scoped.state.slow.signature
        self.spills += 1
        log.debug("spilled state of key %r (%s)", key, digest[:12])

    def _reload(self, key: str) -> ScopedState:
        digest, documents, partition, last_read = self._spilled.pop(key)
        self._spilled_signatures.pop(key, None)
        state = self._new_state()
        state.load(self._path(key), expected_sha256=digest)
        self._delete_spill_file(key)  # in memory again: a later spill writes it anew
        self.reloads += 1
        return ScopedState(key, state, documents, partition, last_read)
