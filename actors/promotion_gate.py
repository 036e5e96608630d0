"""The promotion gate: which of the learner's versions may go ``live``.

A checkpoint of a stream with a learner is a candidate. The learner judges it at the checkpoint's
cut, on two things no version learned from:

- the held-out slice: the most recent ``holdout_documents`` documents that the driver held out
  by a keyed hash of their position (``pipeline.state.tenant_keys.TenantKeys.draw``); the readers
  read and score them like any other, the learner never learns them. The candidate's loss there
  may exceed ``last-good``'s by at most ``max_loss_over_last_good`` (relative);
- the probe: chunks of the model's own kind of text (``model.slow.rehearsal_path``, past the
  chunks it rehearses, so never trained on). The candidate's loss there may exceed the base
  model's by at most ``max_forgetting``: what the stream made the model forget.

Before the first held-out document arrives, a candidate is judged on the probe alone; without
either (no rehearsal file), it stays ``unjudged`` and does not go live.

Each text is read as a new document is (the candidate's slow weights, fresh fast weights), the
same way the pyfunc scores. A candidate that passes becomes the learner's ``last-good``; one that
fails sends the learner's training state (weights, optimiser moments, step, rehearsal position)
back to ``last-good``'s, and the versions the readers will read with are ``last-good``'s too.

The verdict is a function of the learner's state at the cut, which is a function of the ledger:
a snapshot holds the candidate, ``last-good``'s state and the verdict, and ``restore`` applies the
verdict again, so that a stream restored from that version goes on exactly as the one that judged.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from safetensors.torch import load, save

from actors.call_types import GATE_KEY, StateBlob
from ttt_model.model.state import FastWeightState
from ttt_model.model.session import TTTSession

PROMOTED, REJECTED, UNJUDGED = "promoted", "rejected", "unjudged"


@dataclass
class Verdict:
    """What the gate decided about one candidate, with its figures (None where not measured)."""

    verdict: str  # promoted | rejected | unjudged
    reason: str
    position: int  # the learner's position (documents in the ledger) at the cut
    heldout_documents: int = 0
    heldout_loss: float | None = None
    last_good_loss: float | None = None
    base_loss: float | None = None
    probe_loss: float | None = None
    probe_base_loss: float | None = None
    digest: str = ""  # sha256 of the candidate's slow weights (A and B of every adapter)
    unchanged: bool = False  # documents were learned since the last verdict, yet the weights did not move
    learned: int = 0  # documents learned since the last verdict
    kept_out: dict[str, int] = field(default_factory=dict)  # documents not learned since the last verdict, by reason

    @property
    def promoted(self) -> bool:
        return self.verdict == PROMOTED

    @property
    def gain_vs_base(self) -> float | None:
        return _relative(self.heldout_loss, self.base_loss)

    @property
    def gain_vs_last_good(self) -> float | None:
        return _relative(self.heldout_loss, self.last_good_loss)

    @property
    def forgetting(self) -> float | None:
        return _relative(self.probe_loss, self.probe_base_loss)

    def figures(self) -> dict[str, float | None]:
        """Relative changes of loss (negative: better), and counts."""
        return {"gain_vs_base": self.gain_vs_base, "gain_vs_last_good": self.gain_vs_last_good,
                "forgetting": self.forgetting, "heldout_documents": float(self.heldout_documents),
                "heldout_loss": self.heldout_loss, "documents_learned": float(self.learned),
                "documents_kept_out": float(sum(self.kept_out.values()))}

    def to_dict(self) -> dict[str, Any]:
        return {**self.figures(), **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Verdict":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _relative(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference - 1.0


def slow_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of slow weights (the adapters' A and B, by name): equal digests, equal models."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        if name.endswith((".A", ".B")):
            digest.update(name.encode())
            digest.update(state_dict[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class PromotionGate:
    """The gate of one learner (``actors.learner.StreamLearner``), which gives it the model."""

    def __init__(self, config: Any, model: torch.nn.Module, slow: Any, probe: torch.Tensor | None):
        """``config``: the stream's GateConfig; ``slow``: the learner's SlowLearner; ``probe``:
        (n, tokens) token ids of the model's own kind of text (None: no forgetting budget)."""
        self.config = config
        self.model = model
        self.slow = slow
        self.probe = probe
        self.held_out: deque[tuple[int, list[int]]] = deque(maxlen=config.holdout_documents)  # (position, ids)
        self.last_good: bytes | None = None  # the learner's state when it last passed (None: the base model)
        self.last_good_digest: str | None = None
        self.verdict: Verdict | None = None  # the last one
        self.learned = 0
        self.kept_out: dict[str, int] = {}
        # Losses that do not change until last-good does: per held-out position, and the probe's.
        self._cache: dict[tuple[str, int], float] = {}

    # -- what the learner tells it ---------------------------------------------------------------

    def hold_out(self, position: int, ids: list[int]) -> None:
        self.held_out.append((position, ids[: self.config.holdout_tokens]))

    def learned_one(self) -> None:
        self.learned += 1

    def kept_out_one(self, reason: str) -> None:
        self.kept_out[reason] = self.kept_out.get(reason, 0) + 1

    # -- judging ---------------------------------------------------------------------------------

    def judge(self, position: int, candidate: Any, state_dict: dict[str, torch.Tensor],
              load_state: Callable[[bytes], Any]) -> Verdict:
        """The verdict on ``candidate`` (the learner's SlowState now; ``state_dict`` its tensors);
        ``load_state`` turns last-good's bytes into a SlowState to score with."""
        digest = slow_digest(state_dict)
        previous = self.verdict.digest if self.verdict is not None else self.last_good_digest
        counts = {"learned": self.learned, "kept_out": dict(sorted(self.kept_out.items())), "digest": digest,
                  "unchanged": self.learned > 0 and previous is not None and digest == previous}
        documents = [(p, torch.tensor(ids, dtype=torch.long)) for p, ids in self.held_out if len(ids) >= 2]
        if not documents and self.probe is None:
            return Verdict(UNJUDGED, "no held-out document yet, and no probe", position, **counts)
        heldout = reference = base = None
        if documents:
            heldout = self.loss(candidate, [d for _, d in documents])
            # Last-good's state is loaded only for documents it has not scored yet.
            reference = self._cached("last_good", documents,
                                     lambda: load_state(self.last_good) if self.last_good is not None else None)
            base = self._cached("base", documents, lambda: None)
        probe = probe_base = None
        if self.probe is not None:
            probe = self.loss(candidate, list(self.probe))
            if ("probe", -1) not in self._cache:
                self._cache["probe", -1] = self.loss(None, list(self.probe))
            probe_base = self._cache["probe", -1]
        verdict = Verdict(PROMOTED, "", position, len(documents), heldout, reference, base, probe, probe_base, **counts)
        cfg = self.config
        reasons = []
        if heldout is None:
            pass  # early in a stream: judged on the probe alone, which no version learned from either
        elif not math.isfinite(heldout):
            reasons.append("held-out loss is not finite")
        elif not heldout <= reference * (1 + cfg.max_loss_over_last_good):  # a NaN reference fails too
            reasons.append(f"held-out loss {heldout:.4f} above last-good's {reference:.4f} by more than "
                           f"{100 * cfg.max_loss_over_last_good:g}%")
        if probe is not None and not (probe <= probe_base * (1 + cfg.max_forgetting)):
            reasons.append(f"probe loss {probe:.4f} above the base model's {probe_base:.4f} by more than "
                           f"{100 * cfg.max_forgetting:g}% (forgetting)")
        if reasons:
            verdict.verdict, verdict.reason = REJECTED, "; ".join(reasons)
        else:
            verdict.reason = ", ".join(
                ([f"held-out loss {heldout:.4f} vs last-good {reference:.4f}"] if heldout is not None
                 else ["no held-out document yet"])
                + ([f"probe {probe:.4f} vs base {probe_base:.4f}"] if probe is not None else []))
        return verdict

    def unjudged(self, position: int) -> Verdict:
        """The verdict of a version written between judging points: not judged, not live."""
        return Verdict(UNJUDGED, "written between the positions the gate judges at (a checkpoint by time)", position,
                       learned=self.learned, kept_out=dict(sorted(self.kept_out.items())))

    def settle(self, verdict: Verdict, current: bytes) -> bytes | None:
        """Take ``verdict`` (the learner's state is ``current`` bytes): returns the state the learner
        goes back to (last-good's bytes; b"" for the base model), or None when it keeps its own."""
        self.verdict = verdict
        self.learned, self.kept_out = 0, {}
        if verdict.verdict == PROMOTED:
            self.last_good, self.last_good_digest = current, verdict.digest
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "last_good"}
            return None
        if verdict.verdict == REJECTED:
            return self.last_good if self.last_good is not None else b""
        return None

    @torch.no_grad()
    def loss(self, state: Any, documents: list[torch.Tensor]) -> float:
        """Token-weighted mean next-token loss of ``documents``, each read as a new document of
        the stream is: ``state``'s slow weights (None: the base model's), fresh fast weights."""
        total, count = 0.0, 0
        device = next(self.model.parameters()).device
        with self.slow.bound(state):
            for ids in documents:
                session = TTTSession(self.model, FastWeightState.for_model(self.model))
                nll = session.read_window(ids.to(device)[None]).nll[0, 1:].double()
                total += float(nll.sum())
                count += nll.numel()
        return total / max(count, 1)

    def _cached(self, which: str, documents: list[tuple[int, torch.Tensor]], state_of: Callable[[], Any]) -> float:
        """The loss under a state that stays fixed between promotions, per document, kept."""
        total, count = 0.0, 0
        state, loaded = None, False
        for position, ids in documents:
            if (which, position) not in self._cache:
                if not loaded:
                    state, loaded = state_of(), True
                self._cache[which, position] = self.loss(state, [ids])
            total += self._cache[which, position] * (ids.numel() - 1)
            count += ids.numel() - 1
        held = {p for p, _ in documents}
        self._cache = {k: v for k, v in self._cache.items() if k[1] in held or k[1] < 0}
        return total / max(count, 1)

    # -- snapshots -------------------------------------------------------------------------------

    def snapshot(self, verdict: Verdict | None) -> StateBlob:
        """Everything above as one blob; ``verdict``: the one taken at this snapshot's cut, which
        ``restore`` applies again (None: none taken)."""
        tensors: dict[str, torch.Tensor] = {}
        positions = [p for p, _ in self.held_out]
        lengths = [len(ids) for _, ids in self.held_out]
        flat = [t for _, ids in self.held_out for t in ids]
        tensors["held_out.positions"] = torch.tensor(positions, dtype=torch.int64)
        tensors["held_out.lengths"] = torch.tensor(lengths, dtype=torch.int64)
        tensors["held_out.ids"] = torch.tensor(flat, dtype=torch.int64)
        if self.last_good is not None:
            tensors["last_good"] = torch.frombuffer(bytearray(self.last_good), dtype=torch.uint8)
        meta = {"last_good_digest": self.last_good_digest, "learned": self.learned, "kept_out": self.kept_out,
                "previous": self.verdict.to_dict() if self.verdict is not None else None,
                "verdict": verdict.to_dict() if verdict is not None else None}
        tensors["meta"] = torch.frombuffer(bytearray(json.dumps(meta, sort_keys=True).encode()), dtype=torch.uint8)
        data = save(tensors)
        return StateBlob(GATE_KEY, data, hashlib.sha256(data).hexdigest(), 0)

    def restore(self, blob: StateBlob | None) -> Verdict | None:
        """Back to a snapshot (None: the start of a stream); returns the verdict it was taken with,
        for the learner to settle again."""
        self.held_out.clear()
        self._cache = {}
        if blob is None:
            self.last_good = self.last_good_digest = self.verdict = None
            self.learned, self.kept_out = 0, {}
            return None
        if hashlib.sha256(blob.data).hexdigest() != blob.sha256:
            raise ValueError(f"{GATE_KEY}: sha256 does not match")
        tensors = load(blob.data)
        meta = json.loads(tensors["meta"].numpy().tobytes().decode())
        start = 0
        for position, length in zip(tensors["held_out.positions"].tolist(), tensors["held_out.lengths"].tolist()):
            self.held_out.append((position, tensors["held_out.ids"][start : start + length].tolist()))
            start += length
        self.last_good = tensors["last_good"].numpy().tobytes() if "last_good" in tensors else None
        self.last_good_digest = meta["last_good_digest"]
        self.learned, self.kept_out = meta["learned"], meta["kept_out"]
        self.verdict = Verdict.from_dict(meta["previous"]) if meta["previous"] else None
        return Verdict.from_dict(meta["verdict"]) if meta["verdict"] else None
