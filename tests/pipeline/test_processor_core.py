"""The processor's run loop without Ray, Kafka or MLflow: a reader dies, MLflow goes away, the
monitor rolls back. In-process fakes stand in for the reader pool, the topic, the sinks and the
model registry; the StreamProcessor, StreamCheckpointer, OffsetTracker and DegradationMonitor
are the real ones. (The full stack runs the same sequences in test_recovery.py,
test_mlflow_outage.py and test_monitor_rollback.py.)"""

from __future__ import annotations

import hashlib
import itertools
import json
import time

import pytest
from kafka.consumer.fetcher import ConsumerRecord

from actors.call_types import DocumentOutcome, DocumentTask
from actors.state_store import StateBlob
from pipeline.state.tenant_keys import TenantKeys
from pipeline.state.checkpoint import HEAD, LAST_GOOD, LIVE, Checkpoint, StreamCheckpointer
from pipeline.config import CheckpointConfig, ControlConfig, MonitorConfig, ProcessorConfig
from pipeline.stream_io.control import ControlCommand
from pipeline.observability.monitor import DegradationMonitor
from pipeline.processing.job import DurableParts, build_processor
from pipeline.processing.reader_pool import ContextParallelFailure, ReaderDied
from pipeline.processing.reader_deadlines import RestartBudget, RestartBudgetSpent

TOPIC = "docs"


class FakeWorker:
    """Its state is the ids it has read, in order; a document's loss is 1 + the state's length
    (0.01 per id), and 9 for a document whose text is "poison" (whose fast weights also move far:
    delta ratio 5, else 0.1)."""

    def __init__(self, name: str):
        self.name = name
        self.read: list[str] = []

    def process(self, task: DocumentTask) -> DocumentOutcome:
        self.read.append(task.id)
        loss = 9.0 if task.text == "poison" else 1.0 + 0.01 * len(self.read)
        return DocumentOutcome(task.id, ok=True, tokens=10, loss=loss, reader=self.name,
                               delta_ratio=5.0 if task.text == "poison" else 0.1)

    def snapshot(self) -> list[StateBlob]:
        data = json.dumps(self.read).encode()
        return [StateBlob("__global__", data, hashlib.sha256(data).hexdigest(), len(self.read))]

    def restore(self, blobs: list[StateBlob]) -> None:
        self.read = json.loads(blobs[0].data) if blobs else []


class FakePool:
    """Runs each document when it is submitted; ``kill(w, after=n)`` makes reader ``w`` die on
    its n-th next document: that call and every later one fails until the pool is waited on for
    readiness, which brings it back with an empty state (a restarted actor)."""

    def __init__(self, n: int, make_reader=FakeWorker):
        self.names = [f"s-reader-{i}" for i in range(n)]
        self.make_reader = make_reader  # name -> a reader (FakeWorker, or a real DocumentReader)
        self.readers = [make_reader(name) for name in self.names]
        self.dead = [False] * n
        self.die_in = [None] * n
        self.outcomes = {}
        self.handles = itertools.count()
        self.restarts = 0
        self.parallel_failures: dict[str, int] = {}  # document id -> context-parallel reads that fail
        self.batches: list[int] = []  # documents per submit call
        self.killers: set[str] = set()  # document ids that kill their reader whenever read
        self.hangers: set[str] = set()  # document ids their reader never finishes (until restarted)
        self.hung: dict[int, list] = {}  # reader -> handles that never finish
        self.in_flight_at_kill: list[int] = []  # calls of the batch that killed the reader

    def fail_parallel(self, doc_id: str, times: int) -> None:
        self.parallel_failures[doc_id] = times

    def kill(self, w: int, after: int) -> None:
        self.die_in[w] = after

    def submit(self, w, tasks, slow_version=None):
        self.batches.append(len(tasks))
        if any(t.id in self.killers for t in tasks):
            self.in_flight_at_kill.append(len(tasks))
        return [self._submit_one(w, task) for task in tasks]

    def _submit_one(self, w, task):
        handle = next(self.handles)
        if self.die_in[w] is not None:
            self.die_in[w] -= 1
            if self.die_in[w] == 0:
                self.dead[w], self.die_in[w] = True, None
        if task.id in self.killers:
            self.dead[w] = True
        if task.id in self.hangers and not self.dead[w]:
            self.hung.setdefault(w, []).append(handle)
            self.outcomes[handle] = ReaderDied("restarted past its deadline")
            return handle
        if self.hung.get(w) and not self.dead[w]:  # queued behind the hung document
            self.hung[w].append(handle)
            self.outcomes[handle] = ReaderDied("restarted past its deadline")
            return handle
        if self.dead[w]:
            self.outcomes[handle] = ReaderDied("killed")
        elif self.parallel_failures.get(task.id, 0) > 0:
            self.parallel_failures[task.id] -= 1
            self.readers[w].read.append(task.id + " (part)")  # a member died after some chunks
            self.outcomes[handle] = ContextParallelFailure("member 1 died")
        else:
            self.outcomes[handle] = self.readers[w].process(task)
        return handle

    def wait(self, handles, timeout_s, every=False):
        hung = {h for hs in self.hung.values() for h in hs}
        return [h for h in handles if h not in hung]

    def hand_off(self, handle):
        return ("handed", handle)

    def restart(self, w):
        self.hung.pop(w, None)  # what it held fails with ReaderDied
        self.dead[w] = True
        self.restarts_asked = getattr(self, "restarts_asked", 0) + 1

    def result(self, handle):
        outcome = self.outcomes.pop(handle)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def write_states(self, target):
        return {name: w.snapshot() for name, w in zip(self.names, self.readers)}  # FakeStore takes blobs

    def restore(self, w, blobs):
        self.readers[w].restore(blobs)

    def forget(self, w, key):
        self.forgotten = [*getattr(self, "forgotten", []), key]
        return False

    def status(self):
        return {"readers": [{"reader": name, "alive": not dead} for name, dead in zip(self.names, self.dead)]}

    def wait_ready(self, w, timeout_s):
        if self.dead[w]:
            self.dead[w], self.readers[w] = False, self.make_reader(self.names[w])
            self.restarts += 1
        return True


