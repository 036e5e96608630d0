"""``ttt-stream run``: wire the config to topics, Ray actors, the Kafka source and sinks."""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from actors.runtime import init_ray, ships_working_dir
from actors.supervisor import StreamActors
from pipeline.state.base_model import BaseModelSource, local_model_dir
from pipeline.processing.actor_specs import (as_actors_see_it, context_parallel_spec, effective_model_config, hands_off,
                                             reader_spec)
from pipeline.state.checkpoint import (HEAD, LAST_GOOD, LIVE, REFERENCE_LOSS, CheckpointError, CheckpointStore,
                                       StreamCheckpointer, base_model_id)
from pipeline.config import AppConfig, ProcessorConfig
from pipeline.stream_io.control import CommandLedger, ControlSource
from pipeline.state.tenant_keys import TenantKeys
from pipeline.observability.metrics import StreamMetrics
from pipeline.observability.monitor import Breach, DegradationMonitor
from pipeline.observability.processor_run import start_processor_run
from pipeline.processing.learning_admission import LearningAdmission
from pipeline.processing.document_intake import DocumentIntake
from pipeline.processing.processor import StreamProcessor
from pipeline.processing.recovery import BestEffortRecovery, CheckpointedRecovery
from pipeline.stream_events import CheckpointWritten, DocumentRead, EventObserver, RolledBack, StreamEvents
from pipeline.state.rescale import split_learner, states_for_readers
from pipeline.processing.run_summary import RunSummary
from pipeline.stream_io.sink import KafkaSinks
from pipeline.stream_io.source import KafkaDocumentSource, OffsetOutOfRange
from pipeline.stream_io.topics import ensure_topics
from actors.ray_pool import RayLearner, RayReaderPool, SynchronousLearnerPool
from pipeline.processing.reader_pool import Learner, NoLearner, ReaderPool

log = logging.getLogger(__name__)


def restore_from_checkpoint(config: AppConfig, store: CheckpointStore, source: KafkaDocumentSource,
                            pool: ReaderPool, positions: dict[int, int], assignment: dict[int, int],
                            base: dict[str, Any] | None = None, model_dir: Path | None = None,
                            learner: Learner | None = None) -> StreamCheckpointer:
    """The checkpointer of this run; with ``checkpoint.restore``, the readers' states (and the
    learner's) and the source's offsets are set from the ``head`` version first (written by as
    many readers or not: ``pipeline.state.rescale`` says which reader takes which state)."""
    names = pool.names
    start, resumed, current = None, {}, source.topic_id()
    # The newest version (head), whether the promotion gate passed it or not: it holds the
    # learner's verdict, and reading on from it goes on as the run that wrote it would have.
    ref = HEAD if store.registry.resolve(HEAD) is not None else LIVE  # LIVE: a stream from before head existed
    if config.processor.checkpoint.restore and store.registry.resolve(ref) is not None:
        start = store.load(ref)  # CheckpointError: refuse to start rather than lose or repeat
        topic = start.manifest["offsets"]["topic"]
        if topic != config.kafka.topics.documents:
            raise CheckpointError(f"{store.name} v{start.version} read topic {topic!r}, this config reads "
                                  f"{config.kafka.topics.documents!r}; set processor.checkpoint.restore: false")
        recorded = start.manifest["offsets"].get("topic_id")
        recreated = recorded is not None and current is not None and recorded != current
        if recreated and config.kafka.offset_reset == "error":
            raise OffsetOutOfRange(
                f"{store.name} v{start.version} read topic {topic!r} with id {recorded}; the topic now has id "
                f"{current}: it was deleted and created again, and the version's offsets belong to the old one; "
                "set kafka.offset_reset to earliest (read the new topic from its start) or latest")
        readers, learned = split_learner(start, learner.name if learner is not None else None)
        states = states_for_readers(readers, names, assignment, config.processor.scope)
        for w, name in enumerate(names):
            pool.restore(w, states[name])
        if learner is not None:
            learner.restore(learned)
        if recreated:
            offsets = source.seek_to_start(config.kafka.offset_reset)
            log.warning("topic %s was created again (id %s, the version read %s): reading from offsets %s "
                        "(kafka.offset_reset: %s)", topic, current, recorded, offsets, config.kafka.offset_reset)
        else:
            offsets = source.seek(start.offsets)  # OffsetOutOfRange, or moved by kafka.offset_reset
        resumed = offsets
        log.info("restored %s v%s: offsets %s", store.name, start.version, offsets)
    base = base if base is not None else base_model_id(config.model.path)
    return StreamCheckpointer(store, config.processor.checkpoint, config.kafka.topics.documents, config.digest(),
                              base, start, {**positions, **resumed},
                              model_config=effective_model_config(config, model_dir),
                              assignment={p: names[w] for p, w in assignment.items()}, topic_id=current)


class PartitionsChanged(RuntimeError):
    """The documents topic has partitions that the run did not read (added while it ran)."""


class NoCommands:
    """The control topic of a stream without checkpoints is not read: nothing could be carried out."""

    def poll(self) -> list:
        return []


