"""Checkpoints trained with the paper's reference implementation, converted to ours.

The reference (ByteDance-Seed/In-Place-TTT, ``hf_models/hf_qwen3``, ``hf_llama``) saves a plain
Hugging Face checkpoint whose config carries ``ttt_mode, ttt_layers, ttt_chunk, ttt_lr,
ttt_proj, ttt_target`` and whose TTT layers' MLPs hold ``ttt_conv.weight`` (a depthwise Conv1d,
the same tensor as ours) and ``ttt_proj.weight``. The parameter names are ours too; the one
difference is how P is applied: the reference computes V = t~ @ ttt_proj.weight (the raw matrix,
contracting its first index), while our ``ttt_proj`` is an nn.Linear, V = t~ @ W^T. So the
converted checkpoint stores ttt_proj.weight transposed, and its TTT settings as our ``ttt``
config entry; the base weights are copied unchanged.

    convert_reference_checkpoint("ref-run/checkpoint-1000", "converted/")
    model = load_ttt_model("converted/")            # or `ttt-stream convert-reference SRC OUT`
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ttt_model.config import TTTConfig

# the reference's config key -> ours
TARGETS = {"hidden_states": "hidden_states", "input_embed": "input_embeddings"}
REFERENCE_KEYS = ("ttt_mode", "ttt_layers", "ttt_chunk", "ttt_lr", "ttt_proj", "ttt_target")


def reference_ttt_config(config: dict, conv_kernel: int = 5) -> TTTConfig | None:
    """Our TTTConfig for a reference config.json (None where ``ttt_mode`` is off)."""
    if not config.get("ttt_mode", False):
        return None
    target = config.get("ttt_target", "hidden_states")
    if target not in TARGETS:
        raise ValueError(f"ttt_target {target!r}: the reference knows {sorted(TARGETS)}")
    return TTTConfig(
        layers=sorted(int(i) for i in config.get("ttt_layers", [])),
        chunk_size=int(config.get("ttt_chunk", 8192)),  # the reference's defaults where a key is absent
        eta=float(config.get("ttt_lr", 0.3)),
        use_proj=bool(config.get("ttt_proj", True)),
        target=TARGETS[target],
        conv_kernel=conv_kernel,
    )


def convert_reference_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's tensors under our conventions: every ``*.ttt_proj.weight`` transposed."""
    return {name: t.t().contiguous() if name.endswith(".ttt_proj.weight") else t for name, t in tensors.items()}


def convert_reference_checkpoint(source: str | Path, out: str | Path) -> Path:
    """Write ``source`` (a reference checkpoint directory, safetensors) as one of ours to ``out``."""
    source, out = Path(source), Path(out)
    config = json.loads((source / "config.json").read_text())
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        found = sorted(p.name for p in source.glob("*.bin"))
        raise ValueError(f"{source}: no safetensors weights" + (f" (found {found}: pickled, not loaded)" if found else ""))
    out.mkdir(parents=True, exist_ok=True)
    conv_kernels, conv_layers, proj_layers = set(), set(), set()
    for shard in shards:
        tensors = load_file(str(shard))
        for name, tensor in tensors.items():
            if name.endswith(".mlp.ttt_conv.weight"):
                conv_kernels.add(tensor.shape[-1])
                conv_layers.add(_layer_of(name))
            elif name.endswith(".mlp.ttt_proj.weight"):
                proj_layers.add(_layer_of(name))
        save_file(convert_reference_tensors(tensors), str(out / shard.name), metadata={"format": "pt"})
    if len(conv_kernels) > 1:
        raise ValueError(f"{source}: TTT convs of several kernel sizes {sorted(conv_kernels)}")
    ttt = reference_ttt_config(config, conv_kernel=next(iter(conv_kernels), 5))
    if ttt is not None:
        if conv_layers != set(ttt.layers):
            raise ValueError(f"{source}: ttt_layers {ttt.layers} but ttt_conv weights for layers {sorted(conv_layers)}")
        if ttt.use_proj and proj_layers != set(ttt.layers):
            raise ValueError(f"{source}: ttt_proj is on but ttt_proj weights are there for layers {sorted(proj_layers)}")
    converted = {k: v for k, v in config.items() if k not in REFERENCE_KEYS}
    if ttt is not None:
        converted["ttt"] = ttt.model_dump()
    (out / "config.json").write_text(json.dumps(converted, indent=2, sort_keys=True))
    for item in source.iterdir():  # tokenizer, generation config, shard index
        if item.is_file() and item.suffix != ".safetensors" and item.name != "config.json":
            shutil.copy2(item, out / item.name)
    return out


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])