class FakeSource:
    """Partitions of records; poll returns them in order, one partition after the other per call."""

    def __init__(self, documents: dict[int, list[dict]]):
        self.records = {p: [ConsumerRecord(TOPIC, p, None, o, 0, 0, None, json.dumps(d).encode(), [], None, -1, -1, -1)
                            for o, d in enumerate(docs)] for p, docs in documents.items()}
        self.position = {p: 0 for p in documents}
        self.commits: list[dict[int, int]] = []
        self.added: list[int] = []  # partitions the topic gained (unassigned_partitions)

    def poll(self, timeout_ms, max_records):
        out = []
        for p in sorted(self.records):
            while len(out) < max_records and self.position[p] < len(self.records[p]):
                out.append(self.records[p][self.position[p]])
                self.position[p] += 1
        return out

    def seek(self, offsets):
        self.position.update(offsets)
        return dict(offsets)

    def commit(self, offsets):
        self.commits.append(dict(offsets))

    def highwaters(self):
        return {p: len(records) for p, records in self.records.items()}

    def unassigned_partitions(self):
        return list(self.added)

    def positions(self):
        return dict(self.position)

    def topic_id(self):
        return "a-topic-id"  # the same topic throughout (a recreated one is tested on the real broker)


class FakeSinks:
    def __init__(self):
        self.results, self.alerts, self.dead_letters = [], [], []

    def result(self, message, refused=None):
        self.results.append(message)

    def alert(self, message):
        self.alerts.append(message)

    def dead_letter(self, value, key, headers):
        self.dead_letters.append(value)

    def metrics(self, message):
        pass

    def flush(self, timeout_s=30.0):
        pass


