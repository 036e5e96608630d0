"""Checkpoints of a stream's adapted state in MLflow: one run and one registered-model version each.

A checkpoint is a folder ``checkpoint/`` in the run's artifacts:

    manifest.json                      offsets, config digest, base model, the effective model
                                       config (TTT + slow weights), metrics, file hashes
    states/<reader>/<sha256(key)[:32]>.safetensors

and a version of the registered model ``<stream>-ttt`` whose tags hold the offsets, the parent
version, the documents seen, the reason (periodic / shutdown / rollback) and the manifest's
sha256. Alias ``head`` points at the newest version, where a restart reads on from; ``live`` at
the one users load: with a learner, the newest the promotion gate passed (``pipeline.state.promotion``),
else the newest; ``last-good`` at the newest the gate (or, without one, the monitor) passed. Loading checks the manifest against the version's tag and every state
file against the manifest before anything is used; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from actors.call_types import StateBlob, StateTarget
from actors.state_upload import manifest_entry, state_file
from actors.reader_names import current_name
from pipeline.config import MlflowConfig
from pipeline.state.registered_model import RegisteredModel
from pipeline.state.run_artifacts import RunArtifacts

log = logging.getLogger(__name__)

FORMAT = "ttt-stream.checkpoint/1"
LIVE, LAST_GOOD, HEAD = "live", "last-good", "head"
BASE = "base"  # a rollback target: fresh states, the base model as the stream started
ARTIFACT_DIR = "checkpoint"


# The monitor's mean adapted loss over its window when a version became last-good: the reference
# its loss-jump rule compares with after a restart.
REFERENCE_LOSS = "window_adapted_loss"


READERS_PLACEHOLDER = "<the readers' entries>"


def parse_manifest(data: bytes | str) -> dict[str, Any]:
    """A checkpoint's manifest.json. One written before the rename (docs/upgrading.md) reads as
    one written now: its states under ``readers``, its readers by their names now
    (``<stream>-reader-<i>``), in the states and the assignment alike, so that a restore or a
    rollback to it gives each reader the states that reader had."""
    manifest = json.loads(data)
    if "readers" not in manifest and "workers" in manifest:
        manifest["readers"] = manifest.pop("workers")
    manifest["readers"] = {current_name(name): entries for name, entries in manifest["readers"].items()}
    if isinstance(manifest.get("assignment"), dict):
        manifest["assignment"] = {p: current_name(name) for p, name in manifest["assignment"].items()}
    return manifest


def _write_manifest(path: Path, manifest: dict[str, Any], files: dict[str, list[dict[str, Any]]],
                    written: dict[str, bytes]) -> str:
    """Write ``manifest`` with its readers' entries in place of the placeholder: those of the
    states given as bytes, and those the readers wrote, streamed as they came (never parsed nor
    copied here, so that a checkpoint of many keys adds no more than their entries to the
    driver); returns its sha256."""
    head, tail = json.dumps(manifest, indent=2, sort_keys=True).encode().split(json.dumps(READERS_PLACEHOLDER).encode())
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        def put(data: bytes) -> None:
            f.write(data)
            digest.update(data)

        put(head + b"{")
        for i, reader in enumerate(sorted({*files, *written})):
            put((b"," if i else b"") + json.dumps(reader).encode() + b":")
            put(written[reader] if reader in written
                else json.dumps(files[reader], sort_keys=True, separators=(",", ":")).encode())
        put(b"}" + tail)
    return digest.hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read or trusted; the caller keeps its current state."""


@dataclass
class Checkpoint:
    """What a version holds, loaded and verified."""

    version: str
    manifest: dict[str, Any]
    states: dict[str, list[StateBlob]]  # reader name -> its states

    @property
    def offsets(self) -> dict[int, int]:
        return {int(p): o for p, o in self.manifest["offsets"]["partitions"].items()}

    @classmethod
    def base(cls, readers: list[str]) -> "Checkpoint":
        """The rollback target ``base``: no state for any reader (fresh, the base model)."""
        return cls(BASE, {}, {name: [] for name in readers})


