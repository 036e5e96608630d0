"""Which documents the learner may learn from: cheap checks of the text before it costs learner time.

The learner's time is the stream's scarce resource: spam, copies and random characters would
cost as much of it as a new page of the domain. Before a document goes to the learner, the driver
checks, in the ledger's order:

- ``duplicate``: the same text (after folding case and whitespace) as a remembered document;
- ``near duplicate``: a 64-bit SimHash over word 4-shingles within ``near_duplicate_bits`` of a
  remembered one (Charikar's fingerprint, as web crawlers use it for near-copies);
- ``degenerate``: zlib compresses it below ``min_compression_ratio`` (one thing repeated) or
  barely at all (above ``max_compression_ratio``: close to random characters), or its characters
  carry less than ``min_char_entropy`` bits each, or more than ``max_next_char_entropy`` bits
  given the character before (random characters of a small alphabet, which compress well);
- ``key share``: its key sends more than ``key_share`` of the last ``key_window_documents``
  documents while other keys send too, and already took that share of the documents learned
  (one tenant's flood; a stream of one tenant is that tenant's, and is not capped).

A document kept out is still read, scored and answered; its result says why (``learning``) and
the metrics count it. A key whose documents are kept out ``quarantine_after`` times in a row is
quarantined (an alert says so): none of its documents is learned until ``ttt-stream release KEY``. The memory is bounded (``memory_documents`` fingerprints) and goes into
every checkpoint, so that a restored stream decides as the one that wrote it.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections import Counter, deque
from typing import Any

import numpy as np

# The closed set of reasons (the part of a reason before the colon): metric labels stay bounded.
KINDS = ("duplicate", "near duplicate", "degenerate", "key share", "quarantined")
# Keys whose run of documents kept out is counted (the most recent ones): bounded memory.
MAX_COUNTED_KEYS = 4096
LEARNED, HELD_OUT = "admitted", "held out"

WORD = re.compile(r"\w+")
SHINGLE_WORDS = 4
MAX_SHINGLES = 20_000  # of a document's start: the fingerprint's time stays bounded
MAX_CHECKED_BYTES = 1 << 16


def simhash(text: str) -> int:
    """Charikar's 64-bit SimHash of the word 4-shingles of ``text`` (character 4-grams for a text
    of fewer words): near-identical texts differ in few bits."""
    words = WORD.findall(text.lower())
    if len(words) >= SHINGLE_WORDS:
        shingles = [" ".join(words[i : i + SHINGLE_WORDS]) for i in range(min(len(words) - SHINGLE_WORDS + 1, MAX_SHINGLES))]
    else:
        shingles = [text[i : i + 4] for i in range(max(1, min(len(text) - 3, MAX_SHINGLES)))]
    hashes = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") for s in shingles],
                      dtype=np.uint64)
    bits = np.unpackbits(hashes.byteswap().view(np.uint8).reshape(-1, 8), axis=1)  # (n, 64), most significant first
    votes = bits.sum(axis=0, dtype=np.int64) * 2 - len(shingles)
    return int("".join("1" if v > 0 else "0" for v in votes), 2)


def char_entropy(text: str) -> float:
    """Shannon entropy of the characters of ``text``, in bits per character."""
    return _entropy(Counter(text), len(text))


def next_char_entropy(text: str) -> float:
    """Entropy of a character given the one before it (bits): about 2 to 3.7 for prose, code and
    markup, 4.6 and more for random characters of any alphabet (measured on the shipped corpora)."""
    if len(text) < 2:
        return 0.0
    return _entropy(Counter(zip(text, text[1:])), len(text) - 1) - _entropy(Counter(text[:-1]), len(text) - 1)


def _entropy(counts: Counter, n: int) -> float:
    return -sum(c / n * math.log2(c / n) for c in counts.values()) if n else 0.0


class LearningAdmission:
    """The checks of one stream, with what they remember (``state``: ``as_dict`` of an earlier one)."""

    def __init__(self, config: Any, state: dict[str, Any] | None = None):
        self.config = config  # AdmissionConfig
        state = state or {}
        size = config.memory_documents
        self._exact: deque[str] = deque(state.get("exact", []), maxlen=size)
        self._exact_set = set(self._exact)
        self._fingerprints: deque[int] = deque((int(h, 16) for h in state.get("simhash", [])), maxlen=size)
        window = config.key_window_documents
        self._offered: deque[str | None] = deque(state.get("offered", []), maxlen=window)  # keys of recent documents
        self._learned: deque[str | None] = deque(state.get("learned", []), maxlen=window)  # keys of recent admitted ones
        # Per key: documents kept out in a row; and the keys quarantined (until ``release``).
        self._kept_out_in_a_row: dict[str, int] = dict(state.get("kept_out_in_a_row", {}))
        self.quarantined: set[str] = set(state.get("quarantined", []))
        self.newly_quarantined: str | None = None  # the key the last ``decide`` quarantined
        # The last document's SimHash distance to the nearest remembered one (64: nothing remembered):
        # how new it is to the stream, what a learner short of time prefers.
        self.novelty: float | None = None

    def decide(self, text: str, key: str | None, held_out: bool = False) -> str | None:
        """Why this document must not be learned (``"<kind>: <detail>"``), or None: the learner may
        take it (see ``_check``). A key whose documents are kept out ``quarantine_after`` times in a
        row is quarantined: none of its documents is learned until ``release``."""
        self.newly_quarantined = None
        self.novelty = None
        if key is not None and key in self.quarantined:
            return "quarantined: its key's documents were kept out too often; release it with `ttt-stream release`"
        reason = self._check(text, key, held_out)
        if key is not None:
            if reason is None:
                self._kept_out_in_a_row.pop(key, None)
            else:
                count = self._kept_out_in_a_row.pop(key, 0) + 1  # re-inserted: most recent last
                self._kept_out_in_a_row[key] = count
                while len(self._kept_out_in_a_row) > MAX_COUNTED_KEYS:
                    del self._kept_out_in_a_row[next(iter(self._kept_out_in_a_row))]
                if count >= self.config.quarantine_after and len(self.quarantined) < MAX_COUNTED_KEYS:
                    self.quarantined.add(key)
                    self._kept_out_in_a_row.pop(key)
                    self.newly_quarantined = key
        return reason

    def release(self, key: str) -> bool:
        """Let a quarantined key's documents be learned again; whether it was quarantined."""
        self._kept_out_in_a_row.pop(key, None)
        if key in self.quarantined:
            self.quarantined.discard(key)
            return True
        return False

    def _check(self, text: str, key: str | None, held_out: bool) -> str | None:
        """Why this document must not be learned, or None. A document to be held out passes the same checks of its text (the held-out slice
        holds no copies and no junk), is remembered (its copies are kept out: nothing of the slice
        is learned) and never counted as learned."""
        cfg = self.config
        normal = " ".join(text.lower().split())
        exact = hashlib.sha256(normal.encode()).hexdigest()[:32]
        if exact in self._exact_set:
            return "duplicate: the same text as a recent document"
        fingerprint = simhash(normal)
        near = self._nearest(fingerprint)
        self.novelty = float(near if near is not None else 64)
        self._remember(exact, fingerprint)
        self._offered.append(key)
        if near is not None and near <= cfg.near_duplicate_bits:
            return f"near duplicate: SimHash within {near} bits of a recent document"
        raw = text.encode("utf-8", "surrogatepass")[:MAX_CHECKED_BYTES]
        if len(raw) >= cfg.min_check_bytes:
            ratio = len(zlib.compress(raw, 6)) / len(raw)
            if ratio < cfg.min_compression_ratio:
                return f"degenerate: compresses to {ratio:.3f} of its size (one thing repeated)"
            if ratio > cfg.max_compression_ratio:
                return f"degenerate: compresses to {ratio:.3f} of its size (close to random characters)"
            sample = text[:MAX_CHECKED_BYTES]
            entropy = char_entropy(sample)
            if entropy < cfg.min_char_entropy:
                return f"degenerate: {entropy:.2f} bits per character"
            following = next_char_entropy(sample)
            if following > cfg.max_next_char_entropy:
                return f"degenerate: {following:.2f} bits per character given the one before (random characters)"
        if held_out:
            return None
        offered = sum(1 for k in self._offered if k == key)
        if key is not None and offered < len(self._offered) and offered > cfg.key_share * len(self._offered):
            # It sends more than its share while others send too: its documents learned are capped.
            taken = sum(1 for k in self._learned if k == key)
            if taken >= cfg.key_share * cfg.key_window_documents:
                return (f"key share: its key took {taken} of the last {len(self._learned)} documents learned "
                        f"(learner.admission.key_share {cfg.key_share:g})")
        self._learned.append(key)
        return None

    def _nearest(self, fingerprint: int) -> int | None:
        if not self._fingerprints:
            return None
        known = np.fromiter(self._fingerprints, dtype=np.uint64, count=len(self._fingerprints))
        distances = np.unpackbits((known ^ np.uint64(fingerprint)).view(np.uint8)).reshape(-1, 64).sum(axis=1)
        return int(distances.min())

    def _remember(self, exact: str, fingerprint: int) -> None:
        if len(self._exact) == self._exact.maxlen:
            self._exact_set.discard(self._exact[0])
        self._exact.append(exact)
        self._exact_set.add(exact)
        self._fingerprints.append(fingerprint)

    def as_dict(self) -> dict[str, Any]:
        """What it remembers, as JSON for a checkpoint's manifest."""
        return {"exact": list(self._exact), "simhash": [f"{h:016x}" for h in self._fingerprints],
                "offered": list(self._offered), "learned": list(self._learned),
                "kept_out_in_a_row": dict(self._kept_out_in_a_row), "quarantined": sorted(self.quarantined)}


def decision_kind(kept_out: str | None, held_out: bool) -> str:
    """A document's learning decision as a bounded label: admitted, held out, or a check's kind."""
    if held_out:
        return HELD_OUT
    if kept_out is None:
        return LEARNED
    kind = kept_out.split(":", 1)[0]
    return kind if kind in KINDS else "other"
