"""Parsing document messages: every malformed kind is rejected with a reason, nothing raises."""

import json

import pytest

from pipeline.stream_io.messages import (MAX_ID_CHARS, MAX_KEY_CHARS, ParsedDocument, Rejected, parse_document,
                                         reason_kind, result_message, tenant_key)
from pipeline.stream_io.output_budget import encode_json

MAX_BYTES = 64 * 1024


def parse(value, key=None):
    return parse_document(value, key, "docs", 1, 42, MAX_BYTES)


def test_json_document_with_key_and_meta():
    got = parse(json.dumps({"id": "a", "text": "hello", "key": "tenant-1", "meta": {"lang": "en"}}).encode())
    assert isinstance(got, ParsedDocument)
    assert (got.task.id, got.task.text, got.task.key, got.meta) == ("a", "hello", "tenant-1", {"lang": "en"})


def test_plain_text_gets_an_id_from_its_position_and_the_record_key():
    got = parse("Plain text, ünïcode.".encode(), key=b"k7")
    assert isinstance(got, ParsedDocument)
    assert (got.task.id, got.task.text, got.task.key) == ("docs/1/42", "Plain text, ünïcode.", "k7")


def test_json_without_id_gets_one_and_integer_ids_become_strings():
    assert parse(b'{"text": "x"}').task.id == "docs/1/42"
    assert parse(b'{"id": 7, "text": "x"}').task.id == "7"


