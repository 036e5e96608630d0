"""FastWeightState: the streaming state of a TTT model.

Per TTT layer the state holds ``delta`` (the accumulated fast-weight update dW_total = W - W_0,
one per sequence in the batch, kept in float32 or wider) and the tails of h and t for the chunk
that is not finished yet. It saves to safetensors plus a JSON sidecar holding its sha256, and
loads only after the hash matches: never pickle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save
from torch import nn

from ttt_model.config import TTTConfig

FORMAT = "ttt-stream.fast-weights/1"


class StateIntegrityError(RuntimeError):
    """A saved state whose bytes do not match its recorded hash, or that cannot be read."""


def accumulator_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Fast weights accumulate in float32 at least: bf16 sums of many small updates drift."""
    return torch.promote_types(weight_dtype, torch.float32)


@dataclass
class LayerFastWeights:
    """One TTT layer's streaming state for a batch of B sequences."""

    delta: torch.Tensor  # (B, d, D): sum of applied chunk updates
    tail_h: torch.Tensor  # (B, r, D): keys of the unfinished chunk, r < C
    tail_t: torch.Tensor  # (B, r, d): targets of the unfinished chunk
    tokens_seen: int = 0
    updates: int = 0

    @property
    def tail_len(self) -> int:
        return self.tail_h.shape[1]


