"""A slow, obviously-correct In-Place TTT, written from the equations (float64, token by token),
and small random models of each supported family. Shared by the ttt_model tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

FAMILY_CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}


def tiny_model(family: str, seed: int = 0, layers: int = 3, dtype=torch.float32) -> nn.Module:
    """A randomly initialised model of ``family`` small enough for float64 references."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family](
        vocab_size=101,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    if family == "mistral":
        config.sliding_window = None
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def randomise_ttt_parameters(model: nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Non-zero conv and projection weights, so the fast weights really move."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "is_ttt_mlp", False):
                module.ttt_conv.weight.copy_(torch.randn(module.ttt_conv.weight.shape, generator=gen) * scale)
                if module.ttt_proj is not None:
                    module.ttt_proj.weight.copy_(torch.randn(module.ttt_proj.weight.shape, generator=gen) * scale)


def reference_ttt_mlp(
    x: torch.Tensor,  # (T, d) one sequence
    target: torch.Tensor,  # (T, d)
    w_gate: torch.Tensor,  # (D, d)
    w_up: torch.Tensor,  # (D, d)
    w_down: torch.Tensor,  # (d, D)
    conv: torch.Tensor,  # (d, k) depthwise kernel
    proj: torch.Tensor | None,  # (d, d) weight of a bias-free Linear
    eta: float,
    chunk: int,
    act,
    flush_tail: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (T, d) and the final accumulated dW (d, D), one token at a time, in float64.

    ``flush_tail``: the unfinished last chunk also updates W (zero-padded), as at a document end.
    """
    x, target = x.double(), target.double()
    w_gate, w_up, w_down, conv = w_gate.double(), w_up.double(), w_down.double(), conv.double()
    proj = None if proj is None else proj.double()
    T, d = x.shape
    k = conv.shape[1]
    half = k // 2
    W = w_down.clone()  # the running fast weight
    out = torch.zeros(T, d, dtype=torch.float64)
    keys = torch.zeros(T, w_gate.shape[0], dtype=torch.float64)
    for i in range(T):
        keys[i] = act(w_gate @ x[i]) * (w_up @ x[i])
        out[i] = W @ keys[i]
        end_of_chunk = (i + 1) % chunk == 0
        if end_of_chunk or (flush_tail and i == T - 1):
            start = i + 1 - chunk if end_of_chunk else T - T % chunk
            dW = torch.zeros_like(W)
            for c in range(i + 1 - start):
                # Conv1d is a cross-correlation with zero padding at the chunk's borders.
                mixed = torch.zeros(d, dtype=torch.float64)
                for j in range(k):
                    src = c + j - half
                    if 0 <= src < chunk and start + src < T:
                        mixed += conv[:, j] * target[start + src]
                value = proj @ mixed if proj is not None else mixed
                dW += torch.outer(value, keys[start + c])
            W = W + eta * dW
    return out, W - w_down


def reference_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The whole model in float64 with every TTT MLP replaced by ``reference_ttt_mlp``."""
    import copy

    ref = copy.deepcopy(model).double()
    embed = ref.get_input_embeddings()
    outputs = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b : b + 1]
        embeddings = embed(ids)[0]
        originals = {}
        for module in ref.modules():
            if getattr(module, "is_ttt_mlp", False):
                originals[module] = module.forward
                module.forward = _reference_forward(module, embeddings)
        try:
            with torch.no_grad():
                outputs.append(_plain_forward(ref, ids))
        finally:
            for module, forward in originals.items():
                module.forward = forward
    return torch.cat(outputs)


def _plain_forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def _reference_forward(module: nn.Module, embeddings: torch.Tensor):
    cfg = module.config

    def forward(x: torch.Tensor) -> torch.Tensor:
        target = x[0] if cfg.target == "hidden_states" else embeddings
        out, _ = reference_ttt_mlp(
            x[0], target, module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight,
            module.ttt_conv.weight[:, 0, :], None if module.ttt_proj is None else module.ttt_proj.weight,
            cfg.eta, cfg.chunk_size, module.act_fn,
        )
        if module.down_proj.bias is not None:
            out = out + module.down_proj.bias.double()
        return out[None]

    return forward


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()
