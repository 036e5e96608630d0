"""DocumentReader: one model replica and its adapted states, reading documents prequentially.

A plain class (the Ray actor in ``actors.reader_actor`` is a thin shell around it), so it is tested
and benchmarked without Ray. Per document: tokenize, pick the state of the document's scope,
score every chunk with the current weights and then learn from it, and report the adapted loss
next to the base model's loss on a sample of documents.

Two timescales when slow weights are on (``spec.slow``): the fast weights (In-Place TTT) start
from zero at every document, on top of the scope's slow weights, which take one step on each
chunk after it was scored and carry over from document to document. Without slow weights the
fast weights are the scope's state and carry over (learning from each unfinished last chunk).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch

from actors.base_model import BaseModelSource, fetch_base_model
from actors.call_types import DocumentOutcome, DocumentTask, HandedStates, ReaderSpec, StateBlob, StateTarget
from actors.window_readers import (ContextParallelReader, FastReader, LongDocumentReader, SlowStepReader,
                            WindowReader)
from actors.state_store import ScopedState, StateStore
from actors.state_upload import StateUploader
from ttt_model.adapted_state import AdaptedState
from ttt_model.forward_call import ttt_forward
from ttt_model.lower_layers import capture_inputs
from ttt_model.factory import build_model
from ttt_model.patch import static_mode, ttt_config_of
from ttt_model.slow import SlowState, SlowVersion
from ttt_model.state import FastWeightState, ttt_layers
from ttt_model.token_nll import token_nll

log = logging.getLogger(__name__)

# Documents tokenized ahead (``DocumentReader.prepare``) and kept until processed.
MAX_PREPARED = 64
# The most a reader hands on to the learner for one document (hidden states below the adapters):
# a longer document's go through no object store, the learner computes them itself.
MAX_HANDED_BYTES = 64 * 2**20

def sampled(task: DocumentTask, rate: float) -> bool:
    """Whether a document gets the base-model shadow evaluation: as the stream's driver decided
    (a keyed hash of the record's position), else a stable hash of its id; replays and restarts
    sample the same documents either way."""
    if task.shadow is not None:
        return task.shadow
    document_id = task.id
    if rate <= 0.0:
        return False
    bucket = int.from_bytes(hashlib.sha256(document_id.encode()).digest()[:8], "big") / 2**64
    return bucket < rate


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class DocumentReader:
    """Hosts one model replica; ``process`` reads one document and adapts the right state.

    With a ``long_reader`` (a context-parallel group, see actors.cp_group), windows of at least
    ``spec.context_parallel_min_tokens`` tokens are read by it, starting from this worker's state,
    and the state it returns replaces ours; its failure propagates and the caller retries.
    """

    def __init__(self, spec: ReaderSpec, name: str = "worker", long_reader: LongDocumentReader | None = None):
        from transformers import AutoTokenizer

        self.spec = spec
        self.name = name
        if spec.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.set_num_threads(1)
        self.device = resolve_device(spec.device)
        if spec.model_source is not None:
            path = fetch_base_model(BaseModelSource(**spec.model_source), Path(spec.model_cache_dir))
        else:
            path = Path(spec.model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist (cwd {os.getcwd()})")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        # ``prepare`` runs in another thread, with a tokenizer of its own (a fast tokenizer is
        # not safe to share between threads).
        self._prepare_tokenizer = AutoTokenizer.from_pretrained(str(path))
        self._prepared: OrderedDict[str, tuple[str, list[int]]] = OrderedDict()
        self._prepared_lock = threading.Lock()
        # Which settings go together (slow weights from a learner, context parallelism, scopes)
        # was checked once, by the config's validator.
        self.reads_versions = spec.slow_from_learner
        self.model, self.slow = build_model(path, spec.ttt, spec.slow, self.device, resolve_dtype(spec.dtype, self.device),
                                            rehearsal_tokenizer=None if self.reads_versions else self.tokenizer)
        self.slow_config = spec.slow
        self.states = StateStore(spec.scope, self.new_state, spec.max_keys_in_memory, Path(spec.spill_dir) / name,
                                 spec.max_keys, spec.key_retention_documents)
        self.uploader = StateUploader(name)
        if spec.scope == "per_key":
            size = len(self.new_state().to_bytes())
            log.info("%s: per_key states of %.1f MB, up to %d in memory, %d in all (spill directory up to %.1f GB)",
                     name, size / 1e6, spec.max_keys_in_memory, spec.max_keys, spec.max_keys * size / 1e9)
        self.long_reader = long_reader if spec.context_parallel_min_tokens is not None else None
        # The version bound last, on the device, and its delta ratio (kept while documents read it).
        self._version: tuple[SlowVersion, SlowState, float] | None = None
        self.reader = self._choose_reader()
        self.documents = 0
        self.tokens = 0
        self.busy_s = 0.0
        self.batches = 0  # forwards of process_batch that read several documents
        self.batched_documents = 0
        # split_at_adapters, reading versions: per document read, the hidden states entering the
        # lowest adapted layer, until taken (``take_handed``).
        self.handed: OrderedDict[str, HandedStates] = OrderedDict()

    def _choose_reader(self) -> WindowReader:
        if self.slow is not None and not self.reads_versions:
            return SlowStepReader(self.model, self.slow, self.slow_chunk_tokens, split=self.spec.split_at_adapters)
        # Without slow weights the fast weights are the scope's state and outlive the document.
        fast = FastReader(self.model, carries_over=self.slow is None and self.spec.scope != "per_document")
        if self.long_reader is None:
            return fast
        return ContextParallelReader(fast, self.long_reader, self.spec.context_parallel_min_tokens,
                                     lambda: self._version[0] if self.reads_versions else None)

    @property
    def slow_chunk_tokens(self) -> int:
        """Tokens per slow step: the slow config's, else one step per window."""
        return self.slow_config.chunk_tokens or self.spec.max_document_tokens

    def new_state(self) -> AdaptedState:
        """A state equal to the base model, for a new scope key."""
        learns_slow = self.slow is not None and not self.reads_versions
        return AdaptedState(FastWeightState.for_model(self.model), self.slow.new_state() if learns_slow else None)

    def effective_config(self) -> dict[str, Any]:
        """The TTT and slow-weight configs and the state scope this reader reads with (recorded in
        checkpoints)."""
        return {"ttt": ttt_config_of(self.model).model_dump(), "slow": self.slow_config.model_dump(),
                "scope": self.spec.scope}

    def prepare(self, task: DocumentTask) -> None:
        """Tokenize ``task`` ahead of its ``process`` call. Called from another thread while the
        previous document is read (the tokenizer releases the GIL), it takes tokenization off the
        reading path; ``process`` tokenizes whatever was not prepared."""
        if not self.tokenizes_ahead:
            return
        ids = self._prepare_tokenizer(task.text, add_special_tokens=False)["input_ids"]
        with self._prepared_lock:
            self._prepared[task.id] = (task.text, ids)
            while len(self._prepared) > MAX_PREPARED:  # prepared, then never processed here
                self._prepared.popitem(last=False)

    def process_batch(self, tasks: list[DocumentTask], errors_as_values: bool = False,
                      version: SlowVersion | None = None) -> list[DocumentOutcome]:
        """Read ``tasks`` in order; the outcomes are those of ``process`` on each in turn (with
        ``errors_as_values``, what ``process`` raised on a document takes its place).

        With the per_document and per_key scopes (without slow weights or context parallelism)
        documents that fit in one window are read together, up to ``spec.batch_tokens`` padded
        tokens per forward, each batch row with the fast weights of its own scope (per_key: a
        key's second document starts a new batch, after its first). Otherwise one at a time, the
        next document tokenized in another thread meanwhile.
        """

        def one(task: DocumentTask, ids: list[int] | None = None):
            try:
                return self.process(task, version) if ids is None else self._process(task, ids, version=version)
            except Exception as err:  # noqa: BLE001 - the caller asked for it as a value
                if not errors_as_values:
                    raise
                return err

        if not self._batches_documents:
            outcomes = []
            for i, task in enumerate(tasks):
                ahead = None
                if i + 1 < len(tasks) and self.tokenizes_ahead:
                    ahead = threading.Thread(target=self.prepare, args=(tasks[i + 1],))
                    ahead.start()
                try:
                    outcomes.append(one(task))
                finally:
                    if ahead is not None:
                        ahead.join()
            return outcomes
        outcomes: list[DocumentOutcome | None] = [None] * len(tasks)
        group: list[tuple[int, DocumentTask, list[int]]] = []

        def read_group() -> None:
            if not group:
                return
            if len(group) == 1:  # nothing to share a forward with: the one-document path
                outcomes[group[0][0]] = one(group[0][1], group[0][2])
                group.clear()
                return
            try:
                read = self._read_batch([(t, ids) for _, t, ids in group])
            except Exception:  # noqa: BLE001 - e.g. out of memory: each alone, as one at a time would
                log.warning("%s: a batch of %d documents failed; reading them one at a time", self.name, len(group),
                            exc_info=True)
                read = [one(t, ids) for _, t, ids in group]
            for (i, _, _), outcome in zip(group, read):
                outcomes[i] = outcome
            group.clear()

        for i, task in enumerate(tasks):
            ids = self._tokens_of(task)
            if len(ids) > self.spec.max_document_tokens or len(ids) < 2:
                read_group()
                outcomes[i] = one(task, ids)  # oversize or too short: the one-document path decides
                continue
            padded = max([len(ids)] + [len(g[2]) for g in group])
            keys = {g[1].key for g in group}
            if group and ((len(group) + 1) * padded > self.spec.batch_tokens or len(group) >= self.spec.max_keys_in_memory
                          or (self.spec.scope == "per_key" and task.key in keys)):
                read_group()
            group.append((i, task, ids))
        read_group()
        return outcomes

    @property
    def tokenizes_ahead(self) -> bool:
        """Whether ``prepare`` tokenizes (``spec.tokenize_ahead``; by default on a GPU only)."""
        return self.spec.tokenize_ahead if self.spec.tokenize_ahead is not None else self.device.type == "cuda"

    @property
    def _batches_documents(self) -> bool:
        return (self.spec.scope in ("per_document", "per_key") and self.slow is None and self.long_reader is None
                and ttt_config_of(self.model).objective == "in_place")

    def _tokens_of(self, task: DocumentTask) -> list[int]:
        """The document's token ids: prepared ahead (``prepare``), else tokenized now."""
        with self._prepared_lock:
            text, ids = self._prepared.pop(task.id, (None, None))
        if text != task.text:  # not prepared (or another document under the same id)
            ids = self.tokenizer(task.text, add_special_tokens=False)["input_ids"]
        return ids

    @torch.no_grad()
    def _read_batch(self, items: list[tuple[DocumentTask, list[int]]]) -> list[DocumentOutcome]:
        """Documents of one window each (per_key: of different keys) in one forward.

        Rows are right-padded to the longest: a token never attends to later ones, and only the
        updates of its row's earlier chunks reach it, so padding changes no real token's output.
        ``update_lengths`` keeps the padding out of the fast weights: with per_document also each
        row's unfinished last chunk, as ``process`` does for that scope; with per_key that chunk
        is learned zero-padded, exactly what ``end_document`` does (the batch's unfinished last
        chunk by ``flush_tail``, which pads it with zeros). Padding to the longest rather than to
        a whole chunk: eight documents of 2,050 tokens and a chunk of 1,024 are 2,050 columns,
        not 3,072.
        """
        start = time.perf_counter()
        C = ttt_config_of(self.model).chunk_size
        lengths = [len(ids) for _, ids in items]
        B, L = len(items), max(lengths)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((B, L), pad, dtype=torch.long)
        for b, (_, row) in enumerate(items):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        ids = ids.to(self.device)
        n = torch.tensor(lengths, device=self.device)
        per_key = self.spec.scope == "per_key"
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
        sample = [b for b, (task, _) in enumerate(items) if sampled(task, self.spec.base_loss_sample_rate)]
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
                fast_weight_norm=norm if math.isfinite(norm) else -1.0,
                delta_ratio=ratio if math.isfinite(ratio) else -1.0, windows=1, worker=self.name,
            ))
        return outcomes

    def process(self, task: DocumentTask, version: SlowVersion | None = None,
                below: HandedStates | None = None) -> DocumentOutcome:
        """Read one document; ``version``: the slow weights to read it with (``slow_from_learner``);
        ``below``: the hidden states a reader of a version handed on (``take_handed``), for the
        learner's reader (``split_at_adapters``)."""
        start = time.perf_counter()
        return self._process(task, self._tokens_of(task), start, version, below)

    def take_handed(self, task_id: str) -> HandedStates | None:
        """What reading ``task_id`` computed below the lowest adapted layer, for the learner (once);
        None where nothing was kept (not split, a context-parallel window, not read here)."""
        return self.handed.pop(task_id, None)

    def _process(self, task: DocumentTask, ids: list[int], start: float | None = None,
                 version: SlowVersion | None = None, below: HandedStates | None = None) -> DocumentOutcome:
        start = time.perf_counter() if start is None else start
        if self.reads_versions:
            if version is None:
                raise ValueError(f"{self.name}: reads with the learner's slow weights, and no version was given")
            with self.slow.bound(self._bind(version)):
                outcome = self._read(task, ids, start)
            outcome.slow_delta_ratio = self._version[2]
            outcome.slow_version = version.index
            return outcome
        return self._read(task, ids, start, below)

    def _bind(self, version: SlowVersion) -> SlowState:
        """``version`` as a state on the device (kept while the next documents read the same)."""
        if self._version is None or self._version[0].index != version.index:
            state = self.slow.state_of(version)
            self._version = (version, state, self.slow.delta_ratio(state))
        return self._version[1]

    def _read(self, task: DocumentTask, ids: list[int], start: float,
              below: HandedStates | None = None) -> DocumentOutcome:
        limit = self.spec.max_document_tokens
        if len(ids) > limit and self.spec.oversize == "reject":
            return DocumentOutcome(
                task.id, ok=False, tokens=len(ids), worker=self.name,
                reason=f"oversize: {len(ids)} tokens > max_document_tokens {limit}",
            )
        # Of the tokens, only where a hand-off is checked or made (not on every reader's path).
        digest = (lambda: hashlib.sha256(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest())
        ids = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
        scoped, reused_from = self._state_for(task, ids)
        if self.slow is not None:
            scoped.state.fast.reset()  # fresh at every document, even after one that raised
        windows = [ids[:, i : i + limit] for i in range(0, ids.shape[1], limit)]
        weight = next(self.model.parameters())
        dtype = str(weight.dtype).removeprefix("torch.")
        handed_bytes = ids.shape[1] * self.model.config.hidden_size * weight.element_size()
        if below is not None and (below.device_type, below.dtype) == (self.device.type, dtype) \
                and below.tokens_sha256 == digest():
            adapted = self.reader.read(scoped.state, windows, below.windows)  # else computed here, the same bits
        elif self.reads_versions and self.spec.split_at_adapters and handed_bytes <= MAX_HANDED_BYTES:
            with capture_inputs(self.model, self.slow.lowest_layer) as captured:
                adapted = self.reader.read(scoped.state, windows)
            if len(captured) == len(windows):  # else a window went to a context-parallel group
                self.handed[task.id] = HandedStates(digest(), [c.cpu() for c in captured], self.device.type, dtype)
                while len(self.handed) > MAX_PREPARED:  # read, then never taken
                    self.handed.popitem(last=False)
        else:
            adapted = self.reader.read(scoped.state, windows)
        base = self._base_nll(windows) if sampled(task, self.spec.base_loss_sample_rate) else None
        scoped.documents += 1
        fast = scoped.state.fast
        # One transfer from the device for both figures (each float() would wait for the device).
        norms = torch.stack([n.double() for n in fast.norms().values()])
        ratios = torch.stack([r.double() for r in fast.delta_ratios(self.model).values()])
        norm, ratio = torch.stack([norms.square().sum().sqrt(), ratios.max()]).tolist()
        slow_ratio = 0.0
        if self.slow is not None:
            fast.reset()  # the fast weights live for one document
            if scoped.state.slow is not None:
                slow_ratio = self.slow.delta_ratio(scoped.state.slow)
        self.documents += 1
        self.tokens += ids.shape[1]
        elapsed = time.perf_counter() - start
        self.busy_s += elapsed
        loss = _mean(adapted)
        return DocumentOutcome(
            task.id, ok=True, tokens=ids.shape[1], loss=_finite_or_none(loss),
            base_loss=_finite_or_none(_mean(base)) if base is not None else None,
            finite=math.isfinite(loss if loss is not None else 0.0) and math.isfinite(norm) and math.isfinite(slow_ratio),
            latency_ms=1000.0 * elapsed, state_key=scoped.key, state_documents=scoped.documents,
            fast_weight_norm=norm if math.isfinite(norm) else -1.0,
            delta_ratio=ratio if math.isfinite(ratio) else -1.0,
            slow_delta_ratio=slow_ratio if math.isfinite(slow_ratio) else -1.0, windows=len(windows), worker=self.name,
            reused_from=reused_from,
        )

    def snapshot(self) -> list[StateBlob]:
        """Every state, as bytes (none when reading the learner's versions: nothing outlives a
        document here)."""
        return list(self.iter_snapshot())

    def iter_snapshot(self) -> Iterator[StateBlob]:
        """``snapshot`` one state at a time."""
        return iter(()) if self.reads_versions else self.states.iter_snapshot()

    def write_states(self, target: StateTarget) -> bytes:
        """Upload this reader's states into the checkpoint's run, one at a time; their manifest
        entries (a JSON list)."""
        return self.uploader.write(self.iter_snapshot(), target)

    def restore(self, blobs: list[StateBlob]) -> None:
        if self.reads_versions and blobs:
            raise ValueError(f"{self.name}: reads the learner's versions and keeps no state; got {len(blobs)}")
        self.states.restore(blobs)
        # What was uploaded before may belong to versions since pruned: the next checkpoint
        # writes every state again rather than name a file that may be gone.
        self.uploader = StateUploader(self.name)

    def forget(self, key: str) -> bool:
        """Drop ``key``'s per_key state, in memory or spilled (its replay buffer with it);
        whether this worker held one."""
        self.uploader.forget(key)
        return self.spec.scope == "per_key" and self.states.forget(key)

    def stats(self) -> dict[str, Any]:
        return {
            "worker": self.name,
            "documents": self.documents,
            "tokens": self.tokens,
            "busy_s": self.busy_s,
            "states": len(self.states),
            "states_in_memory": self.states.in_memory,
            "spills": self.states.spills,
            "reloads": self.states.reloads,
            "expired_keys": self.states.expired,
            "device": str(self.device),
            "parallel_windows": self.reader.parallel_windows,
            "batches": self.batches,
            "batched_documents": self.batched_documents,
        }

    # -- internals -----------------------------------------------------------------------------

    def _state_for(self, task: DocumentTask, ids: torch.Tensor) -> tuple[ScopedState, str | None]:
        """The scope's state for a document, and for a new key that starts from another key's
        slow weights (``slow.reuse_nearest_key``), that key."""
        cfg, key = self.slow_config, task.key
        if self.slow is None or not cfg.reuse_nearest_key or self.spec.scope != "per_key" or key in self.states:
            return self.states.get(key, task.partition), None
        signature = self.slow.signature(ids[:, : ttt_config_of(self.model).chunk_size])
        nearest = self.slow.nearest(signature, self.states.signatures())
        source = self.states.peek(nearest[0]).slow if nearest and nearest[1] >= cfg.reuse_min_similarity else None
        scoped = self.states.get(key, task.partition)
        if source is not None:
            scoped.state.slow.copy_from(source)
            log.info("%s: new key %r starts from the slow weights of %r (similarity %.3f)", self.name, key, *nearest)
        scoped.state.slow.signature = signature
        return scoped, nearest[0] if source is not None else None

    @torch.no_grad()
    def _base_nll(self, windows: list[torch.Tensor]) -> torch.Tensor:
        nll = []
        with self.slow.disabled() if self.slow is not None else nullcontext(), static_mode(self.model):
            for window in windows:
                nll.append(token_nll(self.model(input_ids=window).logits[0, :-1], window[0, 1:]))
        return torch.cat(nll)


def _mean(nll: torch.Tensor) -> float | None:
    return float(nll.double().mean()) if nll.numel() else None


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
