"""The two configs of a TTT model: ``TTTConfig`` (the fast weights, In-Place TTT) and
``SlowConfig`` (the slow weights, low-rank adapters learned across documents).

Typed pydantic models, validated where they are built: a stream's YAML (as sections of
``pipeline.config.AppConfig``), a model's ``config.json`` (key ``ttt``) or a checkpoint's
manifest. An invalid value or an unknown field fails with the field's name. This module imports
no torch, so that light modules (the actors' call types, the pipeline's config) can hold them.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Target = Literal["hidden_states", "input_embeddings"]
Objective = Literal["in_place", "gradient"]
GradientLoss = Literal["cross_entropy", "entropy"]
Optimizer = Literal["sgd", "adam"]

# The gated MLP's projections: on the domain streams of bench/domain_stream.py they gave more
# gain per unit of forgetting than attention + MLP.
DEFAULT_SLOW_TARGETS = ("gate_proj", "up_proj", "down_proj")
# The top three decoder layers: a slow step's backward stops there.
DEFAULT_SLOW_LAYERS = (-3, -2, -1)


class TTTConfig(BaseModel):
    """In-Place TTT hyper-parameters (defaults: the paper's continual-training recipe).

    As a stream's ``model.ttt`` section, the fields that are set replace the model's own
    (``overrides``); the others keep the values in the model's ``config.json``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, description="Decoder layers whose MLP gets fast weights; None: every `layer_stride`-th from 0.")
    chunk_size: int = Field(default=1024, ge=1, description="Tokens per TTT chunk: the fast weights update after each.")
    eta: float = Field(default=3.0, allow_inf_nan=False, description="Step size of the in-place update.")
    target: Target = Field(default="hidden_states",
                           description="What the update's target is built from: hidden_states (continual training) "
                                       "or input_embeddings (models trained from scratch).")
    use_proj: bool = Field(default=True, description="A learned projection of the target before the update.")
    conv_kernel: int = Field(default=5, ge=1, description="Width of the causal convolution over the target (odd).")
    max_update_norm: float | None = Field(default=None, gt=0,
                                          description="Safeguard: clip the Frobenius norm of one chunk's update.")
    max_delta_ratio: float | None = Field(default=None, gt=0,
                                          description="Safeguard: cap ||sum dW|| / ||W_down|| (Frobenius).")
    decay: float | None = Field(default=None, ge=0.0, lt=1.0,
                                description="Safeguard: before each update the summed delta is scaled by 1 - decay.")
    objective: Objective = Field(default="in_place",
                                 description="in_place: the trained rule; gradient: gradient steps of `gradient_loss` "
                                             "on the fast weights (dynamic evaluation, no trained TTT parameters).")
    gradient_loss: GradientLoss = Field(default="cross_entropy", description="Loss of the gradient objective.")
    gradient_lr: float = Field(default=0.3, gt=0, description="Learning rate of the gradient objective on W_down.")
    gradient_steps: int = Field(default=1, ge=0, description="Gradient steps per chunk (gradient objective).")
    gradient_optimizer: Optimizer = Field(default="sgd", description="Optimizer of the gradient objective.")
    layer_stride: int = Field(default=6, ge=1, repr=False, description="Layer spacing when `layers` is None.")

    SAFEGUARDS: ClassVar[tuple[str, ...]] = ("max_update_norm", "max_delta_ratio", "decay")

    @field_validator("conv_kernel")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"the causal convolution needs an odd kernel, got {value}")
        return value

    @property
    def safeguards(self) -> list[str]:
        """The names of the safeguards that are on."""
        return [name for name in self.SAFEGUARDS if getattr(self, name) is not None]

    @property
    def has_safeguards(self) -> bool:
        return bool(self.safeguards)

    def overrides(self) -> dict[str, Any]:
        """The fields set explicitly (in YAML, the environment or the constructor), as a dict."""
        return self.model_dump(include=set(self.model_fields_set))

    def resolve_layers(self, num_hidden_layers: int) -> list[int]:
        """The TTT layer indices for a model of this depth (default: 0, 6, 12, ...)."""
        layers = self.layers if self.layers is not None else list(range(0, num_hidden_layers, self.layer_stride))
        bad = [i for i in layers if i >= num_hidden_layers]
        if bad:
            raise ValueError(f"TTTConfig.layers: {bad} out of range for a model with {num_hidden_layers} layers")
        return sorted(set(layers))


class SlowConfig(BaseModel):
    """What adapts across documents, how fast, and how it is bounded (``ttt_model.slow``).

    The defaults are the embedded default's, chosen on bench/domain_stream.py.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(default=False, description="Learn slow weights across documents.")
    targets: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: list(DEFAULT_SLOW_TARGETS), min_length=1,
        description="Linear modules whose names end with one of these get low-rank adapters.")
    layers: list[int] | None = Field(
        default_factory=lambda: list(DEFAULT_SLOW_LAYERS), min_length=1,
        description="Decoder layers with adapters (negative: from the top, -1 the last; None: all). A step's "
                    "backward stops at the lowest one, so adapters in the top layers cost a fraction of a forward.")
    rank: int = Field(default=8, ge=1, description="Rank r of each adapter (W = W_0 + alpha / r B A).")
    alpha: float = Field(default=16.0, gt=0, description="Adapter scale numerator (alpha / r).")
    lr: float = Field(default=3e-3, gt=0, description="Adam learning rate of the adapters.")
    l2_to_base: float = Field(default=10.0, ge=0,
                              description="Decoupled weight decay of A and B (times lr, per step): a pull towards the "
                                          "base, so the adaptation settles where the stream's pull and this balance.")
    max_delta_ratio: float | None = Field(default=None, gt=0,
                                          description="Cap on ||(alpha/r) B A|| / ||W_0|| per adapted matrix.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Clip the adapters' gradient norm per step.")
    replay_chunks: int = Field(default=0, ge=0,
                               description="Earlier full chunks kept and trained on again with each new one.")
    rehearsal_path: str | None = Field(
        default=None, min_length=1,
        description="JSONL of {id, text} from the text the base model was trained on: one rehearsed chunk joins "
                    "every `rehearsal_every`-th slow step, holding the adaptation to what the stream does not show.")
    rehearsal_chunks: int = Field(default=64, ge=1, description="Chunks taken from the rehearsal file.")
    rehearsal_every: int = Field(default=2, ge=1, description="Slow steps per rehearsed chunk.")
    rehearsal_tokens: int | None = Field(default=256, ge=2,
                                         description="Tokens of a rehearsed chunk; None: the TTT chunk size.")
    reuse_nearest_key: bool = Field(
        default=False,
        description="per_key scope: a new key starts from the slow weights of the existing key whose first document "
                    "is most alike (it carries one key's learning into another's model).")
    reuse_min_similarity: float = Field(default=0.0, ge=-1, le=1,
                                        description="Least cosine similarity for `reuse_nearest_key`.")
    chunk_tokens: int | None = Field(
        default=None, ge=2,
        description="Tokens per slow step, each through the forward that scored them; None: one step per window "
                    "(the reader's max_document_tokens).")
    seed: int = Field(default=0, description="Seed of the adapters' random A.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
