"""The learner's Ray actor tokenizes ahead, in a thread of its own, the documents it reads itself:
sent by the pools before the calls that read them (``prepare``), for the synchronous learner and
for the asynchronous one at lag 1 (at lag 2 and more its readers hand the ids on)."""

import pytest
import ray

from actors.call_types import DocumentTask
from actors.learner_actor import LearnerActor
from actors.ray_pool import RayLearner, SynchronousLearnerPool
from pipeline.processing.actor_specs import standalone_reader_spec
from tests.conftest import TINY_MODEL
from tests.sample_text import SAMPLE_TEXT

pytestmark = [pytest.mark.slow]

DOCS = [DocumentTask(f"d{i}", SAMPLE_TEXT[i * 1500 : (i + 1) * 1500], partition=0, offset=i) for i in range(4)]
SLOW = {"enabled": True, "lr": 3e-3, "layers": [-1]}


def learner_actor(tmp_path, name: str):
    spec = standalone_reader_spec(model_path=str(TINY_MODEL), device="cpu", spill_dir=str(tmp_path), slow=SLOW,
                                  scope="global", tokenize_ahead=True)
    return LearnerActor.options(num_cpus=0.5).remote(spec, 1, name)


def test_the_learner_actor_tokenizes_ahead_what_it_reads(ray_session, tmp_path):
    synchronous = learner_actor(tmp_path / "sync", "sync-learner")
    asynchronous = learner_actor(tmp_path / "async", "async-learner")
    try:
        pool = SynchronousLearnerPool(synchronous, "sync-learner")
        handles = pool.submit(0, DOCS)
        assert len(pool.wait(handles, timeout_s=300, every=True)) == len(DOCS)
        outcomes = [pool.result(h) for h in handles]
        assert all(o.ok and o.tokens > 0 for o in outcomes)
        learner = RayLearner(asynchronous, "async-learner", lag=1)
        for task in DOCS:
            learner.submit(task)
        assert learner.snapshot()  # in order after the learn calls: they are done
        stats = ray.get([a.stats.remote() for a in (synchronous, asynchronous)])
        assert [s["learned"] for s in stats] == [len(DOCS)] * 2
        # The prepare calls run in their own thread, ahead of the reads: the first may lose the
        # race with its read (then it is tokenized inline), not all of them.
        assert [s["tokenized_ahead"] >= 1 for s in stats] == [True, True], stats
    finally:
        for actor in (synchronous, asynchronous):
            ray.kill(actor)
