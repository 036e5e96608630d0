"""``ttt-stream export``: a checkpoint as a plain Hugging Face model, its state merged into W_down."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.state.adapted_model import StateChoiceError, choose_state, load_adapted_model
from pipeline.state.base_model import DEFAULT_CACHE_DIR, local_model_dir
from pipeline.state.checkpoint import Checkpoint, CheckpointError, base_model_id


def export_checkpoint(checkpoint: Checkpoint, out: Path, reader: str | None = None, key: str | None = None,
                      tracking_uri: str | None = None) -> Path:
    """Write ``out``: config, safetensors weights and tokenizer of the base model with one state
    (slow weights and fast-weight delta) merged into its weights; it loads with
    ``AutoModelForCausalLM`` and no TTT. A registered base model is fetched from ``tracking_uri``."""
    from transformers import AutoTokenizer

    base = checkpoint.manifest["base_model"]
    base_dir, _ = local_model_dir(base["path"], tracking_uri, DEFAULT_CACHE_DIR)
    if base_model_id(base_dir)["weights_sha256"] != base["weights_sha256"]:
        raise CheckpointError(f"{base['path']}: weights differ from the checkpoint's base model")
    entries = {w: [{"key": b.key, "blob": b} for b in bs] for w, bs in checkpoint.states.items()}
    model_config = checkpoint.manifest.get("model_config") or {}
    try:
        chosen_reader, entry = choose_state(entries, reader, key, f"v{checkpoint.version}", model_config.get("scope"))
    except StateChoiceError as err:
        raise CheckpointError(f"{err} (--reader/--key)") from None
    blob = entry["blob"] if entry else None  # None: a new tenant's model (per_key, no --key)
    model = load_adapted_model(base_dir, model_config, blob.data if blob else None).merged()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    (out / "ttt_export.json").write_text(json.dumps({
        "stream": checkpoint.manifest["stream"], "version": checkpoint.version, "reader": chosen_reader,
        "key": blob.key if blob else None, "state_sha256": blob.sha256 if blob else None,
        "documents": blob.documents if blob else 0, "base_model": base, "model_config": model_config,
    }, indent=2))
    return out
