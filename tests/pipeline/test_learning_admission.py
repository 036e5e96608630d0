"""The learner's admission checks: copies, near-copies, junk and one key's flood are kept out with
a reason; the shipped corpora pass; the fingerprint matches a slow reference; a restored
admission decides as the one that was saved."""

import hashlib
import json
import random
import string

import pytest

from pipeline.config import AdmissionConfig
from pipeline.processing.learning_admission import LearningAdmission, decision_kind, simhash
from tests.conftest import ROOT

DOCS = [json.loads(line)["text"] for line in (ROOT / "models/ttt-tiny-qwen3/rehearsal.jsonl").open()]


def reference_simhash(text: str) -> int:
    """Charikar's SimHash, bit by bit."""
    import re

    words = re.findall(r"\w+", text.lower())
    shingles = [" ".join(words[i : i + 4]) for i in range(len(words) - 3)] if len(words) >= 4 else \
        [text[i : i + 4] for i in range(max(1, len(text) - 3))]
    votes = [0] * 64
    for shingle in shingles:
        h = int.from_bytes(hashlib.blake2b(shingle.encode(), digest_size=8).digest(), "big")
        for bit in range(64):
            votes[bit] += 1 if h >> (63 - bit) & 1 else -1
    return int("".join("1" if v > 0 else "0" for v in votes), 2)


def test_the_fingerprint_is_charikars_simhash():
    rng = random.Random(0)
    for _ in range(20):
        words = [rng.choice(["stream", "ray", "kafka", "model", "weights", "a", "the", "x1"]) for _ in range(rng.randint(0, 300))]
        text = " ".join(words) or "abc"
        assert simhash(text) == reference_simhash(text)


def test_copies_and_near_copies_are_kept_out_and_distinct_documents_are_not():
    admission = LearningAdmission(AdmissionConfig())
    assert [admission.decide(d, None) for d in DOCS[:10]] == [None] * 10
    assert admission.decide(DOCS[3], None).startswith("duplicate:")
    assert admission.decide("  " + DOCS[4].upper() + "\n", None).startswith("duplicate:")  # case and spacing folded
    words = DOCS[5].split()
    edited = " ".join(words[: len(words) // 2] + ["inserted", "here"] + words[len(words) // 2 :])
    assert admission.decide(edited, None).startswith("near duplicate:")
    assert admission.decide(DOCS[11], None) is None


def test_junk_is_kept_out_and_the_shipped_corpora_pass():
    rng = random.Random(1)
    admission = LearningAdmission(AdmissionConfig())
    junk = {
        "spam": "BUY CHEAP PILLS NOW!!! best offer " * 100,
        "random printable": "".join(rng.choice(string.printable) for _ in range(3000)),
        "random letters": "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(3000)),
        "one character": "a" * 2000,
    }
    for name, text in junk.items():
        reason = admission.decide(text, None)
        assert reason is not None and reason.startswith("degenerate:"), (name, reason)
    fresh = LearningAdmission(AdmissionConfig())
    kept = [d[:60] for d in DOCS if (fresh.decide(d, None) or "").startswith("degenerate")]
    assert len(kept) <= len(DOCS) // 100, kept


def test_one_keys_flood_is_capped_only_while_other_keys_are_in_the_stream():
    config = AdmissionConfig(key_share=0.5, key_window_documents=8, near_duplicate_bits=0)
    alone = LearningAdmission(config)
    assert all(alone.decide(d, "tenant-a") is None for d in DOCS[:20])  # one tenant is the stream, not a flood
    shared = LearningAdmission(config)
    decisions = [shared.decide(d, "flood" if i % 5 else "quiet") for i, d in enumerate(DOCS[:40])]
    flood = [r for i, r in enumerate(decisions) if i % 5]
    quiet = [r for i, r in enumerate(decisions) if not i % 5]
    assert all(r is None for r in quiet)
    assert sum(r is not None and r.startswith("key share:") for r in flood) >= len(flood) // 3


def test_a_restored_admission_decides_as_the_saved_one():
    rng = random.Random(2)
    stream = [(rng.choice(DOCS[:30]), rng.choice(["a", "b", None])) for _ in range(80)]
    first = LearningAdmission(AdmissionConfig(memory_documents=16, key_window_documents=4))
    for text, key in stream[:40]:
        first.decide(text, key)
    saved = json.loads(json.dumps(first.as_dict()))
    again = LearningAdmission(AdmissionConfig(memory_documents=16, key_window_documents=4), saved)
    assert [first.decide(t, k) for t, k in stream[40:]] == [again.decide(t, k) for t, k in stream[40:]]


def test_decision_kinds_are_a_closed_set():
    assert decision_kind(None, True) == "held out" and decision_kind(None, False) == "admitted"
    assert decision_kind("near duplicate: SimHash within 2 bits", False) == "near duplicate"
    assert decision_kind("anything: else", False) == "other"