@dataclass
class CheckpointRequest:
    """Everything a new version records."""

    states: dict[str, list[StateBlob]]
    topic: str
    offsets: dict[int, int]
    config_digest: str
    base_model: dict[str, str]
    documents: int
    reason: str
    parent_version: str | None
    # The stream's effective model config: {"ttt": TTTConfig dict, "slow": SlowConfig dict}.
    model_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    assignment: dict[int, str] = field(default_factory=dict)  # partition -> reader name
    topic_id: str | None = None  # the documents topic's UUID: its offsets mean nothing in another
    # The control commands taken, while young enough to be sent again (pipeline.stream_io.control.CommandLedger).
    commands: dict[str, Any] = field(default_factory=dict)
    # What the learner's admission checks remember (pipeline.processing.learning_admission).
    admission: dict[str, Any] = field(default_factory=dict)
    promote: bool = True  # live moves to it (False: a candidate the promotion gate rejected or could not judge)


def new_manifest(request: CheckpointRequest, stream: str, forgotten: dict[str, int]) -> dict[str, Any]:
    """The manifest of a checkpoint, but for the readers' entries (spliced in as they wrote them)."""
    return {
        "format": FORMAT,
        "stream": stream,
        "created": time.time(),
        "reason": request.reason,
        "parent_version": request.parent_version,
        "offsets": {"topic": request.topic, "topic_id": request.topic_id,
                    "partitions": {str(p): o for p, o in sorted(request.offsets.items())}},
        "config_digest": request.config_digest,
        "base_model": request.base_model,
        "model_config": request.model_config,
        "documents": request.documents,
        "metrics": request.metrics,
        "readers": READERS_PLACEHOLDER,  # spliced in below, as the readers wrote it
        # partition -> reader name: which reader's state read which partition (rescaling)
        "assignment": {str(p): w for p, w in sorted(request.assignment.items())},
        "forgotten": dict(sorted(forgotten.items())),
        "commands": request.commands,
        "admission": request.admission,
    }


def verified(where: str, version: str, manifest_sha256: str | None, local: Path, forgotten: Callable[[str], bool],
             read: Callable[[dict[str, Any]], bytes]) -> Checkpoint:
    """The checkpoint in ``local`` once its manifest matches the version's tag and every state
    file its manifest entry (``read``: an entry's bytes); the states of ``forgotten`` keys are
    passed over (their files are gone). Raises CheckpointError."""
    try:
        manifest_bytes = (local / "manifest.json").read_bytes()
    except OSError:
        raise CheckpointError(f"{where}: manifest.json is missing") from None
    got = hashlib.sha256(manifest_bytes).hexdigest()
    if got != manifest_sha256:
        raise CheckpointError(f"{where}: manifest sha256 {got} != the version's tag {manifest_sha256}")
    manifest = parse_manifest(manifest_bytes)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a {FORMAT} checkpoint")
    states = {}
    for reader, entries in manifest["readers"].items():
        blobs = []
        for entry in entries:
            if forgotten(entry["key"]):  # erased: its file is gone, nothing brings it back
                continue
            try:
                data = read(entry)
            except Exception:  # noqa: BLE001 - not in this version, nor in the one it names
                raise CheckpointError(f"{where}: state file {entry['file']} "
                                      f"{'of run ' + entry['run_id'] + ' ' if 'run_id' in entry else ''}is missing") from None
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry["sha256"]:
                raise CheckpointError(f"{where}: {entry['file']} sha256 {digest} != manifest {entry['sha256']}")
            blobs.append(StateBlob(entry["key"], data, digest, int(entry["documents"]), entry.get("partition"),
                                   int(entry.get("last_read", 0))))
        states[reader] = blobs
    return Checkpoint(version, manifest, states)


