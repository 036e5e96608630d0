"""The control topic: commands to a running processor (``{"action": "rollback", "to": V}``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from pipeline.config import KafkaConfig

log = logging.getLogger(__name__)
ACTIONS = ("rollback",)


@dataclass(frozen=True)
class ControlCommand:
    action: str
    to: str
    request_id: str | None = None


def parse_command(value: bytes | None) -> ControlCommand | str:
    """A command, or why the message is not one."""
    try:
        message = json.loads(value or b"")
    except ValueError as err:
        return f"bad JSON: {err}"
    if not isinstance(message, dict) or message.get("action") not in ACTIONS:
        return f"unknown action {message.get('action') if isinstance(message, dict) else message!r}; known: {ACTIONS}"
    to = message.get("to")
    if not isinstance(to, (str, int)) or isinstance(to, bool) or not str(to):
        return "rollback needs 'to': a version number or an alias such as last-good"
    request_id = message.get("request_id")
    return ControlCommand(message["action"], str(to), str(request_id) if request_id is not None else None)


class ControlSource:
    """Reads new commands (committed under ``<group_id>.control``; a first start skips old ones)."""

    def __init__(self, config: KafkaConfig):
        self.topic = config.topics.control
        self.consumer = KafkaConsumer(
            bootstrap_servers=config.bootstrap_servers, group_id=f"{config.group_id}.control",
            auto_offset_reset="latest", **config.client, **config.consumer, enable_auto_commit=False,
        )
        partitions = self.consumer.partitions_for_topic(self.topic) or {0}
        self.tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self.consumer.assign(self.tps)
        for tp in self.tps:
            self.consumer.position(tp)  # resolve "latest" now, before any command is sent

    def poll(self) -> list[ControlCommand | str]:
        out = []
        for tp, records in self.consumer.poll(timeout_ms=0).items():
            for record in records:
                out.append(parse_command(record.value))
            self.consumer.commit({tp: OffsetAndMetadata(records[-1].offset + 1, "", -1)})
        return out

    def close(self) -> None:
        self.consumer.close(autocommit=False)
