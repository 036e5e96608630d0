"""Rescaling from a checkpoint: the stream goes on with another ``processor.readers`` (2 -> 3,
3 -> 1). per_key states follow their keys' partitions (bitwise equal to one reader reading every
key); global and per_document states follow the documented rule (pipeline.state.rescale). The real
StreamProcessor, StreamCheckpointer and restore path over the in-process fakes of
test_processor_core; the per_key runs read with real DocumentReaders."""

from __future__ import annotations

import hashlib
import json

import pytest

from actors.assignment import assign_partitions
from actors.call_types import DocumentTask
from actors.document_reader import DocumentReader
from actors.state_store import StateBlob
from pipeline.state.tenant_keys import TenantKeys
from pipeline.state.checkpoint import LIVE, Checkpoint, CheckpointError, parse_manifest
from pipeline.config import parse_config
from pipeline.processing.actor_specs import as_actors_see_it, reader_spec
from pipeline.processing.job import DurableParts, build_processor, restore_from_checkpoint
from pipeline.state.rescale import states_for_readers
from tests.conftest import TINY_MODEL
from tests.pipeline.test_processor_core import TOPIC, FakePool, FakeSinks, FakeSource, FakeStore, FakeWorker
from tests.sample_text import SAMPLE_TEXT

MODEL = str(TINY_MODEL)
TEXT = SAMPLE_TEXT


def app_config(tmp_path, readers: int, scope: str):
    return parse_config({
        "kafka": {"topics": {"documents": TOPIC, "partitions": 3}},
        "model": {"path": MODEL, "device": "cpu", "slow": {"enabled": False}},
        "processor": {"readers": readers, "scope": scope, "deterministic": True, "base_loss_sample_rate": 0.0,
                      "max_keys_in_memory": 2, "spill_dir": str(tmp_path / "spill"), "poll_timeout_ms": 1,
                      "checkpoint": {"every_documents": 4, "every_seconds": 3600}, "monitor": {"enabled": False}},
    }, environ={})


def keyed_documents(per_partition: int) -> dict[int, list[dict]]:
    """Three partitions with two keys each (a key's records in one partition, as Kafka's keyed
    partitioner puts them), short texts."""
    return {p: [{"id": f"p{p}-{i:02d}", "key": f"k{p}{'ab'[i % 2]}",
                 "text": TEXT[(p * 31 + i) * 97 : (p * 31 + i) * 97 + 300]} for i in range(per_partition)]
            for p in range(3)}


def run_from_live(config, store, docs, make_reader):
    """One run of the stream as ``ttt-stream run`` does it: readers, assignment, restore from
    ``live`` (if any), read until idle, a checkpoint at the end."""
    pool = FakePool(config.processor.readers, make_reader)
    source = FakeSource(docs)
    assignment = assign_partitions(sorted(docs), config.processor.readers)
    checkpointer = restore_from_checkpoint(config, store, source, pool, {p: 0 for p in docs}, assignment)
    proc = build_processor(config.processor, source, FakeSinks(), pool, assignment, "s", DurableParts(checkpointer))
    proc.run(until_idle_s=0.05)
    return pool, proc.sinks


def first(docs, n):
    return {p: d[:n] for p, d in docs.items()}


