"""Document messages on the wire: parsing what arrives, encoding what leaves.

A document is JSON ``{"id": str, "text": str, "key": str?, "meta": {}?}`` or plain UTF-8 text
(its id is then ``topic/partition/offset``). Anything else is rejected with a reason and goes,
bytes unchanged, to the dead-letter topic: more than ``max_bytes``, JSON that is not strict
(``pipeline.stream_io.untrusted_json``), an id or key longer than ``MAX_ID_CHARS`` / ``MAX_KEY_CHARS``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from actors.call_types import DocumentOutcome, DocumentTask
from pipeline.stream_io.untrusted_json import UntrustedJSONError, loads_untrusted

# Kafka Connect's convention: the original record unchanged, the error in headers.
REASON_HEADER = "ttt.error.reason"
SOURCE_HEADERS = ("ttt.source.topic", "ttt.source.partition", "ttt.source.offset")
# An id names a document in results and logs, a key a tenant's state: neither is text to read.
MAX_ID_CHARS = 256
HEX_KEY = "hex:"  # a key that is not plain text, by its bytes (tenant_key)
MAX_KEY_CHARS = len(HEX_KEY) + 2 * 256  # a key of 256 bytes in hex
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Rejected:
    reason: str


@dataclass(frozen=True)
class ParsedDocument:
    task: DocumentTask
    meta: dict[str, Any] = field(default_factory=dict)


def source_id(topic: str, partition: int, offset: int) -> str:
    return f"{topic}/{partition}/{offset}"


def parse_document(
    value: bytes | None, record_key: bytes | None, topic: str, partition: int, offset: int, max_bytes: int,
) -> ParsedDocument | Rejected:
    """The document in one Kafka record, or why there is none. Never raises: a record this parser
    did not foresee is refused as "other", so that no record can stop the stream (and stop it
    again on every restart, its offset never committed)."""
    try:
        return _parse_document(value, record_key, topic, partition, offset, max_bytes)
    except Exception as err:  # noqa: BLE001 - the record's verdict, whatever it is
        return Rejected(f"unreadable record: {type(err).__name__}")


def _parse_document(
    value: bytes | None, record_key: bytes | None, topic: str, partition: int, offset: int, max_bytes: int,
) -> ParsedDocument | Rejected:
    if not value:
        return Rejected("empty message")
    if len(value) > max_bytes:
        return Rejected(f"too large: {len(value)} bytes > processor.max_document_bytes {max_bytes}")
    if record_key is not None and len(record_key) > 4 * MAX_KEY_CHARS:
        return Rejected(f"record key too long: {len(record_key)} bytes")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as err:
        return Rejected(f"invalid UTF-8 at byte {err.start}: {err.reason}")
    key = tenant_key(record_key)
    if not text.strip():
        return Rejected("empty text")
    try:
        doc = loads_untrusted(text)
    except UntrustedJSONError as err:
        if text.lstrip().startswith(("{", "[")):
            return Rejected(str(err))
        # Not JSON: plain text, a document of its own.
        return _bounded(ParsedDocument(DocumentTask(source_id(topic, partition, offset), text, key, partition, offset=offset)))
    if not isinstance(doc, dict):
        return Rejected(f"JSON message must be an object, got {type(doc).__name__}")
    if "text" not in doc:
        return Rejected("missing field 'text'")
    if not isinstance(doc["text"], str):
        return Rejected(f"field 'text' must be a string, got {type(doc['text']).__name__}")
    if not doc["text"].strip():
        return Rejected("empty text")
    doc_id = doc.get("id", source_id(topic, partition, offset))
    if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or doc_id == "":
        return Rejected(f"field 'id' must be a non-empty string, got {str(doc_id)[:64]!r}")
    if isinstance(doc_id, str) and CONTROL_CHARACTER.search(doc_id):
        return Rejected("control character in field 'id'")
    doc_key = doc.get("key")
    if doc_key is None:  # absent, or null: the record's key, if any, names the tenant
        doc_key = key
    elif not isinstance(doc_key, str):
        return Rejected(f"field 'key' must be a string, got {type(doc_key).__name__}")
    else:
        doc_key = tenant_key(doc_key.encode())
        if record_key is not None and doc_key != key:
            return Rejected("key contradicts the record key: field 'key' and the Kafka record's key name two tenants")
    meta = doc.get("meta")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        return Rejected(f"field 'meta' must be an object, got {type(meta).__name__}")
    return _bounded(ParsedDocument(DocumentTask(str(doc_id), doc["text"], doc_key, partition, offset=offset), meta))


def _bounded(parsed: ParsedDocument) -> ParsedDocument | Rejected:
    task = parsed.task
    if len(task.id) > MAX_ID_CHARS:
        return Rejected(f"id too long: {len(task.id)} characters > {MAX_ID_CHARS}")
    if task.key is not None and len(task.key) > MAX_KEY_CHARS:
        return Rejected(f"key too long: {len(task.key)} characters > {MAX_KEY_CHARS}")
    return parsed


def tenant_key(record_key: bytes | None) -> str | None:
    """The tenant a key names, exactly: UTF-8 text as it is; bytes that are not UTF-8 text (or
    text with control characters, or text that starts with ``hex:``) as ``hex:`` and their
    hexadecimal digits. One to one: two keys share a state only if their bytes are equal, and
    an empty key is a tenant of its own, not the absence of one (None)."""
    if record_key is None:
        return None
    try:
        text = record_key.decode("utf-8")
    except UnicodeDecodeError:
        return HEX_KEY + record_key.hex()
    if text.startswith(HEX_KEY) or CONTROL_CHARACTER.search(text):
        return HEX_KEY + record_key.hex()
    return text


def result_message(outcome: DocumentOutcome, meta: dict[str, Any], partition: int, offset: int,
                   topic: str = "", learning: str | None = None) -> dict[str, Any]:
    """The results-topic record for a processed document. ``source`` is its idempotency key: the
    record it answers (``topic/partition/offset``). After a crash the records since the last
    checkpoint are read again and their results written again, the same (states are restored
    exactly); a consumer keeps the first result of each ``source``. ``learning``: with a learner,
    ``admitted``, ``held out``, or why the document was kept from learning; ``slow_version``: the
    learner's version it was read with."""
    return {
        "id": outcome.id,
        "source": source_id(topic, partition, offset),
        "tokens": outcome.tokens,
        "loss": outcome.loss,
        "base_loss": outcome.base_loss,
        "finite": outcome.finite,
        "latency_ms": round(outcome.latency_ms, 3),
        "state_key": outcome.state_key,
        "state_documents": outcome.state_documents,
        "fast_weight_norm": outcome.fast_weight_norm,
        "delta_ratio": outcome.delta_ratio,
        "slow_delta_ratio": outcome.slow_delta_ratio,
        "slow_version": outcome.slow_version,
        "learning": learning,
        "windows": outcome.windows,
        "reused_from": outcome.reused_from,
        "reader": outcome.reader,
        "partition": partition,
        "offset": offset,
        "meta": meta,
    }


