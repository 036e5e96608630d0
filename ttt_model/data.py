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


@dataclass(frozen=True)
class TokenWindows:
    """One micro-batch of training windows: token ids and, for a document-aligned stream, the
    first token of each document (both (batch, seq_len + 1))."""

    ids: torch.Tensor
    document_start: torch.Tensor | None

    def to(self, device) -> "TokenWindows":
        start = None if self.document_start is None else self.document_start.to(device)
        return TokenWindows(self.ids.to(device), start)


class PackedTokenStream:
    """All training documents as one token stream (each followed by EOS), sampled in windows.

    With ``align`` (the TTT chunk size) every document is cut to a whole number of chunks (its
    last partial chunk dropped, EOS kept) and windows start on chunk borders, so a document always
    begins a chunk: the trainer restarts the fast weights there, as they restart for every
    document at inference, instead of carrying one document's updates into the next. Cutting
    rather than padding keeps runs of filler tokens, which no document has at inference, out of
    attention. Documents shorter than one chunk are left out.

    Window offsets come from a generator seeded by (seed, step), so a resumed run draws exactly
    the batches an uninterrupted one would, with no sampler state to save.
    """

    def __init__(
        self, token_ids: Sequence[torch.Tensor | list[int]], eos_id: int, seq_len: int, seed: int,
        align: int | None = None,
    ):
        if align is not None and (align < 1 or seq_len % align):
            raise ValueError(f"seq_len {seq_len} must be a multiple of align {align}")
        eos = torch.tensor([eos_id])
        pieces = []
        for ids in token_ids:
            ids = torch.as_tensor(ids, dtype=torch.int64)
            keep = len(ids) if align is None else (len(ids) + 1) // align * align - 1
            if keep >= 0:
                pieces.append(torch.cat([ids[:keep], eos]))
        self.tokens = torch.cat(pieces)
        self.starts = None
        if align is not None:
            self.starts = torch.zeros(len(self.tokens), dtype=torch.bool)
            self.starts[torch.tensor([0] + [len(p) for p in pieces[:-1]]).cumsum(0)] = True
        if len(self.tokens) <= seq_len + 1:
            raise ValueError(f"corpus has {len(self.tokens)} tokens, fewer than one window of {seq_len}")
        self.seq_len = seq_len
        self.seed = seed
        self.align = align or 1

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, step: int, micro_step: int, batch_size: int) -> TokenWindows:
        """One micro-batch of one optimiser step."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + micro_step)
        slots = (len(self.tokens) - self.seq_len - 1) // self.align
        starts = (torch.randint(0, slots, (batch_size,), generator=gen) * self.align).tolist()

        def windows(t: torch.Tensor) -> torch.Tensor:
            return torch.stack([t[s : s + self.seq_len + 1] for s in starts])

        return TokenWindows(windows(self.tokens), None if self.starts is None else windows(self.starts))
