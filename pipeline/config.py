"""Typed configuration of a ttt-stream deployment, validated when it is loaded.

A config file is YAML; every section is a pydantic model that forbids unknown keys, so a typo
fails at load with the field's dotted path. Environment variables override the file:
``TTT_STREAM__KAFKA__BOOTSTRAP_SERVERS=host:9092`` sets ``kafka.bootstrap_servers``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer, field_validator,
                      model_validator)

from pipeline.state.base_model import DEFAULT_CACHE_DIR, is_model_uri, masked_uri
from ttt_model.config import SlowConfig, TTTConfig

ENV_PREFIX = "TTT_STREAM__"
# Keys of the Kafka client settings that hold secrets (sasl_plain_password, ssl_password,
# sasl_oauth_token, ...): kept as SecretStr, shown as ********** and left out of the digest.
SECRET_SETTING = re.compile(r"password|secret|token|credential", re.IGNORECASE)


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class TopicsConfig(_Section):
    documents: str = "ttt.documents"
    """Topic the documents are read from (JSON: id, text, optional key and meta)."""
    results: str = "ttt.results"
    """Topic of the per-document results (losses, tokens, state)."""
    metrics: str = "ttt.metrics"
    """Topic of the processor's status reports."""
    alerts: str = "ttt.alerts"
    """Topic of alerts: monitor breaches, rollbacks, refused commands, forgets."""
    dead_letter: str = "ttt.dead-letter"
    """Topic of records that were not read, each with its reason in the headers."""
    control: str = "ttt.control"
    """Topic of signed commands to a running processor (rollback, forget)."""
    partitions: int = Field(default=2, ge=1)
    """Partitions of the documents topic when it is created: the unit of parallelism."""
    replication_factor: int = Field(default=1, ge=1)
    """Copies of each record the broker keeps, and how many must have it before a write counts (the
    topic's min.insync.replicas). 1 and None fit the one-broker embedded stack; a cluster wants 3
    and 2.
    """
    min_insync_replicas: int | None = Field(default=None, ge=1)
    """The topics' min.insync.replicas (None: the broker's default)."""

    @model_validator(mode="after")
    def _insync_within_replicas(self) -> "TopicsConfig":
        if self.min_insync_replicas is not None and self.min_insync_replicas > self.replication_factor:
            raise ValueError(f"kafka.topics.min_insync_replicas {self.min_insync_replicas} is above "
                             f"kafka.topics.replication_factor {self.replication_factor}")
        return self


