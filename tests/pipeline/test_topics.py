import pytest
from kafka import KafkaConsumer

from pipeline.config import KafkaConfig, TopicsConfig
from pipeline.stream_io.topics import ensure_topics, stream_topics

pytestmark = pytest.mark.stack


def test_ensure_topics_creates_missing_once_with_partitions(stack):
    kafka = KafkaConfig(
        bootstrap_servers=stack.kafka.bootstrap_servers,
        topics=TopicsConfig(documents="t1.docs", results="t1.results", metrics="t1.metrics",
                            alerts="t1.alerts", dead_letter="t1.dlq", control="t1.control", partitions=3),
    )
    assert sorted(ensure_topics(kafka)) == sorted(stream_topics(kafka))
    assert ensure_topics(kafka) == []
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    partitions = {t: consumer.partitions_for_topic(t) for t in ("t1.docs", "t1.results")}
    consumer.close()
    assert partitions == {"t1.docs": {0, 1, 2}, "t1.results": {0}}
