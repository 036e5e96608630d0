"""Commands from outside the processor: a rollback or a forget, through the control topic to a
running processor (signed with the control key), or offline, as a new version in MLflow."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from kafka import KafkaConsumer, KafkaProducer

from actors.call_types import StateBlob
from pipeline.state.checkpoint import BASE, HEAD, LIVE, Checkpoint, CheckpointError, CheckpointRequest, CheckpointStore
from pipeline.config import AppConfig
from pipeline.stream_io.control import control_key, sign_command
from pipeline.state.promotion import servable
from pipeline.state.tenant_keys import TenantKeys


def request_rollback(config: AppConfig, to: str, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """Roll a running processor back to ``to`` and wait for its record of it; adds the times
    measured from the request."""
    sent_at = time.time()
    answer = request(config, {"action": "rollback", "to": to}, ("rollback", "rollback_failed"), timeout_s)
    if answer is not None and answer["type"] == "rollback":
        answer["serving_after_request_s"] = answer["served_at"] - sent_at
        answer["recorded_after_request_s"] = answer["time"] - sent_at
    return answer


def request_forget(config: AppConfig, key: str, timeout_s: float = 60.0) -> dict[str, Any] | None:
    """Have a running processor erase ``key``'s per-key state and write a version without it."""
    return request(config, {"action": "forget", "key": key}, ("forget",), timeout_s)


def request_release(config: AppConfig, key: str, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """Have a running processor let a quarantined key's documents be learned again."""
    return request(config, {"action": "release", "key": key}, ("release",), timeout_s)


def request(config: AppConfig, command: dict[str, Any], answers: tuple[str, ...],
            timeout_s: float) -> dict[str, Any] | None:
    """Send ``command``, signed with the control key, and wait for the processor's answer to it
    on the alerts topic (one of ``answers``, or its refusal, ``control_error``); None if none came."""
    kafka = config.kafka
    key = control_key(config.processor.control)
    if key is None:
        raise RuntimeError(f"no control key: set ${config.processor.control.key_env} to the processor's")
    request_id = uuid.uuid4().hex
    consumer = KafkaConsumer(
        kafka.topics.alerts, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest",
        enable_auto_commit=False, consumer_timeout_ms=200, **kafka.consumer_settings(),
    )
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, **kafka.producer_settings())
    # Bound to this stream: the processor of another stream (same control topic) refuses it.
    signed = sign_command({**command, "request_id": request_id, "stream": config.stream.name,
                           "group": kafka.group_id}, key)
    producer.send(kafka.topics.control, json.dumps(signed).encode())
    producer.flush()
    producer.close()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for record in consumer:
                message = json.loads(record.value)
                if message.get("request_id") == request_id and message.get("type") in (*answers, "control_error"):
                    return message
    finally:
        consumer.close()
    return None


def rollback_offline(config: AppConfig, to: str) -> str:
    """A new version holding the states of ``to`` and the offsets of ``live``: the next run
    starts from that state where the stream left off."""
    store, live = _live(config, "roll back from")
    target = Checkpoint.base(list(live.states)) if to == BASE else store.load(to)
    return _save_after(store, live, target.states, "rollback",
                       {"rollback_to": target.version, "rollback_from": live.version, "rollback_cause": "manual"},
                       promote=to == BASE or servable(store.registry.version_tags(target.version)))


def forget_offline(config: AppConfig, key: str) -> tuple[str, int]:
    """A new version holding ``live``'s states without ``key``'s (and its offsets), its tombstone
    in it, and the key's state files erased from every version: the next run starts without that
    tenant, and no rollback brings it back. Returns the version and how many states of ``live``
    it dropped."""
    store, live = _live(config, "forget a key in")
    state_key = TenantKeys(store.registry.key_salt()).state_key_of(key)
    states = {name: [b for b in blobs if b.key != state_key] for name, blobs in live.states.items()}
    dropped = sum(len(blobs) for blobs in live.states.values()) - sum(len(blobs) for blobs in states.values())
    store.registry.forget(state_key)
    version = _save_after(store, live, states, "forget", {"forgot_state_key": state_key},
                          promote=servable(store.registry.version_tags(live.version)))
    store.erase(state_key)
    return version, dropped


def _live(config: AppConfig, what: str) -> tuple[CheckpointStore, Checkpoint]:
    """The version the next run reads on from: ``head`` (``live`` for a stream from before it)."""
    store = CheckpointStore(config.mlflow, config.stream.name)
    ref = HEAD if store.registry.resolve(HEAD) is not None else LIVE
    if store.registry.resolve(ref) is None:
        raise CheckpointError(f"{store.name}: no version to {what}")
    return store, store.load(ref)


def _save_after(store: CheckpointStore, live: Checkpoint, states: dict[str, list[StateBlob]], reason: str,
                tags: dict[str, str], promote: bool) -> str:
    """A version after ``live`` (the version read on from, ``head``): its offsets, documents and
    model, with ``states``; ``live`` moves to it only if ``promote`` (its weights are servable)."""
    manifest = live.manifest
    return store.save(CheckpointRequest(
        states=states, topic=manifest["offsets"]["topic"], offsets=live.offsets,
        config_digest=manifest["config_digest"], base_model=manifest["base_model"],
        documents=int(manifest["documents"]), reason=reason, parent_version=live.version,
        model_config=manifest.get("model_config") or {}, metrics={}, tags=tags,
        assignment={int(p): w for p, w in (manifest.get("assignment") or {}).items()},
        topic_id=manifest["offsets"].get("topic_id"), commands=manifest.get("commands") or {},
        admission=manifest.get("admission") or {}, promote=promote,
    ))
