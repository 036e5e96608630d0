"""`ttt-stream forget KEY` on the real stack (broker, MLflow, Ray): a running processor erases one
tenant's per-key state, in memory and spilled, and writes a version that holds no state of it;
with no processor running, `--offline` writes that version from `live`."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.state.checkpoint import LIVE, CheckpointStore
from pipeline.stream_io.control import key_digest
from pipeline.processing.job import run_stream
from pipeline.stream_io.topics import ensure_topics
from tests.pipeline.test_rollback_export import cli
from tests.pipeline.test_stream_e2e import produce, read_topic, short_documents, stream_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def keys_in(store: CheckpointStore, ref: str) -> set[str]:
    return {b.key for blobs in store.load(ref).states.values() for b in blobs}


def test_forget_erases_a_tenant_from_the_running_stream_and_offline(stack, ray_session, tmp_path):
    config = stream_config(stack, tmp_path, workers=1, scope="per_key", base_loss_sample_rate=0.0,
                           max_keys_in_memory=1)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    store = CheckpointStore(config.mlflow, config.stream.name)
    ensure_topics(config.kafka)
    docs = short_documents(9, length=300)  # keys k0, k1, k2
    produce(config, [json.dumps(d).encode() for d in docs], partitions=[0] * len(docs))

    runner = threading.Thread(target=run_stream, args=(config,), kwargs={"until_idle_s": 12.0})
    runner.start()
    try:
        deadline = time.monotonic() + 240
        while len(read_topic(config, config.kafka.topics.results, expect=9, timeout_s=2.0)) < 9:
            assert time.monotonic() < deadline, "the stream did not read its documents"
        spill = Path(config.processor.spill_dir)
        spilled_before = sorted(spill.rglob("*.safetensors"))
        assert len(spilled_before) == 2  # one key in memory, two spilled
        forgot = cli("forget", "k1", "-c", str(config_file))
        assert forgot.returncode == 0, forgot.stderr[-3000:]
        assert "forgotten by 1 worker(s)" in forgot.stdout
        version = forgot.stdout.split(" v")[1].split()[0]
        assert keys_in(store, version) == {"k0", "k2"} and store.resolve(LIVE) == version
        assert store.load(version).manifest["reason"] == "forget"
        assert len(sorted(spill.rglob("*.safetensors"))) == 1  # k1 was spilled: its file went
        alerts = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.alerts, expect=1)]
        (alert,) = [a for a in alerts if a["type"] == "forget"]
        assert alert["key_sha256"] == key_digest("k1") and "k1" not in json.dumps(alert)
    finally:
        runner.join(timeout=300)
    assert not runner.is_alive()

    offline = cli("forget", "k2", "--offline", "-c", str(config_file))
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert keys_in(store, LIVE) == {"k0"}
    # The next run starts from that version: no state of k1 or k2 comes back.
    again = run_stream(config, until_idle_s=3.0)
    assert again.documents == 0 and keys_in(store, LIVE) == {"k0"}
