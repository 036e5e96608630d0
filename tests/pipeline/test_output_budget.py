"""Everything the processor writes fits its budget whatever the input: results whose echo outgrows
the record, dead letters of records of any size, alerts and reports quoting outside text."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from actors.call_types import DocumentOutcome
from pipeline.stream_io.messages import result_message
from pipeline.stream_io.output_budget import (BYTES_HEADER, CUT_HEADER, MAX_KEY_BYTES, SHA256_HEADER,
                                              bounded_dead_letter, bounded_json, encode_json)

BUDGET = 16_384


def test_a_result_whose_meta_outgrows_the_budget_keeps_every_figure_and_marks_the_cut():
    # 90,000 emoji: 360 KB of UTF-8 in the record, 1.08 MB as the JSON escapes of a result.
    meta = {"note": "\U0001F600" * 90_000, "source": "crawler-7"}
    message = result_message(DocumentOutcome("d1", ok=True, tokens=12, loss=2.5), meta, 1, 42)
    assert len(encode_json(message)) > 1_000_000
    data = bounded_json(message, BUDGET, cut_first=("meta",))
    got = json.loads(data)
    assert len(data) <= BUDGET and got["cut"] == ["meta"]
    assert got["meta"] == {"cut": True, "bytes": len(encode_json(meta)), "sha256": hashlib.sha256(encode_json(meta)).hexdigest()}
    assert {k: v for k, v in got.items() if k not in ("meta", "cut")} == {k: v for k, v in message.items() if k != "meta"}


def test_a_message_within_the_budget_is_written_as_it_is():
    message = {"type": "status", "counts": {"a": 1}, "text": "x" * 100}
    assert bounded_json(message, BUDGET) == encode_json(message)


@pytest.mark.parametrize("seed", range(20))
def test_any_message_fits_largest_fields_cut_first(seed):
    rng = random.Random(seed)
    message = {f"f{i}": "".join(rng.choice("ab\u00e9\U0001F600\"\\") for _ in range(rng.randrange(0, 8000)))
               for i in range(rng.randrange(1, 12))}
    data = bounded_json(message, BUDGET)
    got = json.loads(data)
    assert len(data) <= BUDGET
    kept = {k: v for k, v in got.items() if k != "cut" and not isinstance(v, dict)}
    assert all(message[k] == v for k, v in kept.items())
    cut = got.get("cut", [])
    # What was cut is no smaller than what was kept, and each cut field names its digest.
    if cut and kept:
        assert min(len(encode_json(message[k])) for k in cut) >= max(len(encode_json(v)) for v in kept.values())
    for k in cut:
        assert got[k]["sha256"] == hashlib.sha256(encode_json(message[k])).hexdigest()


@pytest.mark.parametrize("value_bytes, key_bytes", [(0, 0), (100, 10), (BUDGET, 0), (5_000_000, 0),
                                                    (5_000_000, 5_000_000), (10, MAX_KEY_BYTES + 1)])
def test_a_dead_letter_keeps_a_prefix_and_the_digest_of_any_record(value_bytes, key_bytes):
    value = bytes(random.Random(value_bytes).randrange(256) for _ in range(min(value_bytes, 64))) * (value_bytes // 64 + 1)
    value = value[:value_bytes]
    key = b"k" * key_bytes if key_bytes else None
    reason = [("ttt.error.reason", ("bad JSON: " + "q" * 50_000).encode())]
    out_value, out_key, headers = bounded_dead_letter(value, key, reason, BUDGET)
    size = len(out_value) + len(out_key or b"") + sum(len(n) + len(v) for n, v in headers)
    assert size <= BUDGET
    h = dict(headers)
    assert h[SHA256_HEADER].decode() == hashlib.sha256(value).hexdigest() and int(h[BYTES_HEADER]) == value_bytes
    assert value.startswith(out_value)
    cut = h.get(CUT_HEADER, b"").decode().split(",")
    assert ("value" in cut) == (len(out_value) < len(value))
    assert ("key" in cut) == (key is not None and len(key) > MAX_KEY_BYTES)
    if "key" in cut:
        assert out_key == hashlib.sha256(key).hexdigest().encode()
    else:
        assert out_key == key
    assert len(h["ttt.error.reason"]) <= 1024