class FakeStore:
    """Versions in a dict; the first ``down_for`` writes fail, as they do while MLflow is out of reach."""

    def __init__(self, down_for: int = 0):
        self.name = "s-ttt"
        self.versions: dict[str, Checkpoint] = {}
        self.aliases: dict[str, str] = {}
        self.reference: dict[str, float] = {}
        self.registry = self  # the registered model's side (aliases, tombstones) too
        self.down_for = down_for  # writes that fail before MLflow is back
        self.on_failure = lambda: None

    def open_run(self, reason):
        return None

    def save(self, request, run=None):
        if self.down_for:
            self.down_for -= 1
            self.on_failure()
            raise ConnectionError("MLflow is down")
        version = str(len(self.versions) + 1)
        manifest = {"offsets": {"topic": request.topic, "partitions": {str(p): o for p, o in request.offsets.items()}},
                    "documents": request.documents, "reason": request.reason, "tags": request.tags,
                    "assignment": {str(p): w for p, w in request.assignment.items()}}
        self.versions[version] = Checkpoint(version, manifest, request.states)
        self.aliases[HEAD] = version
        if request.promote:
            self.aliases[LIVE] = version
        return version

    def resolve(self, ref):
        return self.aliases.get(ref, ref if ref in self.versions else None)

    def load(self, ref):
        return self.versions[self.resolve(ref)]

    def set_alias(self, alias, version):
        self.aliases[alias] = version

    def version_tags(self, ref):
        version = self.resolve(ref)
        return dict(self.versions[version].manifest["tags"]) if version in self.versions else {}

    def record_metric(self, version, key, value):
        self.reference[version] = value

    def prune(self, keep):
        return []  # retention is tested on the real MLflow (tests/pipeline/test_checkpoint.py)

    # Erasure is tested on the real MLflow (tests/pipeline/test_forget.py); here it is recorded.
    def forget(self, state_key):
        self.tombstones_left = [*getattr(self, "tombstones_left", []), state_key]

    def erase(self, state_key):
        self.erased = [*getattr(self, "erased", []), state_key]
        return 0


def documents(partitions: int, per_partition: int, poison: set[str] = frozenset()) -> dict[int, list[dict]]:
    return {p: [{"id": f"p{p}-{i:03d}", "text": "poison" if f"p{p}-{i:03d}" in poison else "text"}
                for i in range(per_partition)] for p in range(partitions)}


class FakeControl:
    """Hands out ``records`` (record, command or refusal) at its ``at``-th poll."""

    def __init__(self, at: int, records):
        self.at, self.records, self.polls = at, list(records), 0

    def poll(self):
        self.polls += 1
        if self.polls < self.at:
            return []
        out, self.records = self.records, []
        return out


def control_record(offset):
    return ConsumerRecord("control", 0, None, offset, 0, 0, None, b"{}", [], None, -1, -1, -1)


def processor(docs, store=None, every=5, monitor=None, control_source=None, **config):
    cfg = ProcessorConfig(checkpoint=CheckpointConfig(every_documents=every, every_seconds=3600, retry_initial_s=0.001,
                                                      retry_max_s=0.001, max_pending_documents=config.pop("max_pending", 1000)),
                          poll_timeout_ms=1, **config)
    pool, source, sinks = FakePool(len(docs)), FakeSource(docs), FakeSinks()
    checkpointer = None
    if store is not None:
        checkpointer = StreamCheckpointer(store, cfg.checkpoint, TOPIC, "digest", {"path": "m"}, None, {p: 0 for p in docs})
    proc = build_processor(cfg, source, sinks, pool, {p: p for p in docs}, "s",
                           DurableParts(checkpointer, monitor=monitor, control=control_source))
    return proc, pool, source, sinks


def test_a_dead_reader_is_restored_from_the_checkpoint_and_its_partition_read_again_exactly_once():
    docs = documents(2, 23)
    straight, pool_a, _, _ = processor(docs, store=FakeStore())
    straight.run(until_idle_s=0.05)

    crashed, pool, source, sinks = processor(docs, store=FakeStore())
    pool.kill(0, after=15)  # its 15th document: after a checkpoint, before the next
    summary = crashed.run(until_idle_s=0.05)

    assert pool.restarts == 1 and summary.retries >= 1
    # States exactly once: what each reader has read is what it read without the crash.
    assert [w.read for w in pool.readers] == [w.read for w in pool_a.readers]
    assert pool.readers[0].read == [d["id"] for d in docs[0]]
    # Results at least once: every id; the re-read ones twice.
    ids = [r["id"] for r in sinks.results]
    assert set(ids) == {d["id"] for p in docs.values() for d in p} and len(ids) > 46
    assert source.commits[-1] == {0: 23, 1: 23}
    assert crashed.recovery.checkpointer.store.load(LIVE).manifest["offsets"]["partitions"] == {"0": 23, "1": 23}


