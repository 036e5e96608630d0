"""Per-key states: a bounded LRU that spills to hash-verified safetensors and reloads on demand."""

import pytest
import torch

from actors.state_store import StateStore
from tests.ttt_model.reference import tiny_model
from ttt_model import FastWeightState, StateIntegrityError, TTTConfig, enable_ttt
from ttt_model.adapted_state import AdaptedState


@pytest.fixture()
def model():
    m = tiny_model("qwen3", seed=0)
    enable_ttt(m, TTTConfig(layers=[0, 2], chunk_size=4))
    return m


def marked(store: StateStore, key: str, value: float) -> None:
    scoped = store.get(key)
    for _, layer in scoped.state.fast:
        layer.delta.fill_(value)
    scoped.documents += 1


def test_lru_spills_the_least_recent_key_and_reloads_it_exactly(model, tmp_path):
    store = StateStore("per_key", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=2, spill_dir=tmp_path)
    marked(store, "a", 1.0)
    marked(store, "b", 2.0)
    store.get("a")  # "a" is now the most recent: "b" goes when "c" arrives
    marked(store, "c", 3.0)
    assert store.in_memory == 2 and len(store) == 3 and store.spills == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    b = store.get("b")  # reloaded from disk; "a" spills now
    assert store.reloads == 1 and b.documents == 1
    assert all(torch.equal(layer.delta, torch.full_like(layer.delta, 2.0)) for _, layer in b.state.fast)
    assert all(torch.equal(layer.delta, torch.full_like(layer.delta, 1.0)) for _, layer in store.get("a").state.fast)
    fresh = store.get("new")
    assert fresh.documents == 0 and all(not layer.delta.any() for _, layer in fresh.state.fast)


def test_a_corrupt_spilled_state_is_refused(model, tmp_path):
    store = StateStore("per_key", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=1, spill_dir=tmp_path)
    marked(store, "a", 1.0)
    marked(store, "b", 2.0)
    (spilled,) = tmp_path.glob("*.safetensors")
    data = bytearray(spilled.read_bytes())
    data[-1] ^= 0xFF
    spilled.write_bytes(bytes(data))
    with pytest.raises(StateIntegrityError, match="sha256"):
        store.get("a")


def test_global_scope_shares_one_state_and_per_document_resets_it(model, tmp_path):
    shared = StateStore("global", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=1, spill_dir=tmp_path)
    marked(shared, "a", 1.0)
    assert shared.get("b").documents == 1 and shared.get(None).state.fast.layers[0].delta.eq(1.0).all()
    per_doc = StateStore("per_document", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=1, spill_dir=tmp_path)
    marked(per_doc, "a", 1.0)
    assert not per_doc.get("a").state.fast.layers[0].delta.any()


def test_snapshot_and_restore_round_trip_bit_exactly_including_spilled_states(model, tmp_path):
    store = StateStore("per_key", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=1, spill_dir=tmp_path / "a")
    for key, value in (("a", 1.5), ("b", -2.25), ("c", 3.0)):
        marked(store, key, value)
    blobs = store.snapshot()
    assert [b.key for b in blobs] == ["a", "b", "c"] and all(b.documents == 1 for b in blobs)
    other = StateStore("per_key", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=2, spill_dir=tmp_path / "b")
    other.restore(blobs)
    assert len(other) == 3 and other.in_memory == 2
    for key, value in (("a", 1.5), ("b", -2.25), ("c", 3.0)):
        scoped = other.get(key)
        assert scoped.documents == 1
        assert all(torch.equal(layer.delta, torch.full_like(layer.delta, value)) for _, layer in scoped.state.fast)
    assert [b.sha256 for b in other.snapshot()] == [b.sha256 for b in blobs]


def test_restore_refuses_a_blob_whose_bytes_do_not_match_its_hash(model, tmp_path):
    from actors.state_store import StateBlob

    store = StateStore("global", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=1, spill_dir=tmp_path)
    marked(store, "x", 4.0)
    (blob,) = store.snapshot()
    bad = StateBlob(blob.key, blob.data[:-1] + bytes([blob.data[-1] ^ 1]), blob.sha256, blob.documents)
    with pytest.raises(StateIntegrityError, match="sha256"):
        store.restore([bad])
    assert store.get(None).state.fast.layers[0].delta.eq(4.0).all()  # the current state is kept