class CheckpointStore:
    """Writes and reads the checkpoints of one stream, one version of its registered model each
    (``registry``: the versions, aliases and tombstones themselves)."""

    def __init__(self, config: MlflowConfig, stream: str):
        self.config = config
        self.stream = stream
        self.registry = RegisteredModel(config, stream)
        self.name = self.registry.name
        self.client = self.registry.client
        # The processor's own MLflow run (pipeline/observability/processor_run.py): checkpoint runs nest under
        # it. Read at each save: a run created late (MLflow down at start) is still found.
        self.parent_run: Any = None
        # State files already in the registry, by (key, sha256): (the run that holds it, its file).
        # A version reuses them instead of uploading the same bytes (incremental checkpoints);
        # states that readers write themselves are remembered by the readers (actors.state_upload).
        self._stored: dict[tuple[str, str], tuple[str, str]] = {}
        self._manifests: dict[str, dict[str, Any]] = {}  # version -> manifest loaded here (versions never change)
        self._reads: dict[str, set[str]] = {}  # version -> the runs whose files it reads (prune)

    # -- erasure -------------------------------------------------------------------------------

    def erase(self, state_key: str) -> int:
        """Delete the state files of ``state_key`` from every version before its tombstone and
        from every other checkpoint run of the stream (failed ones, those of deleted versions);
        returns how many places were cleared. The versions stay loadable: their other states are untouched, and
        load passes over the entries of a forgotten key."""
        before = self.registry.tombstones(refresh=True)[state_key]  # KeyError: no tombstone, nothing erased
        versions = self.registry.all_versions()
        runs = {int(mv.version): mv.run_id for mv in versions if int(mv.version) < before}
        files = set()
        for version, run_id in runs.items():
            for entries in self._manifest(str(version))["readers"].values():
                files |= {(e.get("run_id", run_id), e["file"]) for e in entries if e["key"] == state_key}
        # Runs no version lists: a checkpoint whose readers wrote their states and then failed,
        # and the runs of versions deleted since (MLflow deletes a run's artifacts only at gc).
        listed = {mv.run_id for mv in versions}
        name = Path(state_file("-", state_key)).name
        for run_id in set(self.registry.checkpoint_runs()) - listed:
            for reader in self.client.list_artifacts(run_id, checkpoint_artifact("states")):
                if reader.is_dir:
                    files.add((run_id, f"states/{Path(reader.path).name}/{name}"))
        by_run: dict[str, list[str]] = {}
        for run_id, file in sorted(files):
            by_run.setdefault(run_id, []).append(checkpoint_artifact(file))
        for run_id, paths in by_run.items():
            self.registry.delete_artifacts(run_id, paths)
        self._stored = {held: src for held, src in self._stored.items() if src not in files}
        log.info("%s: erased the state files of a forgotten key in %d runs (%d versions before its tombstone)",
                 self.name, len(by_run), len(runs))
        return len(files)

    # -- writing -------------------------------------------------------------------------------

    def open_run(self, reason: str) -> StateTarget:
        """The run of the next version, for the readers to write their states into (``save``
        then completes it)."""
        parent_run_id = getattr(self.parent_run, "run_id", None)
        run = self.client.create_run(
            self.registry.experiment_id(), run_name=f"{self.stream}-{reason}",
            tags={"ttt.stream": self.stream, "ttt.reason": reason,
                  **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})},
        )
        return StateTarget(run.info.run_id, RunArtifacts(run.info.artifact_uri, self.config.tracking_uri),
                           f"{ARTIFACT_DIR}/{PYFUNC_CHECKPOINT}")

    def save(self, request: CheckpointRequest, run: StateTarget | None = None) -> str:
        """Log the checkpoint as a run (``run``: one opened before, the states its readers wrote
        in it given as their manifest entries), register it as a new version, move ``live``;
        return it."""
        run = run if run is not None else self.open_run(request.reason)
        run_id = run.run_id
        try:
            version = self._complete(request, run)
        except Exception:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        return version

    def _complete(self, request: CheckpointRequest, run: StateTarget) -> str:
        from mlflow.entities import Metric, Param

        run_id = run.run_id
        with tempfile.TemporaryDirectory(prefix="ttt-ckpt-") as tmp:
            staging = Path(tmp) / "staging" / "checkpoint"  # its folder name is its place in the model
            files: dict[str, list[dict[str, Any]]] = {}  # reader -> the entries of the states given as bytes
            written: dict[str, bytes] = {}  # reader -> the JSON entries of the states it wrote itself
            forgotten = self.registry.tombstones(refresh=True)  # an offline forget since is seen here
            for reader, states in sorted(request.states.items()):
                if isinstance(states, bytes):
                    written[reader] = states
                    continue
                entries = []
                for state in states:
                    entry = manifest_entry(state)
                    if (state.key, state.sha256) in self._stored:  # unchanged since a version already written
                        entry["run_id"], entry["file"] = self._stored[state.key, state.sha256]
                    else:
                        entry["file"] = state_file(reader, state.key)
                        (staging / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
                        (staging / entry["file"]).write_bytes(state.data)
                    entries.append(entry)
                files[reader] = entries
            manifest = new_manifest(request, self.stream, forgotten)
            staging.mkdir(parents=True, exist_ok=True)  # a version that reuses every file writes none
            manifest_sha = _write_manifest(staging / "manifest.json", manifest, files, written)
            # The version's folder is an MLflow pyfunc model (from code, nothing pickled) whose
            # one artifact is the checkpoint: `models:/<stream>-ttt@live` loads and scores.
            root = Path(tmp) / ARTIFACT_DIR
            save_pyfunc(root, staging, request.base_model["path"])

            now = int(time.time() * 1000)
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0) for k, v in request.metrics.items() if v is not None],
                params=[Param("config_digest", request.config_digest), Param("base_model", request.base_model["path"][-250:]),
                        Param("reason", request.reason), Param("parent_version", str(request.parent_version))],
            )
            self.client.log_artifacts(run_id, str(root), ARTIFACT_DIR)
            self.client.set_terminated(run_id)
        self.registry.ensure()
        parent_run_id = getattr(self.parent_run, "run_id", None)
        version = self.client.create_model_version(
            self.name, source=f"{run.artifacts.artifact_uri}/{ARTIFACT_DIR}", run_id=run_id,
            tags={
                "offsets": json.dumps(manifest["offsets"]["partitions"], sort_keys=True),
                "parent_version": str(request.parent_version),
                "documents": str(request.documents),
                "reason": request.reason,
                "manifest_sha256": manifest_sha,
                **({"ttt.processor_run": parent_run_id} if parent_run_id else {}),
                **request.tags,
            },
        ).version
        self.client.set_registered_model_alias(self.name, HEAD, version)
        if request.promote:
            self.client.set_registered_model_alias(self.name, LIVE, version)
        if written:
            # The readers remember their own files; the manifest is read back when needed
            # (prune, erase), never kept: the driver holds no more than the entries it wrote.
            self._stored = self._entries_stored(str(version), run_id, {**files})
        else:
            self._remember(str(version), run_id, {**manifest, "readers": files})
        log.info("checkpoint %s v%s (%s): %d documents, offsets %s, %d states through the driver, %d readers wrote "
                 "their own (%d bytes of entries)", self.name, version, request.reason, request.documents,
                 request.offsets, sum(map(len, files.values())), len(written), sum(map(len, written.values())))
        return str(version)

    def _remember(self, version: str, run_id: str, manifest: dict[str, Any]) -> None:
        """The state files of ``version`` (written by ``run_id``), for the next version to reuse."""
        self._manifests[version] = manifest
        self._stored = self._entries_stored(version, run_id, manifest["readers"])

    def _entries_stored(self, version: str, run_id: str,
                        readers: dict[str, list[dict[str, Any]]]) -> dict[tuple[str, str], tuple[str, str]]:
        # By key and sha256: a file holds one key's state, so that erasing a key deletes no file
        # another key reads; an erased file is never reused.
        return {(e["key"], e["sha256"]): (e.get("run_id", run_id), e["file"])
                for entries in readers.values() for e in entries if not self.registry.forgotten_in(version, e["key"])}

    def prune(self, keep: int) -> list[str]:
        """Delete the versions (and their runs) older than the newest ``keep``, except those an
        alias points at and those whose state files a kept version reads; returns them."""
        model = self.client.get_registered_model(self.name)
        aliased = {str(v) for v in (model.aliases or {}).values()}
        versions = sorted(self.client.search_model_versions(f"name='{self.name}'"), key=lambda mv: -int(mv.version))
        by_run = {mv.run_id: str(mv.version) for mv in versions}
        kept = {str(mv.version) for mv in versions[:keep]} | aliased
        todo = list(kept)
        while todo:  # and, transitively, the versions holding files that kept ones read
            for run_id in self._runs_read_by(todo.pop()):
                holder = by_run.get(run_id)
                if holder is not None and holder not in kept:
                    kept.add(holder)
                    todo.append(holder)
        deleted = []
        for mv in versions:
            if str(mv.version) not in kept:
                self.client.delete_model_version(self.name, mv.version)
                self.client.delete_run(mv.run_id)
                self._manifests.pop(str(mv.version), None)
                self._reads.pop(str(mv.version), None)
                deleted.append(str(mv.version))
        gone = {mv.run_id for mv in versions if str(mv.version) in deleted}
        self._stored = {held: src for held, src in self._stored.items() if src[0] not in gone}
        if deleted:
            log.info("%s: deleted versions %s (keeping %d, aliased and referenced ones)", self.name, deleted, keep)
        return deleted

    def _manifest(self, version: str) -> dict[str, Any]:
        """A version's manifest: the one loaded or written here, else fetched (and not kept: a
        cluster's manifest lists every key of every reader)."""
        if version in self._manifests:
            return self._manifests[version]
        mv = self.client.get_model_version(self.name, version)
        with tempfile.TemporaryDirectory(prefix="ttt-ckpt-") as tmp:
            path = self.client.download_artifacts(mv.run_id, checkpoint_artifact("manifest.json"), tmp)
            return parse_manifest(Path(path).read_bytes())

    def _runs_read_by(self, version: str) -> set[str]:
        """The runs of other versions whose state files ``version`` reads (kept: they are few)."""
        if version not in self._reads:
            self._reads[version] = {e["run_id"] for entries in self._manifest(version)["readers"].values()
                                    for e in entries if "run_id" in e}
        return self._reads[version]

    # -- reading -------------------------------------------------------------------------------

    def load(self, ref: str) -> Checkpoint:
        """Download and verify a version (number or alias). Raises CheckpointError."""
        from mlflow.exceptions import MlflowException

        version = self.registry.resolve(ref)
        if version is None:
            raise CheckpointError(f"{self.name}: no version is aliased {ref!r}")
        self.registry.tombstones(refresh=True)  # those left since, by whoever
        try:
            mv = self.client.get_model_version(self.name, version)
        except MlflowException as err:
            raise CheckpointError(f"{self.name} v{version}: not found ({err.error_code})") from None
        with tempfile.TemporaryDirectory(prefix="ttt-ckpt-") as tmp:
            try:
                local = Path(self.client.download_artifacts(mv.run_id, ARTIFACT_DIR, tmp))
            except Exception as err:  # noqa: BLE001 - any failure to fetch is a missing artifact
                raise CheckpointError(f"{self.name} v{version}: cannot download its artifacts: {err}") from None
            local = local / PYFUNC_CHECKPOINT
            checkpoint = verified(f"{self.name} v{version}", version, mv.tags.get("manifest_sha256"), local,
                                  lambda key: self.registry.forgotten_in(version, key),
                                  lambda entry: self._state_file(local, entry))
        self._remember(version, mv.run_id, checkpoint.manifest)
        return checkpoint

    def _state_file(self, local: Path, entry: dict[str, Any]) -> bytes:
        """An entry's bytes: in this version's artifacts, or in the run of an earlier version
        that wrote them (``run_id``)."""
        if "run_id" not in entry:
            return (local / entry["file"]).read_bytes()
        with tempfile.TemporaryDirectory(prefix="ttt-ckpt-") as tmp:
            path = self.client.download_artifacts(entry["run_id"], checkpoint_artifact(entry["file"]), tmp)
            return Path(path).read_bytes()