def test_while_mlflow_is_down_nothing_is_committed_and_reading_pauses_at_the_backlog():
    docs = documents(1, 40)
    store = FakeStore(down_for=30)
    proc, pool, source, sinks = processor(docs, store=store, every=4, max_pending=10)
    seen = []  # at every failed write: commits so far, documents waiting, records read
    store.on_failure = lambda: seen.append((len(source.commits), proc.recovery.checkpointer.pending_documents, source.position[0]))
    proc.run(until_idle_s=0.5)

    assert len(seen) == 30 and all(commits == 0 for commits, _, _ in seen)
    # Reading paused once 10 documents waited; what was already queued (a poll's budget of
    # 2 x max_in_flight_per_reader) still finished.
    assert 10 <= max(pending for _, pending, _ in seen) <= 14 and max(read for _, _, read in seen) <= 14
    assert pool.readers[0].read == [d["id"] for d in docs[0]]  # nothing lost, nothing twice
    assert source.commits[-1] == {0: 40} and store.load(LIVE).manifest["documents"] == 40


def test_a_poisoned_burst_is_rolled_back_to_last_good_with_its_loss_as_a_number():
    poison = {f"p0-{i:03d}" for i in range(20, 24)}
    docs = documents(1, 30, poison)
    store = FakeStore()
    monitor = DegradationMonitor(MonitorConfig(window_documents=4, min_documents=2, max_loss_over_base=None,
                                               max_loss_jump=0.5))
    proc, pool, source, sinks = processor(docs, store=store, every=5, monitor=monitor)
    proc.run(until_idle_s=0.05)

    rollbacks = [a for a in sinks.alerts if a["type"] == "rollback"]
    assert rollbacks and rollbacks[0]["cause"] == "loss_jump" and rollbacks[0]["documents_after_breach"] <= 5
    good = rollbacks[0]["to"]
    assert isinstance(store.reference[good], float) and store.reference[good] < 2.0  # the window before the burst
    # The readers went back to last-good's state: the burst's documents were read but forgotten.
    assert not poison & set(pool.readers[0].read)
    rolled = store.load(rollbacks[0]["version"])
    assert rolled.manifest["reason"] == "rollback" and rolled.states == store.load(good).states
    # last-good only ever moved to versions whose window passed: none holds a poisoned document.
    assert not poison & set(json.loads(store.load(LAST_GOOD).states["s-reader-0"][0].data))


def test_a_breach_before_any_version_passed_the_monitor_rolls_back_to_the_base_model():
    poison = {f"p0-{i:03d}" for i in range(3, 7)}  # before the first checkpoint (every 50)
    docs = documents(1, 12, poison)
    store = FakeStore()
    monitor = DegradationMonitor(MonitorConfig(window_documents=4, min_documents=2, max_loss_over_base=None,
                                               max_loss_jump=0.5, max_fast_delta_ratio=1.0))
    proc, pool, source, sinks = processor(docs, store=store, every=50, monitor=monitor)
    proc.run(until_idle_s=0.05)

    assert not [a for a in sinks.alerts if a["type"] == "rollback_failed"]
    (rollback,) = [a for a in sinks.alerts if a["type"] == "rollback"][:1]
    assert rollback["to"] == "base" and rollback["cause"] == "delta_ratio"
    rolled = store.load(rollback["version"])
    assert rolled.manifest["tags"]["rollback_to"] == "base" and rolled.states == {"s-reader-0": []}
    # fresh state at the rollback: what the reader holds now was read after it, no poison in it
    assert pool.readers[0].read and not poison & set(pool.readers[0].read)


def test_a_failed_context_parallel_read_goes_back_to_the_checkpoint_and_a_hopeless_one_to_dead_letters():
    docs = documents(2, 20)
    straight, pool_a, _, _ = processor(docs, store=FakeStore())
    straight.run(until_idle_s=0.05)

    proc, pool, source, sinks = processor(docs, store=FakeStore(), max_attempts=3)
    pool.fail_parallel("p0-012", times=1)
    pool.fail_parallel("p1-007", times=99)
    summary = proc.run(until_idle_s=0.05)

    # One failure, then the read worked: the part learned is dropped with the checkpoint.
    assert pool.readers[0].read == pool_a.readers[0].read
    # Three failures: the document goes to the dead-letter topic once, nothing of it stays
    # learned, and everything else is read.
    assert summary.parallel_failures == 1 + 3 and summary.dead_letters == 1
    assert json.loads(sinks.dead_letters[0])["id"] == "p1-007"
    assert pool.readers[1].read == [d["id"] for d in docs[1] if d["id"] != "p1-007"]
    assert source.commits[-1] == {0: 20, 1: 20}


