"""Exactly-once state: `ttt-stream run` killed (SIGKILL, whole process group) at 3 random
moments over a 250-document stream and restarted each time ends with fast-weight states
bitwise equal to a run that never crashed, and every document id in the results."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from kafka import KafkaConsumer

from pipeline.state.checkpoint import HEAD, CheckpointStore
from pipeline.processing.job import run_stream
from pipeline.stream_io.topics import ensure_topics
from tests.conftest import ROOT
from tests.pipeline.test_stream_e2e import produce, read_topic, share_salt, short_documents, stream_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]
SETTINGS = dict(readers=2, reader_num_cpus=0.5, scope="global", deterministic=True, base_loss_sample_rate=0.0)


def checkpoint_settings(stack):
    return stack.processor.checkpoint.model_copy(update={"every_documents": 40, "every_seconds": 3600.0})


def final_states(config) -> list[list[tuple[str, str, int]]]:
    """Per reader (by index): (key, sha256, documents) of each state in the newest version (head)."""
    states = CheckpointStore(config.mlflow, config.stream.name).load(HEAD).states
    return [[(b.key, b.sha256, b.documents) for b in states[name]] for name in sorted(states)]


class ResultCounter(threading.Thread):
    """Counts result records as they arrive, so that kills land while documents are read."""

    def __init__(self, config):
        super().__init__(daemon=True)
        self.config, self.count, self.stop = config, 0, threading.Event()

    def run(self) -> None:
        consumer = KafkaConsumer(self.config.kafka.topics.results, bootstrap_servers=self.config.kafka.bootstrap_servers,
                                 auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=200)
        while not self.stop.is_set():
            self.count += sum(1 for _ in consumer)
        consumer.close()


def test_three_kills_end_bitwise_equal_to_an_uncrashed_run(stack, ray_session, tmp_path):
    docs = short_documents(250)  # not a multiple of every_documents: the last version is the shutdown one
    values = [json.dumps(d).encode() for d in docs]
    partitions = [i % 2 for i in range(len(docs))]  # the same partitions in both streams

    reference = stream_config(stack, tmp_path / "ref", **SETTINGS)
    reference = reference.model_copy(update={"processor": reference.processor.model_copy(
        update={"checkpoint": checkpoint_settings(stack)})})
    crashed = stream_config(stack, tmp_path / "crash", **SETTINGS)
    crashed = crashed.model_copy(update={"processor": crashed.processor.model_copy(
        update={"checkpoint": checkpoint_settings(stack)})})
    share_salt(reference, crashed)  # the same held-out slice: the learner learns the same documents
    ensure_topics(reference.kafka)
    produce(reference, values, partitions)
    run_stream(reference, until_idle_s=3.0)

    config_file = tmp_path / "crash.yaml"
    config_file.write_text(yaml.safe_dump(crashed.model_dump(mode="json")))
    ensure_topics(crashed.kafka)
    produce(crashed, values, partitions)
    counter = ResultCounter(crashed)
    counter.start()
    rng = random.Random(int(os.environ.get("TTT_STREAM_TEST_SEED", "5")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTT_STREAM__")}
    argv = [sys.executable, "-m", "pipeline.cli", "run", "-c", str(config_file), "--until-idle", "3"]
    kills = []
    for _ in range(3):
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen = counter.count
        deadline = time.monotonic() + 180
        while counter.count < seen + rng.randint(1, 30) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills.append(counter.count)
        proc.wait(timeout=60)
    final = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    counter.stop.set()
    assert len(kills) == 3, kills  # every kill landed while the stream was being read

    assert final_states(crashed) == final_states(reference)  # bitwise: same sha256 per state
    results = [json.loads(r.value) for r in read_topic(crashed, crashed.kafka.topics.results, expect=len(docs))]
    assert {r["id"] for r in results} == {d["id"] for d in docs}
    # Results are at least once; their idempotency key says which are the same: keeping the first
    # of each source gives one result per record, equal to the uncrashed run's.
    first = {}
    for r in results:
        first.setdefault(r["source"], r)
    want = {r["source"]: r for r in map(lambda v: json.loads(v.value),
                                        read_topic(reference, reference.kafka.topics.results, expect=len(docs)))}
    assert len(first) == len(docs) and first.keys() == {s.replace(reference.kafka.topics.documents,
                                                                   crashed.kafka.topics.documents) for s in want}
    assert sorted((r["id"], r["loss"], r["tokens"]) for r in first.values()) == \
        sorted((r["id"], r["loss"], r["tokens"]) for r in want.values())
    versions = CheckpointStore(crashed.mlflow, crashed.stream.name).registry.versions()
    assert versions[0]["tags"]["reason"] == "shutdown" and int(versions[0]["tags"]["documents"]) >= len(docs)