def ttt_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The model's In-Place TTT MLPs by decoder-layer index.

    Found by walking the model's modules once, then remembered with where each one is attached:
    the walk over a 28-layer model costs about a millisecond of host time, several per document,
    and a short document on a GPU is bound by host time. The remembered layers are used only
    while each is still attached where it was found (static_mode and disable_ttt detach them).
    """
    cached = model.__dict__.get("_ttt_layers_found")
    if cached and all(getattr(parent, attr, None) is mlp for parent, attr, mlp in cached):
        return {mlp.layer_idx: mlp for _, _, mlp in cached}
    found = []
    for name, module in model.named_modules():
        if getattr(module, "is_ttt_mlp", False):
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name), attr, module))
    if not found:
        raise ValueError("model has no TTT layers: call ttt_model.enable_ttt(model, config) first")
    found.sort(key=lambda entry: entry[2].layer_idx)
    model.__dict__["_ttt_layers_found"] = found
    return {mlp.layer_idx: mlp for _, _, mlp in found}


class FastWeightState:
    """The fast weights of every TTT layer of one model, for a batch of sequences."""

    def __init__(self, layers: dict[int, LayerFastWeights], config: TTTConfig):
        self.layers = layers
        self.config = config

    # -- creation ------------------------------------------------------------------------------

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int = 1) -> "FastWeightState":
        """A zero state (model equals its base weights) shaped for ``model``'s TTT layers."""
        layers = {}
        config = None
        for idx, mlp in ttt_layers(model).items():
            config = mlp.config
            weight = mlp.down_proj.weight
            d, D = weight.shape
            layers[idx] = LayerFastWeights(
                delta=torch.zeros(batch_size, d, D, dtype=accumulator_dtype(weight.dtype), device=weight.device),
                tail_h=torch.zeros(batch_size, 0, D, dtype=weight.dtype, device=weight.device),
                tail_t=torch.zeros(batch_size, 0, d, dtype=weight.dtype, device=weight.device),
            )
        return cls(layers, config)

    def __iter__(self) -> Iterator[tuple[int, LayerFastWeights]]:
        return iter(self.layers.items())

    @property
    def batch_size(self) -> int:
        return next(iter(self.layers.values())).delta.shape[0]

    @property
    def tokens_seen(self) -> int:
        return next(iter(self.layers.values())).tokens_seen

    # -- maintenance ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the base model: zero deltas, empty tails."""
        for layer in self.layers.values():
            layer.delta = torch.zeros_like(layer.delta)
            layer.tail_h = layer.tail_h[:, :0]
            layer.tail_t = layer.tail_t[:, :0]
            layer.tokens_seen = 0
            layer.updates = 0

    def norms(self) -> dict[int, torch.Tensor]:
        """||delta||_F per layer, one value per sequence (B,)."""
        return {idx: torch.linalg.matrix_norm(layer.delta.detach()) for idx, layer in self.layers.items()}

    def delta_ratios(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """||delta||_F / ||W_down||_F per layer and sequence: the size of the adaptation."""
        mlps = ttt_layers(model)
        return {idx: norm / mlps[idx].w0_norm().to(norm.dtype) for idx, norm in self.norms().items()}

    @torch.no_grad()
    def clip_(self, max_norm: float) -> "FastWeightState":
        """Scale each layer's delta down to Frobenius norm at most ``max_norm``."""
        for layer in self.layers.values():
            norm = torch.linalg.matrix_norm(layer.delta, keepdim=True)
            layer.delta = layer.delta * torch.clamp(max_norm / (norm + 1e-12), max=1.0)
        return self

    @torch.no_grad()
    def decay_(self, factor: float) -> "FastWeightState":
        """Multiply every delta by ``factor`` (0 forgets everything, 1 keeps it)."""
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"decay factor must be in [0, 1], got {factor}")
        for layer in self.layers.values():
            layer.delta = layer.delta * factor
        return self

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> nn.Module:
        """Fold delta into W_down (batch of one) and zero it: the model now carries the adaptation."""
        if self.batch_size != 1:
            raise ValueError(f"merge_into needs a state of batch size 1, got {self.batch_size}")
        mlps = ttt_layers(model)
        for idx, layer in self.layers.items():
            weight = mlps[idx].down_proj.weight
            weight.copy_((weight.to(layer.delta.dtype) + layer.delta[0]).to(weight.dtype))
            layer.delta = torch.zeros_like(layer.delta)
        return model

    def detach_(self) -> "FastWeightState":
        for layer in self.layers.values():
            layer.delta = layer.delta.detach()
        return self

    def clone(self) -> "FastWeightState":
        return FastWeightState(
            {
                idx: LayerFastWeights(
                    layer.delta.detach().clone(), layer.tail_h.clone(), layer.tail_t.clone(),
                    layer.tokens_seen, layer.updates,
                )
                for idx, layer in self.layers.items()
            },
            self.config,
        )

    # -- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for idx, layer in self.layers.items():
            tensors[f"layers.{idx}.delta"] = layer.delta.detach().cpu().clone()
            tensors[f"layers.{idx}.tail_h"] = layer.tail_h.detach().cpu().clone()
            tensors[f"layers.{idx}.tail_t"] = layer.tail_t.detach().cpu().clone()
            tensors[f"layers.{idx}.counters"] = torch.tensor([layer.tokens_seen, layer.updates], dtype=torch.int64)
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the state with ``tensors``; shapes must match this model's layers."""
        expected = set(self.state_dict())
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"fast-weight state does not fit this model: missing {missing}, unexpected {extra}")
        for idx, layer in self.layers.items():
            delta = tensors[f"layers.{idx}.delta"]
            if delta.shape[1:] != layer.delta.shape[1:]:
                raise ValueError(f"layer {idx}: delta shape {tuple(delta.shape)} != {tuple(layer.delta.shape)}")
        for idx, layer in self.layers.items():
            delta = tensors[f"layers.{idx}.delta"]
            device = layer.delta.device
            layer.delta = delta.to(device=device, dtype=layer.delta.dtype)
            layer.tail_h = tensors[f"layers.{idx}.tail_h"].to(device=device, dtype=layer.tail_h.dtype)
            layer.tail_t = tensors[f"layers.{idx}.tail_t"].to(device=device, dtype=layer.tail_t.dtype)
            layer.tokens_seen, layer.updates = (int(v) for v in tensors[f"layers.{idx}.counters"])

    def to_bytes(self) -> bytes:
        """The safetensors bytes ``save`` writes (same tensors, same bytes)."""
        return save(self.state_dict(), metadata={"format": FORMAT})

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> str:
        """Write ``path`` (safetensors) and ``path``.json (hash, format, config); return the sha256."""
        return write_verified(Path(path), self.to_bytes(), {
            "ttt_config": self.config.model_dump() if self.config else None,
            "tokens_seen": self.tokens_seen,
            "metadata": metadata or {},
        })

    def load(self, path: str | Path, expected_sha256: str | None = None) -> dict:
        """Verify ``path`` against its hash (the sidecar's, or ``expected_sha256``), then load it.

        On any failure the current state is left untouched and StateIntegrityError is raised.
        """
        tensors, sidecar = read_verified(Path(path), expected_sha256)
        try:
            self.load_state_dict(tensors)
        except ValueError as err:
            raise StateIntegrityError(f"{path}: {err}") from None
        return sidecar


def write_verified(path: Path, data: bytes, sidecar: dict) -> str:
    """Write safetensors ``data`` to ``path`` and a JSON sidecar with its sha256; return the hash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    digest = file_sha256(path)
    sidecar_path(path).write_text(json.dumps({"format": FORMAT, "sha256": digest, **sidecar}, indent=2, sort_keys=True))
    return digest


def read_verified(path: Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a file ``write_verified`` wrote, after its hash matched; else StateIntegrityError."""
    try:
        sidecar = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError) as err:
        raise StateIntegrityError(f"{path}: cannot read its sidecar {sidecar_path(path)}: {err}") from None
    want = expected_sha256 or sidecar.get("sha256")
    if sidecar.get("format") != FORMAT or not want:
        raise StateIntegrityError(f"{path}: not a {FORMAT} state (sidecar format {sidecar.get('format')!r})")
    try:
        got = file_sha256(path)
    except OSError as err:
        raise StateIntegrityError(f"{path}: cannot read: {err.strerror}") from None
    if got != want:
        raise StateIntegrityError(f"{path}: sha256 {got} does not match the recorded {want}")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise StateIntegrityError(f"{path}: unreadable safetensors file: {err}") from None
    return tensors, sidecar


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
