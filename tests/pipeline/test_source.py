"""KafkaDocumentSource against the embedded broker: an offset to resume from that the broker does
not hold (a recreated topic, a restarted in-memory broker) is refused or moved by
kafka.offset_reset, never read past silently."""

import json

import pytest

from pipeline.stream_io.source import KafkaDocumentSource, OffsetOutOfRange
from pipeline.stream_io.topics import ensure_topics
from tests.pipeline.test_stream_e2e import produce, stream_config

pytestmark = pytest.mark.stack


def source_with(config, reset: str) -> KafkaDocumentSource:
    return KafkaDocumentSource(config.kafka.model_copy(update={"offset_reset": reset}))


def test_an_offset_past_the_end_is_refused_or_moved_by_the_reset_policy(stack, tmp_path):
    config = stream_config(stack, tmp_path)
    ensure_topics(config.kafka)
    produce(config, [b'{"id": "a", "text": "x y"}'] * 3, partitions=[0, 0, 0])

    refusing = source_with(config, "error")
    try:
        assert refusing.seek({0: 3, 1: 0}) == {0: 3, 1: 0}  # the end itself is in range
        with pytest.raises(OffsetOutOfRange, match=r"partition 0: offset 40 to resume from is past the end "
                                                   r"\(the broker holds offsets 0 to 2\).*kafka\.offset_reset"):
            refusing.seek({0: 40})
    finally:
        refusing.close()
    for reset, want in (("earliest", 0), ("latest", 3)):
        moving = source_with(config, reset)
        try:
            assert moving.seek({0: 40, 1: 0}) == {0: want, 1: 0}
            assert moving.positions()[0] == want
            assert [r.offset for r in moving.poll(timeout_ms=3000, max_records=10) if r.partition == 0] == \
                list(range(want, 3))
        finally:
            moving.close()


@pytest.mark.slow
def test_a_restarted_in_memory_broker_under_a_kept_checkpoint_is_refused_then_read_from_earliest(
        stack, ray_session, tmp_path):
    """The embedded broker keeps records in memory: restarted, its topics start again at 0 while
    MLflow still holds the last checkpoint's offsets. Reading on from them would skip every new
    record with no error (seen: 2 documents fed, 0 read)."""
    from pipeline.config import LocalStackConfig
    from pipeline.processing.job import run_stream
    from pipeline.local.local_stack import LocalStack
    from tests.conftest import free_port
    from tests.pipeline.test_stream_e2e import short_documents

    port = free_port()
    local = LocalStack(LocalStackConfig(data_dir=tmp_path / "broker",
                                        broker=stack.local_stack.broker.model_copy(update={"port": port})))
    config = stream_config(stack, tmp_path, readers=1, base_loss_sample_rate=0.0)
    config = config.model_copy(update={"kafka": config.kafka.model_copy(
        update={"bootstrap_servers": f"127.0.0.1:{port}"})})
    docs = [json.dumps(d).encode() for d in short_documents(8, length=100)]
    try:
        local.up(skip=("mlflow",))
        ensure_topics(config.kafka)
        produce(config, docs[:6], partitions=[0] * 6)
        assert run_stream(config, until_idle_s=2.0).documents == 6  # checkpoint at offset 6

        local.down(skip=("mlflow",))
        local.up(skip=("mlflow",))
        ensure_topics(config.kafka)
        produce(config, docs[6:], partitions=[0, 0])  # offsets 0 and 1 of the new topic
        # the restarted broker made the topic anew (a new id): refused before any offset is tried
        with pytest.raises(OffsetOutOfRange, match=r"with id .*; the topic now has id .*deleted and created again"):
            run_stream(config, until_idle_s=2.0)
        earliest = config.model_copy(update={"kafka": config.kafka.model_copy(update={"offset_reset": "earliest"})})
        assert run_stream(earliest, until_idle_s=2.0).documents == 2
    finally:
        local.down()


@pytest.mark.slow
def test_a_topic_created_again_with_more_records_than_the_checkpoint_s_offset_is_not_read_from_that_offset(
        stack, ray_session, tmp_path):
    """Deleted and created again, a topic's offsets restart at 0: once it holds more records than
    the checkpoint's offset, that offset is in range yet names another record. The topic's id
    (recorded in the checkpoint) tells the two apart."""
    import time

    from kafka.admin import KafkaAdminClient

    from pipeline.state.checkpoint import LIVE, CheckpointStore
    from pipeline.processing.job import run_stream
    from tests.pipeline.test_stream_e2e import short_documents

    config = stream_config(stack, tmp_path, readers=1, base_loss_sample_rate=0.0)
    docs = [json.dumps(d).encode() for d in short_documents(8, length=100)]
    ensure_topics(config.kafka)
    produce(config, docs[:3], partitions=[0] * 3)
    assert run_stream(config, until_idle_s=2.0).documents == 3
    first_id = CheckpointStore(config.mlflow, config.stream.name).load(LIVE).manifest["offsets"]["topic_id"]
    assert first_id

    admin = KafkaAdminClient(bootstrap_servers=config.kafka.bootstrap_servers)
    try:
        admin.delete_topics([config.kafka.topics.documents])
    finally:
        admin.close()
    time.sleep(1.0)
    ensure_topics(config.kafka)
    produce(config, docs[3:], partitions=[0] * 5)  # offsets 0-4: the checkpoint's 3 is in range
    with pytest.raises(OffsetOutOfRange, match=r"deleted and created again"):
        run_stream(config, until_idle_s=2.0)
    earliest = config.model_copy(update={"kafka": config.kafka.model_copy(update={"offset_reset": "earliest"})})
    assert run_stream(earliest, until_idle_s=2.0).documents == 5  # all of the new topic, not its last 2
    live = CheckpointStore(config.mlflow, config.stream.name).load(LIVE).manifest["offsets"]
    assert live["topic_id"] != first_id and live["partitions"]["0"] == 5