def test_documents_go_to_the_readers_in_batches_and_a_death_mid_batch_loses_nothing():
    docs = documents(2, 23)
    straight, pool_a, _, _ = processor(docs, store=FakeStore())
    straight.run(until_idle_s=0.05)

    batched, pool, source, sinks = processor(docs, store=FakeStore(), batch_documents=4, max_in_flight_per_reader=4)
    pool.kill(1, after=14)  # inside a batch
    summary = batched.run(until_idle_s=0.05)

    assert max(pool.batches) == 4 and pool.restarts == 1 and summary.retries >= 1
    assert [w.read for w in pool.readers] == [w.read for w in pool_a.readers]  # states exactly once
    assert {r["id"] for r in sinks.results} == {d["id"] for p in docs.values() for d in p}
    assert source.commits[-1] == {0: 23, 1: 23}


def test_batch_documents_defaults_to_eight_on_a_gpu_reader_of_a_batching_scope_and_never_above_the_in_flight_bound():
    gpu = dict(reader_num_gpus=1, scope="per_document")
    assert ProcessorConfig().documents_per_call == 1
    assert ProcessorConfig(**gpu, max_in_flight_per_reader=16).documents_per_call == 8
    assert ProcessorConfig(**gpu).documents_per_call == 2  # max_in_flight_per_reader 2
    assert ProcessorConfig(reader_num_gpus=1, scope="per_key", max_in_flight_per_reader=16).documents_per_call == 8
    assert ProcessorConfig(reader_num_gpus=1, scope="global", max_in_flight_per_reader=16).documents_per_call == 1
    import pytest

    from pipeline.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"processor\.batch_documents \(4\) is above processor\.max_in_flight_per_reader"):
        parse_config({"processor": {"batch_documents": 4}}, environ={})


def test_partitions_added_while_running_stop_the_run_loudly_after_what_was_read_is_committed():
    docs = documents(2, 30)
    proc, pool, source, sinks = processor(docs, store=FakeStore(), status_interval_s=0.001)
    polls = source.poll

    def poll_then_grow(timeout_ms, max_records):
        if sum(source.position.values()) >= 10:
            source.added = [2, 3]  # a producer's request made the broker add partitions
        return polls(timeout_ms, max_records)

    source.poll = poll_then_grow
    summary = proc.run(until_idle_s=5.0)  # stops long before idle
    assert proc.unread_partitions == [2, 3]
    assert [a for a in sinks.alerts if a["type"] == "partitions_changed"] == [
        {"type": "partitions_changed", "stream": "s", "unread_partitions": [2, 3], "read_partitions": [0, 1],
         "time": sinks.alerts[-1]["time"]}]
    assert 10 <= summary.documents < 60  # stopped part-way
    # what was read is checkpointed and committed: a restart goes on from there
    assert source.commits[-1] == {p: sum(1 for r in sinks.results if r["id"].startswith(f"p{p}-")) for p in (0, 1)}


def test_the_fast_delta_ratio_is_bounded_per_square_root_of_the_chunks_a_document_spans():
    monitor = DegradationMonitor(MonitorConfig(max_fast_delta_ratio=1.3, max_loss_over_base=None, max_loss_jump=None),
                                 chunk_tokens=512)
    long_and_good = DocumentOutcome("long", ok=True, tokens=16 * 512, loss=1.0, delta_ratio=4.8)  # 16 chunks: 1.2
    short_and_runaway = DocumentOutcome("short", ok=True, tokens=300, loss=1.0, delta_ratio=1.5)  # 1 chunk: 1.5
    assert monitor.observe(long_and_good) is None
    breach = monitor.observe(short_and_runaway)
    assert breach.rule == "delta_ratio" and breach.values["chunks"] == 1 and breach.values["per_sqrt_chunk"] == 1.5
    grown = DocumentOutcome("long-runaway", ok=True, tokens=16 * 512 - 5, loss=1.0, delta_ratio=5.6)  # 1.4
    assert monitor.observe(grown).values["chunks"] == 16
    unscaled = DegradationMonitor(MonitorConfig(max_fast_delta_ratio=1.3, max_loss_over_base=None, max_loss_jump=None))
    assert unscaled.observe(long_and_good).rule == "delta_ratio"  # no chunk size known: the ratio itself


