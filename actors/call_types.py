"""What goes into and comes out of the actors' calls: plain dataclasses and the pydantic model
configs, no torch, so that the pipeline (the processor, the ledger, the monitor) imports them
without loading a model's stack."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ttt_model.config import SlowConfig, TTTConfig

Scope = Literal["global", "per_key", "per_document"]
# The learner's published slow-weight versions still read with (actors.learner), beside its state.
PUBLISHED_KEY = "__published_versions__"
# The learner's promotion gate (actors.promotion_gate): last-good's state, the held-out slice, the verdict.
GATE_KEY = "__promotion_gate__"
# Blobs of a learner's snapshot that are not a model's state (a pyfunc has none of them to choose).
RESERVED_KEYS = frozenset({PUBLISHED_KEY, GATE_KEY})


class ModelSource(Protocol):
    """A base model registered in MLflow, pinned by the driver
    (``pipeline.state.base_model.BaseModelSource``): a reader fetches it onto its node."""

    def fetch(self, cache_dir: str) -> Path:
        """The model's directory on this node, downloaded once and verified file by file."""


class ArtifactFolder(Protocol):
    """A run's artifacts, writable from a reader's process (``pipeline.state.run_artifacts``)."""

    artifact_uri: str

    def log_artifact(self, local_path: str, artifact_path: str) -> None:
        """Upload the file ``local_path`` into the folder ``artifact_path`` of the run."""


@dataclass(frozen=True)
class ReaderSpec:
    """What a reader actor hosts and how it adapts. Built from a stream's config by
    ``pipeline.processing.actor_specs.reader_spec`` (the one place it is built; no defaults of its own): the
    config's validator has checked how these settings go together, and the reader trusts it."""

    model_path: str  # as the actor sees it: absolute, or relative to the job's working directory
    # A model registered in MLflow: fetched into model_cache_dir on this node and verified,
    # instead of reading model_path.
    model_source: ModelSource | None
    model_cache_dir: str
    device: str  # auto | cpu | cuda
    dtype: str  # auto | float32 | bfloat16 | float16
    ttt: TTTConfig  # its set fields replace the model's own
    slow: SlowConfig
    scope: Scope
    max_keys_in_memory: int
    # per_key: keys held in all (memory and spill) and documents a key may go unread; past either
    # its state is forgotten (actors.state_store).
    max_keys: int
    key_retention_documents: int | None
    spill_dir: str
    max_document_tokens: int
    oversize: str  # split | reject
    base_loss_sample_rate: float
    deterministic: bool
    # Windows of at least this many tokens go to the context-parallel reader (None: none).
    context_parallel_min_tokens: int | None
    # process_batch, per_document / per_key scope: documents read in one forward, up to this many
    # padded tokens (rows x the longest document).
    batch_tokens: int
    # The slow weights are trained by the stream's learner (actors.learner): this reader reads
    # every document with the SlowVersion it is given, learns nothing across documents and keeps
    # no state between them (its fast weights start from zero at every document).
    slow_from_learner: bool
    # With slow_from_learner: the layers below the lowest adapted one are read once, by the
    # reader, which hands their hidden states on to the learner (``ttt_model.model.lower_layers``);
    # the learner's own reader (slow_from_learner False) reads them apart, or takes them handed.
    split_at_adapters: bool
    # Tokenize the next document in another thread while one is read (``prepare``). None: on a
    # GPU only, where the CPU waits for the device meanwhile; on a CPU the model already uses the
    # cores (measured on 2 cores: 26% slower with it).
    tokenize_ahead: bool | None


@dataclass(frozen=True)
class ContextParallelSpec:
    """How the stream processor's context-parallel group is built (``pipeline.processing.actor_specs``)."""

    model_path: str
    world: int
    num_cpus: float
    num_gpus: float
    ttt: TTTConfig
    num_threads: int | None
    # PACK: the members on one node where they fit (their all-gathers are the heavy traffic).
    strategy: str
    # The stream's slow weights (read with the learner's versions; disabled: none).
    slow: SlowConfig


