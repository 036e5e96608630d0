"""`ttt-stream forget KEY` on the real stack (broker, MLflow, Ray): a running processor erases one
tenant's per-key state, in memory and spilled, writes a version that holds no state of it and
erases its state files from every earlier version; a rollback past the forget, a restart and more
reading bring it back nowhere, and no export of any version holds it. With no processor running,
`--offline` does the same from `live`."""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from actors.call_types import StateBlob
from actors.state_upload import StateUploader, state_file
from pipeline.state.checkpoint import LIVE, CheckpointStore, checkpoint_artifact
from pipeline.state.tenant_keys import TenantKeys
from pipeline.processing.job import run_stream
from pipeline.stream_io.topics import ensure_topics
from tests.pipeline.test_rollback_export import cli
from tests.pipeline.test_stream_e2e import produce, read_topic, short_documents, stream_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def keys_in(store: CheckpointStore, ref: str) -> set[str]:
    return {b.key for blobs in store.load(ref).states.values() for b in blobs}


def listed_in(store: CheckpointStore, version: str) -> set[str]:
    """The state keys a version's manifest lists (load passes over the forgotten ones)."""
    return {e["key"] for entries in store._manifest(version)["readers"].values() for e in entries}


def file_of(store: CheckpointStore, version: str, state_key: str) -> bytes:
    """The state file of ``state_key`` in ``version``, fetched as MLflow serves it (raises if gone)."""
    manifest = store._manifest(version)
    run_id = store.client.get_model_version(store.name, version).run_id
    (entry,) = [e for entries in manifest["readers"].values() for e in entries if e["key"] == state_key]
    with tempfile.TemporaryDirectory() as tmp:
        path = store.client.download_artifacts(entry.get("run_id", run_id), checkpoint_artifact(entry["file"]), tmp)
        return Path(path).read_bytes()


def test_forget_is_final_through_rollback_restart_and_export(stack, ray_session, tmp_path):
    config = stream_config(stack, tmp_path, readers=1, scope="per_key", base_loss_sample_rate=0.0,
                           max_keys_in_memory=1)
    config = config.model_copy(update={"processor": config.processor.model_copy(update={
        "checkpoint": config.processor.checkpoint.model_copy(update={"every_documents": 3, "every_seconds": 3600.0}),
    })})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    store = CheckpointStore(config.mlflow, config.stream.name)
    keys = TenantKeys(store.registry.key_salt())
    k0, k1, k2 = (keys.state_key(k) for k in ("k0", "k1", "k2"))
    ensure_topics(config.kafka)
    docs = short_documents(9, length=300)  # keys k0, k1, k2
    produce(config, [json.dumps(d).encode() for d in docs], partitions=[0] * len(docs))

    done = threading.Event()  # set once the online part is checked: the run ends then
    runner = threading.Thread(target=run_stream, args=(config,), kwargs={"until_idle_s": 60.0, "stop_event": done})
    runner.start()
    try:
        deadline = time.monotonic() + 240
        while len(read_topic(config, config.kafka.topics.results, expect=9, timeout_s=2.0)) < 9:
            assert time.monotonic() < deadline, "the stream did not read its documents"
        spill = Path(config.processor.spill_dir)
        assert len(sorted(spill.rglob("*.safetensors"))) == 2  # one key in memory, two spilled
        before = store.registry.resolve(LIVE)
        assert k1 in listed_in(store, before) and file_of(store, before, k1)
        # A checkpoint whose readers wrote their states and then failed: no version lists its run.
        failed = store.open_run("periodic")
        StateUploader(f"{config.stream.name}-reader-0").write(
            iter([StateBlob(k1, b"k1's state", hashlib.sha256(b"k1's state").hexdigest(), 1)]), failed)
        store.client.set_terminated(failed.run_id, status="FAILED")
        failed_file = checkpoint_artifact(state_file(f"{config.stream.name}-reader-0", k1))
        assert [a.path for a in store.client.list_artifacts(failed.run_id, str(Path(failed_file).parent))]
        forgot = cli("forget", "k1", "-c", str(config_file))
        assert forgot.returncode == 0, forgot.stderr[-3000:]
        assert "forgotten by 1 reader(s)" in forgot.stdout
        version = forgot.stdout.split(" v")[1].split()[0]
        assert keys_in(store, version) == {k0, k2} and store.registry.resolve(LIVE) == version
        manifest = store.load(version).manifest
        assert manifest["reason"] == "forget" and manifest["forgotten"] == {k1: int(version)}
        assert len(sorted(spill.rglob("*.safetensors"))) == 1  # k1 was spilled: its file went
        alerts = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.alerts, expect=1)]
        (alert,) = [a for a in alerts if a["type"] == "forget"]
        assert alert["state_key"] == k1 and "k1" not in json.dumps(alert)
    finally:
        done.set()
        runner.join(timeout=300)
    assert not runner.is_alive()

    assert not store.client.list_artifacts(failed.run_id, str(Path(failed_file).parent))  # the failed run's too
    # Every version before the forget: its state file of k1 erased, the rest of it loadable.
    earlier = [str(v) for v in range(1, int(version))]
    for v in earlier:
        if k1 in listed_in(store, v):
            with pytest.raises(Exception):
                file_of(store, v, k1)
        assert k1 not in keys_in(store, v)
    assert "k1" not in json.dumps([store._manifest(v) for v in earlier + [version]])  # names, never keys

    # Roll back past the forget, then read more: k1 comes back nowhere.
    rolled = cli("rollback", "--to", before, "--offline", "-c", str(config_file))
    assert rolled.returncode == 0, rolled.stderr[-3000:]
    assert keys_in(store, LIVE) == {k0, k2}
    more = [d for d in short_documents(12, length=300)[9:] if d["key"] != "k1"]
    produce(config, [json.dumps({**d, "id": d["id"] + "-more"}).encode() for d in more], partitions=[0] * len(more))
    again = run_stream(config, until_idle_s=3.0)
    assert again.documents == len(more)
    since = [str(v) for v in range(int(version), int(store.registry.resolve(LIVE)) + 1)]
    assert all(k1 not in listed_in(store, v) and k1 not in keys_in(store, v) for v in since)
    spill_name = Path(state_file("-", k1)).name  # a spill file is named as a checkpoint's state file
    spilled = [p.name for p in Path(config.processor.spill_dir).rglob("*.safetensors")]
    assert spilled and spill_name not in spilled
    # No export of any version holds the key (every version is loaded without it, above); the
    # command says why, before and after the forget.
    for v in (before, since[-1]):
        exported = cli("export", "--version", v, "--key", "k1", "--out", str(tmp_path / f"k1-v{v}"), "-c", str(config_file))
        said = "was forgotten" if v in earlier else "no state for reader"
        assert exported.returncode == 1 and said in exported.stderr, exported.stdout + exported.stderr
    assert cli("export", "--version", LIVE, "--key", "k0", "--out", str(tmp_path / "k0"),
               "-c", str(config_file)).returncode == 0

    # Offline: the same, with no processor running.
    offline = cli("forget", "k2", "--offline", "-c", str(config_file))
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert keys_in(store, LIVE) == {k0}
    assert store.load(LIVE).manifest["forgotten"].keys() == {k1, k2}
    last = run_stream(config, until_idle_s=3.0)
    assert last.documents == 0 and keys_in(store, LIVE) == {k0}
