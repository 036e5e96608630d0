"""The control topic: signed commands to a running processor (``{"action": "rollback", "to": V,
"request_id": ..., "issued_at": T, "signature": HMAC}``, ``{"action": "forget", "key": K,
...}``: erase one tenant's per-key state, or ``{"action": "release", "key": K, ...}``: let a
quarantined tenant's documents be learned again).

Anyone who can write to the topic can send a record; only a holder of the control key (the
environment variable named by ``processor.control.key_env``) can send a command. The signature is
HMAC-SHA256 over the command's canonical JSON (sorted keys, no spaces, without the signature);
``issued_at`` bounds its age, and a signature is taken once. A command names its stream and
consumer group (``stream``, ``group``, both signed) and is refused by any other. The signatures
taken go into every checkpoint (``CommandLedger``), so that a captured command cannot be sent
again after a restart either.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from pipeline.config import ControlConfig, KafkaConfig
from pipeline.stream_io.messages import MAX_KEY_CHARS
from pipeline.stream_io.untrusted_json import UntrustedJSONError, loads_untrusted

log = logging.getLogger(__name__)
ACTIONS = ("rollback", "forget", "release")
# A command is a few fields; anything longer is not one.
MAX_COMMAND_BYTES = 4096
SIGNATURE = "signature"
# Control records read per turn of the run loop: a flood of them waits its turn, documents go on.
MAX_RECORDS_PER_POLL = 64
# Signatures remembered (and checkpointed) at most; past it the oldest go, and no command issued
# before the newest of those that went is taken (CommandLedger.floor).
MAX_TAKEN = 1024


@dataclass(frozen=True)
class ControlCommand:
    action: str
    to: str | None = None  # rollback: a version, an alias, or base
    request_id: str | None = None
    key: str | None = None  # forget, release: the tenant's key


def control_key(config: ControlConfig, environ: Mapping[str, str] = os.environ) -> bytes | None:
    key = environ.get(config.key_env)
    return key.encode() if key else None


def _canonical(message: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in message.items() if k != SIGNATURE}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_command(message: dict[str, Any], key: bytes, now: float | None = None) -> dict[str, Any]:
    """``message`` with ``issued_at`` and its signature."""
    signed = {**message, "issued_at": time.time() if now is None else now}
    signed[SIGNATURE] = hmac.new(key, _canonical(signed), hashlib.sha256).hexdigest()
    return signed


@dataclass
class CommandLedger:
    """The commands a stream has taken, while young enough to be sent again: their signatures
    with their ``issued_at``, and a floor below which none is taken. Written into every
    checkpoint and read back at start (``as_dict`` / ``from_dict``)."""

    taken: dict[str, float] = field(default_factory=dict)
    floor: float = -math.inf

    def as_dict(self) -> dict[str, Any]:
        return {"taken": dict(self.taken), "floor": self.floor if math.isfinite(self.floor) else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "CommandLedger":
        data = data or {}
        floor = data.get("floor")
        return cls({str(s): float(t) for s, t in (data.get("taken") or {}).items()},
                   float(floor) if floor is not None else -math.inf)

    def take(self, signature: str, issued: float, now: float, max_age_s: float) -> str | None:
        """Record ``signature`` as taken, or say why it cannot be."""
        for old in [s for s, t in self.taken.items() if now - t > max_age_s]:
            del self.taken[old]
        if signature in self.taken:
            return "refused: replayed command"
        if issued <= self.floor:
            return "refused: replayed command (issued before commands this stream no longer lists)"
        self.taken[signature] = issued
        while len(self.taken) > MAX_TAKEN:
            oldest = min(self.taken, key=self.taken.__getitem__)
            self.floor = max(self.floor, self.taken.pop(oldest))
        return None


class CommandVerifier:
    """Takes a command only if signed with ``key``, for this stream, recent, and not taken before."""

    def __init__(self, key: bytes | None, config: ControlConfig, stream: str, group: str,
                 ledger: CommandLedger | None = None, clock: Callable[[], float] = time.time):
        self.key = key
        self.config = config
        self.stream = stream
        self.group = group
        self.ledger = ledger if ledger is not None else CommandLedger()
        self.clock = clock

    def refusal(self, message: dict[str, Any]) -> str | None:
        """Why ``message`` is not taken as a command (None: it is, and is now spent)."""
        if self.key is None:
            return f"refused: no control key in ${self.config.key_env} on the processor"
        signature = message.get(SIGNATURE)
        if not isinstance(signature, str):
            return "refused: unsigned command"
        expected = hmac.new(self.key, _canonical(message), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return "refused: bad signature"
        if message.get("stream") != self.stream or message.get("group") != self.group:
            return (f"refused: for another stream: the command names stream {str(message.get('stream'))[:64]!r}, "
                    f"group {str(message.get('group'))[:64]!r}")
        issued = message.get("issued_at")
        now = self.clock()
        if not isinstance(issued, (int, float)) or isinstance(issued, bool) or not math.isfinite(issued):
            return "refused: no issued_at"
        if abs(now - issued) > self.config.max_age_s:
            return (f"refused: expired: issued {now - issued:.0f} s ago "
                    f"(processor.control.max_age_s {self.config.max_age_s:g})")
        return self.ledger.take(signature, float(issued), now, self.config.max_age_s)


def parse_command(value: bytes | None, verifier: CommandVerifier) -> ControlCommand | str:
    """A command, or why the record is not one; never raises (a record this parser did not
    foresee is refused as "unreadable record")."""
    try:
        return _parse_command(value, verifier)
    except Exception as err:  # noqa: BLE001 - the record's verdict, whatever it is
        return f"unreadable record: {type(err).__name__}"


def _parse_command(value: bytes | None, verifier: CommandVerifier) -> ControlCommand | str:
    if value is not None and len(value) > MAX_COMMAND_BYTES:
        return f"too large: {len(value)} bytes > {MAX_COMMAND_BYTES}"
    try:
        message = loads_untrusted((value or b"").decode("utf-8"))
    except UnicodeDecodeError as err:
        return f"invalid UTF-8 at byte {err.start}: {err.reason}"
    except UntrustedJSONError as err:
        return str(err)
    if not isinstance(message, dict) or message.get("action") not in ACTIONS:
        action = message.get("action") if isinstance(message, dict) else message
        return f"unknown action {str(action)[:64]!r}; known: {ACTIONS}"
    to, key = message.get("to"), message.get("key")
    if message["action"] == "rollback":
        if not isinstance(to, (str, int)) or isinstance(to, bool) or not str(to) or len(str(to)) > 64:
            return "rollback needs 'to': a version number or an alias such as last-good"
        to = str(to)
    elif not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
        return f"{message['action']} needs 'key': a string of at most {MAX_KEY_CHARS} characters"
    refusal = verifier.refusal(message)
    if refusal is not None:
        return refusal
    request_id = message.get("request_id")
    request_id = str(request_id)[:128] if request_id is not None else None
    if message["action"] == "rollback":
        return ControlCommand("rollback", to, request_id)
    return ControlCommand(message["action"], request_id=request_id, key=key)


class ControlSource:
    """Reads new commands (committed under ``<group_id>.control``; a first start skips old ones)."""

    def __init__(self, config: KafkaConfig, control: ControlConfig, stream: str, ledger: CommandLedger,
                 environ: Mapping[str, str] = os.environ):
        self.topic = config.topics.control
        self.verifier = CommandVerifier(control_key(control, environ), control, stream, config.group_id, ledger)
        if self.verifier.key is None:
            log.warning("no control key in $%s: every command on %s will be refused", control.key_env, self.topic)
        self.consumer = KafkaConsumer(
            bootstrap_servers=config.bootstrap_servers, group_id=f"{config.group_id}.control",
            auto_offset_reset="latest", **config.consumer_settings(), enable_auto_commit=False,
        )
        partitions = self.consumer.partitions_for_topic(self.topic) or {0}
        self.tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self.consumer.assign(self.tps)
        for tp in self.tps:
            self.consumer.position(tp)  # resolve "latest" now, before any command is sent

    def poll(self) -> list[tuple[ConsumerRecord, ControlCommand | str]]:
        """New records, each with its command or why it is none."""
        out = []
        for tp, records in self.consumer.poll(timeout_ms=0, max_records=MAX_RECORDS_PER_POLL).items():
            for record in records:
                out.append((record, parse_command(record.value, self.verifier)))
            self.consumer.commit({tp: OffsetAndMetadata(records[-1].offset + 1, "", -1)})
        return out

    def close(self) -> None:
        self.consumer.close(autocommit=False)
