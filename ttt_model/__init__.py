"""In-Place Test-Time Training for Hugging Face causal LMs (pure torch + transformers)."""

from ttt_model.config import TTTConfig
from ttt_model.forward_call import TTTCall, ttt_forward
from ttt_model.layer import InPlaceTTTMLP
from ttt_model.patch import (
    SUPPORTED_FAMILIES, configure_ttt, disable_ttt, enable_ttt, has_ttt, load_ttt_model, ttt_config_of,
)
from ttt_model.session import StepOutput, TTTSession
from ttt_model.state import FastWeightState, LayerFastWeights, StateIntegrityError

__all__ = [
    "FastWeightState",
    "InPlaceTTTMLP",
    "LayerFastWeights",
    "SUPPORTED_FAMILIES",
    "StateIntegrityError",
    "StepOutput",
    "TTTCall",
    "TTTConfig",
    "TTTSession",
    "configure_ttt",
    "disable_ttt",
    "enable_ttt",
    "has_ttt",
    "load_ttt_model",
    "ttt_config_of",
    "ttt_forward",
]
