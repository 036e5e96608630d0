"""The stream's registered model in MLflow, ``<stream>-ttt``: its versions, aliases and tags.

What lives on the registered model itself rather than in one version: the aliases (``head``,
``live``, ``last-good``), the salt of state names, and the tombstones of forgotten keys. The
checkpoints, one version each, are written and read by ``pipeline.state.checkpoint.CheckpointStore``.
"""

from __future__ import annotations

import secrets
from typing import Any

from pipeline.config import MlflowConfig
from pipeline.state.tenant_keys import SALT_TAG, TOMBSTONE_TAG


def model_name(stream: str) -> str:
    return f"{stream}-ttt"


class RegisteredModel:
    def __init__(self, config: MlflowConfig, stream: str):
        from mlflow import MlflowClient

        self.config = config
        self.stream = stream
        self.name = model_name(stream)
        self.client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
        self._forgotten: dict[str, int] | None = None  # tombstones: state key -> first version after its forget

    def ensure(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(self.name, tags={"ttt.stream": self.stream})
            except MlflowException:
                pass  # created meanwhile by another writer

    def experiment_id(self) -> str:
        """The experiment the stream's checkpoint runs are logged in."""
        experiment = self.client.get_experiment_by_name(self.config.experiment)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(self.config.experiment)

    def checkpoint_runs(self) -> list[str]:
        """Every checkpoint run of the stream, deleted ones and those no version lists included
        (a checkpoint whose readers wrote their states and then failed; MLflow deletes a run's
        artifacts only at gc)."""
        from mlflow.entities import ViewType

        runs = self.client.search_runs([self.experiment_id()], f"tags.`ttt.stream` = '{self.stream}'",
                                       run_view_type=ViewType.ALL, max_results=10_000)
        return [run.info.run_id for run in runs if run.data.tags.get("ttt.reason") is not None]

    def delete_artifacts(self, run_id: str, paths: list[str]) -> None:
        """Delete files of a run's artifacts (one that is not there is no error)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(self.client.get_run(run_id).info.artifact_uri, tracking_uri=self.config.tracking_uri)
        for path in paths:
            repo.delete_artifacts(path)

    def key_salt(self) -> bytes:
        """The stream's salt of state names (``pipeline.state.tenant_keys``), made on first use."""
        self.ensure()
        tags = self.client.get_registered_model(self.name).tags or {}
        if SALT_TAG not in tags:
            self.client.set_registered_model_tag(self.name, SALT_TAG, secrets.token_hex(32))
            tags = self.client.get_registered_model(self.name).tags  # another writer's, if it was first
        return bytes.fromhex(tags[SALT_TAG])

    # -- versions and aliases ------------------------------------------------------------------

    def resolve(self, ref: str) -> str | None:
        """A version number, or an alias (``live``, ``last-good``), to a version; None if unset."""
        from mlflow.exceptions import MlflowException

        if ref.isdigit():
            return ref
        try:
            return str(self.client.get_model_version_by_alias(self.name, ref).version)
        except MlflowException:
            return None

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def all_versions(self) -> list[Any]:
        # Raises while MLflow is out of reach: tombstones are never taken as "none".
        return list(self.client.search_model_versions(f"name='{self.name}'"))

    def version_tags(self, ref: str) -> dict[str, str]:
        version = self.resolve(ref)
        return {} if version is None else dict(self.client.get_model_version(self.name, version).tags)

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
        for mv in self.all_versions():
            metrics = self.client.get_run(mv.run_id).data.metrics if mv.run_id else {}
            rows.append({
                "version": str(mv.version), "created": mv.creation_timestamp / 1000.0,
                "aliases": sorted(aliases.get(str(mv.version), [])), "tags": dict(mv.tags), "metrics": metrics,
            })
        return sorted(rows, key=lambda r: int(r["version"]), reverse=True)

    def record_metric(self, version: str, key: str, value: float) -> None:
        """A metric of ``version``'s run (the monitor's reference loss)."""
        self.client.log_metric(self.client.get_model_version(self.name, version).run_id, key, float(value))

    def metric(self, ref: str, key: str) -> float | None:
        """A metric of the run of ``ref`` (a version or alias), if it has one."""
        version = self.resolve(ref)
        if version is None:
            return None
        run_id = self.client.get_model_version(self.name, version).run_id
        return self.client.get_run(run_id).data.metrics.get(key)

    # -- forgotten keys ------------------------------------------------------------------------

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
        """Leave a tombstone for ``state_key``: from now on no load returns a state of it from a
        version written so far, whoever loads. Raises (MLflow out of reach), having changed
        nothing, rather than forget in memory only. ``CheckpointStore.erase`` then deletes its files."""
        self.ensure()
        first = max((int(mv.version) for mv in self.all_versions()), default=0) + 1
        self.client.set_registered_model_tag(self.name, TOMBSTONE_TAG + state_key, str(first))
        self.tombstones()[state_key] = first

    def forgotten_in(self, version: str, key: str) -> bool:
        """Whether ``key``'s state in ``version`` was erased (the version is older than its tombstone)."""
        tombstone = self.tombstones().get(key)
        return tombstone is not None and int(version) < tombstone
