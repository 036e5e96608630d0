"""Continual learning through the real pipeline, with the embedded default config.

A small domain the shipped model never saw (the source files of the installed kafka-python
package: Python code, where the model was trained on prose manuals) is streamed through the
broker to a Ray reader; the live version in MLflow, exported with its slow weights merged, must
beat the base model on held-out files of that domain, and the checkpoints must hold slow weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import kafka
import pytest
import torch
from safetensors.torch import load

from actors.call_types import RESERVED_KEYS
from pipeline.state.checkpoint import LIVE, CheckpointStore
from pipeline.state.export import export_checkpoint
from pipeline.processing.job import run_stream
from pipeline.stream_io.topics import ensure_topics
from tests.conftest import ROOT, static_loss
from tests.pipeline.test_stream_e2e import produce, read_topic, stream_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def domain_documents(chars: int = 2500) -> list[dict]:
    files = sorted(p for p in Path(kafka.__file__).parent.rglob("*.py") if p.stat().st_size > 2 * chars)
    return [{"id": str(p.relative_to(Path(kafka.__file__).parent)), "text": p.read_text()[:chars]} for p in files]


def test_the_live_version_beats_the_base_on_held_out_documents_of_the_stream_domain(stack, ray_session, tmp_path):
    assert stack.model.slow.enabled  # the embedded default learns across documents
    docs = domain_documents()
    assert len(docs) >= 22, len(docs)
    stream, heldout = docs[:18], docs[-4:]
    config = stream_config(stack, tmp_path, readers=1, base_loss_sample_rate=0.0)
    config = config.model_copy(update={"processor": config.processor.model_copy(update={
        "checkpoint": config.processor.checkpoint.model_copy(update={"every_documents": 6, "every_seconds": 3600.0}),
    })})
    ensure_topics(config.kafka)
    produce(config, [json.dumps(d).encode() for d in stream], partitions=[0] * len(stream))
    run_stream(config, until_idle_s=3.0)

    results = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.results, expect=len(stream))]
    assert sorted(r["id"] for r in results) == sorted(d["id"] for d in stream)
    ratios = [r["slow_delta_ratio"] for r in sorted(results, key=lambda r: r["offset"])]
    # The slow weights moved, and kept moving (read by the learner's readers: the first
    # document with the base model's; a held-out document teaches nothing, so the next reads the same).
    assert ratios[0] == 0.0 < ratios[-1] and len(set(ratios)) > len(ratios) // 2

    store = CheckpointStore(config.mlflow, config.stream.name)
    live = store.load(LIVE)
    assert live.manifest["model_config"]["slow"]["enabled"] and live.manifest["documents"] == len(stream)
    rehearsal = ROOT / live.manifest["model_config"]["slow"]["rehearsal_path"]
    assert live.manifest["model_config"]["rehearsal_sha256"] == hashlib.sha256(rehearsal.read_bytes()).hexdigest()
    (blob,) = [b for blobs in live.states.values() for b in blobs if b.key not in RESERVED_KEYS]
    assert any(k.startswith("slow.") and k.endswith(".B") and t.any() for k, t in load(blob.data).items())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = export_checkpoint(live, tmp_path / "live")
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models/ttt-tiny-qwen3")
    base = AutoModelForCausalLM.from_pretrained(ROOT / "models/ttt-tiny-qwen3", dtype=torch.float32).eval()
    adapted = AutoModelForCausalLM.from_pretrained(exported).eval()
    texts = [d["text"] for d in heldout]
    base_loss, live_loss = static_loss(base, tokenizer, texts), static_loss(adapted, tokenizer, texts)
    print(f"held-out files of the stream's domain: base {base_loss:.4f}, live {live_loss:.4f} "
          f"({100 * (live_loss / base_loss - 1):+.2f}%)")
    # Measured: -2.0% (18 short files; rehearsal of the model's own text holds the gain back).
    assert live_loss < 0.99 * base_loss