def test_a_document_that_kills_its_reader_every_time_is_dead_lettered_once_and_passed_over():
    docs = documents(2, 23)
    straight, pool_a, _, _ = processor(docs, store=FakeStore())
    straight.run(until_idle_s=0.05)

    proc, pool, source, sinks = processor(docs, store=FakeStore(), max_attempts=3, batch_documents=4,
                                          max_in_flight_per_reader=4)
    pool.killers = {"p0-013"}
    summary = proc.run(until_idle_s=0.05)

    # The first death took a batch of four with it; after it the suspects were read one at a
    # time, so that the next two deaths had the killer alone in flight.
    assert pool.in_flight_at_kill[0] == 4 and pool.in_flight_at_kill[1:] == [1, 1]
    assert pool.restarts == 3 and summary.dead_letters == 1
    assert json.loads(sinks.dead_letters[0])["id"] == "p0-013"
    # States exactly once, without the killer; the other reader never noticed.
    assert pool.readers[0].read == [d["id"] for d in docs[0] if d["id"] != "p0-013"]
    assert pool.readers[1].read == pool_a.readers[1].read
    assert {r["id"] for r in sinks.results} == {d["id"] for p in docs.values() for d in p} - {"p0-013"}
    assert source.commits[-1] == {0: 23, 1: 23}


def test_control_refusals_are_dead_lettered_counted_and_every_command_kind_is_rate_limited():
    control = FakeControl(at=30, records=[
        (control_record(0), "refused: unsigned command"),
        (control_record(1), ControlCommand("rollback", "99", "unknown")),
        (control_record(2), ControlCommand("rollback", "1", "first")),
        (control_record(3), ControlCommand("rollback", "1", "too-soon")),
        *[(control_record(4 + i), "refused: unsigned command") for i in range(50)],
        (control_record(60), ControlCommand("forget", key="k1", request_id="forget-1")),
        (control_record(61), ControlCommand("forget", key="k2", request_id="forget-too-soon")),
    ])
    proc, pool, source, sinks = processor(documents(1, 40), store=FakeStore(), control_source=control,
                                          control=ControlConfig(min_rollback_interval_s=3600,
                                                                min_forget_interval_s=3600), scope="per_key")
    summary = proc.run(until_idle_s=0.05)

    # A signed command's refusal answers its sender; the 51 unsigned records are one alert, counted.
    refused = {a["request_id"]: a["error"] for a in sinks.alerts if a["type"] == "control_error"}
    assert refused == {"unknown": "refused: unknown version: s-ttt has no version '99'",
                       "too-soon": refused["too-soon"], "forget-too-soon": refused["forget-too-soon"]}
    assert refused["too-soon"].startswith("refused: rate limit: a rollback was done 0 s ago")
    assert refused["forget-too-soon"].startswith("refused: rate limit: a forget was done 0 s ago")
    assert [a["counts"] for a in sinks.alerts if a["type"] == "control_refused"] == [
        {"refused: unsigned command": 51}]
    assert [a["request_id"] for a in sinks.alerts if a["type"] == "rollback"] == ["first"]
    (forget,) = [a for a in sinks.alerts if a["type"] == "forget"]
    # Readers, the tombstone and the erasure all name the state, never the key itself.
    state_key = TenantKeys.unpersisted("s").state_key("k1")
    assert forget["request_id"] == "forget-1" and forget["state_key"] == state_key and "k1" not in json.dumps(forget)
    store = proc.recovery.checkpointer.store
    assert pool.forgotten == [state_key] and store.tombstones_left == store.erased == [state_key]
    assert summary.dead_letters == 54 and len(sinks.dead_letters) == 54


def test_a_document_past_its_deadline_restarts_its_reader_and_is_dead_lettered_after_max_attempts():
    docs = documents(2, 12)
    proc, pool, source, sinks = processor(docs, store=FakeStore(), max_attempts=2, document_timeout_s=0.2)
    pool.hangers = {"p1-005"}
    started = time.monotonic()
    summary = proc.run(until_idle_s=0.05)

    timeouts = [a for a in sinks.alerts if a["type"] == "document_timeout"]
    assert [a["document"] for a in timeouts] == ["p1-005", "p1-005"] and pool.restarts == 2
    assert time.monotonic() - started >= 0.4  # two deadlines passed
    assert summary.dead_letters == 1 and json.loads(sinks.dead_letters[0])["id"] == "p1-005"
    assert pool.readers[1].read == [d["id"] for d in docs[1] if d["id"] != "p1-005"]
    assert pool.readers[0].read == [d["id"] for d in docs[0]]
    assert source.commits[-1] == {0: 12, 1: 12}