@dataclass
class DurableParts:
    """What makes the stream's progress durable and governable: its checkpoints, the names of its
    states, its control topic, the learner's admission memory and the monitor."""

    checkpointer: StreamCheckpointer | None = None  # None: best effort, nothing durable
    keys: TenantKeys | None = None  # None: the stream's names of keys, not persisted
    control: ControlSource | None = None
    admission: LearningAdmission | None = None
    monitor: DegradationMonitor | None = None


def build_processor(config: ProcessorConfig, source: KafkaDocumentSource, sinks: KafkaSinks, pool: ReaderPool,
                    assignment: dict[int, int], stream: str, durable: DurableParts | None = None,
                    learner: Learner | None = None, observers: Sequence[EventObserver] = ()) -> StreamProcessor:
    """The processor of a deployment, its parts picked once here: the recovery policy (with
    checkpoints or best effort), and the observers subscribed to its events (metrics, the MLflow
    run, the monitor with its rollbacks and last-good alias, the alert topic)."""
    durable = durable if durable is not None else DurableParts()
    checkpointer, monitor = durable.checkpointer, durable.monitor
    recovery = CheckpointedRecovery(checkpointer) if checkpointer is not None else BestEffortRecovery()
    learner = learner if learner is not None else NoLearner()
    keys = durable.keys if durable.keys is not None else TenantKeys.unpersisted(stream)
    intake = DocumentIntake(config, stream, assignment, keys, durable.admission, learner.name is not None, sinks)
    processor = StreamProcessor(config, source, sinks, pool, intake, learner, recovery,
                                durable.control if durable.control is not None else NoCommands())
    events = processor.events
    for observer in observers:
        observer.subscribe_to(events)
    if monitor is not None:
        if checkpointer is None:
            raise ValueError("the monitor rolls back to checkpointed versions: it needs a checkpointer")
        watch_with_monitor(events, monitor, recovery, checkpointer)

    def alert_rollback(event: RolledBack) -> None:
        sinks.alert(event.record)
        sinks.flush()

    events.subscribe(RolledBack, alert_rollback)
    return processor


def watch_with_monitor(events: StreamEvents, monitor: DegradationMonitor, recovery: CheckpointedRecovery,
                       checkpointer: StreamCheckpointer) -> None:
    """The monitor reads every outcome (not those finishing while a rollback waits for them); a
    breach is published and rolls back; a checkpoint it passes becomes ``last-good``."""

    def observe(event: DocumentRead) -> None:
        if recovery.rolling_back:
            return
        breach = monitor.observe(event.outcome)
        if breach is not None:
            events.publish(breach)

    def mark_last_good(event: CheckpointWritten) -> None:
        # With a promotion gate, the gate moves last-good; the monitor keeps its reference loss.
        if event.version is None or event.reason == "rollback" or event.promoted is False or not monitor.passes():
            return
        store = checkpointer.store
        try:
            if monitor.reference_loss is not None:
                store.registry.record_metric(event.version, REFERENCE_LOSS, monitor.reference_loss)
            if event.promoted is None:
                store.registry.set_alias(LAST_GOOD, event.version)
        except Exception as err:  # noqa: BLE001 - MLflow went away just now: last-good stays
            log.warning("could not move %s to v%s: %s", LAST_GOOD, event.version, err)

    events.subscribe(DocumentRead, observe)
    events.subscribe(Breach, recovery.on_breach)
    events.subscribe(CheckpointWritten, mark_last_good)
    events.subscribe(RolledBack, lambda event: monitor.reset())


def run_stream(config: AppConfig, until_idle_s: float | None = None, ready_timeout_s: float = 300.0,
               stop_event: threading.Event | None = None) -> RunSummary:
    """Run the stream until stopped (SIGINT/SIGTERM, ``stop_event``) or idle: the documents topic ->
    the readers (and the learner) -> the output topics, with the checkpoints, the monitor and the
    observers around them. Whatever was started is stopped on the way out, in reverse order."""
    model_dir, model_source, base = base_model(config)
    connect(config)
    with ExitStack() as running:
        actors = start_actors(config, model_source)
        running.callback(actors.shutdown)
        source = running.enter_context(closing(KafkaDocumentSource(config.kafka)))
        sinks = running.enter_context(closing(KafkaSinks(config.kafka)))
        pool, learner, assignment = readers_and_learner(config, actors, source, ready_timeout_s)
        durable = durable_parts(config, source, pool, assignment, base, model_dir, learner, running)
        processor = build_processor(config.processor, source, sinks, pool, assignment, config.stream.name, durable,
                                    learner, observers(config, base, durable.checkpointer, running))
        return run_until_stopped(processor, config, assignment, until_idle_s, stop_event)