PYFUNC_CHECKPOINT = "artifacts/checkpoint"  # where save_model puts the "checkpoint" artifact


def checkpoint_artifact(file: str) -> str:
    """Where a checkpoint file (``manifest.json``, a state) lies among its run's artifacts."""
    return f"{ARTIFACT_DIR}/{PYFUNC_CHECKPOINT}/{file}"


def save_pyfunc(path: Path, checkpoint_dir: Path, base_model: str) -> None:
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        params=ParamSchema([ParamSpec("mode", "string", "score"), ParamSpec("max_new_tokens", "long", 32)]),
    )
    mlflow.pyfunc.save_model(
        path=str(path), python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        # reader / key: which state to score with, chosen at load time where there are several.
        artifacts={"checkpoint": str(checkpoint_dir)},
        model_config={"base_model": base_model, "reader": None, "key": None},
        pip_requirements=[], signature=signature,
        # What `mlflow models serve` and the UI show as a request; saved as given (the signature
        # is explicit, so MLflow need not load the model to infer one).
        input_example=pd.DataFrame({"text": ["def add(a, b):\n    return a + b\n"]}),
    )


def base_model_id(path: str | Path) -> dict[str, str]:
    """The base model a state belongs to: its folder and the sha256 of its weights."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return {"path": str(path), "weights_sha256": digest.hexdigest()}


class StreamCheckpointer:
    """When to checkpoint, and writing one with retries: the processor's side of checkpoints.

    A failed write (MLflow down) is retried with exponential backoff; until one succeeds the
    offsets stay uncommitted and ``backlog_full`` tells the processor to stop reading once
    ``max_pending_documents`` documents wait for a checkpoint.
    """

    def __init__(self, store: CheckpointStore, config, topic: str, config_digest: str,
                 base_model: dict[str, str], start: Checkpoint | None, start_offsets: dict[int, int],
                 model_config: dict[str, Any] | None = None, assignment: dict[int, str] | None = None,
                 topic_id: str | None = None):
        self.store = store
        self.topic_id = topic_id
        self.assignment = assignment or {}  # partition -> reader name, recorded for rescaling
        self.config = config  # CheckpointConfig
        self.topic = topic
        self.config_digest = config_digest
        self.base_model = base_model
        self.model_config = model_config or {}
        self.model_version = start.version if start else None  # MLflow's; the learner's are slow versions
        # The control commands taken (pipeline.stream_io.control.CommandLedger), as the start
        # version recorded them; ``commands`` gives them as they are now, for each new version.
        self.commands_at_start: dict[str, Any] = dict(start.manifest.get("commands") or {}) if start else {}
        self.commands: Callable[[], dict[str, Any]] = dict
        self.admission_at_start: dict[str, Any] = dict(start.manifest.get("admission") or {}) if start else {}
        self.admission: Callable[[], dict[str, Any]] = dict
        self.offsets = dict(start_offsets)  # where this run resumes: the version's offsets as the source took them
        self.documents = int(start.manifest["documents"]) if start else 0
        self.pending_documents = 0
        self.owed = False  # a version is owed whatever the documents (a forget's that failed)
        self.last_at = time.monotonic()
        self.failures = 0
        self._retry_at = 0.0
        self._delay = config.retry_initial_s

    def document_done(self) -> None:
        self.pending_documents += 1

    def due(self, now: float, by_count: bool = True) -> bool:
        """Whether a checkpoint is due: ``every_seconds`` since the last, or (``by_count``)
        ``every_documents`` finished since."""
        if now < self._retry_at:
            return False
        if self.owed:  # a forget whose version could not be written: again, as soon as it may
            return True
        if self.pending_documents == 0:
            return False
        return (by_count and self.pending_documents >= self.config.every_documents) \
            or now - self.last_at >= self.config.every_seconds

    @property
    def backlog_full(self) -> bool:
        return self.pending_documents >= self.config.max_pending_documents

    def write(self, states: dict[str, list[StateBlob]] | Callable[[StateTarget], dict[str, list[Any]]],
              offsets: dict[int, int], reason: str, metrics: dict[str, float],
              tags: dict[str, str] | None = None, promote: bool = True) -> str | None:
        """A new version, or None after a failure (retried later with backoff). ``states``: the
        states as bytes, or what writes them into the version's run and returns their entries
        (the readers, each its own: ``ReaderPool.write_states``). ``promote``: live moves to it."""
        try:
            run = None
            if callable(states):
                run = self.store.open_run(reason)
                states = states(run)
            return self._save(states, offsets, reason, metrics, tags, run, promote)
        except Exception as err:  # noqa: BLE001 - MLflow down or refusing: retry, lose nothing
            if run is not None:
                try:  # a reader failed writing into it: the run is no version's
                    self.store.client.set_terminated(run.run_id, status="FAILED")
                except Exception:  # noqa: BLE001 - MLflow down: the run stays as it was
                    pass
            self.failures += 1
            self._retry_at = time.monotonic() + self._delay
            log.warning("checkpoint failed (%s: %s); retry in %.1f s, %d documents wait",
                        type(err).__name__, err, self._delay, self.pending_documents,
                        exc_info=self.failures == 1)  # the first failure's traceback, once
            self._delay = min(2 * self._delay, self.config.retry_max_s)
            return None

    def _save(self, states: dict[str, list[Any]], offsets: dict[int, int], reason: str, metrics: dict[str, float],
              tags: dict[str, str] | None, run: StateTarget | None, promote: bool) -> str:
        request = CheckpointRequest(
            states=states, topic=self.topic, offsets={**self.offsets, **offsets}, config_digest=self.config_digest,
            base_model=self.base_model, model_config=self.model_config,
            documents=self.documents + self.pending_documents, reason=reason,
            parent_version=self.model_version, metrics=metrics, tags=tags or {}, assignment=self.assignment,
            topic_id=self.topic_id, commands=self.commands(), admission=self.admission(), promote=promote,
        )
        version = self.store.save(request, run)
        self.model_version = version
        self.offsets = request.offsets
        self.documents = request.documents
        self.pending_documents = 0
        self.owed = False
        self.last_at = time.monotonic()
        self._retry_at = 0.0
        self._delay = self.config.retry_initial_s
        # Version numbers only grow: up to keep_versions of them, there is nothing to delete.
        if self.config.keep_versions is not None and int(version) > self.config.keep_versions:
            try:
                self.store.prune(self.config.keep_versions)
            except Exception as err:  # noqa: BLE001 - retention waits for the next version
                log.warning("could not delete old versions of %s: %s", self.store.name, err)
        return version
