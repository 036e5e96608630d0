"""A run's artifacts, written from any process.

The driver opens a checkpoint's MLflow run and hands each reader a ``StateTarget`` holding one of
these: the reader uploads its own states through it (``actors.state_upload``) without knowing
MLflow, and the driver, which commits the version, never holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(unsafe_hash=True)
class RunArtifacts:
    """The artifact root of one MLflow run (``artifact_uri``) on the server ``tracking_uri``."""

    artifact_uri: str
    tracking_uri: str = field(repr=False)  # may hold credentials
    # MLflow's repository of the root, opened on first use in the process that writes (a reader's).
    _repository: Any = field(default=None, init=False, repr=False, compare=False)

    def log_artifact(self, local_path: str, artifact_path: str) -> None:
        if self._repository is None:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            self._repository = get_artifact_repository(self.artifact_uri, tracking_uri=self.tracking_uri)
        self._repository.log_artifact(local_path, artifact_path)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_repository": None}  # a client's connections stay in its process
