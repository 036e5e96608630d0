"""On the real stack, with a processor running: `ttt-stream rollback` (control topic), `versions`,
`export` to a plain Hugging Face model, the pyfunc flavour from `models:/<stream>-ttt@live`,
and an offline rollback."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch
import yaml

from actors.call_types import RESERVED_KEYS
from pipeline.state.checkpoint import LAST_GOOD, LIVE, CheckpointStore
from pipeline.processing.job import run_stream
from pipeline.stream_io.topics import ensure_topics
from tests.conftest import ROOT, cli
from tests.pipeline.test_stream_e2e import produce, short_documents, stream_config
from tests.sample_text import SAMPLE_TEXT

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_rollback_versions_export_and_pyfunc(stack, ray_session, tmp_path):
    config = stream_config(stack, tmp_path, readers=1, base_loss_sample_rate=0.0)
    config = config.model_copy(update={"processor": config.processor.model_copy(update={
        "checkpoint": config.processor.checkpoint.model_copy(update={"every_documents": 5, "every_seconds": 3600.0}),
    })})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    store = CheckpointStore(config.mlflow, config.stream.name)
    ensure_topics(config.kafka)
    produce(config, [json.dumps(d).encode() for d in short_documents(12, length=1500)], partitions=[0] * 12)

    stop = threading.Event()
    runner = threading.Thread(target=run_stream, args=(config,), kwargs={"stop_event": stop})
    runner.start()
    try:
        deadline = time.monotonic() + 180
        while len(store.registry.versions()) < 2 and time.monotonic() < deadline:
            time.sleep(1.0)
        assert len(store.registry.versions()) >= 2
        time.sleep(1.0)
        rolled = cli("rollback", "--to", "1", "-c", str(config_file))
        assert rolled.returncode == 0, rolled.stderr[-3000:]
        serving_s = float(re.search(r"serving it ([0-9.]+) s after the request", rolled.stdout).group(1))
        assert serving_s < 5.0, rolled.stdout
        print(f"rollback on command: readers serving v1 {serving_s:.2f} s after the request")
    finally:
        stop.set()
        runner.join(timeout=120)
    live = store.registry.versions()[0]
    assert live["aliases"] == [LIVE] or LIVE in live["aliases"]
    assert live["tags"]["reason"] in ("rollback", "shutdown")
    rollback_rows = [r for r in store.registry.versions() if r["tags"]["reason"] == "rollback"]
    assert rollback_rows and rollback_rows[0]["tags"]["rollback_to"] == "1"
    assert {b.sha256 for bs in store.load(rollback_rows[0]["version"]).states.values() for b in bs} == \
        {b.sha256 for bs in store.load("1").states.values() for b in bs}
    listed = cli("versions", "-c", str(config_file))
    assert listed.returncode == 0 and "rollback to v1 (manual)" in listed.stdout, listed.stdout + listed.stderr

    # export: a plain HF model whose weights are W_0 + the slow weights' (alpha/r) B A, and whose
    # W_down of the TTT layers also carries the fast weights' delta (zero: they end with a document)
    out = tmp_path / "exported"
    exported = cli("export", "--version", LIVE, "--out", str(out), "-c", str(config_file))
    assert exported.returncode == 0, exported.stderr[-3000:]
    from safetensors.torch import load
    from transformers import AutoModelForCausalLM

    from ttt_model import TTTSession, load_ttt_model
    from ttt_model.model.state import ttt_layers

    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(plain.config, "ttt")
    live = store.load(LIVE)
    slow = live.manifest["model_config"]["slow"]
    assert slow["enabled"]
    # The stream's one state: on its learner (the embedded default), else on its reader.
    (blob,) = [b for blobs in live.states.values() for b in blobs if b.key not in RESERVED_KEYS]
    tensors = load(blob.data)
    reference = load_ttt_model(ROOT / "models/ttt-tiny-qwen3", dtype=torch.float32).eval()
    adapted = sorted({k[len("slow."):].rsplit(".", 1)[0] for k in tensors if k.endswith(".A")})
    assert adapted and all(k.rsplit(".", 1)[-1] in slow["targets"] for k in adapted)
    with torch.no_grad():
        for name in adapted:
            reference.get_submodule(name).weight += (
                slow["alpha"] / slow["rank"] * tensors[f"slow.{name}.B"] @ tensors[f"slow.{name}.A"])
        for idx, mlp in ttt_layers(reference).items():
            mlp.down_proj.weight += tensors[f"layers.{idx}.delta"][0]
    for name in adapted:
        assert torch.allclose(plain.get_submodule(name).weight, reference.get_submodule(name).weight, atol=1e-6)
    assert any(tensors[f"slow.{name}.B"].any() for name in adapted)

    # pyfunc: score a text as a new document of the stream: the live slow weights, fresh fast weights
    import mlflow
    import pandas as pd

    from transformers import AutoTokenizer

    mlflow.set_registry_uri(config.mlflow.tracking_uri)
    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{store.name}@{LIVE}")
    text = SAMPLE_TEXT[:2000]
    scored = model.predict(pd.DataFrame({"text": [text]}))
    ids = torch.tensor(AutoTokenizer.from_pretrained(ROOT / "models/ttt-tiny-qwen3")(text, add_special_tokens=False)["input_ids"])[None]
    with torch.no_grad():
        want = TTTSession(reference).feed(ids).nll[0, 1:].double().mean().item()
    assert scored["loss"][0] == pytest.approx(want, rel=1e-5)
    generated = model.predict(pd.DataFrame({"text": ["The stream processor"]}), params={"mode": "generate", "max_new_tokens": 8})
    assert isinstance(generated["generated"][0], str) and generated["generated"][0]

    # offline rollback: live becomes a copy of last-good
    offline = cli("rollback", "--to", LAST_GOOD, "--offline", "-c", str(config_file))
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert store.registry.versions()[0]["tags"]["rollback_to"] == store.registry.resolve(LAST_GOOD)
