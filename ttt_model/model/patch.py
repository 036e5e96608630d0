"""Attach In-Place TTT to a Hugging Face causal LM, and save/load such a model.

``enable_ttt(model, config)`` swaps the MLP of each chosen decoder layer for an
``InPlaceTTTMLP`` that shares the original projections, records the config under
``model.config.ttt`` and returns the same model object. ``load_ttt_model(path)`` reads a
checkpoint written by ``save_pretrained`` back, TTT parameters included, without remote code.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from ttt_model.config import TTTConfig
from ttt_model.model.forward_call import enter_decoder, leave_decoder, set_input_embeds
from ttt_model.model.layer import InPlaceTTTMLP
from ttt_model.model.state import ttt_layers


@dataclass(frozen=True)
class GatedMLPFamily:
    """Where a model family keeps its decoder layers and their gated MLPs."""

    layers_path: str = "model.layers"
    mlp_attr: str = "mlp"


# Families whose MLP is down_proj(act(gate_proj(x)) * up_proj(x)) under model.layers[i].mlp.
SUPPORTED_FAMILIES: dict[str, GatedMLPFamily] = {
    "llama": GatedMLPFamily(),
    "qwen2": GatedMLPFamily(),
    "qwen3": GatedMLPFamily(),
    "mistral": GatedMLPFamily(),
}


def family_of(model: nn.Module) -> GatedMLPFamily:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"In-Place TTT does not support model_type {model_type!r}; "
            f"supported: {', '.join(sorted(SUPPORTED_FAMILIES))}"
        )
    return SUPPORTED_FAMILIES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    module: Any = model
    for part in family_of(model).layers_path.split("."):
        module = getattr(module, part)
    return module


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder under the language-model head (``model.model`` in these families)."""
    return getattr(model, family_of(model).layers_path.split(".")[0])


def has_ttt(model: nn.Module) -> bool:
    """Whether TTT is enabled on ``model``."""
    try:
        ttt_layers(model)  # remembered between calls
    except ValueError:
        return False
    return True


def is_ttt_parameter(name: str) -> bool:
    """Whether a parameter name is a TTT layer's own (its conv or projection), not the base model's."""
    return ".ttt_" in name


def enable_ttt(model: nn.Module, config: TTTConfig | None = None) -> nn.Module:
    """Attach In-Place TTT in place to a supported HF causal LM and return it."""
    config = config or TTTConfig()
    family = family_of(model)
    if has_ttt(model):
        raise ValueError("TTT is already enabled on this model")
    layers = decoder_layers(model)
    for idx in config.resolve_layers(len(layers)):
        mlp = getattr(layers[idx], family.mlp_attr)
        setattr(layers[idx], family.mlp_attr, InPlaceTTTMLP(mlp, config, idx))
    config_dict = config.model_dump()
    config_dict["layers"] = config.resolve_layers(len(layers))
    model.config.ttt = config_dict

    if config.target == "input_embeddings":
        base = getattr(model, family.layers_path.split(".")[0])

        # The decoder's forward is a call of its own (ttt_model.model.forward_call) that sees its input
        # embeddings: given by the caller, or computed by the embedding layer.
        model.ttt_hooks = [
            base.register_forward_pre_hook(
                lambda module, args, kwargs: enter_decoder(kwargs.get("inputs_embeds")), with_kwargs=True),
            model.get_input_embeddings().register_forward_hook(
                lambda module, args, output: set_input_embeds(output)),
            base.register_forward_hook(lambda module, args, output: leave_decoder(), always_call=True),
        ]
    return model


def disable_ttt(model: nn.Module) -> nn.Module:
    """Put the original MLPs back (sharing the current weights) and drop the TTT config."""
    family = family_of(model)
    layers = decoder_layers(model)
    for idx, mlp in ttt_layers(model).items():
        setattr(layers[idx], family.mlp_attr, mlp.base_mlp)
    for hook in getattr(model, "ttt_hooks", []):
        hook.remove()
    model.ttt_hooks = []
    if hasattr(model.config, "ttt"):
        del model.config.ttt
    return model


def configure_ttt(model: nn.Module, overrides: TTTConfig | dict[str, Any]) -> TTTConfig:
    """Change how a model's TTT layers adapt (objective, safeguards, ...) and return the config.

    ``overrides``: a dict of fields, or a TTTConfig whose explicitly set fields are the ones
    to replace (a stream's ``model.ttt``). A model with TTT layers keeps its layers and trained
    TTT parameters, with those fields replaced; a plain model gets TTT enabled with them (useful
    with the gradient objective, which needs no trained TTT parameters).
    """
    if isinstance(overrides, TTTConfig):
        overrides = overrides.overrides()
    if not has_ttt(model):
        config = TTTConfig.model_validate(dict(overrides))
        enable_ttt(model, config)
        return config
    mlps = ttt_layers(model)
    current = next(iter(mlps.values())).config
    if "layers" in overrides and sorted(overrides["layers"] or []) != sorted(mlps):
        raise ValueError(f"TTTConfig.layers: the model's TTT layers are {sorted(mlps)}; they cannot be overridden")
    config = TTTConfig.model_validate({**current.model_dump(), **overrides, "layers": sorted(mlps)})
    for mlp in mlps.values():
        mlp.config = config
    model.config.ttt = config.model_dump()
    return config


@contextmanager
def static_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its original MLPs: TTT off, every trained weight as it is."""
    layers = decoder_layers(model)
    mlp_attr = family_of(model).mlp_attr
    mlps = ttt_layers(model) if has_ttt(model) else {}
    try:
        for idx, mlp in mlps.items():
            setattr(layers[idx], mlp_attr, mlp.base_mlp)
        yield model
    finally:
        for idx, mlp in mlps.items():
            setattr(layers[idx], mlp_attr, mlp)


def ttt_config_of(model: nn.Module) -> TTTConfig:
    """The TTTConfig recorded in a model's HF config."""
    raw = getattr(model.config, "ttt", None)
    if raw is None:
        raise ValueError("model config has no 'ttt' entry")
    return TTTConfig.model_validate(dict(raw))


def load_ttt_model(path: str | Path, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a checkpoint saved by ``save_pretrained`` of a TTT-enabled model (or a plain one).

    The base weights load through ``AutoModelForCausalLM`` (no remote code); the TTT parameters,
    which it does not know, are then read from the same safetensors files.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    from_pretrained_kwargs.setdefault("trust_remote_code", False)
    from transformers.utils import logging as hf_logging

    # Its load report would list our TTT parameters as unexpected keys; they are read below.
    verbosity, bars_off = hf_logging.get_verbosity(), not hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if not bars_off:
            hf_logging.enable_progress_bar()
    raw = getattr(model.config, "ttt", None)
    if raw is None:
        return model
    config = ttt_config_of(model)
    del model.config.ttt
    enable_ttt(model, config)
    ttt_keys = {name for name, _ in model.named_parameters() if is_ttt_parameter(name)}
    loaded = _read_tensors(path, ttt_keys)
    missing = sorted(ttt_keys - set(loaded))
    if missing:
        raise ValueError(f"{path}: checkpoint has a TTT config but lacks parameters {missing[:4]}...")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in loaded.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return model


def _read_tensors(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({weight_map[n] for n in names if n in weight_map})
    else:
        files = ["model.safetensors"]
    out = {}
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            for name in names & set(f.keys()):
                out[name] = f.get_tensor(name)
    return out
