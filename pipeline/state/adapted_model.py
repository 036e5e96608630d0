"""A checkpoint's state on its base model, configured exactly as the stream read it.

The manifest records the stream's effective model configuration (the TTT config after the
stream's overrides, and the slow-weight config); the pyfunc flavour and ``export`` both build
their model here, so that a version in MLflow scores like the stream that wrote it.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load
from torch import nn

from actors.call_types import RESERVED_KEYS
from ttt_model.adapted_state import AdaptedState
from ttt_model.config import SlowConfig, TTTConfig
from ttt_model.factory import build_model
from ttt_model.model.patch import disable_ttt
from ttt_model.model.session import TTTSession
from ttt_model.slow import SlowLearner
from ttt_model.model.state import FastWeightState


class StateChoiceError(ValueError):
    """No state, or several, match the requested reader and key."""


def choose_state(entries: dict[str, list[dict[str, Any]]], reader: str | None, key: str | None,
                 where: str, scope: str | None = None) -> tuple[str | None, dict[str, Any] | None]:
    """The one (reader, entry) of a manifest's ``readers`` matching ``reader`` and ``key``.

    With the per_key or per_document scope and no choice, (None, None): the model a new tenant
    (a new document) starts from, so that a version of many tenants loads with no choice to make.
    """
    if scope in ("per_key", "per_document") and reader is None and key is None:
        return None, None
    readers = [reader] if reader else sorted(entries)
    found = [(w, e) for w in readers for e in entries.get(w, [])
             if e["key"] not in RESERVED_KEYS and (key is None or e["key"] == key)]
    if not found:
        held = ", ".join(f"{w}: {[e['key'] for e in es]}" for w, es in sorted(entries.items()))
        raise StateChoiceError(f"{where}: no state for reader {reader!r} key {key!r}; it has {{{held}}}")
    if len(found) > 1:
        raise StateChoiceError(f"{where} holds {len(found)} states: choose one by reader and key "
                               f"({', '.join(w + '/' + str(e['key']) for w, e in found)})")
    return found[0]


@dataclass
class AdaptedModel:
    """The base model with the stream's TTT config, its slow-weight adapters and one state."""

    model: nn.Module
    learner: SlowLearner | None
    state: AdaptedState

    @contextmanager
    def bound(self) -> Iterator[None]:
        """The model with the state's slow weights for the block."""
        with self.learner.bound(self.state.slow) if self.learner is not None else nullcontext():
            yield

    def new_session(self) -> TTTSession:
        """A session that reads a text as a new document of the stream would be read (inside
        ``bound``): fast weights fresh per document when slow weights are on, else a copy of the
        state's; nothing is written back to the state."""
        fast = FastWeightState.for_model(self.model) if self.learner is not None else self.state.fast.clone()
        return TTTSession(self.model, fast)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """A plain model (TTT off) whose weights carry the slow weights and the fast-weight delta."""
        if self.learner is not None:
            self.learner.merge_into_model(self.state.slow)
            self.learner = None
        self.state.fast.merge_into(self.model)
        return disable_ttt(self.model)


def load_adapted_model(base_path: str | Path, model_config: dict[str, Any], state_data: bytes | None) -> AdaptedModel:
    """``state_data`` (a checkpoint's safetensors blob; None: a new key's state) on the model at
    ``base_path``, configured by the manifest's ``model_config`` ({"ttt": ..., "slow": ...}; {}
    for the model's own config)."""
    model, learner = build_model(base_path, TTTConfig.model_validate(model_config.get("ttt") or {}),
                                 SlowConfig.model_validate(model_config.get("slow") or {}))
    state = AdaptedState(FastWeightState.for_model(model), learner.new_state() if learner else None)
    if state_data is not None:
        state.load_state_dict(load(state_data))
    return AdaptedModel(model, learner, state)


def verified_state_bytes(root: Path, entry: dict[str, Any]) -> bytes:
    """An entry's state file, checked against its sha256: in the checkpoint at ``root``, or in
    the MLflow run of the earlier version that wrote it (an incremental checkpoint's ``run_id``)."""
    if "run_id" in entry:
        import mlflow

        from pipeline.state.checkpoint import checkpoint_artifact

        path = mlflow.artifacts.download_artifacts(run_id=entry["run_id"], artifact_path=checkpoint_artifact(entry["file"]))
        data = Path(path).read_bytes()
    else:
        data = (root / entry["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{entry['file']}: sha256 does not match the manifest")
    return data
