"""The stream processor as a Ray job, submitted with Ray's own command to a multi-node cluster:
`ray job submit --working-dir . -- python -m pipeline.cli run ...`, stopped with `ray job stop`
mid-stream, submitted again: the second job resumes from the newest checkpoint (`head`) and reads the
stream to the end, every id in the results. The base model comes from MLflow
(``models:/NAME@base``): the working directory shipped to the nodes has no weights.

The cluster is started as on real machines, one `ray start` per node (tests/pipeline/
ray_start_cluster.py): a head with the dashboard (which takes the jobs) and no worker resources,
two worker nodes, each with a temp dir of its own. The config travels as TTT_STREAM__ variables in the job's
runtime environment, the code as its working directory; nothing is installed at run time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from pipeline.state.base_model import file_hashes, register_base_model
from pipeline.state.checkpoint import HEAD, CheckpointStore
from pipeline.stream_io.topics import ensure_topics
from tests.conftest import ROOT
from tests.pipeline.ray_start_cluster import RayStartCluster
from tests.pipeline.test_recovery import ResultCounter
from tests.pipeline.test_stream_e2e import produce, read_topic, short_documents, stream_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]


@pytest.fixture()
def job_cluster():
    cluster = RayStartCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def as_environment(config) -> dict[str, str]:
    """The config's differences from configs/local.yaml as TTT_STREAM__ variables."""
    t = config.kafka.topics
    return {
        "TTT_STREAM__STREAM__NAME": config.stream.name,
        "TTT_STREAM__KAFKA__BOOTSTRAP_SERVERS": config.kafka.bootstrap_servers,
        "TTT_STREAM__KAFKA__GROUP_ID": config.kafka.group_id,
        **{f"TTT_STREAM__KAFKA__TOPICS__{name.upper()}": getattr(t, name)
           for name in ("documents", "results", "metrics", "alerts", "dead_letter", "control")},
        "TTT_STREAM__MLFLOW__TRACKING_URI": config.mlflow.tracking_uri,
        "TTT_STREAM__PROCESSOR__CHECKPOINT__EVERY_DOCUMENTS": "10",
        "TTT_STREAM__PROCESSOR__BASE_LOSS_SAMPLE_RATE": "0.0",
        "TTT_STREAM__PROCESSOR__MONITOR__ENABLED": "false",
        "TTT_STREAM__PROCESSOR__METRICS__PORT": "0",
    }


def ray_job(cluster: RayStartCluster, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """``ray job ARGS`` against the cluster; a submission made while the head's job agent is still
    starting ("No available agent to submit job") is made again, as Ray's message asks."""
    env, address = cluster.environment, cluster.dashboard
    command, *rest = args
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", command, "--address", address, *rest],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        if "No available agent to submit job" not in done.stderr + done.stdout or time.monotonic() > deadline:
            return done
        time.sleep(2)


def test_a_stopped_job_resumes_from_the_live_checkpoint_when_submitted_again(stack, job_cluster, tmp_path):
    config = stream_config(stack, tmp_path)
    docs = short_documents(60)
    ensure_topics(config.kafka)
    produce(config, [json.dumps(d).encode() for d in docs], [i % 2 for i in range(len(docs))])
    name = f"{config.stream.name}-base"
    register_base_model(ROOT / "models" / "ttt-tiny-qwen3", name, config.mlflow.tracking_uri, config.mlflow.experiment,
                        alias="base")
    environment = {**as_environment(config), "TTT_STREAM__MODEL__PATH": f"models:/{name}@base",
                   "TTT_STREAM__MODEL__CACHE_DIR": str(tmp_path / "model-cache")}
    runtime_env = json.dumps({"env_vars": environment, "excludes": ["*.safetensors"]})
    entrypoint = [sys.executable, "-m", "pipeline.cli", "run", "-c", "configs/local.yaml", "--until-idle", "5"]

    counter = ResultCounter(config)
    counter.start()
    try:
        first = ray_job(job_cluster, "submit", "--no-wait", "--submission-id", f"{config.stream.name}-1",
                        "--working-dir", ".", "--runtime-env-json", runtime_env, "--", *entrypoint)
        assert first.returncode == 0, first.stderr[-3000:]
        deadline = time.monotonic() + 300
        while counter.count < 25 and time.monotonic() < deadline:
            time.sleep(0.5)  # past the second checkpoint (10 documents each)
        if not 25 <= counter.count < len(docs):
            logs = ray_job(job_cluster, "logs", f"{config.stream.name}-1")
            pytest.fail(f"{counter.count} results: {(logs.stdout + logs.stderr)[-5000:]}")
        stopped = ray_job(job_cluster, "stop", f"{config.stream.name}-1")
        assert stopped.returncode == 0 and "stopped" in (stopped.stdout + stopped.stderr).lower(), stopped.stderr[-2000:]
    finally:
        counter.stop.set()
    store = CheckpointStore(config.mlflow, config.stream.name)
    resumed_from = store.registry.resolve(HEAD)  # the newest version, judged or not: where a restart reads on
    assert resumed_from is not None

    second = ray_job(job_cluster, "submit", "--submission-id", f"{config.stream.name}-2", "--working-dir", ".",
                     "--runtime-env-json", runtime_env, "--", *entrypoint)
    logs = second.stdout + second.stderr
    assert second.returncode == 0 and "succeeded" in logs, logs[-4000:]
    restored = re.search(rf"restored {config.stream.name}-ttt v(\d+)", logs)
    assert restored and restored.group(1) == resumed_from, logs[-4000:]
    live = store.load(HEAD)
    assert live.offsets == {0: 30, 1: 30}
    assert live.manifest["base_model"]["path"] == f"models:/{name}/1"  # pinned: the version read
    assert live.manifest["base_model"]["files"] == file_hashes(ROOT / "models" / "ttt-tiny-qwen3")
    results = read_topic(config, config.kafka.topics.results, expect=len(docs), timeout_s=60)
    assert {json.loads(r.value)["id"] for r in results} == {d["id"] for d in docs}
