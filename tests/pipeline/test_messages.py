"""Parsing document messages: every malformed kind is rejected with a reason, nothing raises."""

import json

import pytest

from pipeline.messages import ParsedDocument, Rejected, parse_document


def parse(value, key=None):
    return parse_document(value, key, "docs", 1, 42)


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
