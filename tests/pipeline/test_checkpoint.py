"""Checkpoints on the real MLflow server: versions, aliases, verification on load."""

import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from actors.state_store import StateBlob
from pipeline.state.checkpoint import HEAD, LAST_GOOD, LIVE, CheckpointError, CheckpointRequest, CheckpointStore
from tests.ttt_model.reference import tiny_model
from ttt_model import FastWeightState, TTTConfig, enable_ttt

pytestmark = [pytest.mark.stack]


def blob(key: str, value: float, documents: int, partition: int | None = None) -> StateBlob:
    import hashlib

    model = tiny_model("qwen3", seed=0)
    enable_ttt(model, TTTConfig(layers=[1], chunk_size=4))
    state = FastWeightState.for_model(model)
    state.layers[1].delta.fill_(value)
    data = state.to_bytes()
    return StateBlob(key, data, hashlib.sha256(data).hexdigest(), documents, partition)


def request(value: float, offsets: dict[int, int], parent: str | None, reason: str = "periodic") -> CheckpointRequest:
    return CheckpointRequest(
        states={"w-0": [blob("__global__", value, 3)], "w-1": [blob("a", -value, 1, 1), blob("b", value, 2, 3)]},
        topic="docs", offsets=offsets, config_digest="c" * 64, base_model={"path": "m", "weights_sha256": "0" * 64},
        documents=6, reason=reason, parent_version=parent, metrics={"adapted_loss": 3.5, "base_loss": 3.7},
        assignment={0: "w-0", 1: "w-1"},
    )


@pytest.fixture()
def store(stack):
    return CheckpointStore(stack.mlflow, f"test-{uuid.uuid4().hex[:8]}")


def test_versions_aliases_and_a_verified_round_trip(store):
    v1 = store.save(request(1.0, {0: 10, 1: 7}, None))
    store.registry.set_alias(LAST_GOOD, v1)
    v2 = store.save(request(2.0, {0: 20, 1: 15}, v1))
    assert (store.registry.resolve(LIVE), store.registry.resolve(LAST_GOOD)) == (v2, v1)
    loaded = store.load(LIVE)
    assert loaded.version == v2 and loaded.offsets == {0: 20, 1: 15}
    assert loaded.manifest["parent_version"] == v1 and loaded.manifest["reason"] == "periodic"
    original = request(2.0, {}, None).states
    assert {w: [(b.key, b.sha256, b.documents, b.partition) for b in blobs] for w, blobs in loaded.states.items()} == \
        {w: [(b.key, b.sha256, b.documents, b.partition) for b in blobs] for w, blobs in original.items()}
    assert loaded.manifest["assignment"] == {"0": "w-0", "1": "w-1"}  # for rescaling (pipeline.state.rescale)
    assert loaded.states["w-1"][0].data == original["w-1"][0].data
    assert store.load(LAST_GOOD).offsets == {0: 10, 1: 7}
    rows = store.registry.versions()
    assert [r["version"] for r in rows] == [v2, v1]
    assert rows[0]["aliases"] == [HEAD, LIVE] and rows[1]["aliases"] == [LAST_GOOD]
    assert rows[0]["tags"]["reason"] == "periodic" and rows[0]["tags"]["parent_version"] == v1
    assert rows[0]["metrics"]["adapted_loss"] == pytest.approx(3.5)
    # A candidate the promotion gate did not pass: the newest version (head, where a restart reads
    # on), never live.
    v3 = store.save(replace(request(3.0, {0: 30, 1: 22}, v2), promote=False))
    assert (store.registry.resolve(HEAD), store.registry.resolve(LIVE)) == (v3, v2)


def test_a_tampered_or_missing_artifact_fails_clearly(store, stack):
    version = store.save(request(1.0, {0: 1}, None))
    artifacts = stack.local_stack.data_dir.resolve()
    (manifest,) = [p for p in artifacts.rglob("manifest.json") if store.load(version).manifest["stream"] == store.stream
                   and (p.parent / "states").exists() and store.stream in p.read_text()]
    state_file = next((manifest.parent / "states" / "w-1").glob("*.safetensors"))
    data = bytearray(state_file.read_bytes())
    data[-1] ^= 0xFF
    state_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        store.load(version)
    state_file.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        store.load(version)
    with pytest.raises(CheckpointError, match="no version is aliased"):
        store.load(LAST_GOOD)


def uploaded_states(store, version) -> list[str]:
    run_id = store.client.get_model_version(store.name, version).run_id
    from pipeline.state.checkpoint import checkpoint_artifact

    root = checkpoint_artifact("states")
    return [f.path for d in store.client.list_artifacts(run_id, root) for f in store.client.list_artifacts(run_id, d.path)]


def test_a_checkpoint_uploads_only_the_states_that_changed_and_loads_whole(store, stack):
    first = request(1.0, {0: 5}, None)
    v1 = store.save(first)
    assert len(uploaded_states(store, v1)) == 3
    changed = request(1.0, {0: 9}, v1)
    changed.states["w-1"][1] = blob("b", 7.0, 3, 3)  # one key read since: its state changed
    v2 = store.save(changed)
    assert len(uploaded_states(store, v2)) == 1  # b's, and nothing else
    # A store that never saw v1 loads v2 whole, every file hash-checked, the reused ones from v1's run.
    fresh = CheckpointStore(stack.mlflow, store.stream)
    loaded = fresh.load(v2)
    assert {w: [(b.key, b.data) for b in blobs] for w, blobs in loaded.states.items()} == \
        {w: [(b.key, b.data) for b in blobs] for w, blobs in changed.states.items()}
    # The next version from that store reuses what v1 and v2 hold: nothing is uploaded.
    v3 = fresh.save(changed)
    assert uploaded_states(store, v3) == [] and fresh.load(v3).states == loaded.states
    # The pyfunc (models:/...) reads a reused file from the run that wrote it, hash-checked too.
    import mlflow

    from pipeline.state.adapted_model import verified_state_bytes

    mlflow.set_tracking_uri(stack.mlflow.tracking_uri)
    entry = next(e for e in loaded.manifest["readers"]["w-0"])
    assert "run_id" in entry and verified_state_bytes(Path("/nonexistent"), entry) == changed.states["w-0"][0].data
    with pytest.raises(ValueError, match="sha256"):
        verified_state_bytes(Path("/nonexistent"), {**entry, "sha256": "0" * 64})


def test_retention_keeps_the_newest_the_aliased_and_the_referenced_versions(store):
    v1 = store.save(request(1.0, {0: 1}, None))  # its files stay in use: later versions keep w-0 and a
    versions = [v1]
    for i in range(2, 7):
        req = request(1.0, {0: i}, versions[-1])
        req.states["w-1"][1] = blob("b", float(i), 3, 3)  # only b changes
        versions.append(store.save(req))
    store.registry.set_alias(LAST_GOOD, versions[2])
    deleted = store.prune(keep=2)
    # v1 holds the unchanged files every later version reads; v3 is last-good; v5, v6 the newest.
    assert sorted(deleted, key=int) == [versions[1], versions[3]]
    remaining = {r["version"] for r in store.registry.versions()}
    assert remaining == {versions[0], versions[2], versions[4], versions[5]}
    for version in remaining:  # each still loads whole
        assert len(store.load(version).states["w-1"]) == 2
