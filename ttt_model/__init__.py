"""In-Place Test-Time Training for Hugging Face causal LMs (pure torch + transformers).

Names load on first use, so that ``ttt_model.config`` (pydantic only) imports without torch.
"""

from importlib import import_module
from typing import Any

_HOME = {
    "TTTConfig": "ttt_model.config",
    "SlowConfig": "ttt_model.config",
    "TTTCall": "ttt_model.model.forward_call",
    "ttt_forward": "ttt_model.model.forward_call",
    "InPlaceTTTMLP": "ttt_model.model.layer",
    "SUPPORTED_FAMILIES": "ttt_model.model.patch",
    "configure_ttt": "ttt_model.model.patch",
    "disable_ttt": "ttt_model.model.patch",
    "enable_ttt": "ttt_model.model.patch",
    "has_ttt": "ttt_model.model.patch",
    "load_ttt_model": "ttt_model.model.patch",
    "ttt_config_of": "ttt_model.model.patch",
    "StepOutput": "ttt_model.model.session",
    "TTTSession": "ttt_model.model.session",
    "FastWeightState": "ttt_model.model.state",
    "LayerFastWeights": "ttt_model.model.state",
    "StateIntegrityError": "ttt_model.model.state",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'ttt_model' has no attribute {name!r}")
    return getattr(import_module(_HOME[name]), name)
