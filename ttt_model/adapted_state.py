"""AdaptedState: everything one stream (or one key) has learned, as one verifiable blob.

Its fast weights (a FastWeightState) and, when the stream learns across documents, its slow
weights (a SlowState). Serialised as one safetensors file: the fast weights under their own
names (so a state without slow weights is byte for byte a FastWeightState), the slow weights
under ``slow.``; saved with a sha256 sidecar and loaded only after the hash matches.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from ttt_model.slow import SlowState
from ttt_model.model.state import FORMAT, FastWeightState, StateIntegrityError, read_verified, write_verified

SLOW_PREFIX = "slow."


class AdaptedState:
    def __init__(self, fast: FastWeightState, slow: SlowState | None = None):
        self.fast = fast
        self.slow = slow

    def reset(self) -> None:
        """Back to the base model: fast weights and slow weights (a fresh stream)."""
        self.fast.reset()
        if self.slow is not None:
            for adapter in self.slow.adapters.values():
                adapter.B.zero_()
                for part in ("m_A", "v_A", "m_B", "v_B"):
                    getattr(adapter, part).zero_()
            self.slow.steps = self.slow.tokens = self.slow.replay_next = 0
            self.slow.replay = self.slow.signature = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = self.fast.state_dict()
        if self.slow is not None:
            tensors.update(self.slow.state_dict(SLOW_PREFIX))
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the state with ``tensors``; ValueError (state untouched) if they do not fit."""
        slow = {k: v for k, v in tensors.items() if k.startswith(SLOW_PREFIX)}
        fast = {k: v for k, v in tensors.items() if not k.startswith(SLOW_PREFIX)}
        if bool(slow) != (self.slow is not None):
            raise ValueError("the state's slow weights do not match this reader's "
                             f"({'has' if slow else 'has no'} slow weights, model.slow is "
                             f"{'on' if self.slow is not None else 'off'})")
        backup = self.fast.clone()
        self.fast.load_state_dict(fast)
        if self.slow is not None:
            try:
                self.slow.load_state_dict(slow, SLOW_PREFIX)
            except ValueError:
                self.fast = backup
                raise

    def to_bytes(self) -> bytes:
        return save(self.state_dict(), metadata={"format": FORMAT})

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> str:
        return write_verified(Path(path), self.to_bytes(), {"metadata": metadata or {}})

    def load(self, path: str | Path, expected_sha256: str | None = None) -> None:
        tensors, _ = read_verified(Path(path), expected_sha256)
        try:
            self.load_state_dict(tensors)
        except ValueError as err:
            raise StateIntegrityError(f"{path}: {err}") from None