def test_the_restart_budget_counts_deaths_in_a_window_not_in_a_readers_lifetime():
    now = [0.0]
    budget = RestartBudget(max_restarts=3, window_s=600, clock=lambda: now[0])
    for _ in range(3):  # a killer document: three deaths, then it is dead-lettered
        budget.died(0, "w0")
    now[0] = 601.0  # long after: a death from another cause is recovered from
    budget.died(0, "w0")
    budget.died(1, "w1")  # another reader has a budget of its own
    for _ in range(2):
        budget.died(0, "w0")
    with pytest.raises(RestartBudgetSpent, match="reader w0 died 4 times in 600 s"):
        budget.died(0, "w0")


def test_a_config_whose_restart_budget_is_below_a_documents_attempts_is_refused():
    from pipeline.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="processor.max_restarts 2 is below processor.max_attempts 3"):
        parse_config({"processor": {"max_restarts": 2}}, environ={})


def test_documents_that_kill_their_reader_are_dead_lettered_without_spending_the_restart_budget():
    """Four killers in a row, each dead-lettered after max_attempts deaths: more than twice the
    budget of 5 deaths in the window, and the run goes on (each cause is charged once)."""
    docs = documents(1, 30)
    killers = {"p0-003", "p0-004", "p0-005", "p0-006"}
    proc, pool, source, sinks = processor(docs, store=FakeStore(), max_attempts=3, max_restarts=5)
    pool.killers = killers
    summary = proc.run(until_idle_s=0.05)
    assert pool.restarts > 2 * 5 and summary.dead_letters == 4
    assert sorted(json.loads(d)["id"] for d in sinks.dead_letters) == sorted(killers)
    assert pool.readers[0].read == [d["id"] for d in docs[0] if d["id"] not in killers]


class FakeLearner:
    """A learner whose promotion gate gives the verdicts it is told, one per checkpoint."""

    name = "s-learner"
    keeps_readers_stateless = False

    def __init__(self, verdicts):
        self.verdicts, self.tasks, self.judged_at, self.handed = list(verdicts), [], [], []

    @property
    def position(self):
        return len(self.tasks)

    def submit(self, task):
        self.tasks.append(task)
        return None

    def hand_off(self, task, handed):
        self.handed.append((task.partition, task.offset, handed is not None))

    def check(self):
        pass

    def states(self):
        return {self.name: []}

    def judged_states(self, judge=True, settle=True):
        if not judge:
            return {"verdict": "unjudged", "reason": "between", "digest": "", "position": self.position,
                    "kept_out": {}, "unchanged": False, "learned": 0}, self.states()
        self.judged_at.append(self.position)
        verdict = self.verdicts.pop(0) if self.verdicts else "promoted"
        figures = {"gain_vs_base": -0.05, "gain_vs_last_good": 0.2 if verdict == "rejected" else -0.01,
                   "forgetting": 0.001}
        return ({"verdict": verdict, "reason": f"told {verdict}", "digest": "d" * 64, "position": len(self.tasks),
                 "kept_out": {}, "unchanged": False, "learned": 1, **figures}, self.states())

    def restore(self, blobs):
        pass


