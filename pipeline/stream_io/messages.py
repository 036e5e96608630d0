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
MAX_KEY_CHARS = 256


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
    """The document in one Kafka record, or why there is none."""
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
    key = _decode_key(record_key)
    if not text.lstrip().startswith(("{", "[")):
        if not text.strip():
            return Rejected("empty text")
        return _bounded(ParsedDocument(DocumentTask(source_id(topic, partition, offset), text, key, partition)))
    try:
        doc = loads_untrusted(text)
    except UntrustedJSONError as err:
        return Rejected(str(err))
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
    doc_key = doc.get("key", key)
    if doc_key is not None and not isinstance(doc_key, str):
        return Rejected(f"field 'key' must be a string, got {type(doc_key).__name__}")
    meta = doc.get("meta")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        return Rejected(f"field 'meta' must be an object, got {type(meta).__name__}")
    return _bounded(ParsedDocument(DocumentTask(str(doc_id), doc["text"], doc_key, partition), meta))


def _bounded(parsed: ParsedDocument) -> ParsedDocument | Rejected:
    task = parsed.task
    if len(task.id) > MAX_ID_CHARS:
        return Rejected(f"id too long: {len(task.id)} characters > {MAX_ID_CHARS}")
    if task.key is not None and len(task.key) > MAX_KEY_CHARS:
        return Rejected(f"key too long: {len(task.key)} characters > {MAX_KEY_CHARS}")
    return parsed


def _decode_key(record_key: bytes | None) -> str | None:
    if record_key is None:
        return None
    return record_key.decode("utf-8", errors="replace")


def result_message(outcome: DocumentOutcome, meta: dict[str, Any], partition: int, offset: int) -> dict[str, Any]:
    """The results-topic record for a processed document."""
    return {
        "id": outcome.id,
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
        "windows": outcome.windows,
        "reused_from": outcome.reused_from,
        "worker": outcome.worker,
        "partition": partition,
        "offset": offset,
        "meta": meta,
    }


def reason_kind(reason: str) -> str:
    """A dead letter's reason without its particulars ("bad JSON: Expecting ... column 2" ->
    "bad JSON"): a bounded set, for counts by reason and metric labels."""
    return re.split(r":|, got| at ", reason, maxsplit=1)[0].strip()


def dead_letter_headers(reason: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    values = (topic, str(partition), str(offset))
    return [(REASON_HEADER, reason.encode())] + [(h, v.encode()) for h, v in zip(SOURCE_HEADERS, values)]
