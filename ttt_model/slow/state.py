"""The slow weights of one stream as data: its adapters' tensors, Adam's moments and replay buffer
(``SlowState``, saved and restored bit for bit), and the immutable versions a learner publishes
for readers (``SlowVersion``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AdapterTensors:
    """One adapted matrix: A, B and Adam's moments of each (float32)."""

    A: torch.Tensor
    B: torch.Tensor
    m_A: torch.Tensor
    v_A: torch.Tensor
    m_B: torch.Tensor
    v_B: torch.Tensor

    NAMES = ("A", "B", "m_A", "v_A", "m_B", "v_B")


class SlowState:
    """The slow weights of one stream (or one key): adapters, optimiser moments, replay buffer."""

    OPTIONAL = ("replay", "signature")

    def __init__(self, adapters: dict[str, AdapterTensors], steps: int = 0, tokens: int = 0,
                 replay: torch.Tensor | None = None, replay_next: int = 0):
        self.adapters = adapters
        self.steps = steps
        self.tokens = tokens
        self.replay = replay  # (n, chunk) token ids of earlier chunks, or None
        self.replay_next = replay_next  # the ring buffer's next slot
        # (hidden,) float32: the embedding of the key's first document (adapter reuse), or None
        self.signature: torch.Tensor | None = None

    def version(self, index: int) -> SlowVersion:
        """These slow weights, frozen as a version for readers (A and B copied to the CPU)."""
        return SlowVersion(index, {n: (a.A.detach().float().cpu().clone(), a.B.detach().float().cpu().clone())
                                   for n, a in self.adapters.items()})

    def copy_from(self, other: "SlowState") -> None:
        """Take ``other``'s adapters, optimiser moments and step counters (not its replay buffer,
        which holds another key's text, nor its signature)."""
        signature = self.signature
        self.load_state_dict({k: v for k, v in other.state_dict().items()
                              if k.removeprefix("slow.") not in self.OPTIONAL})
        self.replay, self.replay_next, self.signature = None, 0, signature

    def state_dict(self, prefix: str = "slow.") -> dict[str, torch.Tensor]:
        tensors = {f"{prefix}counters": torch.tensor([self.steps, self.tokens, self.replay_next], dtype=torch.int64)}
        for name, adapter in self.adapters.items():
            for part in AdapterTensors.NAMES:
                tensors[f"{prefix}{name}.{part}"] = getattr(adapter, part).detach().cpu().clone()
        if self.replay is not None:
            tensors[f"{prefix}replay"] = self.replay.cpu().clone()
        if self.signature is not None:
            tensors[f"{prefix}signature"] = self.signature.cpu().clone()
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor], prefix: str = "slow.") -> None:
        """Replace the state with ``tensors`` (same adapters, same shapes), else ValueError."""
        expected = {f"{prefix}counters"} | {f"{prefix}{n}.{part}" for n in self.adapters for part in AdapterTensors.NAMES}
        got = {k for k in tensors if k.startswith(prefix) and k.removeprefix(prefix) not in self.OPTIONAL}
        if got != expected:
            raise ValueError(f"slow-weight state does not fit these adapters: missing {sorted(expected - got)[:4]}, "
                             f"unexpected {sorted(got - expected)[:4]}")
        for name, adapter in self.adapters.items():
            for part in AdapterTensors.NAMES:
                new, old = tensors[f"{prefix}{name}.{part}"], getattr(adapter, part)
                if new.shape != old.shape:
                    raise ValueError(f"{name}.{part}: shape {tuple(new.shape)} != {tuple(old.shape)}")
        for name, adapter in self.adapters.items():
            for part in AdapterTensors.NAMES:
                old = getattr(adapter, part)
                setattr(adapter, part, tensors[f"{prefix}{name}.{part}"].to(device=old.device, dtype=old.dtype))
        self.steps, self.tokens, self.replay_next = (int(v) for v in tensors[f"{prefix}counters"])
        replay, signature = tensors.get(f"{prefix}replay"), tensors.get(f"{prefix}signature")
        device = next(iter(self.adapters.values())).A.device
        self.replay = None if replay is None else replay.to(device)
        self.signature = None if signature is None else signature.to(device)

    def delta_ratios(self, base_norms: dict[str, torch.Tensor], scale: float) -> dict[str, float]:
        """||scale B A||_F / ||W_0||_F per adapted matrix (``base_norms``: ||W_0||_F, 0-d tensors);
        read back from the device at once (one wait, not one per matrix)."""
        ratios = torch.stack([torch.linalg.matrix_norm(scale * (a.B @ a.A)) / base_norms[name]
                              for name, a in self.adapters.items()])
        return dict(zip(self.adapters, ratios.tolist()))


@dataclass(frozen=True)
class SlowVersion:
    """One published version of a stream's slow weights, immutable: what readers read with while
    a learner trains the next. ``index``: the documents the learner had read when it published
    it (document n of the stream reads with version n + 1 - lag)."""

    index: int
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (A, B), float32 on the CPU

    PREFIX = "version."

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{self.PREFIX}{self.index}.{n}.{part}": t for n, ab in self.adapters.items() for part, t in zip("AB", ab)}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> list["SlowVersion"]:
        """The versions in ``tensors`` (keys ``version.<index>.<adapter>.<A|B>``), oldest first."""
        found: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        for key, tensor in tensors.items():
            index, rest = key.removeprefix(cls.PREFIX).split(".", 1)
            name, part = rest.rsplit(".", 1)
            found.setdefault(int(index), {}).setdefault(name, {})[part] = tensor
        return [cls(i, {n: (ab["A"], ab["B"]) for n, ab in found[i].items()}) for i in sorted(found)]