@dataclass(frozen=True)
class DocumentTask:
    id: str
    text: str
    key: str | None = None
    partition: int | None = None  # of the documents topic: where its state lives (rescaling)
    # Decided by the driver from a keyed hash of the record's position (pipeline.state.tenant_keys):
    # also scored by the base model (None: a hash of the id, for callers outside a stream) ...
    shadow: bool | None = None
    # ... and, with a learner, kept from learning: read and scored, and the slice the promotion
    # gate judges versions on (actors.promotion_gate).
    held_out: bool = False
    # Why the learner must not learn from it (pipeline.processing.learning_admission); None: it may.
    kept_out: str | None = None
    # How new it is to the stream (bits of SimHash to the nearest recent document): a learner that
    # cannot take every document takes the newer ones first. None: unknown (every one alike).
    worth: float | None = None
    # Its offset in the partition (a stream's documents): with ``partition``, where its reader's
    # hand-off to the learner is found (``HandedStates``).
    offset: int | None = None


def is_handed_on(task: DocumentTask, lag: int) -> bool:
    """Whether what a reader computed for ``task`` goes to the learner, which waits for it: not
    for a document it will not learn (held out, kept out), nor at lag 1, where the learner of
    document n would then wait for its reader, and that reader for the learner of n - 1."""
    return lag >= 2 and task.offset is not None and not task.held_out and task.kept_out is None


@dataclass(frozen=True)
class HandedStates:
    """What a reader of the learner's versions computed below the lowest adapted layer for one
    document (``ttt_model.model.lower_layers``), handed on to the learner, which uses them only for
    the tokens they were computed from."""

    tokens_sha256: str  # of the document's token ids (int64)
    windows: list[Any]  # torch tensors (1, n, d) on the CPU, one per window
    # Where they were computed ("cuda", "cpu") and in what dtype: a learner elsewhere computes its
    # own, as other kernels could give other bits.
    device_type: str = "cpu"
    dtype: str = "float32"
    # The token ids read (a 1-d int64 tensor), the sha256 of the text they came from and of the
    # tokenizer that read it: the learner takes them instead of tokenizing the text again (at 8k
    # tokens, half a fed step), where its own tokenizer is the same.
    ids: Any = None
    text_sha256: str = ""
    tokenizer_sha256: str = ""

    def tokens_for(self, text: str, tokenizer_sha256: str) -> list[int] | None:
        """The ids read, where they were read from ``text`` by the tokenizer ``tokenizer_sha256``
        names; else None (the learner tokenizes)."""
        if self.ids is None or self.tokenizer_sha256 != tokenizer_sha256 or self.text_sha256 != text_sha256(text):
            return None
        return self.ids.tolist()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class StateTarget:
    """Where a checkpoint's states go: the MLflow run of the version being written. Each reader
    writes its own states there (``actors.state_upload``), so that the driver, which commits the
    version, never holds them."""

    run_id: str
    artifacts: ArtifactFolder  # the run's artifact root
    folder: str  # where a state file ``states/<reader>/<name>`` lies under the artifact root


@dataclass
class DocumentOutcome:
    """What became of one document. ``ok`` False: rejected (``reason``), state untouched."""

    id: str
    ok: bool
    reason: str | None = None
    tokens: int = 0
    loss: float | None = None  # prequential adapted loss, mean nats per predicted token
    base_loss: float | None = None  # TTT off, same tokens; only for sampled documents
    finite: bool = True
    latency_ms: float = 0.0
    state_key: str | None = None
    state_documents: int = 0  # documents the state had absorbed after this one
    fast_weight_norm: float = 0.0
    delta_ratio: float = 0.0  # max over layers of ||dW|| / ||W_down||: how far the fast weights moved
    slow_delta_ratio: float = 0.0  # max over adapted matrices of ||B A|| / ||W_0|| after the document
    windows: int = 0
    reader: str = ""
    # per_key with slow.reuse_nearest_key: the key whose slow weights this new key started from
    reused_from: str | None = None
    # Read with the learner's slow-weight version of this index (documents learned before it).
    slow_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StateBlob:
    """One state serialised for a checkpoint: safetensors bytes, their sha256, its document count
    and the partition its last document came from (where its key lives when readers change)."""

    key: str
    data: bytes
    sha256: str
    documents: int
    partition: int | None = None
    last_read: int = 0  # its store's document count when it was last read with (key expiry)
