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
from ttt_model.patch import configure_ttt, has_ttt, load_ttt_model, ttt_config_of
from ttt_model.slow import SlowLearner, rehearsal_chunks


def build_model(path: str | Path, ttt: TTTConfig, slow: SlowConfig, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, rehearsal_tokenizer=None) -> tuple[nn.Module, SlowLearner | None]:
    """The model at ``path`` on ``device``, frozen and in eval mode, with ``ttt``'s set fields
    replacing the model's own TTT config (a plain model gets TTT with them), and the adapters of
    ``slow`` when it is enabled. With ``rehearsal_tokenizer`` (a learner of slow weights), the
    adapters rehearse the chunks of ``slow.rehearsal_path``; readers of versions need none."""
    model = load_ttt_model(path, dtype=dtype).to(device).eval().requires_grad_(False)
    if ttt.model_fields_set or not has_ttt(model):
        configure_ttt(model, ttt)
    if not slow.enabled:
        return model, None
    rehearsal = None
    if rehearsal_tokenizer is not None and slow.rehearsal_path is not None:
        if not Path(slow.rehearsal_path).is_file():
            raise FileNotFoundError(f"model.slow.rehearsal_path: {slow.rehearsal_path} does not exist")
        tokens = slow.rehearsal_tokens or ttt_config_of(model).chunk_size
        rehearsal = rehearsal_chunks(slow.rehearsal_path, rehearsal_tokenizer, tokens, slow.rehearsal_chunks).to(device)
    return model, SlowLearner(model, slow, rehearsal)
