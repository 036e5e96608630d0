"""DocumentReader: one model replica reading documents prequentially, in the reading mode its
spec asks for (``actors.reading_modes``).

A plain class (the Ray actor in ``actors.reader_actor`` is a thin shell around it), so it is tested
and benchmarked without Ray. It hosts the model, the tokenizer and the tokenizing ahead; the mode,
chosen once when the reader is built, reads each document: picks the state of its scope, scores
every chunk with the current weights and then learns from it, and reports the adapted loss next
to the base model's on a sample of documents.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from actors.call_types import DocumentOutcome, DocumentTask, HandedStates, ReaderSpec, StateBlob, StateTarget
from actors.reading_modes import ReadingMode, choose_mode
from actors.window_readers import LongDocumentReader
from ttt_model.factory import build_model
from ttt_model.model.patch import ttt_config_of
from ttt_model.slow import SlowVersion

log = logging.getLogger(__name__)

# Documents tokenized ahead (``DocumentReader.prepare``) and kept until processed.
MAX_PREPARED = 64


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class DocumentReader:
    """Hosts one model replica; ``process`` reads one document in the reader's mode.

    With a ``long_reader`` (a context-parallel group, see actors.cp_group), windows of at least
    ``spec.context_parallel_min_tokens`` tokens are read by it, starting from this reader's state,
    and the state it returns replaces ours; its failure propagates and the caller retries.
    ``mode``: builds the reading mode from this host (default: the one the spec asks for,
    ``choose_mode``); the learner passes its own.
    """

    def __init__(self, spec: ReaderSpec, name: str = "reader", long_reader: LongDocumentReader | None = None,
                 mode: Callable[[DocumentReader], ReadingMode] | None = None):
        from transformers import AutoTokenizer

        self.spec = spec
        self.name = name
        if spec.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.set_num_threads(1)
        self.device = resolve_device(spec.device)
        if spec.model_source is not None:
            path = spec.model_source.fetch(spec.model_cache_dir)
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
        self.tokenized_ahead = 0  # documents read with the ids ``prepare`` made
        self.model, self.slow = build_model(path, spec.ttt, spec.slow, self.device, resolve_dtype(spec.dtype, self.device))
        self.slow_config = spec.slow
        if spec.context_parallel_min_tokens is None:
            long_reader = None
        self.mode = mode(self) if mode is not None else choose_mode(self, long_reader)

    def effective_config(self) -> dict[str, Any]:
        """The TTT and slow-weight configs and the state scope this reader reads with (recorded in
        checkpoints)."""
        return {"ttt": ttt_config_of(self.model).model_dump(), "slow": self.slow_config.model_dump(),
                "scope": self.mode.states.scope}

    @functools.cached_property
    def tokenizer_sha256(self) -> str:
        """What ids handed on are checked by besides their text: the tokenizer that read them,
        whole (its serialised form: vocabulary, merges, normaliser, special tokens)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        serialised = backend.to_str() if backend is not None else json.dumps(sorted(self.tokenizer.get_vocab().items()))
        return hashlib.sha256(f"{type(self.tokenizer).__name__}\n{serialised}".encode()).hexdigest()

    @property
    def tokenizes_ahead(self) -> bool:
        """Whether ``prepare`` tokenizes (``spec.tokenize_ahead``; by default on a GPU only)."""
        return self.spec.tokenize_ahead if self.spec.tokenize_ahead is not None else self.device.type == "cuda"

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

    def tokens_of(self, task: DocumentTask) -> list[int]:
        """The document's token ids: prepared ahead (``prepare``), else tokenized now."""
        with self._prepared_lock:
            text, ids = self._prepared.pop(task.id, (None, None))
        if text != task.text:  # not prepared (or another document under the same id)
            return self.tokenizer(task.text, add_special_tokens=False)["input_ids"]
        self.tokenized_ahead += 1
        return ids

    def process(self, task: DocumentTask, version: SlowVersion | None = None,
                below: HandedStates | None = None) -> DocumentOutcome:
        """Read one document; ``version``: the slow weights to read it with (a reader of a
        learner's versions); ``below``: the hidden states a reader of a version handed on
        (``take_handed``), for the learner, with the ids it read (not tokenized again here)."""
        start = time.perf_counter()
        ids = below.tokens_for(task.text, self.tokenizer_sha256) if below is not None else None
        return self.mode.read(task, self.tokens_of(task) if ids is None else ids, start, version, below)

    def process_batch(self, tasks: list[DocumentTask], errors_as_values: bool = False,
                      version: SlowVersion | None = None) -> list[DocumentOutcome]:
        """Read ``tasks`` in order; the outcomes are those of ``process`` on each in turn (with
        ``errors_as_values``, what ``process`` raised on a document takes its place). The mode
        reads them one at a time, the next tokenized ahead meanwhile, or several in one forward
        (``BatchedFastWeights``)."""

        def read_one(task: DocumentTask, ids: list[int] | None):
            try:
                start = time.perf_counter()
                return self.mode.read(task, self.tokens_of(task) if ids is None else ids, start, version)
            except Exception as err:  # noqa: BLE001 - the caller asked for it as a value
                if not errors_as_values:
                    raise
                return err

        return self.mode.read_batch(tasks, read_one, self.prepare if self.tokenizes_ahead else None)

    def take_handed(self, task_id: str) -> HandedStates | None:
        """What reading ``task_id`` computed below the lowest adapted layer, for the learner
        (once); None where nothing was kept."""
        return self.mode.take_handed(task_id)

    def snapshot(self) -> list[StateBlob]:
        """Every state, as bytes (none when reading the learner's versions: nothing outlives a
        document there)."""
        return list(self.iter_snapshot())

    def iter_snapshot(self) -> Iterator[StateBlob]:
        """``snapshot`` one state at a time."""
        return self.mode.iter_snapshot()

    def write_states(self, target: StateTarget) -> bytes:
        """Upload this reader's states into the checkpoint's run, one at a time; their manifest
        entries (a JSON list)."""
        return self.mode.uploader.write(self.iter_snapshot(), target)

    def restore(self, blobs: list[StateBlob]) -> None:
        self.mode.restore(blobs)

    def forget(self, key: str) -> bool:
        """Drop ``key``'s per_key state, in memory or spilled (its replay buffer with it);
        whether this reader held one."""
        return self.mode.forget(key)

    def stats(self) -> dict[str, Any]:
        return {"reader": self.name, "device": str(self.device), "tokenized_ahead": self.tokenized_ahead,
                **self.mode.stats()}
