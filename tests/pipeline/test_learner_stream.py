"""The learner on the real stack: two readers read with the versions one learner trains, every
MLflow version holds one model that ``models:/<stream>-ttt@live`` loads with no choice to make,
and context parallelism reads with the slow weights, scoring what single readers score."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from safetensors.torch import load

from actors.call_types import GATE_KEY, PUBLISHED_KEY
from actors.state_store import GLOBAL_KEY
from pipeline.state.checkpoint import HEAD, LIVE, CheckpointStore
from pipeline.state.promotion import VERDICT_TAG
from pipeline.config import AdmissionConfig, ContextParallelConfig, LearnerConfig
from pipeline.processing.job import run_stream
from pipeline.stream_io.topics import ensure_topics
from tests.pipeline.test_stream_e2e import produce, read_topic, share_salt, short_documents, stream_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FIXED_SALT = "5" * 64


def learner_config(stack, tmp_path, **processor):
    settings = dict(scope="global", base_loss_sample_rate=0.0, learner=LearnerConfig(enabled=True, num_cpus=0.5),
                    checkpoint=stack.processor.checkpoint.model_copy(update={"every_documents": 6, "every_seconds": 3600.0}),
                    monitor=stack.processor.monitor.model_copy(update={"enabled": False}))
    return stream_config(stack, tmp_path, **{**settings, **processor})


def results(config, n):
    rows = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.results, expect=n)]
    return {r["id"]: r for r in rows}


def test_two_readers_read_one_learners_versions_and_a_version_is_one_model(stack, ray_session, tmp_path):
    import mlflow
    import pandas as pd

    assert stack.model.slow.enabled
    docs = short_documents(12, length=600)
    config = learner_config(stack, tmp_path, readers=2, reader_num_cpus=0.5)
    share_salt(config, salt=FIXED_SALT)  # the same held-out slice, so the same verdicts, every run
    ensure_topics(config.kafka)
    produce(config, [json.dumps(d).encode() for d in docs], partitions=[i % 2 for i in range(len(docs))])
    summary = run_stream(config, until_idle_s=3.0)
    assert summary.documents == len(docs) and summary.dead_letters == 0

    got = results(config, len(docs))
    assert set(got) == {d["id"] for d in docs}
    assert {r["reader"] for r in got.values()} == {f"{config.stream.name}-reader-{i}" for i in range(2)}
    ratios = sorted(r["slow_delta_ratio"] for r in got.values())
    assert ratios[0] == 0.0 and ratios[-1] > 0  # the first document reads the base, later ones what was learned
    # Every result says which version it read with and what the learner did with it.
    lag = config.processor.learner.lag  # document n reads version n + 1 - lag (2: beside the learner of n - 1)
    assert lag == 2 and sorted(r["slow_version"] for r in got.values()) == [max(0, n + 1 - lag) for n in range(len(docs))]
    decisions = [r["learning"] for r in got.values()]
    assert set(decisions) <= {"admitted", "held out"} and decisions.count("admitted") >= len(docs) // 2

    store = CheckpointStore(config.mlflow, config.stream.name)
    live = store.load(LIVE)
    assert store.registry.resolve(HEAD) == live.version  # every version of this stream passed the gate
    learner = f"{config.stream.name}-learner"
    assert {name: [b.key for b in blobs] for name, blobs in live.states.items()} == {
        f"{config.stream.name}-reader-0": [], f"{config.stream.name}-reader-1": [],
        learner: [GLOBAL_KEY, PUBLISHED_KEY, GATE_KEY]}
    (state,) = [b for b in live.states[learner] if b.key == GLOBAL_KEY]
    assert state.documents == decisions.count("admitted")  # held-out documents are never learned
    for row in store.registry.versions():
        tags = row["tags"]
        assert tags[VERDICT_TAG] == "promoted" and len(tags["ttt.slow_digest"]) == 64, tags
        assert float(tags["ttt.forgetting"]) < 0.02 and row["metrics"]["gate.promoted"] == 1.0
    assert any(k.startswith("slow.") and k.endswith(".B") and t.any() for k, t in load(state.data).items())
    # The learner learned every admitted document from the hidden states its reader handed on.
    status = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.metrics, expect=1)]
    final = [s for s in status if s.get("final")][-1]
    assert final["learner"]["handed"] == decisions.count("admitted") and final["learner"]["handoffs_missed"] == 0

    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    mlflow.set_registry_uri(config.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{store.name}@{LIVE}")  # no reader or key to choose
    text = docs[0]["text"]
    scored = model.predict(pd.DataFrame({"text": [text]}))["loss"][0]
    # The live version scores a text the way the stream's next document would read it: with the
    # learner's weights after every document, the ones a reader would be given next.
    assert 0 < scored < got[docs[0]["id"]]["loss"]


def test_the_synchronous_learner_reads_and_learns_every_document_and_judges_its_versions(stack, ray_session, tmp_path):
    """The embedded default: no readers; the learner reads each document and learns from it in
    one forward, and scores it as a reader that learns itself would."""
    from actors.document_reader import DocumentReader
    from actors.call_types import DocumentTask
    from pipeline.processing.actor_specs import reader_spec, as_actors_see_it

    docs = short_documents(10, length=600)
    config = learner_config(stack, tmp_path, readers=1, base_loss_sample_rate=0.3,
                            # No outlier rule: the reference reader below has none.
                            learner=LearnerConfig(enabled=True, synchronous=True, num_cpus=1,
                                                  admission=AdmissionConfig(enabled=False)),
                            checkpoint=stack.processor.checkpoint.model_copy(update={"every_documents": 5,
                                                                                      "every_seconds": 3600.0}))
    share_salt(config, salt=FIXED_SALT)
    ensure_topics(config.kafka)
    produce(config, [json.dumps(d).encode() for d in docs], partitions=[0] * len(docs))
    summary = run_stream(config, until_idle_s=3.0)
    assert summary.documents == len(docs) and summary.dead_letters == 0
    got = results(config, len(docs))
    learner = f"{config.stream.name}-learner"
    assert {r["reader"] for r in got.values()} == {learner}
    assert [got[d["id"]]["slow_version"] for d in docs] == list(range(len(docs)))  # document n: n learned before
    decisions = [got[d["id"]]["learning"] for d in docs]
    assert "admitted" in decisions and any(r["base_loss"] is not None for r in got.values())  # the shadow too

    # Its scores are a self-learning reader's, a document it does not learn read without a step.
    spec = replace(reader_spec(as_actors_see_it(config)), slow_from_learner=False, split_at_adapters=False)
    reader = DocumentReader(spec, "sync")
    for doc, decision in zip(docs, decisions):
        reader.slow.admit = None if decision == "admitted" else (lambda loss: False)
        want = reader.process(DocumentTask(doc["id"], doc["text"], shadow=False)).loss
        assert got[doc["id"]]["loss"] == pytest.approx(want, rel=1e-4), (doc["id"], decision)

    store = CheckpointStore(config.mlflow, config.stream.name)
    tags = [row["tags"] for row in store.registry.versions()]
    assert {t[VERDICT_TAG] for t in tags} == {"promoted"} and len(tags) >= 2  # judged at 5 and at 10
    assert {t["ttt.version_lag"] for t in tags} == {"1"}  # document n read with all before it learned
    assert {name: [b.key for b in blobs] for name, blobs in store.load(LIVE).states.items()} == {
        learner: [GLOBAL_KEY, PUBLISHED_KEY, GATE_KEY]}


def test_context_parallel_reads_with_the_learners_versions(stack, ray_session, tmp_path):
    docs = [d for pair in zip(short_documents(4, length=150), short_documents(4, length=2600)) for d in pair]
    for i, d in enumerate(docs):
        d["id"] = f"doc-{i:02d}"
    values = [json.dumps(d).encode() for d in docs]

    reference = learner_config(stack, tmp_path / "ref", readers=1)
    config = learner_config(stack, tmp_path / "cp", readers=1,
                            context_parallel=ContextParallelConfig(min_tokens=600, world=2, num_cpus=0.25))
    share_salt(reference, config)  # the same held-out slice: the learner learns the same documents
    ensure_topics(reference.kafka)
    produce(reference, values, partitions=[0] * len(values))
    run_stream(reference, until_idle_s=3.0)
    want = results(reference, len(docs))

    ensure_topics(config.kafka)
    produce(config, values, partitions=[0] * len(values))
    summary = run_stream(config, until_idle_s=3.0)
    assert summary.dead_letters == 0
    got = results(config, len(docs))
    long_ids = {i for i, r in got.items() if r["tokens"] >= 600}
    assert len(long_ids) >= 3
    assert max(got[i]["slow_delta_ratio"] for i in long_ids) > 0  # read with slow weights that moved
    for doc_id, row in got.items():
        assert row["loss"] == pytest.approx(want[doc_id]["loss"], rel=1e-4), doc_id
    status = [json.loads(r.value) for r in read_topic(config, config.kafka.topics.metrics, expect=1)]
    final = [s for s in status if s.get("final")][-1]
    assert final["readers"][0]["parallel_windows"] >= len(long_ids)
    assert final["learner"]["position"] == len(docs)