class KafkaConfig(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    """Kafka bootstrap servers, host:port[,host:port...]."""
    group_id: str = "ttt-stream"
    """Consumer group of the processor: where its committed offsets live."""
    topics: TopicsConfig = TopicsConfig()
    """The stream's topics."""
    client: dict[str, Any] = Field(default_factory=dict)
    """Passed unchanged to every kafka-python client (security_protocol, sasl_*, ssl_*, ...), so a
    user's existing Kafka settings work as they are.
    """
    consumer: dict[str, Any] = Field(default_factory=lambda: {"max_poll_interval_ms": 10_000})
    """Extra keys for the consumer only. The default poll interval is short because a long one stalls
    group joins on the embedded broker.
    """
    producer: dict[str, Any] = Field(default_factory=dict)
    """Extra keys for the producer only (secrets kept as SecretStr)."""
    max_output_bytes: int = Field(default=262_144, ge=16_384)
    """The largest record the processor writes (results, dead letters, alerts, status): fields echoed
    from the input past it are cut and marked (a dead letter keeps a prefix of the record and its
    sha256). Below the producer's max_request_size (kafka-python: 1 MiB) and the broker's
    message.max.bytes.
    """
    offset_reset: Literal["error", "earliest", "latest"] = "error"
    """An offset to resume from (a checkpoint's, the group's committed one) outside the records the
    broker has (a recreated topic, a restarted in-memory broker, retention that deleted them): error
    refuses to read, naming the partition; earliest / latest read on from the first / next record,
    as Kafka's auto.offset.reset does, and say so in the log.
    """

    @field_validator("client", "consumer", "producer")
    @classmethod
    def _secrets_kept_secret(cls, settings: dict[str, Any]) -> dict[str, Any]:
        for k, v in settings.items():
            if SECRET_SETTING.search(k) and not isinstance(v, (str, SecretStr)):
                # YAML reads 0123 as 83 and 1e3 as 1000.0: a secret is text, exactly as written.
                raise ValueError(f"{k}: a secret must be a string (quote it in YAML), got {type(v).__name__}")
        return {k: SecretStr(v) if SECRET_SETTING.search(k) and isinstance(v, str) else v for k, v in settings.items()}

    @model_validator(mode="after")
    def _outputs_fit_a_request(self) -> "KafkaConfig":
        limit = self.producer.get("max_request_size", self.client.get("max_request_size", 1_048_576))
        if isinstance(limit, int) and self.max_output_bytes > limit:
            raise ValueError(f"kafka.max_output_bytes {self.max_output_bytes} is above the producer's "
                             f"max_request_size {limit}")
        return self

    def client_settings(self) -> dict[str, Any]:
        """``client`` as kafka-python takes it (secrets revealed: for a client only)."""
        return _revealed(self.client)

    def consumer_settings(self) -> dict[str, Any]:
        """``client`` then ``consumer``, secrets revealed."""
        return _revealed({**self.client, **self.consumer})

    def producer_settings(self) -> dict[str, Any]:
        """``client`` then ``producer``, secrets revealed."""
        return _revealed({**self.client, **self.producer})


def _revealed(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in settings.items()}


class MlflowConfig(_Section):
    tracking_uri: str = "http://127.0.0.1:5000"
    """MLflow tracking server (and model registry)."""

    @field_serializer("tracking_uri")
    def _credentials_masked(self, uri: str) -> str:
        return masked_uri(uri)
    experiment: str = "ttt-stream"
    """MLflow experiment of the processor and checkpoint runs."""
    processor_runs: bool = True
    """One MLflow run per `ttt-stream run`: the stream's figures over time (pipeline/observability/processor_run.py),
    the checkpoints' runs nested under it.
    """


class RayConfig(_Section):
    address: str | None = None
    """None: start Ray inside the calling process (ray.init()); else the address of a cluster."""
    num_cpus: int = Field(default=2, ge=1)
    """CPUs of the Ray instance started in-process (address None)."""
    object_store_memory_mb: int = Field(default=256, ge=78)
    """Object store of the Ray instance started in-process, in MB."""
    namespace: str = "ttt-stream"
    """Ray namespace of the stream's named actors."""


class BrokerServerConfig(_Section):
    host: str = "127.0.0.1"
    """Address the local broker listens on."""
    port: int = Field(default=9092, ge=1, le=65535)
    """Port of the local broker."""
    startup_timeout_s: float = Field(default=30.0, gt=0)
    """How long `ttt-stream up` waits for the broker."""


class MlflowServerConfig(_Section):
    host: str = "127.0.0.1"
    """Address the local MLflow server listens on."""
    port: int = Field(default=5000, ge=1, le=65535)
    """Port of the local MLflow server."""
    workers: int = Field(default=1, ge=1)
    """Worker processes of the local MLflow server (its own: ``mlflow server --workers``)."""
    startup_timeout_s: float = Field(default=120.0, gt=0)
    """How long `ttt-stream up` waits for MLflow."""


class LocalStackConfig(_Section):
    """Servers that ``ttt-stream up`` starts on this machine (the embedded default)."""

    data_dir: Path = Path("data/local-stack")
    """Where the local broker's log and MLflow's database and artifacts live."""
    broker: BrokerServerConfig = BrokerServerConfig()
    """The local Kafka-protocol broker."""
    mlflow: MlflowServerConfig = MlflowServerConfig()
    """The local MLflow tracking server."""


class StreamConfig(_Section):
    name: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The stream's name: its registered model is `<name>-ttt`, its MLflow runs carry it."""


class ModelConfig(_Section):
    """The model every reader hosts: a local Hugging Face directory (no hub downloads), or one
    registered in MLflow (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/model``:
    pipeline.state.base_model), fetched once per node into ``cache_dir`` and verified."""

    path: str = "models/ttt-tiny-qwen3"
    """A local model directory, or models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model."""
    cache_dir: Path = DEFAULT_CACHE_DIR
    """Where each node keeps fetched registered models (on its own disk)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when there is one, else cpu."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 on cuda, float32 on cpu."""
    ttt: TTTConfig = Field(default_factory=TTTConfig)
    """The fields set here replace the model's own TTT config (objective, safeguards, ...); the others
    keep the values in the model's config.json.
    """
    slow: SlowConfig = Field(default_factory=SlowConfig)
    """The slow weights learned across documents (ttt_model.slow)."""

    @field_serializer("ttt")
    def _only_overrides(self, ttt: TTTConfig) -> dict[str, Any]:
        # Dumped as written, so that the dump parses back to the same overrides.
        return ttt.overrides()

    def effective_ttt(self, model_dir: Path | None = None) -> TTTConfig:
        """The TTT config the stream reads with: the model's own (in ``model_dir``, where a
        registered model was fetched to) with ``ttt``'s set fields replacing its fields."""
        return TTTConfig.model_validate({**self.saved_ttt(model_dir), **self.ttt.overrides()})

    def per_key_state_bytes(self, model_dir: Path | None = None) -> int | None:
        """A lower bound of one per-key state's size: the float32 fast-weight delta of every TTT
        layer, d x D each (slow weights, where a state has them, come on top). None where the
        model's config.json is not on this machine."""
        config = Path(model_dir or self.path) / "config.json"
        if not config.is_file():
            return None
        model = json.loads(config.read_text(encoding="utf-8"))
        try:
            layers = self.effective_ttt(model_dir).resolve_layers(int(model["num_hidden_layers"]))
            return len(layers) * int(model["hidden_size"]) * int(model["intermediate_size"]) * 4
        except (KeyError, TypeError, ValueError):
            return None

    def weight_bytes(self, model_dir: Path | None = None) -> int | None:
        """The size of the model's weight files (None where they are not on this machine)."""
        files = list(Path(model_dir or self.path).glob("*.safetensors"))
        return sum(f.stat().st_size for f in files) if files else None

    def saved_ttt(self, model_dir: Path | None = None) -> dict[str, Any]:
        """The TTT fields in the model's own config.json ({} where the model is not on this machine)."""
        config = Path(model_dir or self.path) / "config.json"
        if not config.is_file():
            return {}
        return json.loads(config.read_text(encoding="utf-8")).get("ttt") or {}


class CheckpointConfig(_Section):
    """Adapted state + consumed offsets to MLflow; offsets are committed only after that."""

    enabled: bool = True
    """Write checkpoints (without: offsets committed on a timer, best effort)."""
    every_documents: int = Field(default=200, ge=1)
    """A checkpoint after this many documents..."""
    every_seconds: float = Field(default=120.0, gt=0)
    """... or this many seconds, whichever comes first."""
    restore: bool = True
    """On start, restore the registered model's newest version (alias `head`; `live` for a stream
    from before it) and read on from its offsets."""
    retry_initial_s: float = Field(default=1.0, gt=0)
    """While MLflow is unreachable: retry with exponential backoff, keep reading until this many
    documents wait for a checkpoint, then pause reading until one is written.
    """
    retry_max_s: float = Field(default=30.0, gt=0)
    """Longest backoff between retries while MLflow is unreachable."""
    max_pending_documents: int = Field(default=1000, ge=1)
    """Documents read without a checkpoint before reading pauses."""
    keep_versions: int | None = Field(default=100, ge=1)
    """Versions kept in the registry: older ones are deleted (model version and run) unless an alias
    points at one or a kept version reads its state files (incremental checkpoints). None: keep
    every version.
    """


class MonitorConfig(_Section):
    """Degradation rules over a rolling window of documents; a breach alerts and rolls back."""

    enabled: bool = True
    """Watch the outcomes (needs checkpoint.enabled: rollbacks go to versions)."""
    window_documents: int = Field(default=10, ge=1)
    """Documents in the rolling window of the loss rules."""
    min_documents: int = Field(default=3, ge=1)
    """Documents the window needs before a loss rule, or a pass, counts."""
    non_finite: bool = True
    """Breach on a non-finite loss or weight."""
    max_fast_delta_ratio: float | None = Field(default=None, gt=0)
    """The fast weights' largest ||dW|| / ||W_down|| over sqrt(TTT chunks the document spans): the
    ratio grows with the number of updates, about as their square root (not the model's own hard cap
    on it, model.ttt.max_delta_ratio: this one alerts and rolls back).
    """
    max_slow_delta_ratio: float | None = Field(default=None, gt=0)
    """The slow weights' largest ||B A|| / ||W_0||: a bound on how far the stream moved the model."""
    max_loss_over_base: float | None = Field(default=0.05, ge=0)
    """Breach when the window's adapted loss exceeds the static model's by this fraction."""
    max_loss_jump: float | None = Field(default=0.3, gt=0)
    """Breach when the window's adapted loss exceeds last-good's by this fraction."""
    auto_rollback: bool = True
    """Roll back to last-good on a breach (else only alert)."""


class MetricsConfig(_Section):
    """The Prometheus endpoint of ``ttt-stream run`` (pipeline/observability/metrics.py)."""

    enabled: bool = True
    """Serve Prometheus metrics from `ttt-stream run`."""
    host: str = "127.0.0.1"
    """Address to serve on; 0.0.0.0 where Prometheus scrapes from another machine."""
    port: int = Field(default=9464, ge=0, le=65535)
    """Port to serve on; 0: a free port, logged and in the status reports."""


PlacementStrategy = Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"]


class ContextParallelConfig(_Section):
    """Long documents read by a group of actors (ttt_model.parallel), the rest by single readers."""

    min_tokens: int = Field(default=16384, ge=2)
    """Windows of at least this many tokens go to the group."""
    world: int = Field(default=2, ge=2)
    """Members (processes) of the group."""
    num_cpus: float = Field(default=1.0, gt=0)
    """CPUs of each member."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs of each member."""
    placement_strategy: PlacementStrategy = "PACK"
    """PACK: the group on one node where it fits (its all-gathers are the heavy traffic); STRICT_PACK:
    only on one node; SPREAD / STRICT_SPREAD: over nodes, when asked.
    """


class GateConfig(_Section):
    """The promotion gate (actors.promotion_gate): a checkpoint is a candidate version, and ``live``
    moves to it only when it is no worse than ``last-good`` on documents no version learned from,
    and forgot no more than a budget of the model's own kind of text. A candidate that fails stays
    a version (its verdict, figures and reason in its tags) and the learner goes back to
    ``last-good``."""

    enabled: bool = True
    """Judge every checkpoint of the learner before it goes live (false: ``live`` moves to each)."""
    holdout_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    """Share of the stream held out: chosen by a keyed hash of each record's position (partition,
    offset) with the stream's salt, so a producer who cannot read the registry cannot steer what is
    judged on.
    Held-out documents are read and scored like every other, never learned."""
    holdout_documents: int = Field(default=8, ge=1)
    """The most recent held-out documents a candidate is judged on."""
    holdout_tokens: int = Field(default=1024, ge=2)
    """Tokens of each held-out document judged (its first ones): bounds the time of a verdict."""
    max_loss_over_last_good: float = Field(default=0.005, ge=0.0)
    """Tolerance: the candidate's held-out loss may exceed last-good's by this fraction."""
    max_forgetting: float = Field(default=0.02, ge=0.0)
    """Budget: the candidate's loss on the probe (the model's own kind of text) may exceed the base
    model's by this fraction."""
    probe_chunks: int = Field(default=8, ge=1)
    """Chunks of the probe: taken from model.slow.rehearsal_path after the chunks it rehearses (so
    never trained on), of rehearsal_tokens each."""


class AdmissionConfig(_Section):
    """What the learner's time is spent on (pipeline.processing.learning_admission): cheap checks of
    each document before it may train the slow weights. A document kept out is still read, scored
    and answered; its result and the metrics say why."""

    enabled: bool = True
    """Check documents before the learner learns from them."""
    memory_documents: int = Field(default=1024, ge=1)
    """Fingerprints of recent documents remembered for the duplicate checks (bounded memory)."""
    near_duplicate_bits: int = Field(default=3, ge=0, le=32)
    """A document whose 64-bit SimHash (over word 4-shingles) is within this many bits of a
    remembered one is a near duplicate (0: exact copies only)."""
    min_check_bytes: int = Field(default=400, ge=0)
    """Texts shorter than this skip the degenerate-text checks (compression says little about them)."""
    min_compression_ratio: float = Field(default=0.08, ge=0.0, le=1.0)
    """Below it (zlib bytes / text bytes), a text is one thing repeated."""
    max_compression_ratio: float = Field(default=0.8, gt=0.0, le=2.0)
    """Above it, a text is close to random characters (natural text and code: about 0.3 to 0.6)."""
    min_char_entropy: float = Field(default=2.5, ge=0.0)
    """Below it (bits per character), a text uses too few distinct characters to be language."""
    max_next_char_entropy: float = Field(default=4.2, gt=0.0)
    """Above it (bits per character given the one before), a text is random characters: prose,
    code and markup of the shipped corpora stay below 3.7, random letters reach 4.6."""
    key_share: float = Field(default=0.5, gt=0.0, le=1.0)
    """One key may take at most this share of the last key_window_documents documents learned."""
    key_window_documents: int = Field(default=32, ge=2)
    """The window of documents learned that key_share is counted over."""
    outlier_loss_margin: float | None = Field(default=1.0, gt=0.0)
    """In the learner: a window whose loss is above the median of the last 64 windows learned by
    more than this fraction (1.0: twice the median) takes no slow step (junk that the text checks
    let by: word salad, another language). None: every window steps. Counted in the version's
    ``kept_out`` as ``outlier loss`` (windows); a result cannot say it, as the learner decides after."""
    quarantine_after: int = Field(default=16, ge=1)
    """A key with this many documents kept out in a row is quarantined: none of its documents is
    learned until `ttt-stream release KEY`; an alert says so."""


class LearnerConfig(_Section):
    """The stream's learner (actors.learner): one actor trains the slow weights from every
    document in the order they were taken from the topic, while the readers read each document
    at a static model's speed with a published version of them."""

    enabled: bool = False
    """Train the slow weights in one learner actor (needs model.slow.enabled and scope global)."""
    synchronous: bool = False
    """The learner reads every document itself and learns from it in the same forward (the
    synchronous slow step), with its gate and checks; no readers (processor.readers: 1, the
    learner). The fastest setting on one device (the embedded default's two cores, one GPU):
    readers and a learner sharing it compute the layers below the adapters once, but the rest
    twice. With it, ``lag`` does not apply: document n is read with the weights learned from
    documents 0 .. n - 1, and its later chunks with the steps on its earlier ones."""
    lag: int = Field(default=2, ge=1)
    """Document n reads with the slow weights learned from documents 0 .. n - lag (1: all before it;
    2: the reader of document n runs beside the learner of document n - 1, which learns from
    the hidden states its reader handed on; larger: the readers may run further ahead).
    """
    @property
    def version_lag(self) -> int:
        """Document n reads the version learned from documents before n + 1 - this (the
        synchronous learner reads document n with all before it learned: 1)."""
        return 1 if self.synchronous else self.lag

    every: int = Field(default=1, ge=1)
    """Learn from every document (1), or from one in ``every`` of those the admission checks let
    through, the newer ones first (in the ledger's order): for a learner slower than its readers,
    which then read at their own speed; documents kept out cost none of that budget.
    """
    num_cpus: float = Field(default=1.0, ge=0)
    """CPUs of the learner actor."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs of the learner actor."""
    gate: GateConfig = GateConfig()
    """Which checkpoints go live."""
    admission: AdmissionConfig = AdmissionConfig()
    """Which documents the learner learns from."""


class ControlConfig(_Section):
    """Who may command a running processor through the control topic: a command carries an
    HMAC-SHA256 signature made with the key in the environment variable ``key_env`` (the
    processor's and the sender's; ``ttt-stream rollback`` signs with it). Without the key every
    command is refused."""

    key_env: str = Field(default="TTT_STREAM_CONTROL_KEY", min_length=1)
    """Environment variable that holds the HMAC key of control commands."""
    max_age_s: float = Field(default=300.0, gt=0)
    """A signed command older than this (or from further in the future) is refused: a copy of one
    cannot be sent again later.
    """
    min_rollback_interval_s: float = Field(default=60.0, ge=0)
    """At most one rollback asked for through the control topic per this many seconds."""
    min_forget_interval_s: float = Field(default=1.0, ge=0)
    """At most one forget asked for through the control topic per this many seconds (each writes a
    version)."""
    min_release_interval_s: float = Field(default=1.0, ge=0)
    """At most one release of a quarantined key per this many seconds."""


# processor keys renamed with the readers (docs/upgrading.md; accepted, with a warning, for one release).
RENAMED_PROCESSOR_KEYS = {"workers": "readers", "worker_num_cpus": "reader_num_cpus",
                          "worker_num_gpus": "reader_num_gpus", "worker_memory_mb": "reader_memory_mb",
                          "max_in_flight_per_worker": "max_in_flight_per_reader"}


class ProcessorConfig(_Section):
    """How ``ttt-stream run`` reads the documents topic and adapts."""

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or not RENAMED_PROCESSOR_KEYS.keys() & raw.keys():
            return raw
        raw = dict(raw)
        for old, new in RENAMED_PROCESSOR_KEYS.items():
            if old not in raw:
                continue
            if new in raw:
                raise ValueError(f"processor.{old} and processor.{new} both given: {old} is {new}'s old name; keep {new}")
            warnings.warn(f"processor.{old} is deprecated: it is processor.{new} now (the old key is read until the "
                          "next release)", FutureWarning, stacklevel=2)
            raw[new] = raw.pop(old)
        return raw

    readers: int = Field(default=1, ge=1)
    """Reader actors; each owns a share of the documents topic's partitions."""
    reader_num_cpus: float = Field(default=1.0, gt=0)
    """CPUs of each reader actor."""
    reader_num_gpus: float = Field(default=0.0, ge=0)
    """GPUs of each reader actor (fractions share one)."""
    placement_strategy: PlacementStrategy = "SPREAD"
    """How Ray places the readers (one placement-group bundle of reader_num_cpus / reader_num_gpus
    each): SPREAD over the nodes where it can, STRICT_SPREAD one per node or not at all, PACK /
    STRICT_PACK on as few nodes as possible / on one.
    """
    scope: Literal["global", "per_key", "per_document"] = "global"
    """global: one state learns from every document (with processor.learner: one for the stream,
    however many readers; without: one per reader); per_key: one state per message key;
    per_document: reset each time.
    """
    max_keys_in_memory: int = Field(default=64, ge=1)
    """per_key: states held in memory; the rest spill to spill_dir."""
    max_keys: int = Field(default=1024, ge=1)
    """per_key: keys a reader holds in all, in memory and spilled to spill_dir; past it the least
    recently read key is forgotten. The spill directory holds up to max_keys x one state's size (a
    reader logs both at start: 2.4 MB a key for the shipped model, 63 MB for Qwen3-0.6B with 5 TTT
    layers); at a checkpoint each reader uploads its own states, one at a time, and the driver
    holds their entries only (about 200 bytes a state).
    """
    reader_memory_mb: int | None = Field(default=None, ge=64)
    """Memory Ray reserves for each reader actor (its `memory` resource; None: none reserved). With
    it, a per_key config whose max_keys_in_memory states and model weights cannot fit is refused at
    load (where the model's config.json is on this machine to size a state).
    """
    key_retention_documents: int | None = Field(default=None, ge=1)
    """per_key: a key unread for this many of its reader's documents is forgotten (None: kept until
    max_keys pushes it out).
    """
    spill_dir: Path = Path("data/spill")
    """Where per_key states spill to (one folder per reader)."""
    max_document_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Records larger than this go to the dead-letter topic unread (before any parsing)."""
    max_document_tokens: int = Field(default=32768, ge=2)
    """Tokens of one window: longer documents are split (or rejected: oversize)."""
    oversize: Literal["split", "reject"] = "split"
    """split: read an oversize document in windows of max_document_tokens (the attention cache
    restarts, the fast weights carry over); reject: send it to the dead-letter topic.
    """
    base_loss_sample_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    """Fraction of documents also scored by the static model (the monitor's reference)."""
    max_in_flight_per_reader: int = Field(default=2, ge=1)
    """Documents handed to a reader before its earlier ones are done."""
    batch_documents: int | None = Field(default=None, ge=1)
    """Documents sent to a reader in one call; with the per_document and per_key scopes (no slow
    weights) the reader reads them in one forward (up to batch_tokens padded tokens: rows x the
    longest; its logits are that many vocabulary-wide rows; per_key: distinct keys). None: with
    those scopes on GPU readers 8 (at most max_in_flight_per_reader: raise it to 16 for batches of
    8), else 1 (a CPU gains nothing from batching, and global reads one document at a time).
    """
    batch_tokens: int = Field(default=16384, ge=2)
    """Padded tokens of one batched forward (rows x the longest document)."""
    max_restarts: int = Field(default=10, ge=0)
    """Deaths of one reader within restart_window_s that the stream recovers from (Ray restarts a
    reader with no lifetime limit); one more stops the run with an error. A document that kills
    its reader is dead-lettered after max_attempts deaths, so it cannot use up the budget alone.
    """
    restart_window_s: float = Field(default=600.0, gt=0)
    """The window max_restarts counts a reader's deaths in."""
    max_attempts: int = Field(default=3, ge=1)
    """Tries of a document that fails (its reader died, a context-parallel read failed) before it is dead-lettered."""
    document_timeout_s: float | None = Field(default=600.0, gt=0)
    """A reader still reading one document after this many seconds (counted from when its earlier
    documents were done) is restarted: the document counts as one that killed its reader
    (max_attempts). None: no deadline.
    """
    restart_timeout_s: float = Field(default=300.0, gt=0)
    """How long a restarted reader may take to come back."""
    poll_timeout_ms: int = Field(default=200, ge=1)
    """Longest wait of one poll of the documents topic."""
    commit_interval_s: float = Field(default=5.0, gt=0)
    """Without checkpoints: how often offsets are committed."""
    status_interval_s: float = Field(default=10.0, gt=0)
    """How often a status report goes to the metrics topic and the MLflow run."""
    deterministic: bool = False
    """Bit-reproducible CPU arithmetic (torch deterministic algorithms, one intra-op thread)."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Adapted states and offsets to MLflow."""
    monitor: MonitorConfig = MonitorConfig()
    """Degradation rules, alerts and automatic rollback."""
    metrics: MetricsConfig = MetricsConfig()
    """The Prometheus endpoint."""
    context_parallel: ContextParallelConfig | None = None
    """None: every document on a single reader."""
    learner: LearnerConfig = LearnerConfig()
    """The learner actor that trains the slow weights for the whole stream."""
    control: ControlConfig = ControlConfig()
    """Who may command the processor through the control topic."""

    @property
    def documents_per_call(self) -> int:
        """``batch_documents``, resolved."""
        if self.batch_documents is not None:
            return self.batch_documents
        if self.scope in ("per_document", "per_key") and self.reader_num_gpus > 0:
            return min(8, self.max_in_flight_per_reader)
        return 1


class AppConfig(_Section):
    """The whole deployment: one stream, its Kafka topics, MLflow, Ray and the local stack."""

    stream: StreamConfig = StreamConfig()
    """The stream's identity."""
    kafka: KafkaConfig = KafkaConfig()
    """Kafka: brokers, topics, client settings."""
    mlflow: MlflowConfig = MlflowConfig()
    """MLflow: tracking server and registry."""
    ray: RayConfig = RayConfig()
    """Ray: in-process or a cluster."""
    model: ModelConfig = ModelConfig()
    """The model every reader hosts, its TTT and slow-weight settings."""
    processor: ProcessorConfig = ProcessorConfig()
    """How `ttt-stream run` reads, adapts, checkpoints and watches."""
    local_stack: LocalStackConfig = LocalStackConfig()
    """The servers `ttt-stream up` starts on this machine."""

    @model_validator(mode="after")
    def _settings_agree(self) -> "AppConfig":
        """The rules that tie settings of several sections together, checked here once: the
        readers and the processor trust them and do not repeat them."""
        p, model = self.processor, self.model
        if p.max_keys < p.max_keys_in_memory:
            raise ValueError(f"processor.max_keys {p.max_keys} is below processor.max_keys_in_memory "
                             f"{p.max_keys_in_memory}")
        if p.max_restarts < p.max_attempts:
            raise ValueError(f"processor.max_restarts {p.max_restarts} is below processor.max_attempts "
                             f"{p.max_attempts}: a document that kills its reader would stop the run before it "
                             "is dead-lettered")
        if p.batch_documents is not None and p.batch_documents > p.max_in_flight_per_reader:
            raise ValueError(f"processor.batch_documents ({p.batch_documents}) is above "
                             f"processor.max_in_flight_per_reader ({p.max_in_flight_per_reader}): no batch that large "
                             "would form")
        if p.reader_memory_mb is not None and p.scope == "per_key":
            state, weights = model.per_key_state_bytes(), model.weight_bytes()
            if state is not None and p.max_keys_in_memory * state + (weights or 0) > p.reader_memory_mb * 2**20:
                raise ValueError(
                    f"processor.max_keys_in_memory {p.max_keys_in_memory} states of {state / 2**20:.1f} MiB (at least) "
                    f"and the model's {(weights or 0) / 2**20:.0f} MiB of weights do not fit "
                    f"processor.reader_memory_mb {p.reader_memory_mb}: lower max_keys_in_memory (the rest spill to "
                    "spill_dir) or raise reader_memory_mb")
        if p.learner.enabled:
            if not model.slow.enabled:
                raise ValueError("processor.learner trains the slow weights: it needs model.slow.enabled: true")
            if p.scope != "global":
                raise ValueError(f"processor.learner learns one slow state for the stream (scope global); with scope "
                                 f"{p.scope!r} each reader learns its keys' slow weights itself: "
                                 "set processor.learner.enabled: false")
            if p.learner.synchronous and (p.readers != 1 or p.context_parallel is not None):
                raise ValueError("processor.learner.synchronous: the learner reads every document itself, so "
                                 "processor.readers must be 1 and processor.context_parallel unset (or set "
                                 "synchronous: false for readers beside the learner)")
        if model.slow.enabled and p.scope == "global" and p.readers > 1 and not p.learner.enabled:
            raise ValueError(f"model.slow with scope global and processor.readers {p.readers}: each reader would learn "
                             "slow weights of its own, and a version would hold several models (models:/<stream>-ttt@live "
                             "could not choose): set processor.learner.enabled: true (one learner for the stream), or "
                             "processor.readers: 1")
        if p.context_parallel is not None:
            if is_model_uri(model.path):
                raise ValueError("processor.context_parallel reads a model directory on every node: model.path may "
                                 "not be an MLflow URI with it (a shared volume, or the image, holds the model)")
            if model.slow.enabled and not p.learner.enabled:
                # Synchronous slow steps follow the chunks of a document: the ranks could not read
                # their segments at the same time. With the learner they read with a fixed version.
                raise ValueError("processor.context_parallel reads with slow weights only from the learner: "
                                 "set processor.learner.enabled: true (or model.slow.enabled: false)")
            if model.effective_ttt().objective != "in_place":
                where = ("model.ttt.objective" if "objective" in model.ttt.model_fields_set
                         else f"{model.path}/config.json ttt.objective")
                raise ValueError(f"processor.context_parallel needs the in_place objective (the gradient objective "
                                 f"trains between chunks); set by {where}")
            if p.context_parallel.min_tokens > p.max_document_tokens:
                raise ValueError("processor.context_parallel.min_tokens is above processor.max_document_tokens: "
                                 "no window would reach the group")
        return self

    def digest(self) -> str:
        """sha256 of the validated config, stable across key order, secrets left out (they dump
        as **********); recorded with checkpoints."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return ``raw`` with ``TTT_STREAM__A__B=value`` variables set at path ``a.b``.

    Values are parsed as YAML scalars, so numbers, booleans and lists keep their types; a setting
    whose name says it is a secret (password, token, ...) is taken as the raw string.
    """
    merged = json.loads(json.dumps(raw))
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        if not all(path):
            raise ConfigError(f"{name}: empty path segment in environment override")
        if len(path) == 2 and path[0] == "processor" and path[1] in RENAMED_PROCESSOR_KEYS:
            # An old key from the environment overrides the file's new one, as it did the old one.
            new = RENAMED_PROCESSOR_KEYS[path[1]]
            warnings.warn(f"{name} is deprecated: it is {ENV_PREFIX}PROCESSOR__{new.upper()} now (the old name is "
                          "read until the next release)", FutureWarning, stacklevel=2)
            path[1] = new
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: '{part}' is not a section")
            node = child
        # A secret is taken as written: parsed as YAML, digits-only "0123" would become the int 83.
        node[path[-1]] = value if value == "" or SECRET_SETTING.search(path[-1]) else yaml.safe_load(value)
    return merged


def _format_validation_error(source: str, err: ValidationError) -> str:
    problems = []
    for item in err.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown field")
        else:
            problems.append(f"{path}: {item['msg']}")
    return f"{source}: invalid config: " + "; ".join(problems)


def parse_config(raw: Any, source: str = "<config>", environ: Mapping[str, str] | None = None) -> AppConfig:
    """Validate an already-parsed YAML document (plus environment overrides) into an AppConfig."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: invalid config: <root>: expected a mapping, got {type(raw).__name__}")
    raw = apply_env_overrides(raw, os.environ if environ is None else environ)
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Read, override from the environment and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_config(raw, source=str(path), environ=environ)
