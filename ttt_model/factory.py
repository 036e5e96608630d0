"""The one place a stream's model is assembled: the base model from its directory, the stream's
TTT config over the model's own, and the slow-weight adapters.

The reader actors, the context-parallel group, the pyfunc flavour and ``export`` all build their
model here, so that a setting reaches each of them the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ttt_model.config import SlowConfig, TTTConfig
from ttt_model.model.patch import configure_ttt, has_ttt, load_ttt_model, ttt_config_of
from ttt_model.slow import SlowLearner, rehearsal_chunks


def build_model(path: str | Path, ttt: TTTConfig, slow: SlowConfig, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[nn.Module, SlowLearner | None]:
    """The model at ``path`` on ``device``, frozen and in eval mode, with ``ttt``'s set fields
    replacing the model's own TTT config (a plain model gets TTT with them), and the adapters of
    ``slow`` when it is enabled (rehearsing nothing: ``load_rehearsal`` gives a learner its chunks)."""
    model = load_ttt_model(path, dtype=dtype).to(device).eval().requires_grad_(False)
    if ttt.model_fields_set or not has_ttt(model):
        configure_ttt(model, ttt)
    if not slow.enabled:
        return model, None
    return model, SlowLearner(model, slow)


def load_rehearsal(learner: SlowLearner, tokenizer) -> None:
    """Give a learner of slow weights the chunks of ``slow.rehearsal_path`` to rehearse (readers of
    a learner's versions need none)."""
    slow = learner.config
    if slow.rehearsal_path is None:
        return
    if not Path(slow.rehearsal_path).is_file():
        raise FileNotFoundError(f"model.slow.rehearsal_path: {slow.rehearsal_path} does not exist")
    tokens = slow.rehearsal_tokens or ttt_config_of(learner.model).chunk_size
    device = next(learner.model.parameters()).device
    learner.rehearsal = rehearsal_chunks(slow.rehearsal_path, tokenizer, tokens, slow.rehearsal_chunks).to(device)