@pytest.mark.parametrize(
    "value, reason",
    [
        (b"", "empty message"),
        (None, "empty message"),
        (b"\xff\xfeabc", "invalid UTF-8 at byte 0"),
        (b"   \n ", "empty text"),
        (b'{"id": "a", "text": "x"', "bad JSON"),
        (b'["a", "b"]', "JSON message must be an object"),
        (b'{"id": "a"}', "missing field 'text'"),
        (b'{"id": "a", "text": 5}', "field 'text' must be a string"),
        (b'{"id": "a", "text": "  "}', "empty text"),
        (b'{"id": "", "text": "x"}', "field 'id' must be a non-empty string"),
        (b'{"id": {"x": 1}, "text": "x"}', "field 'id' must be a non-empty string"),
        (b'{"id": "a", "text": "x", "key": 3}', "field 'key' must be a string"),
        (b'{"id": "a", "text": "x", "meta": []}', "field 'meta' must be an object"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(value, reason):
    got = parse(value)
    assert isinstance(got, Rejected)
    assert got.reason.startswith(reason)


HOSTILE = [
    (b'{"id": "a", "text": "x", "meta": {"score": NaN}}', "bad JSON: NaN is not JSON"),
    (b'{"id": "a", "text": "x", "meta": {"score": Infinity}}', "bad JSON: Infinity is not JSON"),
    (b'{"id": "a", "text": "x", "meta": {"score": -Infinity}}', "bad JSON: -Infinity is not JSON"),
    (b'{"id": "a", "text": "x", "meta": {"score": 1e400}}', "bad JSON: number 1e400 is out of range"),
    (b'{"id": "a", "text": "x", "meta": {"n": ' + b"9" * 5000 + b"}}", "bad JSON"),
    (b'{"id": "a", "text": "x", "meta": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}", "JSON nested deeper than 32"),
    (b'{"id": "a", "text": "x", "meta": ' + b"[" * 40 + b"]" * 40 + b"}", "JSON nested deeper than 32"),
    (b'{"id": "a", "text": "x", "key": "\\ud800"}', "invalid UTF-8: lone surrogate"),
    (b'{"id": "\\udfff", "text": "x"}', "invalid UTF-8: lone surrogate"),
    (b'{"id": "a", "text": "x \\ud800 y"}', "invalid UTF-8: lone surrogate"),
    (b'{"id": "a", "text": "x", "meta": {"\\ud800": 1}}', "invalid UTF-8: lone surrogate"),
    (json.dumps({"id": "i" * (MAX_ID_CHARS + 1), "text": "x"}).encode(), "id too long"),
    (json.dumps({"id": "a", "text": "x", "key": "k" * (MAX_KEY_CHARS + 1)}).encode(), "key too long"),
    (json.dumps({"id": "a", "text": "x" * MAX_BYTES}).encode(), "too large"),
]


@pytest.mark.parametrize("value, reason", HOSTILE)
def test_hostile_records_are_rejected_with_a_reason_and_nothing_raises(value, reason):
    got = parse(value)
    assert isinstance(got, Rejected), got
    assert got.reason.startswith(reason), got.reason
    assert len(got.reason) < 200


def test_a_long_record_key_is_rejected_and_plain_text_is_bounded_too():
    assert parse(b"plain", key=b"k" * (4 * MAX_KEY_CHARS + 1)).reason.startswith("record key too long")
    assert parse(b"plain", key="é".encode() * (MAX_KEY_CHARS + 1)).reason.startswith("key too long")
    assert parse(b"x" * (MAX_BYTES + 1)).reason.startswith("too large")


def test_what_is_accepted_encodes_in_the_results_topic():
    got = parse(json.dumps({"id": "a", "text": "x", "meta": {"deep": [[[1.5]]], "u": "\u00e9"}}).encode())
    assert isinstance(got, ParsedDocument)
    from actors.call_types import DocumentOutcome

    assert json.loads(encode_json(result_message(DocumentOutcome("a", ok=True), got.meta, 1, 42)))["meta"] == got.meta


@pytest.mark.parametrize("value, reason", [
    (b'{"id": "a", "text": "x", "text": "y"}', "duplicate field 'text'"),
    (b'{"id": "a", "text": "x", "meta": {"m": 1, "m": 2}}', "duplicate field 'm'"),
    (b'"a JSON string"', "JSON message must be an object, got str"),
    (b"42", "JSON message must be an object, got int"),
    (b"null", "JSON message must be an object, got NoneType"),
    (b'{"id": "a\\u0000b", "text": "x"}', "control character in field 'id'"),
    (b'{"id": "a\\nb", "text": "x"}', "control character in field 'id'"),
])
def test_leniencies_of_the_parser_are_verdicts(value, reason):
    got = parse(value)
    assert isinstance(got, Rejected) and got.reason.startswith(reason), got


def test_plain_text_that_only_looks_like_json_is_still_text():
    for text in ('"Hello," she said.', "42 is the answer", "true story", "nullable fields"):
        got = parse(text.encode())
        assert isinstance(got, ParsedDocument) and got.task.text == text


def test_tenant_keys_are_exact_one_state_per_distinct_key():
    keys = [None, b"", b"a", b"\xff", b"\xfe", b"\xff\xfe", "é".encode(), b"a\x00", b"a\x01", b"hex:ff", b"hex:",
            b"\xef\xbf\xbd"]  # the last: U+FFFD, what errors="replace" made of every invalid byte
    names = [tenant_key(k) for k in keys]
    assert len(set(names)) == len(keys)  # no two share a state
    assert names[0] is None and names[1] == "" and names[2] == "a"
    assert names[3] == "hex:ff" and names[9] == "hex:" + b"hex:ff".hex()
    for k in keys[1:]:  # and the name is the key: it comes back as the bytes
        name = tenant_key(k)
        assert (bytes.fromhex(name[4:]) if name.startswith("hex:") else name.encode()) == k


def test_the_json_key_must_name_the_record_keys_tenant():
    assert parse(b'{"text": "x", "key": "t1"}', key=b"t1").task.key == "t1"
    assert parse(b'{"text": "x", "key": "hex:ff"}', key=b"\xff").reason.startswith("key contradicts")
    assert parse(b'{"text": "x", "key": "t2"}', key=b"t1").reason.startswith("key contradicts the record key")
    assert parse(b'{"text": "x", "key": ""}', key=None).task.key == ""  # empty: a tenant, not "no key"
    assert parse(b'{"text": "x"}', key=None).task.key is None
    assert parse(b'{"text": "x"}', key=b"\xff").task.key == "hex:ff"


@pytest.mark.parametrize("record_key", [None, b"t1"])
def test_a_null_json_key_is_no_key_and_the_record_key_names_the_tenant(record_key):
    got = parse(b'{"text": "hi", "key": null}', key=record_key)
    assert isinstance(got, ParsedDocument) and got.task.key == (None if record_key is None else "t1")


def test_no_record_makes_the_parser_raise(monkeypatch):
    """A record the parser did not foresee is a verdict too: never an exception in the run loop."""
    import pipeline.stream_io.messages as messages

    def broken(*args):
        raise AttributeError("'NoneType' object has no attribute 'encode'")

    monkeypatch.setattr(messages, "_bounded", broken)
    got = parse(b'{"text": "hi"}')
    assert isinstance(got, Rejected) and got.reason == "unreadable record: AttributeError"
    assert messages.reason_kind(got.reason) == "unreadable record"


@pytest.mark.parametrize("seed", range(5))
def test_random_json_documents_never_raise(seed):
    import random

    rng = random.Random(seed)
    values = [None, True, 0, -1, 1.5, "", "x", "\u00e9", [], {}, [1], {"a": None}]
    fields = ["id", "text", "key", "meta", "extra"]
    for _ in range(2000):
        doc = {f: rng.choice(values) for f in rng.sample(fields, rng.randrange(len(fields) + 1))}
        for key in (None, b"", b"\xff", b"k"):
            got = parse(json.dumps(doc).encode(), key=key)
            assert isinstance(got, (ParsedDocument, Rejected))
            if isinstance(got, Rejected):
                assert reason_kind(got.reason) != "other", got.reason


def test_forget_and_export_name_a_key_as_the_stream_names_its_records():
    from pipeline.state.tenant_keys import TenantKeys

    keys = TenantKeys(b"a salt")
    for raw in (b"acme\n", b"a\tb", b"hex:ff", b"plain", "\u00e9".encode(), b""):
        parsed = parse(b'{"text": "x"}', key=raw)
        assert keys.state_key(parsed.task.key) == keys.state_key_of(raw.decode())
    assert len({keys.state_key_of(k) for k in ("a", "a\n", "hex:61", "")}) == 4
