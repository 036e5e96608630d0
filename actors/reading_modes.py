"""Reading modes: how a reader reads a document and what it keeps from one to the next. One is
chosen when the reader is built (``choose_mode``); each owns its states, its read and batch read,
snapshot / restore / forget, and its outcome figures.

- ``FastWeights``: In-Place TTT alone. Scope ``per_document``: the fast weights start from zero
  at every document; ``global`` and ``per_key``: they are the scope's state and carry over.
- ``BatchedFastWeights``: the same, documents of one window read together in one forward
  (``per_document`` and ``per_key`` with the in-place objective).
- ``SelfLearning``: fast weights fresh at every document on the scope's slow weights, which take
  a step on each chunk after it was scored (the synchronous slow step). The learner's own mode.
- ``ReadingVersions``: fast weights fresh at every document on a learner's published version of
  the slow weights; nothing outlives a document, and what was computed below the adapters may be
  handed on to the learner.

Context parallelism wraps the window reader of ``FastWeights`` and ``ReadingVersions``: windows
long enough go to a context-parallel group (``actors.window_readers.ContextParallelReader``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from actors.call_types import DocumentOutcome, DocumentTask, HandedStates, StateBlob, text_sha256
from actors.reader_names import name_before_the_rename
from actors.state_store import ScopedState, StateStore
from actors.state_upload import StateUploader
from actors.window_readers import ContextParallelReader, FastReader, LongDocumentReader, SlowStepReader, WindowReader
from ttt_model.adapted_state import AdaptedState
from ttt_model.factory import load_rehearsal
from ttt_model.model.forward_call import ttt_forward
from ttt_model.model.lower_layers import capture_inputs
from ttt_model.model.patch import static_mode, ttt_config_of
from ttt_model.slow import SlowState, SlowVersion
from ttt_model.model.state import FastWeightState, ttt_layers
from ttt_model.model.token_nll import token_nll

if TYPE_CHECKING:
    from actors.document_reader import DocumentReader

log = logging.getLogger(__name__)

# Documents read and not yet asked for what they hand on (``ReadingVersions.take_handed``).
MAX_HANDED_DOCUMENTS = 64
# The most a reader hands on to the learner for one document (hidden states below the adapters):
# a longer document's go through no object store, the learner computes them itself.
MAX_HANDED_BYTES = 64 * 2**20

# (task, its token ids or None: tokenize it) -> its outcome, or what reading it raised
ReadOne = Callable[[DocumentTask, "list[int] | None"], Any]


def sampled(task: DocumentTask, rate: float) -> bool:
    """Whether a document gets the base-model shadow evaluation: as the stream's driver decided
    (a keyed hash of the record's position), else a stable hash of its id; replays and restarts
    sample the same documents either way."""
    if task.shadow is not None:
        return task.shadow
    if rate <= 0.0:
        return False
    bucket = int.from_bytes(hashlib.sha256(task.id.encode()).digest()[:8], "big") / 2**64
    return bucket < rate


class ReadingMode:
    """A document at a time: the scope's state, its windows through ``window_reader``, the
    figures of the outcome. Subclasses say what a state is, how its windows are read and what
    becomes of it after the document."""

    def __init__(self, host: DocumentReader, scope: str, shadow_rate: float):
        spec = host.spec
        self.host = host
        self.name = host.name
        self.model = host.model
        self.slow = host.slow
        self.device = host.device
        self.max_tokens = spec.max_document_tokens
        self.oversize = spec.oversize
        self.shadow_rate = shadow_rate
        weight = next(self.model.parameters())
        # What a hand-off is computed in (only from the same kind of device and dtype is one taken),
        # and its size per token.
        self.dtype_name = str(weight.dtype).removeprefix("torch.")
        self.hidden_bytes = self.model.config.hidden_size * weight.element_size()
        spill = Path(spec.spill_dir)
        self.states = StateStore(scope, self.new_state, spec.max_keys_in_memory, spill / host.name,
                                 spec.max_keys, spec.key_retention_documents,
                                 earlier_spill_dirs=(spill / name_before_the_rename(host.name),))
        self.uploader = StateUploader(host.name)
        self.window_reader = self._window_reader()
        self.documents = 0
        self.tokens = 0
        self.busy_s = 0.0
        if scope == "per_key":
            size = len(self.new_state().to_bytes())
            log.info("%s: per_key states of %.1f MB, up to %d in memory, %d in all (spill directory up to %.1f GB)",
                     self.name, size / 1e6, spec.max_keys_in_memory, spec.max_keys, spec.max_keys * size / 1e9)

    # -- what a subclass says --------------------------------------------------------------------

    def new_state(self) -> AdaptedState:
        """A state equal to the base model, for a new scope key."""
        return AdaptedState(FastWeightState.for_model(self.model), None)

    def _window_reader(self) -> WindowReader:
        raise NotImplementedError

    def _read_windows(self, task: DocumentTask, scoped: ScopedState, windows: list[torch.Tensor],
                      ids: list[int], below: HandedStates | None) -> torch.Tensor:
        return self.window_reader.read(scoped.state, windows)

    def _after_document(self, scoped: ScopedState) -> float:
        """Leave the state as the scope's next document must find it; the slow delta ratio."""
        return 0.0

    def _state_for(self, task: DocumentTask, ids: torch.Tensor) -> tuple[ScopedState, str | None]:
        """The scope's state for a document, and the key whose state a new key started from."""
        return self.states.get(task.key, task.partition), None

    # -- reading ---------------------------------------------------------------------------------

    def read(self, task: DocumentTask, ids: list[int], start: float, version: SlowVersion | None = None,
             below: HandedStates | None = None) -> DocumentOutcome:
        """Read one document (``version``: only ``ReadingVersions`` reads with one; ``below``: what
        a reader handed on, only the learner's ``SelfLearning`` takes it)."""
        if len(ids) > self.max_tokens and self.oversize == "reject":
            return DocumentOutcome(task.id, ok=False, tokens=len(ids), reader=self.name,
                                   reason=f"oversize: {len(ids)} tokens > max_document_tokens {self.max_tokens}")
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
        scoped, reused_from = self._state_for(task, tokens)
        windows = [tokens[:, i : i + self.max_tokens] for i in range(0, tokens.shape[1], self.max_tokens)]
        adapted = self._read_windows(task, scoped, windows, ids, below)
        base = self._base_nll(windows) if sampled(task, self.shadow_rate) else None
        scoped.documents += 1
        fast = scoped.state.fast
        # One transfer from the device for both figures (each float() would wait for the device).
        norms = torch.stack([n.double() for n in fast.norms().values()])
        ratios = torch.stack([r.double() for r in fast.delta_ratios(self.model).values()])
        norm, ratio = torch.stack([norms.square().sum().sqrt(), ratios.max()]).tolist()
        slow_ratio = self._after_document(scoped)
        self.documents += 1
        self.tokens += tokens.shape[1]
        elapsed = time.perf_counter() - start
        self.busy_s += elapsed
        loss = _mean(adapted)
        return DocumentOutcome(
            task.id, ok=True, tokens=tokens.shape[1], loss=_finite_or_none(loss),
            base_loss=_finite_or_none(_mean(base)) if base is not None else None,
            finite=math.isfinite(loss if loss is not None else 0.0) and math.isfinite(norm) and math.isfinite(slow_ratio),
            latency_ms=1000.0 * elapsed, state_key=scoped.key, state_documents=scoped.documents,
            fast_weight_norm=_or_minus_one(norm), delta_ratio=_or_minus_one(ratio),
            slow_delta_ratio=_or_minus_one(slow_ratio), windows=len(windows), reader=self.name,
            reused_from=reused_from,
        )

    def read_batch(self, tasks: list[DocumentTask], read_one: ReadOne,
                   prepare: Callable[[DocumentTask], None] | None) -> list[Any]:
        """One at a time, the next document tokenized in another thread meanwhile (``prepare``)."""
        outcomes = []
        for i, task in enumerate(tasks):
            ahead = None
            if i + 1 < len(tasks) and prepare is not None:
                ahead = threading.Thread(target=prepare, args=(tasks[i + 1],))
                ahead.start()
            try:
                outcomes.append(read_one(task, None))
            finally:
                if ahead is not None:
                    ahead.join()
        return outcomes

    def take_handed(self, task_id: str) -> HandedStates | None:
        """What reading ``task_id`` computed for the learner below its adapters (once); None here."""
        return None

    @torch.no_grad()
    def _base_nll(self, windows: list[torch.Tensor]) -> torch.Tensor:
        nll = []
        with self.slow.disabled() if self.slow is not None else nullcontext(), static_mode(self.model):
            for window in windows:
                nll.append(token_nll(self.model(input_ids=window).logits[0, :-1], window[0, 1:]))
        return torch.cat(nll)

    # -- states ----------------------------------------------------------------------------------

    def iter_snapshot(self) -> Iterator[StateBlob]:
        return self.states.iter_snapshot()

    def restore(self, blobs: list[StateBlob]) -> None:
        self.states.restore(blobs)
        # What was uploaded before may belong to versions since pruned: the next checkpoint
        # writes every state again rather than name a file that may be gone.
        self.uploader = StateUploader(self.name)

    def forget(self, key: str) -> bool:
        """Drop ``key``'s per_key state, in memory or spilled; whether one was held."""
        self.uploader.forget(key)
        return self.states.scope == "per_key" and self.states.forget(key)

    def stats(self) -> dict[str, Any]:
        return {"documents": self.documents, "tokens": self.tokens, "busy_s": self.busy_s, "states": len(self.states),
                "states_in_memory": self.states.in_memory, "spills": self.states.spills,
                "reloads": self.states.reloads, "expired_keys": self.states.expired,
                "parallel_windows": self.window_reader.parallel_windows, "batches": 0, "batched_documents": 0}


class FastWeights(ReadingMode):
    """In-Place TTT alone: the fast weights are the scope's state (``per_document``: reset before
    every document; ``global`` and ``per_key``: carried, the unfinished last chunk learned at the
    document's end)."""

    def __init__(self, host: DocumentReader, long_reader: LongDocumentReader | None = None):
        self.long_reader = long_reader
        super().__init__(host, host.spec.scope, host.spec.base_loss_sample_rate)

    def _window_reader(self) -> WindowReader:
        fast = FastReader(self.model, carries_over=self.states.scope != "per_document")
        if self.long_reader is None:
            return fast
        return ContextParallelReader(fast, self.long_reader, self.host.spec.context_parallel_min_tokens, lambda: None)


class BatchedFastWeights(FastWeights):
    """``FastWeights`` whose documents of one window are read together, up to
    ``spec.batch_tokens`` padded tokens per forward, each batch row with the fast weights of its
    own scope (per_key: a key's second document starts a new batch, after its first)."""

    def __init__(self, host: DocumentReader):
        super().__init__(host)
        self.batch_tokens = host.spec.batch_tokens
        self.max_rows = host.spec.max_keys_in_memory
        self.batches = 0  # forwards that read several documents
        self.batched_documents = 0

    def read_batch(self, tasks: list[DocumentTask], read_one: ReadOne,
                   prepare: Callable[[DocumentTask], None] | None) -> list[Any]:
        outcomes: list[Any] = [None] * len(tasks)
        group: list[tuple[int, DocumentTask, list[int]]] = []
        per_key = self.states.scope == "per_key"

        def read_group() -> None:
            if not group:
                return
            if len(group) == 1:  # nothing to share a forward with: the one-document path
                outcomes[group[0][0]] = read_one(group[0][1], group[0][2])
                group.clear()
                return
            try:
                read = self._read_rows([(t, ids) for _, t, ids in group])
            except Exception:  # noqa: BLE001 - e.g. out of memory: each alone, as one at a time would
                log.warning("%s: a batch of %d documents failed; reading them one at a time", self.name, len(group),
                            exc_info=True)
                read = [read_one(t, ids) for _, t, ids in group]
            for (i, _, _), outcome in zip(group, read):
                outcomes[i] = outcome
            group.clear()

        for i, task in enumerate(tasks):
            ids = self.host.tokens_of(task)
            if len(ids) > self.max_tokens or len(ids) < 2:
                read_group()
                outcomes[i] = read_one(task, ids)  # oversize or too short: the one-document path decides
                continue
            padded = max([len(ids)] + [len(g[2]) for g in group])
            if group and ((len(group) + 1) * padded > self.batch_tokens or len(group) >= self.max_rows
                          or (per_key and task.key in {g[1].key for g in group})):
                read_group()
            group.append((i, task, ids))
        read_group()
        return outcomes

    @torch.no_grad()
    def _read_rows(self, items: list[tuple[DocumentTask, list[int]]]) -> list[DocumentOutcome]:
        """Documents of one window each (per_key: of different keys) in one forward.

        Rows are right-padded to the longest: a token never attends to later ones, and only the
        updates of its row's earlier chunks reach it, so padding changes no real token's output.
        ``update_lengths`` keeps the padding out of the fast weights: with per_document also each
        row's unfinished last chunk, as ``read`` does for that scope; with per_key that chunk is
        learned zero-padded, exactly what ``end_document`` does (the batch's unfinished last chunk
        by ``flush_tail``, which pads it with zeros). Padding to the longest rather than to a
        whole chunk: eight documents of 2,050 tokens and a chunk of 1,024 are 2,050 columns, not
        3,072.
        """
        start = time.perf_counter()
        C = ttt_config_of(self.model).chunk_size
        lengths = [len(ids) for _, ids in items]
        B, L = len(items), max(lengths)
        pad = self.host.tokenizer.pad_token_id if self.host.tokenizer.pad_token_id is not None else 0
        ids = torch.full((B, L), pad, dtype=torch.long)
        for b, (_, row) in enumerate(items):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        ids = ids.to(self.device)
        n = torch.tensor(lengths, device=self.device)
        per_key = self.states.scope == "per_key"
        scopes = [self.states.get(task.key, task.partition) for task, _ in items] if per_key else []
        if any(layer.tail_len for s in scopes for _, layer in s.state.fast):
            raise RuntimeError("a per_key state with an unfinished chunk cannot start a batch row")
        state = FastWeightState.for_model(self.model, batch_size=B)
        for idx, layer in state:  # each row starts from its scope's fast weights
            for b, scoped in enumerate(scopes):
                layer.delta[b] = scoped.state.fast.layers[idx].delta[0]
        with ttt_forward(state=state, update_lengths=n if per_key else (n // C) * C):
            logits = self.model(input_ids=ids, use_cache=False).logits
        if per_key:
            for idx, mlp in ttt_layers(self.model).items():
                mlp.flush_tail(state.layers[idx])
        scored = torch.arange(L - 1, device=self.device) < (n - 1)[:, None]  # predicting tokens 1..len-1
        adapted = (token_nll(logits[:, :-1], ids[:, 1:]).double() * scored).sum(1) / (n - 1)
        del logits
        sample = [b for b, (task, _) in enumerate(items) if sampled(task, self.shadow_rate)]
        base = torch.full((B,), float("nan"), dtype=torch.float64, device=self.device)
        if sample:
            rows = torch.tensor(sample, device=self.device)
            with static_mode(self.model):
                static = self.model(input_ids=ids[rows], use_cache=False).logits
            base[rows] = (token_nll(static[:, :-1], ids[rows, 1:]).double() * scored[rows]).sum(1) / (n[rows] - 1)
        norms = torch.stack([v.double() for v in state.norms().values()])  # (layers, B)
        ratios = torch.stack([v.double() for v in state.delta_ratios(self.model).values()])
        figures = torch.stack([adapted, base, norms.square().sum(0).sqrt(), ratios.amax(0)]).tolist()  # one transfer
        if per_key:  # every key's state after its document, as end_document leaves it
            for b, scoped in enumerate(scopes):
                scoped.documents += 1
                for idx, layer in scoped.state.fast:
                    layer.delta = state.layers[idx].delta[b : b + 1].clone()
                    layer.tokens_seen += lengths[b]
                    layer.updates += -(-lengths[b] // C)
        else:  # as after reading them one at a time: the scope's state is the last document's
            scoped = None
            for task, _ in items:
                scoped = self.states.get(None, task.partition)
                scoped.documents += 1
            for idx, layer in scoped.state.fast:
                layer.delta.copy_(state.layers[idx].delta[-1:])
            scopes = [scoped] * B
        elapsed = time.perf_counter() - start
        self.batches += 1
        self.batched_documents += B
        self.documents += B
        self.tokens += sum(lengths)
        self.busy_s += elapsed
        outcomes = []
        for b, (task, _) in enumerate(items):
            loss, base_loss, norm, ratio = (figures[k][b] for k in range(4))
            outcomes.append(DocumentOutcome(
                task.id, ok=True, tokens=lengths[b], loss=_finite_or_none(loss),
                base_loss=_finite_or_none(base_loss) if b in sample else None,
                finite=math.isfinite(loss) and math.isfinite(norm),
                # Its share of the batch's time, by tokens (so that the shares add up to it).
                latency_ms=1000.0 * elapsed * lengths[b] / sum(lengths), state_key=scopes[b].key,
                state_documents=scopes[b].documents if per_key else scopes[b].documents - (B - 1 - b),
                fast_weight_norm=_or_minus_one(norm), delta_ratio=_or_minus_one(ratio), windows=1, reader=self.name,
            ))
        return outcomes

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "batches": self.batches, "batched_documents": self.batched_documents}


class SlowWeightsMode(ReadingMode):
    """Fast weights fresh at every document, on slow weights: reset before the document (even
    after one that raised) and after it."""

    def _read_windows(self, task: DocumentTask, scoped: ScopedState, windows: list[torch.Tensor],
                      ids: list[int], below: HandedStates | None) -> torch.Tensor:
        scoped.state.fast.reset()
        return self._read_fresh(task, scoped, windows, ids, below)

    def _read_fresh(self, task: DocumentTask, scoped: ScopedState, windows: list[torch.Tensor],
                    ids: list[int], below: HandedStates | None) -> torch.Tensor:
        return self.window_reader.read(scoped.state, windows)

    def _after_document(self, scoped: ScopedState) -> float:
        scoped.state.fast.reset()  # the fast weights live for one document
        return self.slow.delta_ratio(scoped.state.slow) if scoped.state.slow is not None else 0.0


class SelfLearning(SlowWeightsMode):
    """Reads each document and learns the scope's slow weights from it in the same forward (the
    synchronous slow step). ``split``: the layers below the lowest adapted one run apart, or not
    at all where a reader handed on what it computed there (the learner's own mode)."""

    def __init__(self, host: DocumentReader, scope: str, shadow_rate: float, split: bool = False):
        self.split = split
        super().__init__(host, scope, shadow_rate)
        load_rehearsal(self.slow, host.tokenizer)
        self.reuse_nearest_key = host.slow_config.reuse_nearest_key and scope == "per_key"
        self.reuse_min_similarity = host.slow_config.reuse_min_similarity

    def new_state(self) -> AdaptedState:
        return AdaptedState(FastWeightState.for_model(self.model), self.slow.new_state())

    def _window_reader(self) -> WindowReader:
        chunk_tokens = self.host.slow_config.chunk_tokens or self.max_tokens  # else one step per window
        return SlowStepReader(self.model, self.slow, chunk_tokens, split=self.split)

    def _read_fresh(self, task: DocumentTask, scoped: ScopedState, windows: list[torch.Tensor],
                    ids: list[int], below: HandedStates | None) -> torch.Tensor:
        if below is not None and (below.device_type, below.dtype) == (self.device.type, self.dtype_name) \
                and below.tokens_sha256 == _tokens_sha256(ids):
            return self.window_reader.read(scoped.state, windows, below.windows)
        return self.window_reader.read(scoped.state, windows)  # else computed here: the same bits

    def _state_for(self, task: DocumentTask, ids: torch.Tensor) -> tuple[ScopedState, str | None]:
        """A new key starts from the slow weights of the most similar key held
        (``slow.reuse_nearest_key``); that key is returned with the state."""
        key = task.key
        if not self.reuse_nearest_key or key in self.states:
            return self.states.get(key, task.partition), None
        signature = self.slow.signature(ids[:, : ttt_config_of(self.model).chunk_size])
        nearest = self.slow.nearest(signature, self.states.signatures())
        source = self.states.peek(nearest[0]).slow if nearest and nearest[1] >= self.reuse_min_similarity else None
        scoped = self.states.get(key, task.partition)
        if source is not None:
            scoped.state.slow.copy_from(source)
            log.info("%s: new key %r starts from the slow weights of %r (similarity %.3f)", self.name, key, *nearest)
        scoped.state.slow.signature = signature
        return scoped, nearest[0] if source is not None else None

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "handed": self.window_reader.handed}


class ReadingVersions(SlowWeightsMode):
    """Reads with a learner's published version of the slow weights (``spec.slow_from_learner``)
    and keeps nothing between documents. ``spec.split_at_adapters``: keeps what it computed below
    the lowest adapted layer for the learner (``take_handed``)."""

    def __init__(self, host: DocumentReader, long_reader: LongDocumentReader | None = None):
        self.long_reader = long_reader
        # The version bound last, on the device, and its delta ratio (kept while documents read it).
        self._version: tuple[SlowVersion, SlowState, float] | None = None
        super().__init__(host, host.spec.scope, host.spec.base_loss_sample_rate)
        self.hands_on = host.spec.split_at_adapters
        # Per document read, what it hands on and (on a GPU) when its copy to the host is done.
        self.handed: OrderedDict[str, tuple[HandedStates, torch.cuda.Event | None]] = OrderedDict()
        self._copy_stream: torch.cuda.Stream | None = None

    def _window_reader(self) -> WindowReader:
        fast = FastReader(self.model, carries_over=False)
        if self.long_reader is None:
            return fast
        return ContextParallelReader(fast, self.long_reader, self.host.spec.context_parallel_min_tokens,
                                     lambda: self._version[0])

    def read(self, task: DocumentTask, ids: list[int], start: float, version: SlowVersion | None = None,
             below: HandedStates | None = None) -> DocumentOutcome:
        if version is None:
            raise ValueError(f"{self.name}: reads with the learner's slow weights, and no version was given")
        with self.slow.bound(self._bind(version)):
            outcome = super().read(task, ids, start)
        outcome.slow_delta_ratio = self._version[2]
        outcome.slow_version = version.index
        return outcome

    def _bind(self, version: SlowVersion) -> SlowState:
        """``version`` as a state on the device (kept while the next documents read the same)."""
        if self._version is None or self._version[0].index != version.index:
            state = self.slow.state_of(version)
            self._version = (version, state, self.slow.delta_ratio(state))
        return self._version[1]

    def _read_fresh(self, task: DocumentTask, scoped: ScopedState, windows: list[torch.Tensor],
                    ids: list[int], below: HandedStates | None) -> torch.Tensor:
        if not self.hands_on or len(ids) * self.hidden_bytes > MAX_HANDED_BYTES:
            return self.window_reader.read(scoped.state, windows)
        with capture_inputs(self.model, self.slow.lowest_layer) as captured:
            adapted = self.window_reader.read(scoped.state, windows)
        if len(captured) == len(windows):  # else a window went to a context-parallel group
            tokens = torch.as_tensor(ids, dtype=torch.int64)
            states = HandedStates(_tokens_sha256(tokens), self._to_host(captured), self.device.type, self.dtype_name,
                                  ids=tokens, text_sha256=text_sha256(task.text),
                                  tokenizer_sha256=self.host.tokenizer_sha256)
            self.handed[task.id] = (states, self._copied())
            while len(self.handed) > MAX_HANDED_DOCUMENTS:  # read, then never taken
                self.handed.popitem(last=False)
        return adapted

    def _to_host(self, captured: list[torch.Tensor]) -> list[torch.Tensor]:
        """The captured states on the CPU. On a GPU, copied on a stream of their own into pinned
        memory, while the next document is read: a copy that waited for the device here would
        cost the reader what the hand-off saves the learner (``take_handed`` waits for it)."""
        if self.device.type != "cuda":
            return [c.cpu() for c in captured]
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        host = []
        with torch.cuda.stream(self._copy_stream):
            for c in captured:
                host.append(torch.empty(c.shape, dtype=c.dtype, pin_memory=True).copy_(c, non_blocking=True))
                c.record_stream(self._copy_stream)  # not reused by the reader before the copy is done
        return host

    def _copied(self) -> torch.cuda.Event | None:
        if self._copy_stream is None:
            return None
        done = torch.cuda.Event()
        done.record(self._copy_stream)
        return done

    def take_handed(self, task_id: str) -> HandedStates | None:
        """What reading ``task_id`` computed below the lowest adapted layer, for the learner
        (once); None where nothing was kept (not handing on, a context-parallel window, too
        large, not read here)."""
        states, copied = self.handed.pop(task_id, (None, None))
        if copied is not None:
            copied.synchronize()
        return states

    def iter_snapshot(self) -> Iterator[StateBlob]:
        return iter(())  # nothing outlives a document

    def restore(self, blobs: list[StateBlob]) -> None:
        if blobs:
            raise ValueError(f"{self.name}: reads the learner's versions and keeps no state; got {len(blobs)}")
        super().restore(blobs)


def choose_mode(host: DocumentReader, long_reader: LongDocumentReader | None = None) -> ReadingMode:
    """The mode ``host.spec`` asks for (which settings go together was checked once, by the
    config's validator)."""
    spec = host.spec
    if host.slow is not None and spec.slow_from_learner:
        return ReadingVersions(host, long_reader)
    if host.slow is not None:  # a reader that learns itself reads in one forward
        return SelfLearning(host, spec.scope, spec.base_loss_sample_rate)
    if spec.scope in ("per_document", "per_key") and long_reader is None \
            and ttt_config_of(host.model).objective == "in_place":
        return BatchedFastWeights(host)
    return FastWeights(host, long_reader)


def _tokens_sha256(ids: list[int] | torch.Tensor) -> str:
    """What a hand-off is checked by: the document's tokens (only where one is made or taken)."""
    return hashlib.sha256(torch.as_tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()


def _mean(nll: torch.Tensor) -> float | None:
    return float(nll.double().mean()) if nll.numel() else None


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _or_minus_one(value: float) -> float:
    return value if math.isfinite(value) else -1.0
