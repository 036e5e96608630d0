"""A base model registered in MLflow (model.path: models:/NAME@ALIAS): every file's sha256 in the
version's tags, fetched once per node into a cache, verified before it is loaded, a changed file
refused by name, and a reader reading from it exactly as from the directory. (The Ray job test
runs a whole stream from a registered model on nodes whose working directory has no weights.)"""

from __future__ import annotations

import uuid

import pytest

from actors.call_types import DocumentTask
from actors.document_reader import DocumentReader
from pipeline.state.base_model import (BaseModelIntegrityError, fetch_base_model, file_hashes, register_base_model,
                                       resolve_base_model)
from pipeline.processing.actor_specs import standalone_reader_spec
from tests.conftest import TINY_MODEL
from tests.sample_text import SAMPLE_TEXT

pytestmark = [pytest.mark.stack]
MODEL = TINY_MODEL
TEXT = SAMPLE_TEXT[:3000]


def test_a_registered_base_model_is_fetched_once_verified_and_read_like_its_directory(stack, tmp_path):
    from mlflow import MlflowClient

    uri, name = stack.mlflow.tracking_uri, f"base-{uuid.uuid4().hex[:8]}"
    registered = register_base_model(MODEL, name, uri, stack.mlflow.experiment, alias="base")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = client.get_model_version(name, "1").tags
    assert {k: v for k, v in tags.items() if k.startswith("sha256/")} == \
        {f"sha256/{path}": digest for path, digest in file_hashes(MODEL).items()}
    source = resolve_base_model(f"models:/{name}@base", uri)
    assert source.uri == registered.uri == f"models:/{name}/1" and source.files == registered.files

    cache = tmp_path / "cache"

    def from_mlflow() -> DocumentReader:
        spec = standalone_reader_spec(model_path=source.uri, model_source=source, model_cache_dir=str(cache),
                          device="cpu", spill_dir=str(tmp_path / "spill"))
        return DocumentReader(spec, "remote")

    local = DocumentReader(standalone_reader_spec(model_path=str(MODEL), device="cpu", spill_dir=str(tmp_path / "spill")), "local")
    task = DocumentTask("d", TEXT)
    assert from_mlflow().process(task).loss == local.process(task).loss
    (copy,) = [p for p in cache.iterdir() if p.is_dir()]
    weights = (copy / "model.safetensors").stat().st_mtime_ns
    from_mlflow()  # a second reader of the node: the cached copy, checked again, not downloaded again
    assert [p for p in cache.iterdir() if p.is_dir()] == [copy] and (copy / "model.safetensors").stat().st_mtime_ns == weights

    with open(copy / "tokenizer_config.json", "a") as f:
        f.write(" ")
    with pytest.raises(BaseModelIntegrityError, match=r"tokenizer_config\.json sha256 \w+ != registered"):
        from_mlflow()

    # A download that does not match the registered hashes is refused and not kept.
    client.set_model_version_tag(name, "1", "sha256/config.json", "0" * 64)
    with pytest.raises(BaseModelIntegrityError, match=r"config\.json sha256 \w+ != registered 0{64}"):
        fetch_base_model(resolve_base_model(f"models:/{name}/1", uri), tmp_path / "other")
    assert not [p for p in (tmp_path / "other").iterdir() if p.is_dir()]

    with pytest.raises(FileNotFoundError, match=f"models:/{name}@nope: not found in MLflow"):
        resolve_base_model(f"models:/{name}@nope", uri)
