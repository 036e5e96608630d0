"""StreamCommands: the signed control records of a running stream (``ttt-stream forget``,
``release``, ``rollback``), carried out between two turns of the run loop, or refused.

A refused record is never executed: it goes to the dead-letter topic with the reason. A signed
command's sender waits for its answer (its ``request_id`` on the alert topic); any other refused
record is only counted, and the counts go out once a status interval (``alert_refusals``), so
that a flood of unsigned records costs the alert topic one message. Each action has its own rate
limit (``processor.control.min_<action>_interval_s``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Protocol

from pipeline.stream_io.source import ConsumerRecord

from pipeline.config import ProcessorConfig
from pipeline.processing.learning_admission import LearningAdmission
from pipeline.processing.recovery import CommandFailed, RecoveryPolicy
from pipeline.state.tenant_keys import TenantKeys
from pipeline.stream_io.control import ControlCommand
from pipeline.stream_io.messages import reason_kind
from pipeline.stream_io.sink import KafkaSinks

log = logging.getLogger(__name__)


class CommandSource(Protocol):
    """Where signed control commands come from (``pipeline.stream_io.control.ControlSource``):
    each record with its verified command, or why it was refused."""

    def poll(self) -> list[tuple[ConsumerRecord, ControlCommand | str]]: ...


class StreamCommands:
    """Carries out the control records of one stream. ``settle``: finish every document taken in
    (a forget waits for the documents already on the readers); ``dead_letter``: where a refused
    record goes, with the reason."""

    def __init__(self, config: ProcessorConfig, stream: str, control: CommandSource, recovery: RecoveryPolicy,
                 sinks: KafkaSinks, keys: TenantKeys, admission: LearningAdmission | None,
                 settle: Callable[[], None], dead_letter: Callable[[ConsumerRecord, str], None]):
        self.config = config
        self.stream = stream
        self.control = control
        self.recovery = recovery
        self.sinks = sinks
        self.keys = keys
        self.admission = admission
        self.settle = settle
        self.dead_letter = dead_letter
        self._last_done: dict[str, float] = {}  # action -> monotonic time the control topic last had it done
        self._refused: dict[str, int] = {}  # refused unsigned records by reason kind, since the last alert

    def handle(self) -> int:
        """Carry out (or refuse) the control records of this turn; how many there were."""
        records = self.control.poll()
        for record, command in records:
            refusal = command if isinstance(command, str) else self._refusal(command)
            if refusal is not None:
                log.debug("control record %s/%d/%d refused: %s", record.topic, record.partition, record.offset, refusal)
                if isinstance(command, ControlCommand):
                    self.sinks.alert({"type": "control_error", "stream": self.stream, "error": refusal,
                                      "request_id": command.request_id, "time": time.time()})
                else:
                    kind = reason_kind(refusal)
                    self._refused[kind] = self._refused.get(kind, 0) + 1
                self.dead_letter(record, refusal)
                continue
            self._last_done[command.action] = time.monotonic()
            try:
                if command.action == "forget":
                    self.forget(command.key, request_id=command.request_id)
                elif command.action == "release":
                    self.release(command.key, request_id=command.request_id)
                else:
                    self.rollback(command.to, cause="manual", request_id=command.request_id)
            except CommandFailed as err:  # MLflow out of reach: the sender hears, the stream goes on
                log.error("%s %s failed: %s", command.action, command.request_id, err)
                self.sinks.alert({"type": "control_error", "stream": self.stream, "request_id": command.request_id,
                                  "error": f"refused: {command.action} failed, nothing changed: {err}",
                                  "time": time.time()})
        return len(records)

    def _refusal(self, command: ControlCommand) -> str | None:
        """Why a signed command is still not carried out (None: it is)."""
        if command.action == "release":
            refusal = None if self.admission is not None else (
                "refused: release needs the learner's admission checks (processor.learner.enabled, "
                "learner.admission.enabled): this stream quarantines no key")
        else:
            refusal = self.recovery.refusal(command.action, command.to)
        if refusal is not None:
            return refusal
        since = time.monotonic() - self._last_done.get(command.action, -math.inf)
        setting = f"min_{command.action}_interval_s"
        interval = getattr(self.config.control, setting)
        if since < interval:
            return (f"refused: rate limit: a {command.action} was done {since:.0f} s ago "
                    f"(processor.control.{setting} {interval:g})")
        return None

    def alert_refusals(self) -> None:
        """The counts of unsigned or malformed control records refused since the last call, as one alert."""
        if self._refused:
            log.warning("control records refused since the last report: %s", self._refused)
            self.sinks.alert({"type": "control_refused", "stream": self.stream, "counts": self._refused,
                              "time": time.time()})
            self._refused = {}

    def forget(self, key: str, request_id: str | None = None) -> str | None:
        """Erase ``key``'s per-key state on every reader (in memory, spilled, its replay buffer
        with it), leave its tombstone, write a version without it and erase its state files from
        every earlier version (``recovery.forget``); returns the new version. Documents of the key
        read after this start a new state."""
        self.settle()  # documents already on the readers finish first
        state_key = self.keys.state_key_of(key)
        held, version = self.recovery.forget(state_key)
        log.info("forgot the key of state %s (held by %d readers): version %s", state_key, held, version)
        self.sinks.alert({"type": "forget", "stream": self.stream, "state_key": state_key, "held": held,
                          "version": version, "request_id": request_id, "time": time.time()})
        return version

    def release(self, key: str, request_id: str | None = None) -> bool:
        """Let the documents of a quarantined ``key`` be learned again (from the next one taken in;
        the next checkpoint records it); whether it was quarantined."""
        state_key = self.keys.state_key_of(key)
        released = self.admission.release(state_key)
        if released:
            self.recovery.release_recorded()
        log.info("release of the key of state %s: %s", state_key, "released" if released else "was not quarantined")
        self.sinks.alert({"type": "release", "stream": self.stream, "state_key": state_key, "released": released,
                          "request_id": request_id, "time": time.time()})
        return released

    def rollback(self, target: str, cause: str, request_id: str | None = None) -> str | None:
        """Every reader back to the states of version ``target`` (``pipeline.processing.recovery``)."""
        return self.recovery.rollback(target, cause, request_id)
