"""``ttt-stream export``: a checkpoint as a plain Hugging Face model, its state merged into W_down."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load

from pipeline.checkpoint import Checkpoint, CheckpointError, base_model_id
from ttt_model.patch import disable_ttt, load_ttt_model
from ttt_model.state import FastWeightState


def pick_state(checkpoint: Checkpoint, worker: str | None, key: str | None):
    workers = [worker] if worker else sorted(checkpoint.states)
    blobs = [(w, b) for w in workers for b in checkpoint.states.get(w, []) if key is None or b.key == key]
    if not blobs:
        raise CheckpointError(f"v{checkpoint.version}: no state for worker {worker!r} key {key!r}; "
                              f"it has {{{', '.join(f'{w}: {[b.key for b in bs]}' for w, bs in checkpoint.states.items())}}}")
    if len(blobs) > 1:
        raise CheckpointError(f"v{checkpoint.version} holds {len(blobs)} states: choose one with --worker/--key "
                              f"({', '.join(f'{w}/{b.key}' for w, b in blobs)})")
    return blobs[0]


def export_checkpoint(checkpoint: Checkpoint, out: Path, worker: str | None = None, key: str | None = None) -> Path:
    """Write ``out``: config, safetensors weights and tokenizer of the base model with one state
    folded into W_down of its TTT layers; it loads with ``AutoModelForCausalLM`` and no TTT."""
    from transformers import AutoTokenizer

    base = checkpoint.manifest["base_model"]
    if base_model_id(base["path"])["weights_sha256"] != base["weights_sha256"]:
        raise CheckpointError(f"{base['path']}: weights differ from the checkpoint's base model")
    chosen_worker, blob = pick_state(checkpoint, worker, key)
    model = load_ttt_model(base["path"], dtype=torch.float32)
    state = FastWeightState.for_model(model)
    state.load_state_dict(load(blob.data))
    state.merge_into(model)
    disable_ttt(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base["path"]).save_pretrained(out)
    (out / "ttt_export.json").write_text(json.dumps({
        "stream": checkpoint.manifest["stream"], "version": checkpoint.version, "worker": chosen_worker,
        "key": blob.key, "state_sha256": blob.sha256, "documents": blob.documents, "base_model": base,
    }, indent=2))
    return out
