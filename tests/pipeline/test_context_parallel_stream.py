"""Long documents through a context-parallel group inside the stream processor, on the real
stack: windows above the threshold go to the group, the rest to the reader; a group member
killed mid-stream fails its document, which is read again from the last checkpoint, and every
document ends with the loss a processor without context parallelism gives it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from pipeline.config import ContextParallelConfig, LearnerConfig
from pipeline.processing.job import run_stream
from pipeline.stream_io.topics import ensure_topics
from tests.pipeline.test_stream_e2e import produce, read_topic, short_documents, stream_config
from ttt_model.config import SlowConfig, TTTConfig

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def cp_config(stack, tmp_path, context_parallel):
    config = stream_config(stack, tmp_path, readers=1, scope="global", context_parallel=context_parallel,
                           learner=LearnerConfig(enabled=False),
                           checkpoint=stack.processor.checkpoint.model_copy(
                               update={"every_documents": 4, "every_seconds": 3600.0}),
                           monitor=stack.processor.monitor.model_copy(update={"enabled": False}))
    # The group reads with safeguards on (they pass the weights from rank to rank) and fast
    # weights only (test_learner_stream reads with slow weights from the learner).
    return config.model_copy(update={"model": config.model.model_copy(
        update={"ttt": TTTConfig(decay=0.05, max_delta_ratio=0.5), "slow": SlowConfig()})})


def losses(config, n):
    results = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.results, expect=n)]
    return {r["id"]: r for r in results}  # the last reading of each id


def test_long_documents_go_to_the_group_and_a_member_failure_is_retried(stack, ray_session, tmp_path):
    import ray

    docs = [d for pair in zip(short_documents(6, length=150), short_documents(6, length=2600)) for d in pair]
    for i, d in enumerate(docs):
        d["id"] = f"doc-{i:02d}"
    values = [json.dumps(d).encode() for d in docs]

    reference = cp_config(stack, tmp_path / "ref", None)
    ensure_topics(reference.kafka)
    produce(reference, values, partitions=[0] * len(values))  # one partition: one order
    run_stream(reference, until_idle_s=3.0)
    want = losses(reference, len(docs))

    config = cp_config(stack, tmp_path / "cp", ContextParallelConfig(min_tokens=600, world=2, num_cpus=0.25))
    ensure_topics(config.kafka)
    produce(config, values, partitions=[0] * len(values))
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=run_stream(config, until_idle_s=3.0)))
    runner.start()
    killed = []
    deadline = time.monotonic() + 180
    while not killed and time.monotonic() < deadline and runner.is_alive():
        try:
            service = ray.get_actor(f"{config.stream.name}-context-parallel")
            if ray.get(service.stats.remote(), timeout=5)["reads"] >= 2:
                pid = ray.get(service.member_pids.remote(), timeout=5)[1]
                os.kill(pid, signal.SIGKILL)  # the next long document fails on it
                killed.append(pid)
        except (ValueError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.05)
    runner.join(timeout=300)
    assert killed and not runner.is_alive()
    summary = outcome["summary"]
    assert summary.parallel_failures >= 1 and summary.dead_letters == 0

    got = losses(config, len(docs))
    assert set(got) == {d["id"] for d in docs}
    long_ids = {r["id"] for r in got.values() if r["tokens"] >= 600}
    assert len(long_ids) >= 4
    for doc_id, row in got.items():
        assert row["loss"] == pytest.approx(want[doc_id]["loss"], rel=1e-4), doc_id
    status = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.metrics, expect=1)]
    final = [s for s in status if s.get("final")][-1]
    assert final["context_parallel"]["failures"] >= 1
    assert final["context_parallel"]["reads"] >= len(long_ids)
    assert final["readers"][0]["parallel_windows"] >= len(long_ids)
