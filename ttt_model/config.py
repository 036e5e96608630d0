"""TTTConfig: which layers adapt, how, and the safeguards on every update.

Stored in the Hugging Face model config under the key ``ttt`` so that a TTT-enabled model saves
and loads like any other (``config.json`` holds it, the safetensors file holds the parameters).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal

Target = Literal["hidden_states", "input_embeddings"]
Objective = Literal["in_place", "gradient"]
GradientLoss = Literal["cross_entropy", "entropy"]
Optimizer = Literal["sgd", "adam"]


@dataclass
class TTTConfig:
    """In-Place TTT hyper-parameters (defaults: the paper's continual-training recipe)."""

    # None means every 6th layer starting at 0 (resolved against the model by ``resolve_layers``).
    layers: list[int] | None = None
    chunk_size: int = 1024
    eta: float = 3.0
    # hidden_states: the MLP input (continual training); input_embeddings: from-scratch models.
    target: Target = "hidden_states"
    use_proj: bool = True
    conv_kernel: int = 5
    # Safeguards, applied to every chunk update in every mode; None disables one.
    max_update_norm: float | None = None  # clip ||dW_i||_F of one chunk's update
    max_delta_ratio: float | None = None  # cap ||sum dW||_F / ||W_down||_F
    decay: float | None = None  # before each update: dW_total *= (1 - decay)
    # How the fast weights learn while streaming: the trained in-place rule, or gradient steps
    # of a loss on the fast weights (dynamic evaluation), which needs no trained TTT parameters.
    objective: Objective = "in_place"
    gradient_loss: GradientLoss = "cross_entropy"
    # SGD on W_down: 0.3 gave -2.3% to -4.6% past 2k tokens on the tiny models (README).
    gradient_lr: float = 0.3
    gradient_steps: int = 1
    gradient_optimizer: Optimizer = "sgd"
    layer_stride: int = field(default=6, repr=False)

    SAFEGUARDS: ClassVar[tuple[str, ...]] = ("max_update_norm", "max_delta_ratio", "decay")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        checks = [
            ("chunk_size", self.chunk_size >= 1),
            ("eta", isinstance(self.eta, (int, float)) and math.isfinite(self.eta)),
            ("target", self.target in ("hidden_states", "input_embeddings")),
            ("conv_kernel", self.conv_kernel >= 1 and self.conv_kernel % 2 == 1),
            ("max_update_norm", self.max_update_norm is None or self.max_update_norm > 0),
            ("max_delta_ratio", self.max_delta_ratio is None or self.max_delta_ratio > 0),
            ("decay", self.decay is None or 0.0 <= self.decay < 1.0),
            ("objective", self.objective in ("in_place", "gradient")),
            ("gradient_loss", self.gradient_loss in ("cross_entropy", "entropy")),
            ("gradient_lr", self.gradient_lr > 0),
            ("gradient_steps", self.gradient_steps >= 0),
            ("gradient_optimizer", self.gradient_optimizer in ("sgd", "adam")),
            ("layer_stride", self.layer_stride >= 1),
            ("layers", self.layers is None or all(i >= 0 for i in self.layers)),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"TTTConfig.{name}: invalid value {getattr(self, name)!r}")

    @property
    def safeguards(self) -> list[str]:
        """The names of the safeguards that are on."""
        return [name for name in self.SAFEGUARDS if getattr(self, name) is not None]

    @property
    def has_safeguards(self) -> bool:
        return bool(self.safeguards)

    def resolve_layers(self, num_hidden_layers: int) -> list[int]:
        """The TTT layer indices for a model of this depth (default: 0, 6, 12, ...)."""
        layers = self.layers if self.layers is not None else list(range(0, num_hidden_layers, self.layer_stride))
        bad = [i for i in layers if i >= num_hidden_layers]
        if bad:
            raise ValueError(f"TTTConfig.layers: {bad} out of range for a model with {num_hidden_layers} layers")
        return sorted(set(layers))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TTTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TTTConfig: unknown fields {unknown}")
        return cls(**data)