def test_a_rejected_candidate_is_a_version_that_never_goes_live():
    docs = documents(1, 30)
    store, learner = FakeStore(), FakeLearner(["promoted", "rejected", "promoted"])
    cfg = ProcessorConfig(checkpoint=CheckpointConfig(every_documents=5, every_seconds=3600), poll_timeout_ms=1)
    pool, source, sinks = FakePool(1), FakeSource(docs), FakeSinks()
    checkpointer = StreamCheckpointer(store, cfg.checkpoint, TOPIC, "digest", {"path": "m"}, None, {0: 0})
    proc = build_processor(cfg, source, sinks, pool, {0: 0}, "s", DurableParts(checkpointer), learner)
    seen = []
    store_save = store.save
    store.save = lambda request, run=None: seen.append(dict(store.aliases)) or store_save(request, run)
    proc.run(until_idle_s=0.05)

    tags = {v: c.manifest["tags"] for v, c in store.versions.items()}
    verdicts = [tags[v]["ttt.verdict"] for v in sorted(tags, key=int)]
    assert verdicts[:3] == ["promoted", "rejected", "promoted"] and set(verdicts[3:]) <= {"promoted"}
    # Version 2 was never live, nor last-good: live stayed at 1 until 3 passed; head was each in turn.
    assert seen[2] == {HEAD: "2", LIVE: "1", LAST_GOOD: "1"}
    last = str(len(tags))
    assert store.aliases == {HEAD: last, LIVE: last, LAST_GOOD: last}
    assert tags["2"]["ttt.gain_vs_last_good"] == "0.2" and tags["2"]["ttt.verdict_reason"] == "told rejected"
    (rejected,) = [a for a in sinks.alerts if a["type"] == "version_rejected"]
    assert rejected["version"] == "2" and rejected["reason"] == "told rejected"
    # The gate judged at the positions the ledger fixes (every 5 documents taken in) and at the end.
    assert learner.judged_at[:-1] == list(range(5, 30, 5)) and learner.judged_at[-1] == 30
    # A rollback to the rejected candidate restores the learner as its verdict left it, and live stays.
    live_before = store.aliases[LIVE]
    rolled = proc.commands.rollback("2", cause="manual")
    assert store.aliases[HEAD] == rolled and store.aliases[LIVE] == live_before
    assert proc.commands.rollback("1", cause="manual") == store.aliases[LIVE]  # a promoted one goes live
    # Every document got its keyed learning decision, and its result says it.
    assert all(not t.kept_out for t in learner.tasks) and {r["learning"] for r in sinks.results} <= {"admitted", "held out"}
    # Each document read was handed on to the learner once, with its position.
    assert sorted(learner.handed) == sorted((t.partition, t.offset, True) for t in learner.tasks)


def test_a_stream_that_stops_between_judging_points_is_judged_where_it_stopped():
    docs = documents(1, 7)
    store, learner = FakeStore(), FakeLearner([])
    # Checkpoints by time all along (unjudged): the last one covers every document before the stop.
    cfg = ProcessorConfig(checkpoint=CheckpointConfig(every_documents=5, every_seconds=0.001), poll_timeout_ms=1)
    pool, source, sinks = FakePool(1), FakeSource(docs), FakeSinks()
    checkpointer = StreamCheckpointer(store, cfg.checkpoint, TOPIC, "digest", {"path": "m"}, None, {0: 0})
    proc = build_processor(cfg, source, sinks, pool, {0: 0}, "s", DurableParts(checkpointer), learner)
    proc.run(until_idle_s=0.05)

    assert learner.judged_at == [5, 7]
    verdicts = [store.versions[v].manifest["tags"]["ttt.verdict"] for v in sorted(store.versions, key=int)]
    assert verdicts[-1] == "promoted" and "unjudged" in verdicts
    assert store.aliases[LIVE] == store.aliases[HEAD] == str(len(store.versions))
    assert not [a for a in sinks.alerts if a["type"] == "version_rejected"]  # unjudged is no rejection


def test_with_the_gate_a_checkpoint_that_failed_is_retried_and_reading_goes_on():
    docs = documents(1, 30)
    store, learner = FakeStore(down_for=3), FakeLearner([])
    cfg = ProcessorConfig(checkpoint=CheckpointConfig(every_documents=5, every_seconds=3600, retry_initial_s=0.001,
                                                      retry_max_s=0.001, max_pending_documents=8), poll_timeout_ms=1)
    pool, source, sinks = FakePool(1), FakeSource(docs), FakeSinks()
    checkpointer = StreamCheckpointer(store, cfg.checkpoint, TOPIC, "digest", {"path": "m"}, None, {0: 0})
    proc = build_processor(cfg, source, sinks, pool, {0: 0}, "s", DurableParts(checkpointer), learner)
    proc.run(until_idle_s=0.2)

    assert pool.readers[0].read == [d["id"] for d in docs[0]]  # MLflow came back: nothing stalled, nothing lost
    assert source.commits[-1] == {0: 30} and store.load(LIVE).manifest["documents"] == 30
    assert learner.judged_at == [5, 10, 15, 20, 25, 30]  # each position judged once, written or not
