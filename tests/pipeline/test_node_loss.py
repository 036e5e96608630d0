"""A node of a multi-node Ray cluster is lost mid-stream: its reader is restarted on the
surviving node, restored from the latest checkpoint, its partition read again, and the final
states are bitwise equal to those of a run that lost no node.

The cluster is Ray's own test cluster (``ray.cluster_utils.Cluster``) on this machine: a head
with no worker resources plus two worker nodes, each a raylet of its own; the stream processor
is ``ttt-stream run`` in its own process connected to it, with the real broker and MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import yaml
from kafka import KafkaConsumer

from pipeline.processing.job import run_stream
from pipeline.stream_io.topics import ensure_topics
from pipeline.config import LearnerConfig
from tests.conftest import ROOT
from tests.pipeline.test_recovery import ResultCounter, checkpoint_settings, final_states
from tests.pipeline.test_stream_e2e import produce, read_topic, short_documents, stream_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]
# Readers with a state of their own on the nodes that are lost (no learner: it would hold the state).
SETTINGS = dict(readers=2, reader_num_cpus=1, scope="global", deterministic=True, base_loss_sample_rate=0.0,
                placement_strategy="SPREAD", learner=LearnerConfig(enabled=False))
STORE_MB = 80 * 1024 * 1024


@pytest.fixture()
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "object_store_memory": STORE_MB, "include_dashboard": False,
        # A lost node is declared dead in about 2 s (default: 15 s).
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4},
    })
    nodes = [cluster.add_node(num_cpus=2, object_store_memory=STORE_MB) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, nodes
    finally:
        cluster.shutdown()


class ReaderNodes(threading.Thread):
    """The node of every reader, from the status reports on the metrics topic, as they come."""

    def __init__(self, config):
        super().__init__(daemon=True)
        self.config, self.reports, self.stop = config, [], threading.Event()

    def run(self) -> None:
        consumer = KafkaConsumer(self.config.kafka.topics.metrics, bootstrap_servers=self.config.kafka.bootstrap_servers,
                                 auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=200)
        while not self.stop.is_set():
            for record in consumer:
                report = json.loads(record.value)
                if report.get("type") == "status" and "readers" in report:
                    self.reports.append({w["reader"]: (w.get("node_id"), w.get("restarted")) for w in report["readers"]
                                         if w.get("alive")})
        consumer.close()

    def latest(self) -> dict:
        return self.reports[-1] if self.reports else {}


def with_settings(stack, tmp_path, **extra):
    config = stream_config(stack, tmp_path, **SETTINGS)
    # Readers that keep the state themselves (global fast weights, no learner): what a node takes
    # with it. Slow weights on two readers would need the learner (refused at load without it). The
    # monitor is off: fast weights carried across documents grow past its delta-ratio bound, and
    # its rollbacks fall where timing puts them (tests/pipeline/test_monitor_rollback.py tests it).
    processor = config.processor.model_copy(update={
        "checkpoint": checkpoint_settings(stack),
        "monitor": config.processor.monitor.model_copy(update={"enabled": False})})
    model = config.model.model_copy(update={"slow": config.model.slow.model_copy(update={"enabled": False})})
    return config.model_copy(update={"processor": processor, "model": model, **extra})


def test_a_lost_node_s_reader_restarts_on_the_other_node_and_the_states_end_bitwise_equal(
        stack, ray_session, cluster, tmp_path):
    ray_cluster, nodes = cluster
    docs = short_documents(200)
    values = [json.dumps(d).encode() for d in docs]
    partitions = [i % 2 for i in range(len(docs))]

    reference = with_settings(stack, tmp_path / "ref")
    lost = with_settings(stack, tmp_path / "lost")
    lost = lost.model_copy(update={"ray": lost.ray.model_copy(update={"address": ray_cluster.address})})
    ensure_topics(reference.kafka)
    produce(reference, values, partitions)
    run_stream(reference, until_idle_s=3.0)  # the test session's single-node Ray

    config_file = tmp_path / "lost.yaml"
    config_file.write_text(yaml.safe_dump(lost.model_dump(mode="json")))
    ensure_topics(lost.kafka)
    produce(lost, values, partitions)
    counter, nodes_of = ResultCounter(lost), ReaderNodes(lost)
    counter.start()
    nodes_of.start()
    first = f"{lost.stream.name}-reader-0"  # partition 0's reader: busy from the start
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTT_STREAM__")}
    log = open(tmp_path / "run.log", "w+")
    run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-c", str(config_file), "--until-idle", "5"],
                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while (counter.count < 60 or first not in nodes_of.latest()) and run.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)  # past the first checkpoint (40 documents), before the last
        assert run.poll() is None and counter.count < 200, "the stream ended before the node could be lost"
        where = nodes_of.latest()[first][0]
        lost_node = next(n for n in nodes if n.node_id == where)
        survivor = next(n for n in nodes if n.node_id != where)
        assert {node for node, _ in nodes_of.latest().values()} == {n.node_id for n in nodes}  # SPREAD
        ray_cluster.remove_node(lost_node)
        assert run.wait(timeout=400) == 0
    finally:
        if run.poll() is None:
            run.kill()
        counter.stop.set()
        nodes_of.stop.set()
    log.seek(0)
    output = log.read()
    assert f"reader {first} died: restored from checkpoint" in output, output[-4000:]
    # Ray placed the lost node's bundle on the survivor and restarted the reader there.
    assert nodes_of.latest()[first] == (survivor.node_id, True)

    assert final_states(lost) == final_states(reference)
    results = read_topic(lost, lost.kafka.topics.results, expect=len(docs), timeout_s=60)
    assert {json.loads(r.value)["id"] for r in results} == {d["id"] for d in docs}
