"""The broker as an admin sees it: whether it answers, and the stream's topics created when missing."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import KafkaConfig

log = logging.getLogger(__name__)


def stream_topics(config: KafkaConfig) -> list[str]:
    """Every topic the stream processor reads or writes, documents first."""
    t = config.topics
    return [t.documents, t.results, t.metrics, t.alerts, t.dead_letter, t.control]


def ensure_topics(config: KafkaConfig) -> list[str]:
    """Create the stream's topics that do not exist yet; return the names it created."""
    from kafka.admin import KafkaAdminClient, NewTopic  # here: the CLI imports this module for every command
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=config.bootstrap_servers, **config.client_settings())
    try:
        existing = set(admin.list_topics())
        missing = [name for name in stream_topics(config) if name not in existing]
        created = []
        for name in missing:
            # The documents topic is partitioned so that readers can share it; the rest are
            # outputs and control, read in order by one consumer.
            partitions = config.topics.partitions if name == config.topics.documents else 1
            try:
                topics = config.topics
                settings = ({"min.insync.replicas": str(topics.min_insync_replicas)}
                            if topics.min_insync_replicas is not None else {})
                admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=topics.replication_factor,
                                              topic_configs=settings)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics: %s", ", ".join(created))
        documents = config.topics.documents
        if documents not in created:
            (described,) = admin.describe_topics([documents])
            count = len(described.get("partitions") or [])
            if count != config.topics.partitions:
                # A producer's metadata request can create a missing topic with the broker's
                # default count (4 on the embedded broker). The processor reads every partition
                # there is, so nothing is lost; the config's count is simply not what it is.
                log.warning("topic %s has %d partitions, kafka.topics.partitions says %d: all %d are read",
                            documents, count, config.topics.partitions, count)
        return created
    finally:
        admin.close()


def broker_answers(bootstrap_servers: str, timeout_s: float = 5.0, client: dict[str, Any] | None = None) -> bool:
    """True if a Kafka-protocol broker answers a metadata request (``client``: kafka-python
    settings such as SASL_SSL's, as ``KafkaConfig.client_settings`` gives them)."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap_servers,
            **{**(client or {}), "request_timeout_ms": int(timeout_s * 1000)},
        )
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()
