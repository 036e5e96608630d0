"""The base model from MLflow, for clusters without a shared file system.

``ttt-stream register-model DIR --name NAME`` logs a model directory (weights, tokenizer,
config) as a run's artifact and registers it as a version of NAME, with the sha256 of every file
in the version's tags (and the run's: ``runs:/`` URIs work too). ``model.path`` may then be
``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN_ID/model``: the driver pins it to
one version, and every reader downloads that version once per node into ``model.cache_dir``
and checks every file against the registered hashes before anything is loaded (and again at
every later load from the cache). A missing, extra or changed file is refused with its name.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HASH_TAG = "sha256/"  # + the file's path in the model directory
DEFAULT_CACHE_DIR = Path("/tmp/ttt-stream/models")  # on each node's own disk
URI_SCHEMES = ("models:/", "runs:/")


class BaseModelIntegrityError(RuntimeError):
    """A downloaded or cached base model whose files are not the registered ones."""


def masked_uri(uri: str) -> str:
    """``uri`` with the password of a ``user:password@`` part shown as ``***``: what a log, a
    printed config or the config digest may hold of it."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)(.*)@([^@/]*)(/.*)?$", uri, re.S)
    if match is None:
        return uri
    scheme, userinfo, host, path = match.groups()
    # The last @ before the host ends the credentials, whatever they hold (/, @, :); without a
    # colon the whole user part is a token.
    user = userinfo.split(":", 1)[0] + ":***" if ":" in userinfo else "***"
    return f"{scheme}{user}@{host}{path or ''}"


def is_model_uri(path: str | Path) -> bool:
    return str(path).startswith(URI_SCHEMES)


@dataclass(frozen=True)
class BaseModelSource:
    """One registered base model, pinned: the URI of one version (or run) and its files' hashes."""

    uri: str
    files: dict[str, str] = field(default_factory=dict)  # path in the directory -> sha256
    tracking_uri: str | None = field(default=None, repr=False)  # may hold credentials

    def fetch(self, cache_dir: str | Path) -> Path:
        """This model's directory on this node (``fetch_base_model``). The driver pins the source
        and hands it to each reader, which calls this in its own process."""
        return fetch_base_model(self, Path(cache_dir))


def file_hashes(directory: Path) -> dict[str, str]:
    hashes = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        hashes[file.relative_to(directory).as_posix()] = digest.hexdigest()
    return hashes


def register_base_model(directory: Path, name: str, tracking_uri: str, experiment: str,
                        alias: str | None = None) -> BaseModelSource:
    """Log ``directory`` as a run's artifact ``model/`` and register it as a new version of
    ``name`` (alias ``alias`` moved to it); returns the pinned source."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: not a model directory (no config.json)")
    hashes = file_hashes(directory)
    tags = {HASH_TAG + path: digest for path, digest in hashes.items()}
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"base-model-{name}", tags={"ttt.base_model": name, **tags})
    client.log_artifacts(run.info.run_id, str(directory), "model")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # it exists
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                          tags=tags).version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    log.info("registered %s as %s v%s (%d files)", directory, name, version, len(hashes))
    return BaseModelSource(f"models:/{name}/{version}", hashes, tracking_uri)


def resolve_base_model(uri: str, tracking_uri: str | None) -> BaseModelSource:
    """``uri`` pinned to one version (an alias resolved now), with the registered hashes."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if uri.startswith("runs:/"):
            run_id = uri.removeprefix("runs:/").split("/", 1)[0]
            pinned, tags = uri, client.get_run(run_id).data.tags
        else:
            name, _, ref = uri.removeprefix("models:/").partition("@")
            if ref:
                mv = client.get_model_version_by_alias(name, ref)
            else:
                name, _, number = name.rpartition("/")
                mv = client.get_model_version(name, number)
            pinned, tags = f"models:/{mv.name}/{mv.version}", mv.tags
    except MlflowException as err:
        raise FileNotFoundError(f"model.path: {uri}: not found in MLflow at {masked_uri(tracking_uri or '')} ({err.error_code})") from None
    files = {k.removeprefix(HASH_TAG): v for k, v in tags.items() if k.startswith(HASH_TAG)}
    if not files:
        raise BaseModelIntegrityError(f"model.path: {uri} has no file hashes in its tags: register it with "
                                      f"`ttt-stream register-model`")
    return BaseModelSource(pinned, files, tracking_uri)


def fetch_base_model(source: BaseModelSource, cache_dir: Path) -> Path:
    """The local directory of ``source``: downloaded once per node (one process downloads, the
    others wait), every file's hash checked against the registered ones before it is returned."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{source.uri}\n{sorted(source.files.items())}".encode()).hexdigest()[:24]
    target = cache_dir / key
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            _download(source, cache_dir, target)  # verified there, before it is kept
            return target
    verify_model_files(target, source)  # a cached copy: checked again at every load
    return target


def _download(source: BaseModelSource, cache_dir: Path, target: Path) -> None:
    import mlflow.artifacts
    from mlflow import MlflowClient

    where = source.uri
    if where.startswith("models:/"):  # the version's artifacts, from this registry (not the default one)
        name, _, version = where.removeprefix("models:/").rpartition("/")
        client = MlflowClient(tracking_uri=source.tracking_uri, registry_uri=source.tracking_uri)
        where = client.get_model_version_download_uri(name, version)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=str(staging),
                                                         tracking_uri=source.tracking_uri))
        verify_model_files(local, source)  # before it can be taken for a good copy
        local.rename(target)
        log.info("%s downloaded to %s and verified (%d files)", source.uri, target, len(source.files))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify_model_files(directory: Path, source: BaseModelSource) -> None:
    got = file_hashes(directory)
    for path in sorted(set(source.files) | set(got)):
        if path not in got:
            raise BaseModelIntegrityError(f"{source.uri}: {path} is missing from {directory}")
        if path not in source.files:
            raise BaseModelIntegrityError(f"{source.uri}: {path} in {directory} is not a registered file")
        if got[path] != source.files[path]:
            raise BaseModelIntegrityError(f"{source.uri}: {path} sha256 {got[path]} != registered {source.files[path]}")


def local_model_dir(path: str | Path, tracking_uri: str | None, cache_dir: Path) -> tuple[Path, BaseModelSource | None]:
    """A model directory for ``model.path``: the path itself, or a registered model fetched and
    verified (with its pinned source)."""
    if not is_model_uri(path):
        return Path(path), None
    source = resolve_base_model(str(path), tracking_uri)
    return fetch_base_model(source, cache_dir), source
