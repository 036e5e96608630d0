"""Per-key states: a bounded LRU that spills to hash-verified safetensors and reloads on demand."""

import pytest
import torch

from actors.reader_names import current_name, name_before_the_rename
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


def files(path):
    return len(list(path.glob("*.safetensors")))


def test_ten_thousand_keys_stay_within_the_key_and_disk_bounds(model, tmp_path):
    store = StateStore("per_key", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=4,
                       spill_dir=tmp_path, max_keys=16)
    one_state = len(store.get("probe").state.to_bytes())
    for i in range(10_000):
        marked(store, f"tenant-{i}", float(i))
        assert store.in_memory <= 4 and len(store) <= 16
    assert files(tmp_path) == 12  # the rest of the 16 held, and nothing else
    assert sum(f.stat().st_size for f in tmp_path.glob("*.safetensors")) < 12 * (one_state + 4096)
    assert store.expired == 10_001 - 16  # "probe" too
    # The most recent 16 keys are the ones held, each with its own state.
    assert sorted(b.key for b in store.snapshot()) == sorted(f"tenant-{i}" for i in range(10_000 - 16, 10_000))
    assert store.get("tenant-9990").state.fast.layers[0].delta.eq(9990.0).all()


def test_a_reloaded_key_s_spill_file_is_deleted_and_a_forgotten_key_leaves_nothing(model, tmp_path):
    store = StateStore("per_key", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=1, spill_dir=tmp_path)
    marked(store, "a", 1.0)
    marked(store, "b", 2.0)
    assert files(tmp_path) == 1
    store.get("a")  # "a" back in memory (its file deleted), "b" spilled
    assert files(tmp_path) == 1 and store.reloads == 1
    assert store.forget("b") and files(tmp_path) == 0 and "b" not in store
    assert not list(tmp_path.iterdir())  # the sha256 sidecars went too
    assert store.forget("a") and len(store) == 0 and not store.forget("a")


def test_a_restarted_reader_removes_the_spill_files_of_its_earlier_incarnation(model, tmp_path):
    def new_store():
        return StateStore("per_key", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=1, spill_dir=tmp_path)

    died = new_store()
    for key in ("a", "b", "c"):
        marked(died, key, 1.0)
    assert files(tmp_path) == 2  # the reader dies here: nothing indexes these files any more
    again = new_store()  # its next incarnation (its states come back from a checkpoint)
    assert files(tmp_path) == 0 and not list(tmp_path.iterdir())
    marked(again, "a", 2.0)
    marked(again, "b", 2.0)
    # And a forget removes a key's file even where this incarnation never wrote it.
    stray = again._path("z")
    stray.write_bytes(b"a state of z, left by someone else")
    assert not again.forget("z") and not stray.exists()


def test_an_empty_key_and_no_key_are_two_states(model, tmp_path):
    store = StateStore("per_key", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=4, spill_dir=tmp_path)
    marked(store, "", 1.0)
    marked(store, None, 2.0)
    assert len(store) == 2 and store.get("").state.fast.layers[0].delta.eq(1.0).all()


def test_keys_unread_for_the_retention_are_forgotten_and_a_restore_forgets_the_same(model, tmp_path):
    def new_store(path):
        return StateStore("per_key", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=2,
                          spill_dir=path, retention_documents=5)

    order = [f"k{i % 7}" if i % 3 else "hot" for i in range(60)] + [f"late-{i}" for i in range(8)]
    straight = new_store(tmp_path / "straight")
    for i, key in enumerate(order):
        marked(straight, key, float(i))
    assert straight.expired > 0 and "k1" not in straight and "hot" not in straight
    # Half way, a snapshot into a new store (a reader restored from a checkpoint): the keys it
    # forgets afterwards, and the states it ends with, are the same.
    first = new_store(tmp_path / "first")
    for i, key in enumerate(order[:30]):
        marked(first, key, float(i))
    restored = new_store(tmp_path / "restored")
    restored.restore(first.snapshot())
    for i, key in enumerate(order[30:], start=30):
        marked(restored, key, float(i))
    assert [(b.key, b.sha256, b.last_read) for b in restored.snapshot()] == \
        [(b.key, b.sha256, b.last_read) for b in straight.snapshot()]


def test_a_reader_removes_the_spill_files_it_left_under_its_name_from_before_the_rename(model, tmp_path):
    """``<stream>-worker-<i>`` became ``<stream>-reader-<i>``: the spill files of the same reader
    under its old name are removed too (nothing indexes them: they would outlive a forget)."""
    old = StateStore("per_key", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=1,
                     spill_dir=tmp_path / "s-worker-0")
    marked(old, "a", 1.0)
    marked(old, "b", 2.0)
    assert len(list((tmp_path / "s-worker-0").glob("*.safetensors"))) == 1
    other = tmp_path / "s-worker-1"
    other.mkdir()
    (other / "x.safetensors").write_bytes(b"another reader's")
    assert name_before_the_rename("s-reader-0") == "s-worker-0" and current_name("s-worker-0") == "s-reader-0"
    StateStore("per_key", lambda: AdaptedState(FastWeightState.for_model(model)), capacity=1,
               spill_dir=tmp_path / "s-reader-0", earlier_spill_dirs=(tmp_path / name_before_the_rename("s-reader-0"),))
    assert list((tmp_path / "s-worker-0").glob("*.safetensors")) == []
    assert (other / "x.safetensors").exists()  # not this reader's