def base_model(config: AppConfig) -> tuple[Path, BaseModelSource | None, dict[str, Any]]:
    """(the model's folder here, its registered source if any, its identity for the checkpoints). A
    registered model is pinned to one version, fetched and verified here first (the driver reads
    its config and hashes its weights), then on every reader's node."""
    model_dir, model_source = local_model_dir(config.model.path, config.mlflow.tracking_uri, config.model.cache_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model.path: {config.model.path} is not a directory")
    base = base_model_id(model_dir)
    if model_source is not None:  # the checkpoint names the registered version, usable anywhere
        base = {**base, "path": model_source.uri, "files": model_source.files}
    return model_dir, model_source, base


def connect(config: AppConfig) -> None:
    """The stream's topics, Ray, and MLflow's client settings."""
    # The checkpointer retries with its own backoff while MLflow is down; the client's own
    # retries (minutes by default) would stall the stream instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    ensure_topics(config.kafka)
    init_ray(config.ray.address, config.ray.num_cpus, config.ray.object_store_memory_mb, config.ray.namespace)


def start_actors(config: AppConfig, model_source: BaseModelSource | None) -> StreamActors:
    p = config.processor
    seen = as_actors_see_it(config, job_working_dir=ships_working_dir())
    return StreamActors(config.stream.name, reader_spec(seen, model_source), p.readers, p.reader_num_cpus,
                        p.reader_num_gpus, p.max_restarts, context_parallel_spec(seen), p.placement_strategy,
                        p.learner if p.learner.enabled else None, p.reader_memory_mb)


def readers_and_learner(config: AppConfig, actors: StreamActors, source: KafkaDocumentSource,
                        ready_timeout_s: float) -> tuple[ReaderPool, Learner | None, dict[int, int]]:
    """The pool the processor reads through, the learner (None without one), partition -> reader."""
    p = config.processor
    names = actors.wait_ready(ready_timeout_s)
    log.info("readers ready: %s", ", ".join(names))
    readers, names, assignment = actors.assign(source.partitions)
    pool: ReaderPool = RayReaderPool(readers, names, hands_off=hands_off(p), status=actors.status)
    learner = None
    if p.learner.enabled:
        actor, name = actors.learner()
        learner = RayLearner(actor, name, p.learner.lag, p.learner.synchronous)
        if p.learner.synchronous:
            pool = SynchronousLearnerPool(actor, name, status=actors.status)
    return pool, learner, assignment


def durable_parts(config: AppConfig, source: KafkaDocumentSource, pool: ReaderPool, assignment: dict[int, int],
                  base: dict[str, Any], model_dir: Path, learner: Learner | None, running: ExitStack) -> DurableParts:
    p = config.processor
    admits = learner is not None and p.learner.admission.enabled
    if not p.checkpoint.enabled:
        return DurableParts(None, TenantKeys.unpersisted(config.stream.name),
                            admission=LearningAdmission(p.learner.admission) if admits else None)
    store = CheckpointStore(config.mlflow, config.stream.name)
    checkpointer = restore_from_checkpoint(config, store, source, pool, source.positions(), assignment, base, model_dir,
                                           learner)
    commands = CommandLedger.from_dict(checkpointer.commands_at_start)
    checkpointer.commands = commands.as_dict  # replay protection survives a restart
    parts = DurableParts(checkpointer, TenantKeys(store.registry.key_salt()))
    parts.control = running.enter_context(closing(ControlSource(config.kafka, p.control, config.stream.name, commands)))
    if admits:  # what it remembers, as the version left it
        parts.admission = LearningAdmission(p.learner.admission, checkpointer.admission_at_start)
        checkpointer.admission = parts.admission.as_dict
    if p.monitor.enabled:
        parts.monitor = DegradationMonitor(p.monitor, store.registry.metric(LAST_GOOD, REFERENCE_LOSS),
                                           chunk_tokens=checkpointer.model_config["ttt"]["chunk_size"])
    return parts


def observers(config: AppConfig, base: dict[str, Any], checkpointer: StreamCheckpointer | None,
              running: ExitStack) -> list[EventObserver]:
    """The Prometheus endpoint and the MLflow run of this ``ttt-stream run`` (each if enabled); the
    run ends FAILED if the stream stops on an error."""
    p, found = config.processor, []
    if p.metrics.enabled:
        metrics = running.enter_context(closing(StreamMetrics(config.stream.name)))
        metrics.serve(p.metrics.host, p.metrics.port)
        found.append(metrics)
    if config.mlflow.processor_runs:
        run_log = start_processor_run(config, base)
        running.push(lambda failed, *_: run_log.close(status="FAILED" if failed else "FINISHED"))
        if checkpointer is not None:
            checkpointer.store.parent_run = run_log
        found.append(run_log)
    return found


def run_until_stopped(processor: StreamProcessor, config: AppConfig, assignment: dict[int, int],
                      until_idle_s: float | None, stop_event: threading.Event | None) -> RunSummary:
    if stop_event is not None:
        processor.stop_event = stop_event
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # A signal stops reading; what is in flight finishes and is committed.
        previous = {sig: signal.signal(sig, lambda *_: processor.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = processor.run(until_idle_s=until_idle_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if processor.unread_partitions:
        raise PartitionsChanged(
            f"the documents topic {config.kafka.topics.documents} gained partitions "
            f"{processor.unread_partitions} while this run read {sorted(assignment)}; what was read is "
            "checkpointed and committed: start again to read every partition")
    return summary
