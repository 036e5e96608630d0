"""Documents and token windows for training and evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str = ""


def load_documents(path: str | Path, limit: int | None = None) -> list[Document]:
    """Read a JSONL file of ``{"id", "text", "source"?}`` records."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                docs.append(Document(rec["id"], rec["text"], rec.get("source", "")))
                if limit is not None and len(docs) >= limit:
                    break
    return docs


class PackedTokenStream:
    """All training documents as one token stream (each followed by EOS), sampled in windows.

    Window offsets come from a generator seeded by (seed, step), so a resumed run draws exactly
    the batches an uninterrupted one would, with no sampler state to save.
    """

    def __init__(self, token_ids: Sequence[torch.Tensor | list[int]], eos_id: int, seq_len: int, seed: int):
        eos = torch.tensor([eos_id], dtype=torch.int64)
        self.tokens = torch.cat([piece for ids in token_ids for piece in (torch.as_tensor(ids, dtype=torch.int64), eos)])
        if len(self.tokens) <= seq_len + 1:
            raise ValueError(f"corpus has {len(self.tokens)} tokens, fewer than one window of {seq_len}")
        self.seq_len = seq_len
        self.seed = seed

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, step: int, micro_step: int, batch_size: int) -> torch.Tensor:
        """(batch_size, seq_len + 1) token ids for one micro-batch of one optimiser step."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + micro_step)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (batch_size,), generator=gen)
        return torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()]).long()