# Every kind of reason a record can be refused for: a closed set, so that counts by reason and
# metric labels stay bounded whatever the input (a reason's detail may quote the record). A reason
# is "<kind>..." with its detail after; the longest kind it starts with names it, else "other".
REASON_KINDS = (
    # the record
    "empty message", "too large", "record key too long", "invalid UTF-8", "empty text", "bad JSON",
    "JSON nested deeper", "JSON message must be an object", "missing field 'text'", "field 'text'", "field 'id'",
    "field 'key'", "field 'meta'", "id too long", "key too long", "key contradicts the record key",
    "control character in", "duplicate field", "unreadable record",
    # reading it
    "oversize", "processing error", "rejected", "reader failed", "its reader died", "context-parallel read failed",
    # writing its output
    "output refused",
    # control records
    "unknown action", "rollback needs", "forget needs", "release needs", "refused: no control key", "refused: unsigned command",
    "refused: bad signature", "refused: no issued_at", "refused: expired", "refused: replayed command",
    "refused: for another stream", "refused: rate limit", "refused: unknown version", "refused: forget needs per_key",
    "refused: checkpoints off", "refused: release needs the learner",
)


def reason_kind(reason: str) -> str:
    """The kind of a reason ("bad JSON: Expecting ... column 2" -> "bad JSON"): one of
    ``REASON_KINDS`` or "other"."""
    matches = [kind for kind in REASON_KINDS if reason.startswith(kind)]
    return max(matches, key=len) if matches else "other"


def dead_letter_headers(reason: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    values = (topic, str(partition), str(offset))
    return [(REASON_HEADER, reason.encode())] + [(h, v.encode()) for h, v in zip(SOURCE_HEADERS, values)]
