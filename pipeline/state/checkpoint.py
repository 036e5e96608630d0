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
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from actors.call_types import StateBlob, StateTarget
from actors.state_upload import manifest_entry, state_file
from actors.reader_names import current_name
from pipeline.config import MlflowConfig
from pipeline.state.tenant_keys import SALT_TAG, TOMBSTONE_TAG

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


def model_name(stream: str) -> str:
    return f"{stream}-ttt"


class CheckpointStore:
    def __init__(self, config: MlflowConfig, stream: str):
        from mlflow import MlflowClient

        self.config = config
        self.stream = stream
        self.name = model_name(stream)
        self.client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
        # The processor's own MLflow run (pipeline/observability/processor_run.py): checkpoint runs nest under
        # it. Read at each save: a run created late (MLflow down at start) is still found.
        self.parent_run: Any = None
        # State files already in the registry, by (key, sha256): (the run that holds it, its file).
        # A version reuses them instead of uploading the same bytes (incremental checkpoints);
        # states that readers write themselves are remembered by the readers (actors.state_upload).
        self._stored: dict[tuple[str, str], tuple[str, str]] = {}
        self._manifests: dict[str, dict[str, Any]] = {}  # version -> manifest loaded here (versions never change)
        self._reads: dict[str, set[str]] = {}  # version -> the runs whose files it reads (prune)
        self._forgotten: dict[str, int] | None = None  # tombstones: state key -> first version after its forget

    # -- erasure -------------------------------------------------------------------------------

    def key_salt(self) -> bytes:
        """The stream's salt of state names (``pipeline.state.tenant_keys``), made on first use."""
        self._ensure_registered_model()
        tags = self.client.get_registered_model(self.name).tags or {}
        if SALT_TAG not in tags:
            self.client.set_registered_model_tag(self.name, SALT_TAG, secrets.token_hex(32))
            tags = self.client.get_registered_model(self.name).tags  # another writer's, if it was first
        return bytes.fromhex(tags[SALT_TAG])

    def tombstones(self, refresh: bool = False) -> dict[str, int]:
        """The state keys ``forget`` erased, each with the first version that may hold a state of
        it again (one begun after the forget). They are tags of the registered model
        (``ttt.forgotten.<state key>``), written before anything else of a forget happens, so
        that they hold whatever fails after; every manifest lists them too. No load returns a
        state of a key from a version before its tombstone."""
        from mlflow.exceptions import MlflowException

        if self._forgotten is None or refresh:
            try:  # raises while MLflow is out of reach: tombstones are never taken as "none"
                tags = self.client.get_registered_model(self.name).tags or {}
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                tags = {}  # no version yet: nothing to forget in
            self._forgotten = {k[len(TOMBSTONE_TAG):]: int(v) for k, v in tags.items() if k.startswith(TOMBSTONE_TAG)}
        return self._forgotten

    def forget(self, state_key: str) -> None:
        """Leave a tombstone for ``state_key`` in the registry: from now on no load returns a
        state of it from a version written so far, whoever loads. Raises (MLflow out of reach),
        having changed nothing, rather than forget in memory only."""
        self._ensure_registered_model()
        first = max((int(mv.version) for mv in self._all_versions()), default=0) + 1
        self.client.set_registered_model_tag(self.name, TOMBSTONE_TAG + state_key, str(first))
        self.tombstones()[state_key] = first

    def erase(self, state_key: str) -> int:
        """Delete the state files of ``state_key`` from every version before its tombstone and
        from every other checkpoint run of the stream (failed ones, those of deleted versions);
        returns how many places were cleared. The versions stay loadable: their other states are untouched, and
        load passes over the entries of a forgotten key."""
        from mlflow.entities import ViewType

        before = self.tombstones(refresh=True)[state_key]  # KeyError: no tombstone, nothing erased
        versions = self._all_versions()
        runs = {int(mv.version): mv.run_id for mv in versions if int(mv.version) < before}
        files = set()
        for version, run_id in runs.items():
            for entries in self._manifest(str(version))["readers"].values():
                files |= {(e.get("run_id", run_id), e["file"]) for e in entries if e["key"] == state_key}
        # Runs no version lists: a checkpoint whose readers wrote their states and then failed,
        # and the runs of versions deleted since (MLflow deletes a run's artifacts only at gc).
        listed = {mv.run_id for mv in versions}
        name = Path(state_file("-", state_key)).name
        for run in self.client.search_runs([self._experiment_id()], f"tags.`ttt.stream` = '{self.stream}'",
                                           run_view_type=ViewType.ALL, max_results=10_000):
            if run.info.run_id in listed or run.data.tags.get("ttt.reason") is None:
                continue
            for reader in self.client.list_artifacts(run.info.run_id, checkpoint_artifact("states")):
                if reader.is_dir:
                    files.add((run.info.run_id, f"states/{Path(reader.path).name}/{name}"))
        by_run: dict[str, list[str]] = {}
        for run_id, file in sorted(files):
            by_run.setdefault(run_id, []).append(file)
        for run_id, run_files in by_run.items():  # deleting a file that is not there is no error
            repo = self._artifacts(run_id)
            for file in run_files:
                repo.delete_artifacts(checkpoint_artifact(file))
        self._stored = {held: src for held, src in self._stored.items() if src not in files}
        log.info("%s: erased the state files of a forgotten key in %d runs (%d versions before its tombstone)",
                 self.name, len(by_run), len(runs))
        return len(files)

    def _artifacts(self, run_id: str) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(self.client.get_run(run_id).info.artifact_uri,
                                       tracking_uri=self.config.tracking_uri)

    def forgotten_in(self, version: str, key: str) -> bool:
        """Whether ``key``'s state in ``version`` was erased (the version is older than its tombstone)."""
        tombstone = self.tombstones().get(key)
        return tombstone is not None and int(version) < tombstone

    def _all_versions(self) -> list[Any]:
        # Raises while MLflow is out of reach: tombstones are never taken as "none".
        return list(self.client.search_model_versions(f"name='{self.name}'"))

    # -- writing -------------------------------------------------------------------------------

    def open_run(self, reason: str) -> StateTarget:
        """The run of the next version, for the readers to write their states into (``save``
        then completes it)."""
        parent_run_id = getattr(self.parent_run, "run_id", None)
        run = self.client.create_run(
            self._experiment_id(), run_name=f"{self.stream}-{reason}",
            tags={"ttt.stream": self.stream, "ttt.reason": reason,
                  **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})},
        )
        return StateTarget(run.info.run_id, run.info.artifact_uri, self.config.tracking_uri,
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
            forgotten = self.tombstones(refresh=True)  # an offline forget since is seen here
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
            manifest = {
                "format": FORMAT,
                "stream": self.stream,
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
        self._ensure_registered_model()
        parent_run_id = getattr(self.parent_run, "run_id", None)
        version = self.client.create_model_version(
            self.name, source=f"{run.artifact_uri}/{ARTIFACT_DIR}", run_id=run_id,
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
                for entries in readers.values() for e in entries if not self.forgotten_in(version, e["key"])}

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

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def record_reference_loss(self, version: str, loss: float) -> None:
        """The monitor's window loss when ``version`` passed it: a metric of the version's run."""
        run_id = self.client.get_model_version(self.name, version).run_id
        self.client.log_metric(run_id, REFERENCE_LOSS, float(loss))

    def reference_loss(self, ref: str) -> float | None:
        """The window loss recorded with ``ref`` (a version or alias), if any."""
        version = self.resolve(ref)
        if version is None:
            return None
        run_id = self.client.get_model_version(self.name, version).run_id
        return self.client.get_run(run_id).data.metrics.get(REFERENCE_LOSS)

    def version_tags(self, ref: str) -> dict[str, str]:
        version = self.resolve(ref)
        return {} if version is None else dict(self.client.get_model_version(self.name, version).tags)

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.config.experiment)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(self.config.experiment)

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(self.name, tags={"ttt.stream": self.stream})
            except MlflowException:
                pass  # created meanwhile by another writer

    # -- reading -------------------------------------------------------------------------------

    def resolve(self, ref: str) -> str | None:
        """A version number, or an alias (``live``, ``last-good``), to a version; None if unset."""
        from mlflow.exceptions import MlflowException

        if ref.isdigit():
            return ref
        try:
            return str(self.client.get_model_version_by_alias(self.name, ref).version)
        except MlflowException:
            return None

    def load(self, ref: str) -> Checkpoint:
        """Download and verify a version (number or alias). Raises CheckpointError."""
        from mlflow.exceptions import MlflowException

        version = self.resolve(ref)
        if version is None:
            raise CheckpointError(f"{self.name}: no version is aliased {ref!r}")
        self.tombstones(refresh=True)  # those left since, by whoever
        try:
            mv = self.client.get_model_version(self.name, version)
        except MlflowException as err:
            raise CheckpointError(f"{self.name} v{version}: not found ({err.error_code})") from None
        with tempfile.TemporaryDirectory(prefix="ttt-ckpt-") as tmp:
            try:
                local = Path(self.client.download_artifacts(mv.run_id, ARTIFACT_DIR, tmp))
            except Exception as err:  # noqa: BLE001 - any failure to fetch is a missing artifact
                raise CheckpointError(f"{self.name} v{version}: cannot download its artifacts: {err}") from None
            checkpoint = self._verify(version, mv.tags, local)
        self._remember(version, mv.run_id, checkpoint.manifest)
        return checkpoint

    def _verify(self, version: str, tags: dict[str, str], local: Path) -> Checkpoint:
        where = f"{self.name} v{version}"
        local = local / PYFUNC_CHECKPOINT
        try:
            manifest_bytes = (local / "manifest.json").read_bytes()
        except OSError:
            raise CheckpointError(f"{where}: manifest.json is missing") from None
        got = hashlib.sha256(manifest_bytes).hexdigest()
        if got != tags.get("manifest_sha256"):
            raise CheckpointError(f"{where}: manifest sha256 {got} != the version's tag {tags.get('manifest_sha256')}")
        manifest = parse_manifest(manifest_bytes)
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{where}: not a {FORMAT} checkpoint")
        states = {}
        for reader, entries in manifest["readers"].items():
            blobs = []
            for entry in entries:
                if self.forgotten_in(version, entry["key"]):  # erased: its file is gone, nothing brings it back
                    continue
                try:
                    data = self._state_file(local, entry)
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

    def _state_file(self, local: Path, entry: dict[str, Any]) -> bytes:
        """An entry's bytes: in this version's artifacts, or in the run of an earlier version
        that wrote them (``run_id``)."""
        if "run_id" not in entry:
            return (local / entry["file"]).read_bytes()
        with tempfile.TemporaryDirectory(prefix="ttt-ckpt-") as tmp:
            path = self.client.download_artifacts(entry["run_id"], checkpoint_artifact(entry["file"]), tmp)
            return Path(path).read_bytes()

    def versions(self) -> list[dict[str, Any]]:
        """Every version, newest first, with its tags, aliases and its run's metrics."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException:
            return []
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        rows = []
        for mv in self.client.search_model_versions(f"name='{self.name}'"):
            metrics = self.client.get_run(mv.run_id).data.metrics if mv.run_id else {}
            rows.append({
                "version": str(mv.version), "created": mv.creation_timestamp / 1000.0,
                "aliases": sorted(aliases.get(str(mv.version), [])), "tags": dict(mv.tags), "metrics": metrics,
            })
        return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


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
        self.version = start.version if start else None
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
            parent_version=self.version, metrics=metrics, tags=tags or {}, assignment=self.assignment,
            topic_id=self.topic_id, commands=self.commands(), admission=self.admission(), promote=promote,
        )
        version = self.store.save(request, run)
        self.version = version
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
