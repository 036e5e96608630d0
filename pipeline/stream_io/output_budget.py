"""Everything the processor writes fits a size budget (``kafka.max_output_bytes``), whatever the
input: a result echoes the document's ``meta``, a dead letter copies the record, an alert or a
status report may carry text that came from outside. Past the budget a field is replaced by a
marker that says it was cut (its size and sha256), and a dead letter keeps a prefix of the record
plus the digest of the whole. A record the broker would refuse for its size can then never stop
the stream and come back on every restart (a poison pill).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Headers of a dead letter whose record was cut (Kafka Connect's style: what the record was, in headers).
SHA256_HEADER = "ttt.source.sha256"
BYTES_HEADER = "ttt.source.bytes"
CUT_HEADER = "ttt.source.cut"  # "value", "key" or "value,key": what the dead letter holds only a prefix / digest of
# A record key is an id, not text: longer than this it is replaced by its sha256 (hex) in a dead letter.
MAX_KEY_BYTES = 1024
# A reason header holds our own words plus at most a short quote of the record.
MAX_REASON_BYTES = 1024
# Room for the record's framing, the headers' names and the marker fields.
OVERHEAD_BYTES = 2048


def encode_json(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bounded_json(message: dict[str, Any], budget: int, cut_first: tuple[str, ...] = ()) -> bytes:
    """``message`` as JSON of at most ``budget`` bytes. Fields are cut, ``cut_first`` first (the
    echoed ones), then the largest, each replaced by ``{"cut": true, "bytes": n, "sha256": h}``
    and named in the top-level list ``cut``, until it fits."""
    data = encode_json(message)
    if len(data) <= budget:
        return data
    message = dict(message)
    encoded = {k: encode_json(v) for k, v in message.items()}
    rest = sorted((k for k in message if k not in cut_first), key=lambda k: -len(encoded[k]))
    cut: list[str] = []
    for field in [k for k in cut_first if k in message] + rest:
        message[field] = {"cut": True, "bytes": len(encoded[field]), "sha256": _digest(encoded[field])}
        cut.append(field)
        message["cut"] = cut
        data = encode_json(message)
        if len(data) <= budget:
            return data
    raise ValueError(f"a message of {len(message)} fields does not fit {budget} bytes even with every field cut")


def bounded_dead_letter(value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]],
                        budget: int) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
    """A dead letter of the record (``value``, ``key``) within ``budget`` bytes: its reason header
    capped, a key over ``MAX_KEY_BYTES`` replaced by its sha256, and the value cut to the prefix
    that fits. The sha256 and size of the whole value are always in the headers, so that the
    record can be found and checked against the source topic."""
    value = value if value is not None else b""
    headers = [(name, data[:MAX_REASON_BYTES]) for name, data in headers]
    headers += [(SHA256_HEADER, _digest(value).encode()), (BYTES_HEADER, str(len(value)).encode())]
    cut = []
    if key is not None and len(key) > MAX_KEY_BYTES:
        key = _digest(key).encode()
        cut.append("key")
    room = budget - OVERHEAD_BYTES - len(key or b"") - sum(len(n) + len(v) for n, v in headers)
    if len(value) > room:
        value = value[:max(room, 0)]
        cut.insert(0, "value")
    if cut:
        headers.append((CUT_HEADER, ",".join(cut).encode()))
    return value, key, headers