def test_per_key_states_follow_their_partitions_from_2_to_3_to_1_readers_bitwise(tmp_path):
    docs = keyed_documents(9)
    store = FakeStore()
    results = []
    for readers, upto in ((2, 3), (3, 6), (1, 9)):
        config = app_config(tmp_path / str(readers), readers, "per_key")
        pool, sinks = run_from_live(config, store, first(docs, upto),
                                    lambda name, c=config: DocumentReader(reader_spec(as_actors_see_it(c)), name))
        results += [r["id"] for r in sinks.results]
        live = store.load(LIVE)
        owner = {int(p): w for p, w in live.manifest["assignment"].items()}
        for reader, blobs in live.states.items():  # every key where its partition is read
            assert all(owner[b.partition] == reader for b in blobs), reader

    # Nothing lost, nothing read twice, and every key's state is the one a single reader that
    # read all of the key's documents has.
    assert sorted(results) == sorted(d["id"] for p in docs.values() for d in p)
    one = DocumentReader(reader_spec(as_actors_see_it(app_config(tmp_path / "one", 1, "per_key"))), "one")
    keys = TenantKeys.unpersisted("s")  # the names the processor gave the states
    for p in sorted(docs):
        for d in docs[p]:
            one.process(DocumentTask(d["id"], d["text"], keys.state_key(d["key"]), p))
    want = {b.key: (b.sha256, b.documents, b.partition) for b in one.snapshot()}
    got = [(b.key, (b.sha256, b.documents, b.partition)) for blobs in store.load(LIVE).states.values() for b in blobs]
    assert dict(got) == want and len(got) == len(want) == 6
    a_keys = {keys.state_key(d["key"]) for p in docs.values() for d in p if d["key"].endswith("a")}
    assert all(documents == 9 // 2 + (key in a_keys) for key, (_, documents, _) in got)


@pytest.mark.parametrize("scope", ["global", "per_document"])
def test_global_and_per_document_states_go_to_the_reader_of_the_lowest_partition(tmp_path, scope):
    docs = {p: [{"id": f"p{p}-{i:02d}", "text": "x"} for i in range(9)] for p in range(3)}
    store = FakeStore()
    run_from_live(app_config(tmp_path, 2, scope), store, first(docs, 3), FakeWorker)
    # Two readers: reader 0 read partitions 0 and 2, reader 1 partition 1.
    before = {name: json.loads(blobs[0].data) for name, blobs in store.load(LIVE).states.items()}
    assert before == {"s-reader-0": [f"p{p}-{i:02d}" for p in (0, 2) for i in range(3)],
                      "s-reader-1": [f"p1-{i:02d}" for i in range(3)]}

    pool, _ = run_from_live(app_config(tmp_path, 3, scope), store, first(docs, 6), FakeWorker)
    # Three: partition 2's new reader starts from the state of the reader that read partition 2.
    new = [f"p{p}-{i:02d}" for p in range(3) for i in range(3, 6)]
    assert [w.read for w in pool.readers] == [before["s-reader-0"] + new[0:3], before["s-reader-1"] + new[3:6],
                                              before["s-reader-0"] + new[6:9]]

    after_three = [w.read for w in pool.readers]
    pool, _ = run_from_live(app_config(tmp_path, 1, scope), store, docs, FakeWorker)
    # One: it goes on from the state of partition 0's reader; the other two are dropped.
    assert pool.readers[0].read == after_three[0] + [f"p{p}-{i:02d}" for p in range(3) for i in range(6, 9)]


def blob(key, partition, documents=1):
    data = f"{key}/{partition}/{documents}".encode()
    return StateBlob(key, data, hashlib.sha256(data).hexdigest(), documents, partition)


def checkpoint(states, assignment=None, partitions=(0, 1, 2)):
    manifest = {"offsets": {"topic": TOPIC, "partitions": {str(p): 5 for p in partitions}}}
    if assignment is not None:
        manifest["assignment"] = {str(p): w for p, w in assignment.items()}
    return Checkpoint("7", manifest, states)


def test_the_same_readers_take_back_their_own_states_even_without_recorded_partitions():
    states = {"w-0": [blob("a", None)], "w-1": [blob("b", None)]}
    got = states_for_readers(checkpoint(states), ["w-0", "w-1"], {0: 0, 1: 1, 2: 0}, "per_key")
    assert got == states


def test_a_key_read_from_two_partitions_keeps_the_state_with_more_documents_where_both_land():
    states = {"w-0": [blob("", 0, documents=3)], "w-1": [blob("", 1, documents=5)]}
    got = states_for_readers(checkpoint(states, {0: "w-0", 1: "w-1", 2: "w-0"}), ["w-0"], {0: 0, 1: 0, 2: 0}, "per_key")
    assert got == {"w-0": [states["w-1"][0]]}


def test_a_per_key_state_without_its_partition_or_from_a_partition_not_read_is_refused():
    old = checkpoint({"w-0": [blob("a", None)], "w-1": [blob("b", 1)]}, {0: "w-0", 1: "w-1", 2: "w-0"})
    with pytest.raises(CheckpointError, match="key 'a' on w-0 does not record its partition.*readers = 2"):
        states_for_readers(old, ["w-0"], {0: 0, 1: 0, 2: 0}, "per_key")
    gone = checkpoint({"w-0": [blob("a", 2)]}, {0: "w-0", 1: "w-0", 2: "w-0"})
    with pytest.raises(CheckpointError, match="partition 2, which this run does not read"):
        states_for_readers(gone, ["w-0", "w-1"], {0: 0, 1: 1}, "per_key")


@pytest.mark.parametrize("scope", ["global", "per_key"])
def test_a_checkpoint_written_before_the_rename_gives_each_reader_its_own_states(scope):
    """Readers were "<stream>-worker-<i>", under "workers": a version written then (a rollback
    target, a restart's) reads as one of "<stream>-reader-<i>", so that each reader takes back its
    own states rather than none (the rescale rule would drop names it does not know)."""
    legacy = {"format": "ttt-stream-checkpoint", "offsets": {"partitions": {"0": 4, "1": 6}},
              "workers": {"s-worker-0": [{"key": "a"}], "s-worker-1": [{"key": "b"}]},
              "assignment": {"0": "s-worker-0", "1": "s-worker-1"}}
    manifest = parse_manifest(json.dumps(legacy))
    assert sorted(manifest["readers"]) == ["s-reader-0", "s-reader-1"] and "workers" not in manifest
    assert manifest["assignment"] == {"0": "s-reader-0", "1": "s-reader-1"}
    states = {name: [blob(entries[0]["key"], int(name[-1]))] for name, entries in manifest["readers"].items()}
    got = states_for_readers(Checkpoint("3", manifest, states), ["s-reader-0", "s-reader-1"], {0: 0, 1: 1}, scope)
    assert got == states
